"""GRPO (hunyuan_jax/train/grpo.py, grpo_data.py, rewards.py; engine/rollout.py) on CPU: the
loss of the real train step (two micro-batches, token and sequence normalization, old
log-probs from the batch) equals a numpy float64 evaluation of the formula on the model's own
log-probabilities; the rollout's log-probabilities equal the train step's recomputation (full
and LoRA, whose reference with B = 0 is the base model); rewards (built-in and a user's
`module:function`, whose failures are one-line errors); prompt records refused with file:line;
a short run on the default model learns a format from reward alone (mean reward from ~0.1 to
>= 0.9) and resumes exactly (same rollouts, same rewards).
"""

import json
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from hunyuan_jax.errors import ConfigError, DataError
from hunyuan_jax.train.config import load_configs
from hunyuan_jax.train.grpo import group_advantages, token_logp
from hunyuan_jax.train.grpo_data import pack_rollout, read_prompts
from hunyuan_jax.train.losses import forward
from hunyuan_jax.train.rewards import Reward, RewardError
from tests.helpers.jax_cache import persistent_compilation_cache

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "configs" / "tiny.yaml"
DEFAULT_MODEL = REPO / "hunyuan_jax" / "assets" / "default_model"
EPS32 = float(np.finfo(np.float32).eps)

ONE_DEVICE = ["mesh=data=1,fsdp=1,expert=1,tensor=1", "rules=fsdp", "runtime.capacity_factor=8.0"]


@pytest.fixture(scope="module", autouse=True)
def compilation_cache():
    with persistent_compilation_cache():
        yield


# ----------------------------------------------------------------------------- the loss
def _np_loss(logp, old, ref, adv, mask, eps_lo, eps_hi, beta, norm):
    """The GRPO loss in numpy float64 (docs/rl.md's formula)."""
    ratio = np.exp(logp - old)
    pg = -np.minimum(ratio * adv, np.clip(ratio, 1 - eps_lo, 1 + eps_hi) * adv)
    d = ref - logp
    per = pg + beta * (np.exp(d) - d - 1)
    if norm == "token":
        return np.sum(per * mask) / np.sum(mask)
    return np.mean(np.sum(per * mask, -1) / np.sum(mask, -1))


@pytest.mark.parametrize("norm", ["token", "sequence"])
def test_step_loss_equals_numpy_formula(norm):
    """TrainStep(objective grpo, 2 updates per rollout: old log-probs from the batch) on a
    fixed batch of 2 micro-batches with different completion lengths: its loss, KL and clip
    fraction = numpy float64 of the formula on the same model's log-probabilities."""
    from hunyuan_jax.data.corpus import to_global
    from hunyuan_jax.model.state import init_model
    from hunyuan_jax.train.step import TrainStep
    from sharding.plan import ShardingPlan

    eps_lo, eps_hi, beta = 0.2, 0.28, 0.05
    mcfg, policy, tcfg = load_configs(
        TINY,
        [
            *ONE_DEVICE, "objective=grpo", "batch_size=8", "micro_batches=2", "seq_len=32",
            "model.num_layers=2", "aux_loss_coef=0.0", "grpo.group_size=4", "steps=2",
            "save_every=2", "grpo.updates_per_rollout=2", f"grpo.epsilon={eps_lo}",
            f"grpo.epsilon_high={eps_hi}", f"grpo.beta={beta}", f"grpo.normalization={norm}",
        ],
    )  # fmt: skip
    plan = ShardingPlan.create(tcfg.mesh, tcfg.rules)
    step = TrainStep(mcfg, policy, tcfg, plan)
    m, r, s = 2, 4, 32
    rng = np.random.default_rng(0)
    mask = np.zeros((m, r, s), np.float32)
    for i in range(m):
        for j in range(r):
            lo = rng.integers(3, 10)
            mask[i, j, lo : lo + rng.integers(2, 20)] = 1.0
    batch = {
        "inputs": rng.integers(0, mcfg.vocab_size, (m, r, s)).astype(np.int32),
        "targets": rng.integers(0, mcfg.vocab_size, (m, r, s)).astype(np.int32),
        "positions": np.broadcast_to(np.arange(s, dtype=np.int32), (m, r, s)).copy(),
        "segment_ids": np.ones((m, r, s), np.int32),
        "loss_mask": mask,
        "advantages": np.repeat(rng.normal(size=(m, r, 1)), s, -1).astype(np.float32),
    }
    model = init_model(mcfg, policy, plan, 0)
    graphdef, params = nnx.split(model)

    @jax.jit
    def logp_fn(params, micro):
        mdl = nnx.merge(graphdef, params)
        out, _, _ = forward(mdl, micro, phase="prefill")
        return token_logp(out, micro["targets"])

    logp = np.stack(
        [np.asarray(logp_fn(params, {k: v[i] for k, v in batch.items()})) for i in range(m)]
    ).astype(np.float64)
    # old / ref: the policy's own log-probs moved by up to +-0.5 (some ratios outside the clip)
    batch["old_logp"] = (logp + rng.uniform(-0.5, 0.5, logp.shape)).astype(np.float32)
    batch["ref_logp"] = (logp + rng.uniform(-0.5, 0.5, logp.shape)).astype(np.float32)
    old, ref = batch["old_logp"].astype(np.float64), batch["ref_logp"].astype(np.float64)
    adv = batch["advantages"].astype(np.float64)
    want = _np_loss(
        logp.reshape(-1, s), old.reshape(-1, s), ref.reshape(-1, s), adv.reshape(-1, s),
        mask.reshape(-1, s), eps_lo, eps_hi, beta, norm,
    )  # fmt: skip
    if norm == "sequence":  # micro-batches hold equal rows: the mean of their means
        want = np.mean(
            [_np_loss(logp[i], old[i], ref[i], adv[i], mask[i], eps_lo, eps_hi, beta, norm)
             for i in range(m)]
        )  # fmt: skip
    ratio = np.exp(logp - old)
    clipped = ((adv > 0) & (ratio > 1 + eps_hi)) | ((adv < 0) & (ratio < 1 - eps_lo))
    assert 0.05 < clipped[mask > 0].mean() < 0.95  # the case is not degenerate

    state = step.init_state(model)
    _, got = step(state, to_global(batch, step.batch_sharding, m * r))
    got = jax.device_get(got)
    # float32: each log-prob is off by ~|logZ| eps (logZ ~ log V ~ 7), exp / products by a few
    # ulps more; the loss is a mean of O(1) terms: 1e-5 absolute covers it with room.
    tol = 1e-5
    np.testing.assert_allclose(got["loss"], want, atol=tol)
    np.testing.assert_allclose(got["grpo/rollout_logp_diff"], np.mean(
        [np.sum(np.abs(logp[i] - old[i]) * mask[i]) / mask[i].sum() for i in range(m)]
    ), atol=tol)  # fmt: skip
    assert got["tokens"] == mask.sum()


def test_group_advantages():
    r = np.array([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5])
    a = group_advantages(r, 4)
    np.testing.assert_allclose(a[:4], np.array([0.5, -0.5, -0.5, 0.5]) / (0.5 + 1e-4))
    np.testing.assert_allclose(a[4:], 0.0)  # a solved (or hopeless) group teaches nothing
    np.testing.assert_allclose(group_advantages(r, 4, std_normalize=False)[:4], r[:4] - 0.5)


# ----------------------------------------------------------------------------- rollouts
@pytest.mark.parametrize("lora", [False, True])
def test_rollout_logprobs_equal_train_recomputation(lora):
    """The engine's per-token log-probabilities of sampled completions (paged cache, prompt
    pages shared by the group) equal the train step's recomputation of the same rows, on the
    very arrays the step holds: full fine-tuning, and LoRA (base + adapters with B != 0);
    LoRA's reference (B = 0 in the program) equals the base model's log-probabilities."""
    from hunyuan_jax.engine.rollout import RolloutSource
    from hunyuan_jax.model import lora as lora_mod
    from hunyuan_jax.model.state import init_model
    from hunyuan_jax.train.grpo import reference_fn
    from hunyuan_jax.train.step import TrainStep
    from sharding.plan import ShardingPlan

    extra = ["lora={rank: 4}"] if lora else []
    mcfg, policy, tcfg = load_configs(
        TINY,
        [*ONE_DEVICE, "objective=grpo", "batch_size=8", "seq_len=40", "model.num_layers=2",
         "grpo.group_size=4", "grpo.max_new_tokens=12", "grpo.page_size=4", *extra],
    )  # fmt: skip
    plan = ShardingPlan.create(tcfg.mesh, tcfg.rules)
    step = TrainStep(mcfg, policy, tcfg, plan)
    if lora:
        base = init_model(mcfg, lora_mod.base_policy(policy), plan, 0)
        model = lora_mod.add_adapters(base, tcfg.lora, jax.random.key(1), plan)
    else:
        model = init_model(mcfg, policy, plan, 0)
    state = step.init_state(model)
    if lora:  # B != 0: the adapters change the policy
        state = state._replace(
            params=jax.tree_util.tree_map_with_path(
                lambda p, x: x + 0.05 if "_lora_b" in jax.tree_util.keystr(p) else x,
                state.params,
            )
        )

    class Tok:
        eos_ids, pad_id = [2], 0

        def decode(self, ids, skip_special_tokens=False):
            return " ".join(map(str, ids))

    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 500, n).tolist() for n in (9, 14)]
    recs = [type("R", (), {"record": {}, "source": f"p:{i}"}) for i in range(2)]
    src = RolloutSource(tcfg, Tok(), prompts, recs, lambda text, rec, where: float(len(text)))
    src.bind(step)
    batch = src.batch_for(state)
    core = next(iter(src.gen._cores.values()))  # the engine decoded the step's own arrays
    leaves = jax.tree.leaves(core.params)
    assert any(x is y for x in leaves for y in jax.tree.leaves(state.params))
    mask = batch["loss_mask"][0]
    assert mask.sum() > 4 * 4  # completions were sampled

    @jax.jit
    def recompute(params, frozen, micro):
        mdl = nnx.merge(step.graphdef, params, *(() if frozen is None else (frozen,)))
        out, _, _ = forward(mdl, micro, phase="prefill")
        return token_logp(out, micro["targets"])

    micro = {k: v[0] for k, v in batch.items()}
    got = np.asarray(recompute(state.params, step.frozen, micro))
    # float32 on both sides, different kernels (paged attention vs dense): a few ulps of logZ
    tol = 1e-4
    np.testing.assert_allclose((got * mask)[mask > 0], batch["old_logp"][0][mask > 0], atol=tol)
    if lora:
        ref = np.asarray(reference_fn(step, True)(state.params, batch, step.frozen))[0]
        zeroed = jax.tree_util.tree_map_with_path(
            lambda p, x: x * 0 if "_lora_b" in jax.tree_util.keystr(p) else x, state.params
        )
        base_lp = np.asarray(recompute(zeroed, step.frozen, micro))
        np.testing.assert_allclose(ref[mask > 0], base_lp[mask > 0], atol=1e-5)
        assert np.abs(ref - got)[mask > 0].max() > 1e-3  # the adapters did change the policy


def test_pack_rollout_layout():
    b = pack_rollout([[5, 6, 7]], [[8, 9, 2]], [[-1.0, -2.0, -3.0]], 8, 0)
    np.testing.assert_array_equal(b["inputs"][0, :5], [5, 6, 7, 8, 9])
    np.testing.assert_array_equal(b["targets"][0, :5], [6, 7, 8, 9, 2])
    np.testing.assert_array_equal(b["loss_mask"][0], [0, 0, 1, 1, 1, 0, 0, 0])
    np.testing.assert_array_equal(b["old_logp"][0, 2:5], [-1.0, -2.0, -3.0])


# ----------------------------------------------------------------------------- rewards
def _gcfg(**kw):
    from hunyuan_jax.train.config import GRPOConfig

    return GRPOConfig(**kw)


def test_builtin_rewards():
    exact = Reward(_gcfg(reward="exact", answer_pattern=r"answer: *(\S+)"))
    assert exact("so the answer: 42", {"answer": "42"}, "f:1") == 1.0
    assert exact("answer: 41 ... answer: 42", {"answer": 42}, "f:1") == 1.0  # the last one
    assert exact("42", {"answer": "42"}, "f:1") == 0.0  # no final answer
    assert Reward(_gcfg(reward="exact"))(" blue \n", {"answer": "blue"}, "f:1") == 1.0
    num = Reward(_gcfg(reward="numeric", tolerance=0.01))
    assert num("it is 3.141", {"answer": "3.14"}, "f:1") == 1.0
    assert num("it is 3.2", {"answer": 3.14}, "f:1") == 0.0
    assert num("no number", {"answer": 1}, "f:1") == 0.0
    rx = Reward(_gcfg(reward="regex", pattern=r"^\s*\d"))
    assert rx(" 7 apples", {}, "f:1") == 1.0 and rx("seven", {}, "f:1") == 0.0


def test_user_reward(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "def length(text, rec):\n    return len(text) / rec['n']\n"
        "def boom(text, rec):\n    raise KeyError('missing')\n"
        "def nan(text, rec):\n    return float('nan')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert Reward(_gcfg(reward="my_rewards:length"))("abcd", {"n": 2}, "f:1") == 2.0
    with pytest.raises(RewardError, match=r"my_rewards:boom raised on the prompt of f:7: KeyError"):
        Reward(_gcfg(reward="my_rewards:boom"))("x", {}, "f:7")
    with pytest.raises(RewardError, match="returned nan"):
        Reward(_gcfg(reward="my_rewards:nan"))("x", {}, "f:1")
    with pytest.raises(RewardError, match="no function 'nope'"):
        Reward(_gcfg(reward="my_rewards:nope"))
    with pytest.raises(RewardError, match="'no_such_mod' cannot be imported .ModuleNotFound"):
        Reward(_gcfg(reward="no_such_mod:f"))
    assert RewardError.exit_code == 3
    with pytest.raises(ConfigError, match="'module:function'"):
        Reward(_gcfg(reward="not-a-spec"))


# ----------------------------------------------------------------------------- data / config
@pytest.mark.parametrize(
    "line, msg",
    [
        ('{"answer": "1"}', "exactly one of 'prompt' or 'messages'"),
        ('{"prompt": "q"}', "no 'answer' field"),
        ('{"prompt": 3, "answer": "1"}', "'prompt' must be a string"),
        ('{"prompt": "q", "answer": [1]}', "'answer' must be a string or a number"),
        ('{"messages": [{"role": "assistant", "content": "a"}], "answer": "1"}', "end with a user"),
        ('{"prompt": "q", "answer": "1"', "invalid JSON"),
    ],
)
def test_bad_prompt_records(tmp_path, line, msg):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "fine", "answer": "1"}\n\n' + line + "\n")
    with pytest.raises(DataError, match=f"{f}:3: .*{msg}"):
        read_prompts(str(f), ("answer",))


def test_grpo_config_checks():
    base = [*ONE_DEVICE, "objective=grpo", "grpo.group_size=4"]
    with pytest.raises(ConfigError, match="multiple of 'grpo.group_size'"):
        load_configs(TINY, [*base, "batch_size=6"])
    with pytest.raises(ConfigError, match="'save_every' .* multiple of 'grpo.updates_per"):
        load_configs(TINY, [*base, "batch_size=8", "grpo.updates_per_rollout=3", "steps=9"])
    with pytest.raises(ConfigError, match="unknown train key.*grpo.nope"):
        load_configs(TINY, [*base, "grpo.nope=1"])
    with pytest.raises(ConfigError, match="grpo.normalization"):
        load_configs(TINY, [*base, "grpo.normalization=row"])


# ----------------------------------------------------------------------------- learning
FORMAT_TASK = [{"prompt": f"assert f({a}) ==", "answer": ""} for a in "xyzn0ks1"]
LEARN = [
    *ONE_DEVICE, "objective=grpo", f"init_from={DEFAULT_MODEL}", "batch_size=32",
    "micro_batches=1", "seq_len=24", "lr=2e-3", "min_lr_ratio=1.0", "warmup_steps=0",
    "weight_decay=0.0", "log_every=4", "grpo.group_size=8", "grpo.max_new_tokens=4",
    "grpo.chat=false", "grpo.reward=regex", r"grpo.pattern=^\s*\d", "grpo.beta=0.01",
    "grpo.page_size=8",
]  # fmt: skip


def _run(tmp_path, run, *extra):
    from hunyuan_jax.engine.rollout import make_grpo_source
    from hunyuan_jax.train.loop import train

    data = tmp_path / "format.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in FORMAT_TASK))
    mcfg, policy, tcfg = load_configs(
        TINY, [*LEARN, f"data={data}", f"run_dir={tmp_path / run}", *extra]
    )
    train(mcfg, policy, tcfg, log=lambda *_: None, make_grpo_source=make_grpo_source)
    lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_grpo_learns_a_format_from_reward_alone(tmp_path):
    """The default model continues `assert f(x) ==` with a number ~1 time in 8; rewarded
    (regex `^\\s*\\d`) for that alone, full fine-tuning reaches a mean reward >= 0.9 within 12
    steps (seen at 8 steps in a 30-step run). beta 0: no reference forward (the resume test
    runs the KL term)."""
    recs = _run(tmp_path, "learn", "steps=12", "save_every=12", "grpo.beta=0.0")  # no reference
    rewards = [r["grpo/reward_mean"] for r in recs]
    print("reward per step:", [round(x, 3) for x in rewards])
    assert rewards[0] <= 0.4
    assert max(rewards[-4:]) >= 0.9, rewards
    assert all(r["grpo/rollout_logp_diff"] < 1e-4 for r in recs)  # dropless: the same policy
    assert recs[-1]["grpo/kl"] == 0 and recs[-1]["grpo/completion_len"] == 4.0
    for key in ("grpo/rollout_tokens_per_s", "grpo/train_tokens_per_s", "grpo/clip_fraction"):
        assert key in recs[-1]


def test_grpo_resumes_exactly(tmp_path):
    """Two updates per rollout (old log-probs from the rollout), stopped after 2 steps and
    resumed to 4: the same rollouts (rewards) and losses as an uninterrupted run (the rollout
    seeds follow the step, the prompt order is checkpointed); each rollout serves 2 steps."""
    mu = ("steps=4", "save_every=2", "grpo.updates_per_rollout=2")
    whole = _run(tmp_path, "whole", *mu)
    _run(tmp_path, "parts", *mu, "stop_at=2")
    parts = _run(tmp_path, "parts", *mu)
    rewards = [r["grpo/reward_mean"] for r in whole]
    assert rewards[0] == rewards[1] and rewards[2] == rewards[3]  # one rollout, two updates
    assert whole[1]["grpo/ratio"] != 1.0  # the second update's policy moved from the rollout's
    assert [r["step"] for r in parts] == [1, 2, 3, 4]
    for a, b in zip(whole, parts, strict=True):
        assert a["grpo/reward_mean"] == b["grpo/reward_mean"]
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
        assert a["grpo/kl"] == pytest.approx(b["grpo/kl"], abs=1e-6)
    assert whole[-1]["grpo/kl"] > 0  # the reference (the initial weights, rebuilt on resume)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-x", "-q"]))
