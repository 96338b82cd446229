"""`remat: auto` (hunyuan_jax/train/remat_choice.py) and the long-sequence layout
(sharding/layout.py): the ladder takes the most saved rung that fits (a forced HBM size, real
CPU compiles and a fake memory analysis), the pre-filter skips what cannot fit, every rung
computes full remat's loss and gradients, and train.py picks the context-parallel layout the
AOT tool picks (8 simulated CPU devices)."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from flax import nnx

from hunyuan_jax.cli import aot as aot_cli
from hunyuan_jax.cli import train as train_cli
from hunyuan_jax.model.state import init_model
from hunyuan_jax.train import remat_choice as R
from hunyuan_jax.train.config import load_configs
from hunyuan_jax.train.losses import lm_loss
from hunyuan_jax.train.step import TrainStep
from sharding.plan import ShardingPlan

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "configs" / "tiny.yaml"
# A small train step (two layers, one CLA group): its compiles are the test's cost.
SMALL = ["batch_size=2", "seq_len=64", "micro_batches=1", "model.num_layers=2"]


def _small(*extra):
    return load_configs(TINY, SMALL + ["runtime.compute_dtype=bfloat16", *extra])


def test_ladder_order_and_estimate():
    """The ladder runs from the most saved to full remat, each rung keeping a subset of the one
    before; the estimate is the formula of the module docstring (tiny, bf16: q_proj = layers x
    heads x head_dim x 2 bytes per token)."""
    assert [r.name for r in R.LADDER] == ["matmuls", "attention", "full"]
    for more, fewer in zip(R.LADDER, R.LADDER[1:]):
        assert set(fewer.saved) < set(more.saved)
    cfg, policy, _ = _small()
    per = R.point_bytes_per_token(cfg, policy)
    assert per["q_proj"] == 2 * 12 * 8 * 2 and per["kv_proj"] == 1 * 2 * 4 * 8 * 2
    assert per["attn_out"] == 2 * (12 * 8 * 2 + 12 * 4) and per["moe_gate"] == 2 * 128 * 2
    rung = R.LADDER[1]
    est = R.estimate_bytes(cfg, policy, rung, state=1000.0, tokens=640, devices=8)
    assert est == 1000.0 + sum(per[p] for p in rung.saved) * 80


def _fake(sizes: dict[str, float], calls: list):
    """attempt() from a fake memory analysis: the bytes each rung 'compiles' to."""

    def attempt(policy):
        name = next(r.name for r in R.LADDER if r.policy(policy) == policy)
        calls.append(name)
        return sizes[name] <= HBM, sizes[name], name

    return attempt


HBM = 1e6  # bytes; one token's saved activations of the small tiny step: ~1.2 KB


@pytest.mark.parametrize(
    "sizes, state, expected, compiled",
    [
        ({"matmuls": 0.9, "attention": 0.8, "full": 0.7}, 0.0, "matmuls", ["matmuls"]),
        ({"matmuls": 1.1, "attention": 0.95, "full": 0.7}, 0.0, "attention", ["matmuls", "attention"]),
        ({"matmuls": 1.3, "attention": 1.2, "full": 0.99}, 0.0, "full", ["matmuls", "attention", "full"]),
        ({"matmuls": 1.3, "attention": 1.2, "full": 1.4}, 0.0, "full", ["matmuls", "attention", "full"]),
        # the pre-filter: a state 100 bytes under the HBM leaves no room for one token's points
        ({"matmuls": 1.3, "attention": 1.2, "full": 0.99995}, HBM - 100, "full", ["full"]),
    ],
)  # fmt: skip
def test_ladder_takes_the_most_saved_rung_that_fits(sizes, state, expected, compiled):
    """A fake memory analysis (bytes per rung, in units of HBM): the first rung that fits is
    taken, those above it are compiled and refused, those below never compiled; a rung whose
    estimate exceeds the HBM is skipped uncompiled; full remat is taken even when it does not
    fit (the caller reports the misfit)."""
    cfg, policy, _ = _small()
    calls: list = []
    sizes = {k: v * HBM for k, v in sizes.items()}
    choice = R.choose(
        cfg, policy, state=state, tokens=1, devices=1, hbm_bytes=HBM,
        attempt=_fake(sizes, calls),
    )  # fmt: skip
    assert choice.rung.name == expected and calls == compiled
    assert choice.policy == R.LADDER[[r.name for r in R.LADDER].index(expected)].policy(policy)
    assert choice.note.startswith(f"auto -> {expected}") and choice.result == expected
    assert len(choice.tried) == (len(R.LADDER) if state else len(compiled))
    assert all("skipped" in t for t in choice.tried[: len(choice.tried) - len(compiled)])


def test_train_step_compiles_the_ladder_against_a_forced_hbm():
    """TrainStep with remat 'auto' on CPU: full remat without an HBM size (said); with one, the
    rungs are compiled (XLA's memory analysis) and the most saved one that fits is taken: a
    size above the 'matmuls' step takes it at once, a size between 'attention' and 'matmuls'
    takes 'attention' after compiling both."""
    cfg, policy, tcfg = _small("runtime.remat=auto")
    plan = ShardingPlan.single()
    step = TrainStep(cfg, policy, tcfg, plan)
    assert step.policy.remat == "full" and "full remat" in step.remat_choice.note
    assert step.remat_choice.result is None  # nothing compiled
    big = TrainStep(cfg, policy, tcfg, plan, hbm_gib=64.0)
    assert big.remat_choice.rung.name == "matmuls" and len(big.remat_choice.tried) == 1
    assert big.policy.remat == "save" and big.policy.saved_names() == R.LADDER[0].saved
    matmuls = big.remat_choice.result
    attention = R.compiled_bytes(
        TrainStep(cfg, R.LADDER[1].policy(policy), tcfg, plan).lower().compile()
    )
    assert attention < matmuls  # the saved q/k/v/o alone hold less than every matmul output
    mid = TrainStep(cfg, policy, tcfg, plan, hbm_gib=(attention + matmuls) / 2 / R.GiB)
    c = mid.remat_choice
    assert c.rung.name == "attention" and c.result == attention
    assert [t.split(":")[0] for t in c.tried] == ["matmuls", "attention"]
    assert "does not fit" in c.tried[0]


def test_every_rung_computes_full_remats_loss_and_gradients():
    """Remat changes what is stored, not what is computed: loss and every gradient of each rung
    (float32, 4 layers = 2 scanned CLA groups) equal full remat's to float32 round-off (XLA may
    fuse the recomputation differently: a few ulp, well under 1e-5 of the largest gradient)."""
    cfg, policy, tcfg = load_configs(TINY, ["model.num_layers=4"])
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 33)), jnp.int32)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}

    def loss_and_grads(p):
        model = init_model(cfg, p, None, seed=3)
        graphdef, params = nnx.split(model)

        def f(params):
            return lm_loss(nnx.merge(graphdef, params), batch, aux_loss_coef=0.01)[0]

        return jax.jit(jax.value_and_grad(f))(params)

    ref_loss, ref_grads = loss_and_grads(policy.replace(remat="full"))
    ref = jax.tree.leaves(ref_grads)
    for rung in R.LADDER[:-1]:
        loss, grads = loss_and_grads(rung.policy(policy))
        np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-6)
        for g, r in zip(jax.tree.leaves(grads), ref, strict=True):
            scale = float(jnp.max(jnp.abs(r))) + 1e-30
            assert float(jnp.max(jnp.abs(g - r))) <= 1e-5 * scale, rung.name


def _yaml_without_mesh(tmp_path) -> Path:
    data = yaml.safe_load(TINY.read_text())
    for key in ("mesh", "rules"):
        data["train"].pop(key)
    path = tmp_path / "tiny_nomesh.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_train_py_picks_the_aot_tools_context_parallel_layout(tmp_path, monkeypatch, capsys):
    """8 devices, the tiny model at 128 tokens with cp_min_seq 64 and no mesh / rules in the
    config: train.py's layout (what it hands the training loop) is the AOT tool's, and both
    print the same `layout:` line; at or below cp_min_seq neither splits the sequence."""
    assert jax.device_count() == 8
    config = _yaml_without_mesh(tmp_path)
    seen = {}

    def fake_train(mcfg, policy, tcfg, *, plan, **_):
        seen.update(tcfg=tcfg, plan=plan)
        return {"losses": []}

    monkeypatch.setattr("hunyuan_jax.train.loop.train", fake_train)
    sets = ["--set", "seq_len=128", "--set", "cp_min_seq=64"]
    rc = train_cli.main(["--config", str(config), "--run-dir", str(tmp_path / "run"), *sets])
    assert rc == 0
    train_line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("layout:")]
    args = aot_cli.build_parser().parse_args(
        ["--config", str(config), "--topology", "local", "--seq", "128", *sets]
    )
    job, header, _, _ = aot_cli.resolve(args)
    assert header["mesh_arg"] == seen["tcfg"].mesh == "fsdp=1,expert=4,tensor=2"
    assert job.plan.label == seen["plan"].label == "fsdp_ep_cp"
    assert dict(job.plan.mesh.shape) == dict(seen["plan"].mesh.shape)
    assert seen["plan"].size("length") == 2
    aot_line = "layout: " + header["layout_note"]
    assert len(train_line) == 1 and train_line[0].split(";")[0] == aot_line.split(";")[0]
    # at the threshold: no context parallelism, the train config's default layout
    rc = train_cli.main(
        ["--config", str(config), "--run-dir", str(tmp_path / "run2"), "--set", "seq_len=64",
         "--set", "cp_min_seq=64"]
    )  # fmt: skip
    assert rc == 0 and seen["tcfg"].rules == "fsdp" and "layout:" not in capsys.readouterr().out
