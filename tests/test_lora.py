"""LoRA (`hunyuan_jax.model.lora`, the LoRA path of `train_step.TrainStep` and `train_loop`) on the
tiny config, CPU: a step trains only the adapters (optimizer state for them alone, the frozen
base untouched); merging folds the adapters into the base with the same logits (float and int8
bases); 8 simulated devices with expert parallelism give the one-device losses; a LoRA run
checkpoints only the adapters plus a base pointer, resumes exactly, and refuses a changed base;
a run's adapters load beside their base (`from_checkpoint.load(adapter=...)`, what infer.py and the
server's --adapter use) and `convert merge-lora`'s run directory gives the same logits.
"""

import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hunyuan_jax.checkpoints import loading, lora_base, runs
from hunyuan_jax.cli import serve as serve_main
from hunyuan_jax.cli.convert import main as convert_main
from hunyuan_jax.decode import from_checkpoint
from hunyuan_jax.errors import CheckpointError, ConfigError
from hunyuan_jax.model import lora
from hunyuan_jax.model.policy import RuntimePolicy
from hunyuan_jax.model.state import init_model
from hunyuan_jax.train.config import load_configs
from hunyuan_jax.train.loop import train
from hunyuan_jax.train.step import TrainStep
from sharding.plan import ShardingPlan
from tests.helpers.jax_cache import persistent_compilation_cache

TINY = Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml"
HY_TINY = (
    Path(__file__).resolve().parents[1] / "hunyuan_jax" / "assets" / "hy_tiny" / "hf_st"
)  # the LoRA runs' base
EPS32 = float(np.finfo(np.float32).eps)
SMALL = [
    "batch_size=16",
    "seq_len=32",
    "micro_batches=2",
    "lr=1e-2",
    "warmup_steps=1",
    "lora={rank: 4, alpha: 8}",
    "runtime.capacity_factor=8.0",  # = experts: no re-routing, so meshes agree exactly
]
EVERY = "lora={rank: 4, alpha: 8, targets: [q_proj, k_proj, v_proj, o_proj, shared, experts]}"
ONE = ["mesh=data=1,fsdp=1,expert=1,tensor=1", "rules=fsdp"]
EP8 = ["mesh=data=2,fsdp=1,expert=4,tensor=1", "rules=fsdp_ep"]


@pytest.fixture(scope="module", autouse=True)
def compilation_cache():
    with persistent_compilation_cache():
        yield


def _batch(cfg, seed=0, shape=(2, 8, 32)):
    tok = np.random.default_rng(seed).integers(0, cfg.vocab_size, shape).astype(np.int32)
    pos = np.broadcast_to(np.arange(shape[-1], dtype=np.int32), shape)
    return {
        "inputs": tok,
        "targets": np.roll(tok, -1, -1),
        "positions": np.array(pos),
        "segment_ids": np.ones(shape, np.int32),
        "loss_mask": np.ones(shape, np.float32),
    }


def _step(mesh, *extra):
    mcfg, policy, tcfg = load_configs(TINY, SMALL + mesh + list(extra))
    plan = ShardingPlan.create(tcfg.mesh, tcfg.rules)
    step = TrainStep(mcfg, policy, tcfg, plan)
    model = init_model(mcfg, lora.base_policy(policy), plan, 0)
    base = jax.tree.map(np.asarray, nnx.state(model))
    lora.add_adapters(model, tcfg.lora, jax.random.key(1), plan)
    return mcfg, step, step.init_state(model), base


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_config():
    _, _, tcfg = load_configs(TINY, ["lora=true"])
    assert tcfg.lora == lora.LoraConfig() and tcfg.lora.scale == 2.0
    assert tcfg.lora.targets == ("q_proj", "k_proj", "v_proj", "o_proj")
    assert load_configs(TINY)[2].lora is None
    assert load_configs(TINY, ["lora.rank=16"])[2].lora == lora.LoraConfig(rank=16)
    for bad in ("lora={rank: 0}", "lora={targets: [mlp]}", "lora={ranks: 4}", "lora=3"):
        with pytest.raises(ConfigError, match="lora"):
            load_configs(TINY, [bad])


def test_step_trains_only_the_adapters():
    """State, gradients and optimizer moments exist only for the adapters; the base (bf16
    matmul weights) is the step's frozen input and comes out bit-identical; B (zero at first)
    moves, so the adapted model differs from the base."""
    mcfg, step, state, base = _step(ONE, EVERY)  # the one-device step of the EP test
    names = {type(v).__name__ for _, v in nnx.to_flat_state(state.params)}
    assert names == {"LoRAParam"}
    n_adapter = sum(x.size for x in jax.tree.leaves(state.params))
    n_moments = sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim > 0)
    assert n_moments == 2 * n_adapter  # Adam's mu and nu for the adapters, nothing else
    frozen = nnx.to_flat_state(step.frozen)
    bf16 = [p for p, v in frozen if p[-1] in ("q_proj", "gate_proj") and v.dtype == jnp.bfloat16]
    assert bf16, "the base's matmul weights are held in bfloat16"
    before = _leaves(state.params)
    for _ in range(2):
        state, metrics = step(state, _batch(mcfg))
        assert bool(metrics["ok"])
    for (path, v), want in zip(frozen, jax.tree.leaves(base)):
        np.testing.assert_array_equal(np.asarray(v.get_value()), want.astype(v.dtype), str(path))
    after = dict(nnx.to_flat_state(state.params))
    moved = [p for p, v in after.items() if p[-1].endswith("_lora_b")]
    assert moved and all(np.abs(np.asarray(after[p].get_value())).max() > 0 for p in moved)
    assert any(not np.array_equal(a, b) for a, b in zip(before, _leaves(state.params)))


@pytest.mark.parametrize("form", ["auto", "int8"])
def test_merge_equals_base_plus_adapter(form):
    """Logits of base + adapters (every target: attention, shared and routed experts; a float32
    or int8 base) equal those of the merged float32 model. The two differ only in float32
    rounding order (x W + s (x A) B vs x (W + s A B)): a few ulps per matmul of <= 128 terms,
    over 6 layers; bound 64 eps * max|logit|."""
    mcfg, _, _ = load_configs(TINY)
    model = init_model(mcfg, RuntimePolicy.inference("float32").replace(weights=form), None, 0)
    lora.add_adapters(model, lora.LoraConfig(rank=4, targets=lora.TARGETS), jax.random.key(1))
    for i, (_, module, name) in enumerate(lora.adapted(model)):
        b = getattr(module, name + "_lora_b")
        b.set_value(0.05 * jax.random.normal(jax.random.key(i), b.shape))
    tokens = jax.random.randint(jax.random.key(2), (2, 24), 0, mcfg.vocab_size)
    forward = nnx.jit(lambda m, t: m(t)[0])
    adapted = forward(model, tokens)
    w0 = lora.quantize.dequantize(model.groups.layers[0].attn.q_proj[...])
    merged = forward(lora.merge_adapters(model), tokens)
    assert not list(lora.adapted(model))
    err = float(jnp.max(jnp.abs(adapted - merged)))
    assert err <= 64 * EPS32 * float(jnp.max(jnp.abs(adapted))), err
    # The adapters matter: the merged weights differ from the base by far more than that.
    w1 = model.groups.layers[0].attn.q_proj[...]
    assert float(jnp.max(jnp.abs(w1 - w0))) > 1e-3


def test_expert_parallel_matches_one_device():
    """data=2 x expert=4 (fsdp_ep, all-to-all dispatch; the routed experts' adapters enter the
    shard_map beside their weights) vs one device: the same losses and adapters over 2 LoRA
    steps on every target (float32 compute; summation order differs across devices)."""
    runs = {}
    for name, mesh in (("one", ONE), ("ep8", EP8)):
        mcfg, step, state, _ = _step(mesh, EVERY)
        losses = []
        for i in range(2):
            state, metrics = step(state, _batch(mcfg, seed=i))
            losses.append(float(metrics["loss"]))
        runs[name] = losses, _leaves(state.params)
    np.testing.assert_allclose(runs["ep8"][0], runs["one"][0], rtol=2e-5)
    # Adam divides by sqrt(v): an element whose gradient is ~0 can move by up to lr (1e-2) per
    # step either way on a 1e-7 difference in summation order; all others agree.
    off = total = 0
    for a, b in zip(runs["ep8"][1], runs["one"][1]):
        diff = np.abs(a - b)
        assert diff.max() < 2 * 1e-2
        off, total = off + int(np.sum(diff > 5e-5)), total + diff.size
    assert off <= 1e-3 * total, (off, total)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from hunyuan_jax.data.corpus import embedded_corpus, texts_for_tokenizer
    from hunyuan_jax.data.tokenizer import SentencePieceTokenizer

    texts = texts_for_tokenizer(embedded_corpus(100_000), "text", 100_000)
    path = tmp_path_factory.mktemp("lora_sp") / "tokenizer"
    return str(SentencePieceTokenizer.train(texts, path, 1024).path)


def test_adapter_dropout():
    """In training (a key), the adapter path reads x with dropout (kept entries scaled by
    1 / (1 - rate)); without a key it reads x itself. The base path never drops."""
    from hunyuan_jax.model import qops

    k = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(k[0], (2, 64, 16))
    w = jax.random.normal(k[1], (16, 8))
    a, b = jax.random.normal(k[2], (16, 4)), jax.random.normal(k[3], (4, 8))
    plain = qops.Adapted(w, a, b, 0.5)
    dropped = qops.Adapted(w, a, b, 0.5, jax.random.key(7), 0.25)
    want = jnp.einsum("bsd,df->bsf", x, w) + 0.5 * ((x @ a) @ b)
    np.testing.assert_allclose(qops.einsum("bsd,df->bsf", x, plain), want, rtol=1e-5, atol=1e-5)
    xd = dropped.lora_input(x)
    zero = np.asarray(xd == 0)
    assert abs(zero.mean() - 0.25) < 0.05  # 2048 Bernoulli(0.25) draws: 5 sigma ~ 0.048
    np.testing.assert_allclose(np.asarray(xd)[~zero], np.asarray(x / 0.75)[~zero], rtol=1e-6)
    got = qops.einsum("bsd,df->bsf", x, dropped)
    want = jnp.einsum("bsd,df->bsf", x, w) + 0.5 * ((xd @ a) @ b)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(qops.matmul(x, dropped), want, rtol=1e-5, atol=1e-5)


def _run(tmp_path, tokenizer, name, *extra):
    mcfg, policy, tcfg = load_configs(
        TINY,
        SMALL
        + ONE
        + [
            f"run_dir={tmp_path / name}",
            "steps=4",
            "save_every=2",
            "corpus_max_bytes=100000",
            f"tokenizer={tokenizer}",
            f"init_from={HY_TINY}",
            "runtime.hidden_dropout=0.1",  # the PRNG must replay on resume
            *extra,
        ],
    )
    return train(mcfg, policy, tcfg, log=lambda *_: None), tmp_path / name


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tokenizer):
    """(summary, run directory) of the 4-step LoRA run of `_run` on hy_tiny, trained once."""
    return _run(tmp_path_factory.mktemp("lora_runs"), tokenizer, "full")


def test_run_checkpoints_adapters_resumes_exactly_and_loads(tmp_path, tokenizer, lora_run):
    """train.py's loop with LoRA on and --init-from the hy_tiny checkpoint: checkpoints hold
    only the adapters (integrity-recorded) and the run records its base; stop + resume equals
    the uninterrupted run; a changed base is refused; the adapters load beside the base
    (infer.py --adapter's path, the base's digest checked), the server with --adapter serves
    that model, and merge-lora's output has the same logits."""
    full, run = lora_run
    record = runs.read_record(runs.checkpoint_dir(run) / "4")
    assert record["params"] and all("_lora_" in n for n in record["params"])
    pointer = lora_base.read_pointer(run)
    assert pointer["base"] == str(HY_TINY.resolve()) and pointer["weights"] == "bf16"
    with pytest.raises(CheckpointError, match="LoRA run"):
        loading.open_checkpoint(run)  # not a full checkpoint: said so, with what to do
    # Stop at 2 and resume: the same losses and adapters as the uninterrupted run.
    _run(tmp_path, tokenizer, "split", "stop_at=2")
    resumed, split = _run(tmp_path, tokenizer, "split")
    assert resumed["start_step"] == 2
    assert resumed["losses"] == full["losses"][2:]
    a, b = (_leaves(_adapters(r)) for r in (run, split))
    assert len(a) == len(b) > 0 and all(np.array_equal(x, y) for x, y in zip(a, b))
    # Base + adapters, unmerged (the recorded base), against merge-lora's run directory.
    unmerged = from_checkpoint.load(None, dtype="float32", adapter=run)
    assert unmerged.tokenizer is not None and list(lora.adapted(unmerged.model))
    assert convert_main(["merge-lora", "--run", str(run), "--out", str(tmp_path / "m")]) == 0
    merged = from_checkpoint.load(tmp_path / "m", dtype="float32")
    tokens = jnp.asarray(_batch(merged.cfg)["inputs"][0])
    forward = nnx.jit(lambda m, t: m(t)[0])
    want, got = forward(unmerged.model, tokens), forward(merged.model, tokens)
    assert float(jnp.max(jnp.abs(want - got))) <= 64 * EPS32 * float(jnp.max(jnp.abs(want)))
    # The server's --adapter: the model it serves is the same base + adapters (and not the base).
    served = serve_main.build_state(
        None, adapter=run, dtype="float32", slots=1, max_len=32, log=lambda *_: None
    ).engine.ex
    served_logits = forward(nnx.merge(served.graphdef, served.params), tokens)
    np.testing.assert_array_equal(np.asarray(served_logits), np.asarray(want))
    base = from_checkpoint.load(HY_TINY, dtype="float32").model
    assert float(jnp.max(jnp.abs(forward(base, tokens) - want))) > 1e-3
    # Resuming without (or with another) train.lora is refused before anything loads.
    with pytest.raises(CheckpointError, match="train.lora"):
        _run(run.parent, tokenizer, "full", "lora=null", "steps=6")
    # A base that is not the one recorded is refused.
    record = json.loads((split / lora_base.POINTER_FILE).read_text())
    record["digest"] = "0" * len(record["digest"])
    (split / lora_base.POINTER_FILE).write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match="were trained on .* not on "):
        _run(tmp_path, tokenizer, "split", "steps=6")


def _adapters(run):
    """The adapters of a run's latest step, as restored beside a float32 hy_tiny."""
    base = loading.load_params(loading.open_checkpoint(HY_TINY), RuntimePolicy.inference("float32"))
    return nnx.state(lora_base.attach(base, run)[0], nnx.LoRAParam)


def _other_base(directory: Path, change) -> Path:
    """A copy of hy_tiny (the runs' base) with `change(tensors, config)` applied: another
    base of the same shapes."""
    from hunyuan_jax.checkpoints.hf_checkpoint import HFCheckpoint
    from tests.helpers.synthetic import write_hf

    src = HFCheckpoint(HY_TINY)
    tensors = {k: src.get(k) for k in src.keys}
    config = json.loads((HY_TINY / "config.json").read_text())
    change(tensors, config)
    return write_hf(directory, tensors, config)


def _bump(tensors, config):
    key = "model.layers.0.self_attn.q_proj.weight"
    tensors[key] = tensors[key] + np.asarray(1e-3, tensors[key].dtype)


def test_adapter_on_another_base_is_refused(tmp_path, lora_run, capsys):
    """Adapters trained on hy_tiny, applied to a base of the same shapes with one weight
    changed by 1e-3: infer.py --adapter exits 4 with one line naming both bases and digests,
    the server's build_state and merge-lora (--base) refuse it too, all through
    `lora_base.check_base`; merge-lora --allow-base-mismatch merges anyway. A base whose config
    differs only in moe_topk (same shapes, same weights) is refused naming the key."""
    from hunyuan_jax.cli import infer

    _, run = lora_run
    other = _other_base(tmp_path / "other", _bump)
    trained = lora_base.read_pointer(run)["digest"]
    code = infer.main(
        ["--checkpoint", str(other), "--adapter", str(run), "--prompt", "x", "--dtype", "float32"]
    )
    err = capsys.readouterr().err.strip()
    assert code == 4 and len(err.splitlines()) == 1, err
    assert err.startswith("infer.py: error: ") and "--allow-base-mismatch" in err
    assert str(run) in err and str(other) in err and f"digest {trained}" in err
    found = err.split(f"{other} (digest ")[1][:64]
    assert len(found) == 64 and found != trained
    with pytest.raises(CheckpointError, match=re.escape(f"not on {other} (digest {found}")):
        serve_main.build_state(other, adapter=run, dtype="float32", slots=1, log=print)
    argv = ["merge-lora", "--run", str(run), "--base", str(other), "--out", str(tmp_path / "m")]
    assert convert_main(argv) == 4
    err = capsys.readouterr().err
    assert f"digest {found}" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "m").exists()
    assert convert_main(argv + ["--allow-base-mismatch"]) == 0
    assert "--allow-base-mismatch" in capsys.readouterr().out
    # Same weights, another architecture of the same shapes: refused before any weight loads.
    topk = _other_base(tmp_path / "topk", lambda t, c: c.update(moe_topk=2))
    with pytest.raises(CheckpointError, match="another architecture: moe_top_k 1 vs 2"):
        from_checkpoint.load(topk, dtype="float32", adapter=run)


def test_corrupt_base_pointer_is_refused(tmp_path, lora_run):
    """lora_base.json fields are checked when read: a digest that is not 64 hex digits, a base
    that is not a path, an unknown form are CheckpointError naming the file and field."""
    _, run = lora_run
    copy = tmp_path / "run"
    copy.mkdir()
    record = lora_base.read_pointer(run)
    for field, value in (("digest", "abc"), ("base", 3), ("weights", "int3"), ("seed", "x")):
        (copy / lora_base.POINTER_FILE).write_text(json.dumps(dict(record, **{field: value})))
        with pytest.raises(CheckpointError, match=f"lora_base.json: corrupt .*'{field}'"):
            lora_base.read_pointer(copy)
