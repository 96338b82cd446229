"""train.py end to end on the tiny config (CPU), through `train_loop.train` and
`train_step.TrainStep`: the loss falls; run-directory layout, metrics and the run's parameters
as `hunyuan_jax.checkpoints.loading` reads them; exact resume; a real SIGKILL during a checkpoint save;
non-finite losses (stop / skip) and weights (never saved); the model / runtime / train config sections and overrides;
expert-specific learning rates and the weight-decay mask, in the optimizer and in the real
step; the same loss curve on an 8-device expert-parallel mesh as on one device.

Compile time dominates on CPU, so the runs share one configuration (and hence one compiled
step) wherever they can; a persistent compilation cache (a temporary directory, for this module
and the killed subprocess only) turns the repeats into cache hits.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hunyuan_jax.checkpoints import loading
from hunyuan_jax.checkpoints.runs import latest_step, restore_run_params
from hunyuan_jax.data.corpus import PackedLoader, embedded_corpus, texts_for_tokenizer
from hunyuan_jax.data.tokenizer import SentencePieceTokenizer
from hunyuan_jax.errors import NonFiniteLoss
from hunyuan_jax.train import optim
from hunyuan_jax.train.config import TrainConfig, load_configs
from hunyuan_jax.train.loop import train
from sharding.plan import ShardingPlan
from tests.helpers.jax_cache import cache_dir, persistent_compilation_cache

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "configs" / "tiny.yaml"
STEPS = 30

# One configuration for the reference run and everything that reuses its compiled step:
# single device, micro-batches (gradient accumulation), dropout on (the PRNG must replay on
# resume), capacity routing at factor 1.0 (tokens are re-routed), explicit expert LR factors.
BASE = [
    "mesh=data=1,fsdp=1,expert=1,tensor=1",
    "rules=fsdp",
    f"steps={STEPS}",
    "batch_size=8",
    "seq_len=64",
    "micro_batches=2",
    "lr=3e-3",
    "warmup_steps=3",
    "save_every=10",
    "keep_checkpoints=3",
    "log_every=10",
    "corpus_max_bytes=300000",
    "shared_expert_lr_scale=0.5",
    "routed_expert_lr_scale=0.25",
    "runtime.hidden_dropout=0.1",
    "runtime.attention_dropout=0.1",
]


def _configs(run_dir, tokenizer, *extra, **changes):
    """(ModelConfig, RuntimePolicy, TrainConfig) of BASE plus `extra` overrides."""
    return load_configs(
        TINY, BASE + [f"run_dir={run_dir}", f"tokenizer={tokenizer}", *extra], **changes
    )


def _metrics(run_dir):
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def _losses(run_dir):
    return [m["loss"] for m in _metrics(run_dir)]


@pytest.fixture(scope="module", autouse=True)
def compilation_cache():
    with persistent_compilation_cache():
        yield


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("train")


@pytest.fixture(scope="module")
def tokenizer(workdir):
    texts = texts_for_tokenizer(embedded_corpus(300_000), "text", 300_000)
    tok = SentencePieceTokenizer.train(texts, workdir / "sp" / "tokenizer", 1024)
    return str(tok.path)


@pytest.fixture(scope="module")
def reference(workdir, tokenizer):
    """The uninterrupted reference run: STEPS steps, checkpoints every 10."""
    run = workdir / "reference"
    mcfg, policy, tcfg = _configs(run, tokenizer)
    summary = train(mcfg, policy, tcfg, log=lambda *_: None)
    return run, summary


def _restore(run, step=None, plan=None):
    """(Checkpoint, model) of a run directory's checkpoint `step` (default: its latest) under
    the run's own policy, placed by `plan` (default: one device). The latest step goes through
    `loading.load_params` (what decoding and --init-from use); an earlier one through the same
    abstract target and `runs.restore_run_params`."""
    ckpt = loading.open_checkpoint(run)
    plan = plan or ShardingPlan.single()
    if step is None:
        return ckpt, loading.load_params(ckpt, ckpt.runtime, plan)
    from hunyuan_jax.model.state import abstract_model

    graphdef, abstract, rest = nnx.split(
        abstract_model(ckpt.cfg, ckpt.runtime, plan), nnx.Param, ...
    )
    got, params = restore_run_params(run, plan.abstract(abstract), step)
    assert got == step
    return ckpt, nnx.merge(graphdef, params, rest)


def _params_equal(a, b):
    la, lb = jax.tree.leaves(nnx.state(a)), jax.tree.leaves(nnx.state(b))
    return len(la) == len(lb) and all(np.array_equal(x, y) for x, y in zip(la, lb))


# ----------------------------------------------------------------------------- training
def test_loss_falls_and_run_dir_layout(reference):
    run, summary = reference
    losses = _losses(run)
    assert len(losses) == STEPS and summary["losses"] == losses
    assert losses[0] > 6.5  # about ln(1024) = 6.93 at random init
    assert np.mean(losses[-5:]) < losses[0] - 1.0, losses
    # Routing statistics are logged for every step.
    m = _metrics(run)
    for rec in m:
        assert len(rec["expert_load"]) == 8 and abs(sum(rec["expert_load"]) - 1) < 1e-5
        assert 0.0 < rec["aux_loss"] < 8.0  # E * sum_e(mean p_e * f_e), 1 when balanced
        assert 0.0 <= rec["rerouted_fraction"] < 1.0 and rec["dropped_fraction"] == 0.0
        assert rec["ok"]
    assert max(r["rerouted_fraction"] for r in m) > 0.0  # capacity 1.0 does re-route
    assert all("tokens_per_s" in r for r in m if r["step"] % 10 == 0)
    # Layout: config, tokenizer, checkpoints/<step>/{params, opt_state, data}.
    assert (run / "config.yaml").is_file() and (run / "tokenizer" / "tokenizer.model").is_file()
    assert not (run / "run.lock").exists()  # held while training, removed at the end
    steps = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [10, 20, 30]
    for item in ("params", "opt_state", "data"):
        assert (run / "checkpoints" / "30" / item).is_dir()
    # The run's parameters as decoding loads them (single device, and sharded on a mesh).
    ckpt, model = _restore(run)
    assert ckpt.format == "run" and ckpt.cfg.num_experts == 8
    assert ckpt.runtime.hidden_dropout == 0.1  # the run's policy, from its config.yaml
    _, model20 = _restore(run, step=20)
    assert not _params_equal(model, model20)
    plan = ShardingPlan.create("data=2,fsdp=1,expert=4,tensor=1", "fsdp_ep")
    _, sharded = _restore(run, plan=plan)
    assert _params_equal(model, sharded)
    gate = sharded.groups.layers[0].moe.gate_proj[...]
    assert gate.sharding.spec[1] == "expert"  # experts over the expert axis
    logits, _, _ = jax.jit(lambda m, t: m(t))(model, jnp.ones((1, 8), jnp.int32))
    assert bool(jnp.all(jnp.isfinite(logits)))


def test_exact_resume(reference, workdir, tokenizer):
    """10 steps, stop, resume for 20 more == 30 uninterrupted, bit for bit (losses, params)."""
    ref_run, _ = reference
    run = workdir / "resumed"
    mcfg, policy, tcfg = _configs(run, tokenizer, "stop_at=10")
    first = train(mcfg, policy, tcfg, log=lambda *_: None)
    assert first["end_step"] == 10 and latest_step(run) == 10
    mcfg, policy, tcfg = _configs(run, tokenizer)
    second = train(mcfg, policy, tcfg, log=lambda *_: None)
    assert second["start_step"] == 10 and len(second["losses"]) == 20
    assert _losses(run) == _losses(ref_run)  # exact float equality, every step
    assert _params_equal(_restore(run)[1], _restore(ref_run)[1])


_HANG = """
import asyncio, os, runpy, sys
from pathlib import Path
from orbax.checkpoint._src.path import atomicity

original = atomicity.AtomicRenameTemporaryPath.finalize

async def finalize(self):
    # Step directory of the save to interrupt: its files are written, the rename is not done.
    if self.get_final().name == os.environ["HANG_AT_STEP"]:
        Path(os.environ["HANG_MARKER"]).write_text(str(self.get()))
        await asyncio.sleep(3600)
    return await original(self)

atomicity.AtomicRenameTemporaryPath.finalize = finalize
sys.argv = ["train.py"] + sys.argv[1:]
runpy.run_path(os.environ["TRAIN_PY"], run_name="__main__")
"""


def test_kill_during_save_resumes_from_last_complete(reference, workdir, tokenizer):
    ref_run, _ = reference
    run = workdir / "killed"
    script = workdir / "hang_in_save.py"
    script.write_text(_HANG)
    marker = workdir / "hang_marker"
    env = dict(
        os.environ,
        HANG_AT_STEP="20",
        HANG_MARKER=str(marker),
        TRAIN_PY=str(REPO / "train.py"),
        JAX_PLATFORMS="cpu",
        JAX_COMPILATION_CACHE_DIR=cache_dir(),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5",
        PYTHONPATH=str(REPO),
    )
    args = [sys.executable, str(script), "--config", str(TINY)]
    for s in BASE + [f"run_dir={run}", f"tokenizer={tokenizer}"]:
        args += ["--set", s]
    proc = subprocess.Popen(
        args, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.time() + 240
        while not marker.exists():
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            assert time.time() < deadline, "the save at step 20 never started"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)  # mid-save: step 20's files written, not committed
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    ckpts = run / "checkpoints"
    names = sorted(p.name for p in ckpts.iterdir())
    assert "10" in names and "20" not in names
    assert any(n.startswith("20.orbax-checkpoint-tmp") for n in names), names
    assert latest_step(run) == 10  # the half-written step is never taken for complete
    # Resume: continues from step 10 exactly as the uninterrupted run did.
    mcfg, policy, tcfg = _configs(run, tokenizer)
    summary = train(mcfg, policy, tcfg, log=lambda *_: None)
    assert summary["start_step"] == 10
    assert _losses(run) == _losses(ref_run)
    assert sorted(p.name for p in ckpts.iterdir()) == ["10", "20", "30"]  # tmp dir cleaned


def _poison_batches(monkeypatch, at_call):
    """Make the `at_call`-th batch drawn from the loader carry a NaN loss weight."""
    original = PackedLoader.__next__
    calls = {"n": 0}

    def patched(self):
        batch = original(self)
        calls["n"] += 1
        if calls["n"] == at_call:
            batch["loss_mask"][0, 0, 0] = np.nan
        return batch

    monkeypatch.setattr(PackedLoader, "__next__", patched)


def _copy_until(ref_run, dst, step):
    """A run directory holding the reference run's checkpoints up to `step`."""
    shutil.copytree(ref_run, dst)
    for p in (dst / "checkpoints").iterdir():
        if p.name.isdigit() and int(p.name) > step:
            shutil.rmtree(p)


def test_nonfinite_loss_stops_naming_the_step(reference, workdir, tokenizer, monkeypatch):
    ref_run, _ = reference
    run = workdir / "nan_stop"
    _copy_until(ref_run, run, 10)
    _poison_batches(monkeypatch, at_call=3)  # resumed at 10: the third batch is step 13
    mcfg, policy, tcfg = _configs(run, tokenizer)
    with pytest.raises(NonFiniteLoss, match=r"at step 13 .*newest healthy checkpoint: step 10"):
        train(mcfg, policy, tcfg, log=lambda *_: None)
    assert latest_step(run) == 10
    assert [m["step"] for m in _metrics(run)][-1] == 13 and not _metrics(run)[-1]["ok"]


# lr=1e39 overflows float32 on purpose: numpy's cast warning is the point, not a problem.
@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
def test_nonfinite_weights_are_never_saved(workdir, tokenizer):
    """A learning rate that overflows float32 (1e39 -> inf) turns step 1's update into inf /
    NaN weights while step 1's own loss (from the weights before the update) is finite: the
    run stops (exit 5) instead of saving them (it saved them, recorded as healthy, and
    exited 0)."""
    run = workdir / "overflow"
    mcfg, policy, tcfg = _configs(run, tokenizer, "lr=1e39", "stop_at=1")
    with pytest.raises(
        NonFiniteLoss, match=r"non-finite values \(NaN / inf\) in \d+ arrays at step 1 "
    ) as e:
        train(mcfg, policy, tcfg, log=lambda *_: None)
    msg = str(e.value)
    assert "losses of steps 1-1 were finite" in msg and "no checkpoint was saved" in msg, msg
    assert e.value.exit_code == 5 and latest_step(run) is None
    assert not [p for p in (run / "checkpoints").iterdir()]  # not even a temporary directory
    assert [m["ok"] for m in _metrics(run)] == [True]


def test_nonfinite_loss_skip_leaves_state_unchanged(reference, workdir, tokenizer, monkeypatch):
    ref_run, _ = reference
    run = workdir / "nan_skip"
    _copy_until(ref_run, run, 10)
    _poison_batches(monkeypatch, at_call=1)
    mcfg, policy, tcfg = _configs(run, tokenizer, "on_nonfinite=skip", "stop_at=11")
    train(mcfg, policy, tcfg, log=lambda *_: None)
    assert latest_step(run) == 11 and not _metrics(run)[-1]["ok"]
    assert _params_equal(_restore(run, step=11)[1], _restore(run, step=10)[1])


# ----------------------------------------------------------------------------- config
def test_configs_and_overrides(tmp_path):
    mcfg, policy, tcfg = load_configs(
        TINY,
        [
            "lr=1e-4",
            "steps=7",
            "runtime.hidden_dropout=0.2",
            "runtime.train_dispatch=gather",
            "mesh=data=2,fsdp=1,expert=4,tensor=1",
            "data=null",
            "pack=false",
        ],
        run_dir=str(tmp_path),
    )
    assert tcfg.lr == 1e-4 and tcfg.steps == 7 and tcfg.data is None and not tcfg.pack
    assert tcfg.mesh == "data=2,fsdp=1,expert=4,tensor=1" and tcfg.run_dir == str(tmp_path)
    assert policy.hidden_dropout == 0.2 and policy.train_dispatch == "gather"
    assert policy.compute_dtype == "float32"  # tiny.yaml's runtime section
    assert mcfg.vocab_size == 1024
    with pytest.raises(ValueError, match="unknown train key"):
        load_configs(TINY, ["learning_rate=1"])
    with pytest.raises(ValueError, match="unknown config key"):
        load_configs(TINY, ["model.nope=1"])
    with pytest.raises(ValueError, match="unknown runtime key"):
        load_configs(TINY, ["runtime.nope=1"])
    with pytest.raises(ValueError, match="runtime keys, not architecture"):
        load_configs(TINY, ["model.hidden_dropout=0.2"])
    with pytest.raises(ValueError, match="train_dispatch"):
        load_configs(TINY, ["runtime.train_dispatch=scatter"])
    with pytest.raises(ValueError, match="micro_batches"):
        load_configs(TINY, ["batch_size=6", "micro_batches=4"])
    with pytest.raises(TypeError, match="steps"):
        load_configs(TINY, ["steps=abc"])
    # The resolved run config round-trips through <run>/config.yaml.
    from hunyuan_jax.checkpoints.runs import read_run_config, write_run_config

    write_run_config(tmp_path, mcfg, policy, tcfg)
    m2, p2, t2 = read_run_config(tmp_path)
    assert m2 == mcfg and p2 == policy and TrainConfig.from_dict(t2) == tcfg
    _, _, small = load_configs(REPO / "configs" / "small.yaml")
    assert small.batch_size > 0


# ----------------------------------------------------------------------------- optimizer
def test_expert_lr_rule_defaults():
    from hunyuan_jax.model.config import ModelConfig

    mcfg = ModelConfig.from_yaml(REPO / "configs" / "hunyuan_a52b_pretrain.yaml")
    tcfg = TrainConfig(batch_size=64, seq_len=4096)
    s = optim.expert_lr_scales(tcfg, mcfg)
    assert s["dense"] == 1.0 and s["shared_expert"] == 1.0
    assert s["routed_expert"] == pytest.approx(0.25)  # 1/sqrt(16) for B << B_noise
    b = tcfg.tokens_per_step
    for bn in (b / 100, b, 100 * b):  # the SPEC formula, whatever B_noise is
        s = optim.expert_lr_scales(tcfg.replace(lr_noise_batch_tokens=bn), mcfg)
        want = optim.lr_opt(b / 16, bn) / optim.lr_opt(b, bn)
        assert s["routed_expert"] == pytest.approx(want)
    assert optim.lr_opt(b, b, 1e-3) == pytest.approx(1e-3)  # B == B_noise gives lr_max
    s = optim.expert_lr_scales(
        tcfg.replace(routed_expert_lr_scale=0.1, shared_expert_lr_scale=0.7), mcfg
    )
    assert (s["routed_expert"], s["shared_expert"]) == (0.1, 0.7)


def _groups_of(params):
    out = {}
    for path, _ in jax.tree_util.tree_leaves_with_path(params):
        out[jax.tree_util.keystr(path)] = optim.param_group(path)
    return out


def test_optimizer_groups_and_decay_mask():
    from hunyuan_jax.model.state import abstract_model

    mcfg, _, tcfg = load_configs(
        TINY,
        [
            "warmup_steps=0",
            "weight_decay=0.1",
            "grad_clip=0",
            "shared_expert_lr_scale=0.5",
            "routed_expert_lr_scale=0.25",
        ],
    )
    _, params = nnx.split(abstract_model(mcfg))
    params = jax.tree.map(lambda a: jnp.full(a.shape, 2.0, a.dtype), params)
    groups = _groups_of(params)
    routed = [k for k, g in groups.items() if g == "routed_expert"]
    shared = [k for k, g in groups.items() if g == "shared_expert"]
    assert len(routed) == 6 and all("moe" in k and "shared" not in k for k in routed)
    assert len(shared) == 6 and all("moe']['shared" in k for k in shared)
    assert groups["['groups']['layers'][0]['moe']['router'].value"] == "dense"
    opt = optim.make_optimizer(tcfg, mcfg)
    state = opt.tx.init(params)
    lr = float(opt.schedule(0))
    # Gradient 1 everywhere: Adam's first step is lr * factor * (1 + wd * p) for decayed
    # parameters and lr * factor for norms (no decay).
    ones = jax.tree.map(jnp.ones_like, params)
    updates, _ = jax.jit(opt.tx.update)(ones, state, params)
    for path, u in jax.tree_util.tree_leaves_with_path(updates):
        name = jax.tree_util.keystr(path)
        factor = {"dense": 1.0, "shared_expert": 0.5, "routed_expert": 0.25}[groups[name]]
        decay = 0.0 if "norm" in name else 0.1 * 2.0
        np.testing.assert_allclose(
            np.asarray(u), -lr * factor * (1 + decay), rtol=1e-5, err_msg=name
        )


def test_train_step_applies_expert_lrs(tokenizer, workdir):
    """In the real step: from the same init, the first update of each parameter is
    -lr * factor * (sign(g) + wd * p) (Adam's first step), so each group's factor can be read
    back from the parameter change; norms show no weight decay."""
    from hunyuan_jax.data.corpus import to_global
    from hunyuan_jax.model.state import init_model
    from hunyuan_jax.train.step import TrainStep

    mcfg, policy, tcfg = _configs(workdir / "unused", tokenizer)
    plan = ShardingPlan.create(tcfg.mesh, tcfg.rules)
    step = TrainStep(mcfg, policy, tcfg, plan)
    state = step.init_state(init_model(mcfg, policy, plan, tcfg.seed))
    before = jax.tree.map(np.asarray, state.params)
    rng = np.random.default_rng(0)
    docs = [(rng.integers(0, 1024, 200).astype(np.int32), np.ones(200, np.float32))]
    loader = PackedLoader(docs, 8, 64, 2)
    state, metrics = step(state, to_global(next(loader), step.batch_sharding, 8))
    lr = float(metrics["lr"])
    assert lr == pytest.approx(3e-3 / 3)
    groups = _groups_of(before)
    seen = {}
    for (path, p0), p1 in zip(
        jax.tree_util.tree_leaves_with_path(before), jax.tree.leaves(state.params)
    ):
        name = jax.tree_util.keystr(path)
        delta = (np.asarray(p1) - p0).ravel()
        p0 = p0.ravel()
        # Elements driven by the gradient's sign (zero-gradient rows only decay: |delta| <=
        # lr * wd * |p| << 0.1 lr); a few elements with |g| near Adam's eps are off.
        moved = np.abs(delta) > 0.1 * lr
        wd = 0.0 if "norm" in name else 0.1
        sign = -np.sign(delta[moved])
        factor = -delta[moved] / (lr * (sign + wd * p0[moved]))
        median = float(np.median(factor))
        assert np.mean(np.abs(factor / median - 1) < 1e-2) > 0.95, name
        seen.setdefault(groups[name], set()).add(round(median, 3))
    assert seen == {"dense": {1.0}, "shared_expert": {0.5}, "routed_expert": {0.25}}


# ----------------------------------------------------------------------------- sharding
@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")
def test_expert_parallel_mesh_matches_single_device(workdir, tokenizer):
    """data=2 x expert=4 (fsdp_ep, all-to-all dispatch) vs one device: the same loss curve and
    parameters. Capacity factor 8 = experts: no token is re-routed, so the math is the same."""
    common = [
        "steps=4",
        "batch_size=16",
        "seq_len=32",
        "micro_batches=2",
        "save_every=4",
        "runtime.capacity_factor=8.0",
        "runtime.hidden_dropout=0.0",
        "runtime.attention_dropout=0.0",
    ]
    runs = {}
    for name, mesh, rules in (
        ("one", "data=1,fsdp=1,expert=1,tensor=1", "fsdp"),
        ("ep8", "data=2,fsdp=1,expert=4,tensor=1", "fsdp_ep"),
    ):
        mcfg, policy, tcfg = _configs(
            workdir / f"mesh_{name}", tokenizer, *common, f"mesh={mesh}", f"rules={rules}"
        )
        assert policy.train_dispatch == "all_to_all"
        train(mcfg, policy, tcfg, log=lambda *_: None)
        runs[name] = workdir / f"mesh_{name}"
    one, ep8 = (_metrics(runs[n]) for n in ("one", "ep8"))
    assert all(m["rerouted_fraction"] == 0.0 for m in one + ep8)
    np.testing.assert_allclose([m["loss"] for m in ep8], [m["loss"] for m in one], rtol=2e-5)
    np.testing.assert_allclose(
        [m["expert_load"] for m in ep8], [m["expert_load"] for m in one], atol=1e-6
    )
    # Parameters: Adam divides by sqrt(v), so an element whose gradient is ~0 can move by up to
    # lr in either direction on a 1e-7 difference in summation order; all others agree.
    a, b = (jax.tree.leaves(nnx.state(_restore(runs[n])[1])) for n in ("one", "ep8"))
    off = total = 0
    for x, y in zip(a, b):
        diff = np.abs(np.asarray(y) - np.asarray(x))
        assert diff.max() < 4 * 3e-3  # 4 steps of at most lr each
        off, total = off + int(np.sum(diff > 5e-5)), total + diff.size
    assert off <= 1e-4 * total, (off, total)
