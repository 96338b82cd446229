"""DPO (hunyuan_jax/train/dpo.py, dpo_data.py) on the tiny config (CPU): the loss of the real train
step (two micro-batches, SFT term, MoE auxiliary loss) equals a numpy float64 evaluation of the
formula on the model's own logits; a short run on 4 pairs starts at margin 0 (the reference is
the initial model), reaches accuracy 1.0 with a growing reward margin, and resumes exactly
(the stored reference log-probabilities read back); a damaged reference file is exit 4 and
changed preference data exit 3; bad records are refused with exit 3 naming file:line, pairs
whose chosen reply equals the rejected one named in a warning (exit 3 when no pair differs);
the response-only loss mask.

Compile time dominates: the shared persistent compilation cache (tests/helpers/jax_cache.py)
makes the run's step (compiled first by the loss test) and the resumed runs' compiles cache hits.
"""

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hunyuan_jax.errors import CheckpointError, DataError
from hunyuan_jax.train.config import load_configs
from hunyuan_jax.train.dpo_data import encode_reply, read_pairs
from tests.helpers.jax_cache import persistent_compilation_cache

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "configs" / "tiny.yaml"
EPS32 = float(np.finfo(np.float32).eps)

PAIRS = [
    {
        "prompt": "What is the capital of France?",
        "chosen": "Paris.",
        "rejected": "London, I think.",
    },
    {"prompt": "Say hello politely.", "chosen": "Hello, nice to meet you.", "rejected": "Go away."},
    {
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "2+2?"},
        ],
        "chosen": "4",
        "rejected": "Twenty two, obviously.",
    },
    {
        "messages": [
            {"role": "user", "content": "Name a colour."},
            {"role": "assistant", "content": "Blue."},
            {"role": "user", "content": "Another one?"},
        ],
        "chosen": "Green.",
        "rejected": "No.",
    },
]

# One device, 4 pairs per step (8 rows) in 2 micro-batches, no dropout; capacity factor 8 =
# experts / top_k: no token is re-routed, so the step's forward is the dropless forward the
# reference log-probabilities are taken with (margin 0 at the first step).
BASE = [
    "objective=dpo",
    "mesh=data=1,fsdp=1,expert=1,tensor=1",
    "rules=fsdp",
    "batch_size=8",
    "micro_batches=2",
    "seq_len=48",
    "steps=16",
    "lr=3e-3",
    "warmup_steps=2",
    "save_every=8",
    "log_every=8",
    "model.num_layers=2",
    "dpo.beta=0.3",
    "dpo.sft_weight=0.5",
    "aux_loss_coef=0.01",
    "runtime.capacity_factor=8.0",
]
BETA, SFT_WEIGHT, AUX = 0.3, 0.5, 0.01


@pytest.fixture(scope="module", autouse=True)
def compilation_cache():
    with persistent_compilation_cache():
        yield


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("dpo") / "pairs.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    return path


def _metrics(run):
    return [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]


def _train(run, data, *extra):
    from hunyuan_jax.train.loop import train

    mcfg, policy, tcfg = load_configs(TINY, [*BASE, f"data={data}", f"run_dir={run}", *extra])
    return train(mcfg, policy, tcfg, log=lambda *_: None)


# ----------------------------------------------------------------------------- the loss
def test_step_loss_equals_numpy_formula():
    """TrainStep(objective dpo) metrics on a fixed batch = numpy float64 of the formula on the
    same model's logits (same step keys), accumulated over 2 micro-batches with different
    chosen token counts (the SFT term token-weighted, DPO and aux averaged). The run's own
    configuration: its compiled step is reused from the cache."""
    from hunyuan_jax.data.corpus import to_global
    from hunyuan_jax.model.state import init_model
    from hunyuan_jax.train.step import TrainStep
    from sharding.plan import ShardingPlan

    beta, sft_w, aux_c = BETA, SFT_WEIGHT, AUX
    mcfg, policy, tcfg = load_configs(TINY, BASE)
    plan = ShardingPlan.create(tcfg.mesh, tcfg.rules)  # as train_loop does
    step = TrainStep(mcfg, policy, tcfg, plan)
    m, r, s = 2, 4, 48  # [micro, rows, seq]
    rng = np.random.default_rng(0)
    mask = np.zeros((m, r, s), np.float32)
    for i in range(m):
        for j in range(r):
            lo, hi = rng.integers(2, 20), rng.integers(24, s)
            mask[i, j, lo:hi] = 1.0
    batch = {
        "inputs": rng.integers(0, mcfg.vocab_size, (m, r, s)).astype(np.int32),
        "targets": rng.integers(0, mcfg.vocab_size, (m, r, s)).astype(np.int32),
        "positions": np.broadcast_to(np.arange(s, dtype=np.int32), (m, r, s)).copy(),
        "segment_ids": np.ones((m, r, s), np.int32),
        "loss_mask": mask,
        "ref_logp": np.zeros((m, r, s), np.float32),
    }
    batch["ref_logp"][..., 0] = rng.normal(-150.0, 5.0, (m, r))
    model = init_model(mcfg, policy, plan, 0)
    key = jax.random.fold_in(jax.random.key(tcfg.seed), 0)  # the step's key at step 0
    graphdef, params = nnx.split(model)

    @jax.jit
    def logits_fn(params, inputs, positions, segment_ids, k):
        logits, stats, _ = nnx.merge(graphdef, params)(
            inputs, positions, segment_ids, phase="train", key=k
        )
        return logits, jnp.mean(stats["aux_loss"])

    nll, aux, max_logz = [], [], 0.0
    for i in range(m):
        logits, aux_i = logits_fn(
            params, batch["inputs"][i], batch["positions"][i], batch["segment_ids"][i],
            jax.random.fold_in(key, i),
        )  # fmt: skip
        lg = np.asarray(logits, np.float64)
        logz = np.log(np.sum(np.exp(lg - lg.max(-1, keepdims=True)), -1)) + lg.max(-1)
        tok = np.take_along_axis(lg, batch["targets"][i][..., None], -1)[..., 0]
        nll.append(np.sum((logz - tok) * mask[i], -1))
        aux.append(float(aux_i))
        max_logz = max(max_logz, float(np.abs(logz).max()))
    nll = np.concatenate(nll)  # rows in batch order: chosen, rejected, chosen, ...
    ref = batch["ref_logp"].sum(-1).reshape(-1)
    logp = -nll
    margin = beta * ((logp[0::2] - ref[0::2]) - (logp[1::2] - ref[1::2]))
    dpo = np.mean(np.log1p(np.exp(-margin)))
    chosen_tokens = mask.reshape(-1, s)[0::2].sum()
    sft = sft_w * nll[0::2].sum() / chosen_tokens
    want = dpo + sft + aux_c * np.mean(aux)

    state = step.init_state(model)
    _, got = step(state, to_global(batch, step.batch_sharding, m * r))  # as train_loop does
    got = jax.device_get(got)
    # float32 log-softmax: each token's log-prob is off by <= ~|logZ| * eps; a row sums <= s.
    tol_logp = 4 * s * max_logz * EPS32
    tol = beta * 2 * tol_logp  # margins and the loss (|d/dx log(1 + e^-x)| <= 1)
    np.testing.assert_allclose(got["dpo/chosen_logp"], logp[0::2].mean(), atol=tol_logp)
    np.testing.assert_allclose(got["dpo/rejected_logp"], logp[1::2].mean(), atol=tol_logp)
    np.testing.assert_allclose(got["dpo/reward_margin"], margin.mean(), atol=tol)
    np.testing.assert_allclose(got["dpo/accuracy"], np.mean(margin > 0))
    np.testing.assert_allclose(got["dpo/loss"], dpo, atol=tol)
    np.testing.assert_allclose(got["tokens"], chosen_tokens)
    np.testing.assert_allclose(got["ce_loss"], sft, atol=sft_w * tol_logp / 8)
    np.testing.assert_allclose(got["loss"], want, atol=tol + sft_w * tol_logp / 8)
    assert 0 < np.mean(margin > 0) < 1 and sft > 1.0  # the case is not degenerate


def test_chunked_row_nll_equals_whole():
    """`row_nll` with runtime.loss_chunk (the sequence in chunks, logits never whole) equals
    the whole-sequence sums (float32: the same per-token values, summed in another order)."""
    from hunyuan_jax.train.losses import row_nll

    rng = np.random.default_rng(1)
    hidden = jnp.asarray(rng.normal(size=(3, 21, 8)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(8, 50)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 50, (3, 21)), jnp.int32)
    mask = jnp.asarray(rng.random((3, 21)) < 0.6, jnp.float32)
    whole = row_nll(hidden @ w, targets, mask)
    chunked = row_nll(hidden, targets, mask, lambda h: h @ w, chunk=8)  # 21 = 8 + 8 + 5 (pad)
    np.testing.assert_allclose(chunked, whole, rtol=21 * EPS32 * 4)
    assert float(jnp.min(whole)) > 1.0


# ----------------------------------------------------------------------------- a run
@pytest.fixture(scope="module")
def run(tmp_path_factory, data):
    run = tmp_path_factory.mktemp("dpo") / "run"
    summary = _train(run, data)
    return run, summary


def test_run_learns_the_preferences(run):
    """Step 1: margin 0 and loss log 2 (the reference is the initial model); then accuracy 1.0
    and a reward margin that grows; chosen log-probs rise relative to the rejected ones."""
    m = _metrics(run[0])
    assert [r["step"] for r in m] == list(range(1, 17))
    first, last = m[0], m[-1]
    # the same forward twice in float32 (different batching: reference vs step)
    assert abs(first["dpo/reward_margin"]) < 1e-4, first
    assert abs(first["dpo/loss"] - np.log(2.0)) < 1e-4
    assert last["dpo/accuracy"] == 1.0
    assert last["dpo/reward_margin"] > 1.0, last
    margins = [r["dpo/reward_margin"] for r in m]
    assert margins[-1] > margins[len(m) // 2] > margins[0]
    assert last["dpo/loss"] < 0.5 * first["dpo/loss"]
    ref = np.load(run[0] / "dpo_reference" / "process-0.npz")["logp"]
    assert ref.shape == (4, 2) and np.all(ref < 0)


def test_resume_is_exact(run, data, tmp_path):
    """Stopped at step 8 and resumed (reference read back, not recomputed): the same metrics."""
    other = tmp_path / "resumed"
    _train(other, data, "stop_at=8")
    ref = (other / "dpo_reference" / "process-0.npz").read_bytes()
    _train(other, data)
    assert (other / "dpo_reference" / "process-0.npz").read_bytes() == ref
    a, b = _metrics(run[0]), _metrics(other)
    for key in ("loss", "dpo/reward_margin", "dpo/chosen_logp", "grad_norm"):
        assert [r[key] for r in a] == [r[key] for r in b], key


def test_damaged_reference_or_changed_data_refused(run, data, tmp_path):
    """Resuming with a reference file that fails its checksum: CheckpointError (exit 4);
    with preference data that changed since: DataError (exit 3)."""
    copy = tmp_path / "copy"
    shutil.copytree(run[0], copy)
    npz = copy / "dpo_reference" / "process-0.npz"
    blob = bytearray(npz.read_bytes())
    blob[-40] ^= 1
    npz.write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match="checksum") as e:
        _train(copy, data, "steps=20")
    assert e.value.exit_code == 4
    shutil.rmtree(copy)
    shutil.copytree(run[0], copy)
    changed = tmp_path / "changed.jsonl"
    rows = [dict(p) for p in PAIRS]
    rows[0]["chosen"] = "Paris, of course."
    changed.write_text("".join(json.dumps(p) + "\n" for p in rows))
    with pytest.raises(DataError, match="differ from those") as e:
        _train(copy, changed, "steps=20")
    assert e.value.exit_code == 3


# ----------------------------------------------------------------------------- data
BAD = [
    ('{"prompt": "q", "chosen": "a"}', "no 'rejected' field"),
    ('{"prompt": "q", "chosen": "a", "rejected": 3}', "'rejected' must be a string"),
    ('{"chosen": "a", "rejected": "b"}', "exactly one of 'prompt' or 'messages'"),
    ('{"prompt": "q", "chosen": " ", "rejected": "b"}', "'chosen' is empty"),
    (
        '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "x"}],'
        ' "chosen": "a", "rejected": "b"}',
        "must end with a user message",
    ),
    ('{"messages": [{"role": "bot", "content": "q"}], "chosen": "a", "rejected": "b"}', "role"),
    ('{"prompt": "q", "chosen": "a", "rejected": "b"', "invalid JSON"),
    ("[1, 2]", "expected a JSON object"),
]


@pytest.mark.parametrize("line,why", BAD)
def test_bad_records_named_by_file_and_line(tmp_path, line, why):
    f = tmp_path / "prefs.jsonl"
    f.write_text(json.dumps(PAIRS[0]) + "\n\n" + line + "\n")
    with pytest.raises(DataError, match=why) as e:
        read_pairs(str(f))
    assert str(e.value).startswith(f"{f}:3:"), str(e.value)


def test_train_cli_exit_3_on_a_bad_record(tmp_path, capsys):
    from hunyuan_jax.cli import train as train_cli

    f = tmp_path / "prefs.jsonl"
    f.write_text(json.dumps(PAIRS[0]) + "\n" + '{"prompt": "q"}\n')
    rc = train_cli.main(
        ["--config", str(TINY), *[f"--set={o}" for o in BASE], f"--set=data={f}",
         f"--run-dir={tmp_path / 'run'}"]
    )  # fmt: skip
    assert rc == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"train.py: error: {f}:2: no 'chosen' field"], err


def test_identical_pairs_warned_and_refused_when_none_differs(tmp_path, capsys):
    """chosen == rejected teaches nothing (margin 0, DPO gradient 0): some such pairs are one
    warning line naming them (file:line); all of them is exit 3 (it trained to the end with
    accuracy 0 and no word)."""
    from hunyuan_jax.cli import train as train_cli

    f = tmp_path / "prefs.jsonl"
    same = [dict(p, rejected=p["chosen"]) for p in PAIRS]
    f.write_text("\n".join(json.dumps(p) for p in [PAIRS[0], same[1], PAIRS[2], same[3]]) + "\n")
    said = []
    assert len(read_pairs(str(f), log=said.append)) == 4
    assert said == [
        f"[data] warning: 2 of 4 preference pairs have 'chosen' equal to 'rejected' (nothing "
        f"to learn from them): {f}:2, {f}:4"
    ], said
    f.write_text("\n".join(json.dumps(p) for p in same) + "\n")
    rc = train_cli.main(
        ["--config", str(TINY), *[f"--set={o}" for o in BASE], f"--set=data={f}",
         f"--run-dir={tmp_path / 'run'}"]
    )  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 3 and len(err) == 1, err
    assert err[0] == (
        f"train.py: error: {f}: 'chosen' equals 'rejected' in every preference pair (4: "
        f"{f}:1, {f}:2, {f}:3 and 1 more): there is no preference to learn"
    ), err


@pytest.fixture(scope="module")
def sp_tok(data, tmp_path_factory):
    from hunyuan_jax.data.tokenizer import SentencePieceTokenizer, render_chat

    pairs = read_pairs(str(data))
    texts = [render_chat(p.conversation(r)) for p in pairs for r in (p.chosen, p.rejected)]
    return SentencePieceTokenizer.train(texts, tmp_path_factory.mktemp("sp") / "t", 400)


def test_loss_mask_covers_the_last_reply_only(data, sp_tok):
    """The mask is 1 exactly on the tokens of the final assistant reply (its text and the
    closing <|eos|>), not on the prompt or an earlier assistant turn."""
    tok = sp_tok
    pairs = read_pairs(str(data))
    p = pairs[3]  # has an earlier assistant turn "Blue."
    ids, w = encode_reply(tok, p, p.chosen)
    masked = tok.decode([i for i, x in zip(ids, w) if x])
    assert masked == "Green.<|eos|>", masked
    assert "Blue." in tok.decode(ids)


def test_pairs_longer_than_seq_len_are_dropped(data, sp_tok):
    """A pair whose chosen or rejected conversation does not fit in seq_len + 1 tokens is
    dropped and counted; rows hold chosen then rejected; none fitting is a DataError."""
    from hunyuan_jax.train.dpo_data import encode_pairs

    pairs = read_pairs(str(data))
    lengths = [
        max(len(encode_reply(sp_tok, p, r)[0]) for r in (p.chosen, p.rejected)) for p in pairs
    ]
    cut = sorted(lengths)[1]  # the two shortest fit (ties aside)
    enc = encode_pairs(sp_tok, pairs, cut - 1)
    kept = [i for i, n in enumerate(lengths) if n - 1 <= cut - 1]
    assert enc.num_pairs == len(kept) and enc.dropped == len(pairs) - len(kept) > 0
    assert enc.sources == [pairs[i].source for i in kept]
    ids, _ = encode_reply(sp_tok, pairs[kept[0]], pairs[kept[0]].rejected)
    np.testing.assert_array_equal(enc.rows[1][0], ids[:-1])  # row 1 = the rejected reply
    with pytest.raises(DataError, match="no preference pair fits in seq_len=4"):
        encode_pairs(sp_tok, pairs, 4)


def test_config_keys():
    """train.objective / train.dpo: YAML-style nested keys and --set dpo.K=V (merged), and
    one-line ConfigErrors naming the key."""
    from hunyuan_jax.errors import ConfigError
    from hunyuan_jax.train.config import TrainConfig

    _, _, t = load_configs(TINY, ["objective=dpo", "dpo.beta=0.5"])
    assert (t.objective, t.dpo.beta, t.dpo.sft_weight) == ("dpo", 0.5, 0.0)
    assert TrainConfig.from_dict(t.to_dict()) == t  # what <run>/config.yaml round-trips
    t = TrainConfig.from_dict({"dpo": {"sft_weight": 1}})
    assert (t.objective, t.dpo.beta, t.dpo.sft_weight) == ("sft", 0.1, 1.0)
    for bad, why in [
        (["dpo.beta=0"], "'dpo.beta' must be positive"),
        (["dpo.sft_weight=-1"], "'dpo.sft_weight' must be >= 0"),
        (["dpo.gamma=1"], r"unknown train key\(s\) \['dpo.gamma'\]"),
        (["objective=ppo"], "'objective' must be one of"),
        (["objective=dpo", "batch_size=6", "micro_batches=2"], "must be even"),
    ]:
        with pytest.raises(ConfigError, match=why):
            load_configs(TINY, bad)
