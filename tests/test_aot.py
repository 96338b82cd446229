"""Ahead-of-time compiles (`hunyuan_jax.aot`): topology names, config and flag resolution, the
FLOP model, exit codes, and real XLA:TPU compiles of the tiny config for a v5p-8 slice in
train / prefill / decode mode, and of the serving engine's programs for a v5e-8 slice (serve).

The TPU compiles need `libtpu` (pip install libtpu; no TPU needed) and are skipped without it.
Each compiles the tiny config in seconds; they run one after the other (never two libtpu
compiles at once)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import HY_TINY
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from hunyuan_jax.aot import compiler, flops, pool_size, topology
from hunyuan_jax.aot import serve as aot_serve
from hunyuan_jax.checkpoints.loading import read_model_config
from hunyuan_jax.cli import aot as cli
from hunyuan_jax.cli.aot import main
from hunyuan_jax.errors import UsageError
from hunyuan_jax.model.policy import RuntimePolicy
from sharding import rules

A52B = "configs/hunyuan_a52b_instruct.yaml"
TINY = "configs/tiny.yaml"
A52B_SAVE = "q_proj,kv_proj,attn_out,o_proj,moe_gate,moe_up,moe_down,mlp_down"


def _libtpu_ok() -> bool:
    if importlib.util.find_spec("libtpu") is None:
        return False
    try:
        topology.topology_devices(topology.parse_topology("v5p-8"))
        return True
    except Exception:
        return False


needs_libtpu = pytest.mark.skipif(
    not _libtpu_ok(),
    reason="libtpu not installed: no ahead-of-time TPU compiles (pip install libtpu)",
)


# ---------------------------------------------------------------------------- no compiler
@pytest.mark.parametrize(
    "name, topo, chips, cloud",
    [
        ("v5p-8", "v5:2x2x1", 4, "v5p-8"),
        ("v5p-128", "v5:4x4x4", 64, "v5p-128"),
        ("v5p-256", "v5:4x4x8", 128, "v5p-256"),
        ("v5p-512", "v5:4x8x8", 256, "v5p-512"),
        ("v4-128", "v4:4x4x4", 64, "v4-128"),
        ("v6e-32", "v6e:4x8", 32, "v6e-32"),
        ("v6e-256", "v6e:16x16", 256, "v6e-256"),
        ("v5e-64", "v5e:8x8", 64, "v5e-64"),
        ("v5litepod-16", "v5e:4x4", 16, "v5e-16"),
        ("v5p:4x4x12", "v5:4x4x12", 192, "v5p-384"),
        ("v6e:2x4", "v6e:2x4", 8, "v6e-8"),
        ("tpu7x-8", "tpu7x:2x2x1", 4, "tpu7x-8"),  # one TPU7x host: 4 chips, 8 devices
        ("v7x-8", "tpu7x:2x2x1", 4, "tpu7x-8"),
    ],
)
def test_topology_names(name, topo, chips, cloud):
    sl = topology.parse_topology(name)
    assert (sl.topology, sl.chips, sl.cloud_name) == (topo, chips, cloud)


@pytest.mark.parametrize("bad", ["v5p-7", "v9-8", "v5p:4x4", "tpu", "v6e-24"])
def test_bad_topology_names(bad):
    with pytest.raises(UsageError):
        topology.parse_topology(bad)


def test_default_meshes():
    cfg = read_model_config(A52B)
    assert topology.default_mesh("train", cfg, 128) == "fsdp=-1,expert=16"
    assert topology.default_mesh("decode", cfg, 32) == "fsdp=1,expert=4,tensor=8"
    assert topology.default_mesh("decode", cfg, 64) == "fsdp=1,expert=8,tensor=8"


def test_long_sequences_get_context_parallelism():
    """`--mode train --seq` > 32768 without --mesh / --rules: preset fsdp_ep_cp with the sequence
    over `tensor` in chunks of <= 16384 tokens (the A52B at 131072 on 128 chips: 8 chunks, experts
    over 16, one sequence per expert shard); the report says so."""
    cfg = read_model_config(A52B)
    assert topology.context_parallel_layout(cfg, 128, 32768) is None
    assert topology.context_parallel_layout(cfg, 128, 131072) == (
        "fsdp=1,expert=16,tensor=8",
        "fsdp_ep_cp",
        8,
    )
    assert topology.context_parallel_layout(cfg, 128, 65536)[0] == "fsdp=2,expert=16,tensor=4"
    argv = ["--config", "configs/tiny.yaml", "--topology", "local", "--seq", "65536"]
    job, header, _, _ = cli.resolve(cli.build_parser().parse_args(argv))
    assert job.plan.rules == rules.get_rules("fsdp_ep_cp") and job.plan.size("length") == 4
    assert (
        header["mesh_arg"] == "fsdp=1,expert=2,tensor=4"
        and "context parallelism" in (header["layout_note"])
    )
    job, header, _, _ = cli.resolve(cli.build_parser().parse_args([*argv, "--rules", "fsdp_ep"]))
    assert not job.plan.shards("length") and "layout_note" not in header


def _configs(*argv):
    return cli.resolve_configs(cli.build_parser().parse_args(["--topology", "local", *argv]))


def test_policy_per_mode():
    # Train: the YAML's runtime section (fp32 master weights, bf16 compute, full remat).
    cfg, policy, _ = _configs("--config", A52B)
    assert (cfg.num_layers, policy.param_dtype, policy.compute_dtype, policy.remat) == (
        64,
        "float32",
        "bfloat16",
        "full",
    )
    _, policy, tcfg = _configs(
        "--config", A52B, "--param-dtype", "bfloat16", "--set", "runtime.remat=save_dots",
        "--set", "opt_state_dtype=bfloat16", "--set", "model.num_layers=4",
    )  # fmt: skip
    assert (policy.param_dtype, policy.remat, tcfg.opt_state_dtype) == (
        "bfloat16",
        "save_dots",
        "bfloat16",
    )
    # Serving: RuntimePolicy.inference(--dtype), --set runtime.* on top.
    _, policy, _ = _configs(
        "--config", A52B, "--mode", "decode", "--set", "runtime.scan_layers=false"
    )
    assert (policy.param_dtype, policy.compute_dtype, policy.remat) == ("bfloat16",) * 2 + ("none",)
    assert policy.scan_layers is False
    # A Hugging Face directory has no runtime section: RuntimePolicy() for training.
    cfg, policy, _ = _configs("--config", str(HY_TINY / "hf_st"))
    assert cfg.num_experts == 8 and (policy.param_dtype, policy.remat) == ("float32", "full")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--set", "num_layers=2"], "model key"),
        (["--mode", "decode", "--set", "lr=1"], "train keys"),
        (["--mode", "decode", "--seq", "4"], "--seq"),
        (["--cache-len", "64"], "--cache-len"),
        (["--config", "no/such.yaml"], "no such file"),
        (["--mesh", "fsdp=3"], "--mesh"),
        (["--rule", "nonsense"], "--rule"),
        (["--mode", "decode", "--step-time", "1"], "train only"),
        (["--mode", "prefill", "--seq", "512", "--cache-len", "256"], "exceeds --cache-len"),
        (["--topology", "v9-8"], "unknown TPU generation"),
        # train.py's own checks (train_data.check_run), before anything is compiled
        (["--seq", "4096"], "seq_len 4096 exceeds the model's max_position_embeddings 256"),
        (["--mode", "decode", "--cache-len", "512"], "max_position_embeddings 256"),
        (["--mode", "decode", "--mesh", "tensor=8"], "tensor=8 does not divide kv_heads"),
        (["--mesh", "expert=8", "--set", "model.num_experts=6"], "does not divide exp"),
        (["--mode", "serve", "--cache-len", "64"], "--max-len"),
        (["--mode", "serve", "--batch", "2"], "does not apply to --mode serve"),
        (["--mode", "decode", "--max-seqs", "4"], "only for --mode serve"),
        (["--mode", "serve", "--page-size", "0"], "--page-size must be >= 1"),
    ],
)
def test_usage_errors_exit_2(argv, message, capsys):
    base = ["--config", TINY, "--topology", "local"]
    assert main(base + argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_analytic_flops_a52b():
    cfg = read_model_config(A52B)
    n = flops.active_matmul_params(cfg)
    # SPEC 1: ~51.5B active per token with the 0.83B embedding; matmuls use the LM head once.
    assert 50.5e9 < n["total"] < 52e9
    full = RuntimePolicy(remat="full", loss_chunk=1024)
    f = flops.analytic_flops(cfg, "train", batch=128, seq=4096, context=4096, policy=full)
    # Full remat: one more forward of the layers (less the groups' last down projections,
    # whose output only the next group reads) and of the chunked loss's LM head.
    assert 0.75 < f["ceiling"] < 0.78 and f["hardware"] < f["model"] * 4 / 3
    none = flops.analytic_flops(cfg, "train", 128, 4096, 4096, RuntimePolicy(remat="none"))
    assert none["ceiling"] == 1.0 and none["model"] == f["model"]
    # Keeping the attention path and the routed experts' matmul outputs: the shared expert's
    # gate and up (2 x 15.0 of 98.4 GFLOPs per token forward) and the head are recomputed.
    save = full.replace(remat="save", remat_save=A52B_SAVE)
    assert flops.analytic_flops(cfg, "train", 128, 4096, 4096, save)["ceiling"] > 0.9
    # SPEC 7: 1.85e15 FLOPs per chip per step at 128 chips measured, 1.10x 8 N T.
    per_chip = f["hardware"] / 128
    assert 1.6e15 < per_chip < 2.0e15


def test_step_time_model_applies_only_where_its_assumptions_hold():
    """The A52B's matmuls fill the MXU and its modeled train step is seconds: the model
    applies. The tiny model's (hidden 96) do not, and a sub-millisecond step is overheads."""
    chip = topology.CHIPS["v5p"]
    a52b, tiny = read_model_config(A52B), read_model_config(TINY)
    assert flops.model_limits(a52b, chip, {"step_time_s": 3.9, "bound": "compute"}) == []
    limits = flops.model_limits(tiny, chip, {"step_time_s": 1e-5, "bound": "communication"})
    assert len(limits) == 2 and "hidden_size 96" in limits[0] and "0.010 ms" in limits[1]
    # A measured --step-time is the user's: the MFU from it stands.
    assert flops.model_limits(tiny, chip, {"step_time_s": 1e-5, "bound": "given"}) == []
    assert topology.CHIPS["v6e"].mxu == 256  # 256x256 on Trillium: a 128-wide model pads


def test_parse_oom_messages():
    text = (
        "RESOURCE_EXHAUSTED: E1000: CompileTimeHbmOom: Ran out of memory on HBM, the total "
        "memory required for HLO temporaries (240.00G) exceeds available HBM (95.73G)."
    )
    assert compiler.parse_oom(text) == (240.0, 95.73)
    used = "Ran out of memory in memory space hbm. Used 187.00G of 95.74G hbm."
    assert compiler.parse_oom(used) == (187.0, 95.74)
    assert compiler.parse_oom("something else") == (None, None)


def test_hoisted_cast_check_reads_the_entry_computation():
    """A bf16 array of a stacked weight's per-device shape defined in the entry computation
    (convert or fusion; not a loop body's slice, not a tuple element) is a hoisted copy."""
    mesh = Mesh(np.array(jax.devices()[:2]), ("fsdp",))
    w = jax.ShapeDtypeStruct((4, 8, 16), jnp.float32, sharding=NamedSharding(mesh, P(None, "fsdp")))
    hlo = """%body (p: bf16[4,4,16]) -> bf16[1,4,16] {
  %p = bf16[4,4,16]{2,1,0} parameter(0)
  %c = bf16[4,4,16]{2,1,0} convert(%x)
}

ENTRY %main (param.1: f32[4,4,16]) -> f32[4,4,16] {
  %param.1 = f32[4,4,16]{2,1,0} parameter(0)
  %convert.1 = bf16[4,4,16]{2,1,0:T(8,128)(2,1)} convert(%param.1), backend_config={}
  %fusion.2 = bf16[4,4,16]{2,1,0} fusion(%param.1), kind=kLoop, calls=%f
  %gte.3 = bf16[4,4,16]{2,1,0} get-tuple-element(%while.4), index=3
  %slice.5 = bf16[1,4,16]{2,1,0} convert(%param.1)
}
"""
    copies = compiler.stacked_cast_copies(hlo, {"w": w})
    assert copies == {"4,4,16": [2, 2 * (4 * 4 * 16) * 2]}
    assert compiler.stacked_cast_copies(hlo.split("ENTRY")[0], {"w": w}) == {}


def test_local_devices_decode_step(capsys, tmp_path):
    """`--mode decode` on this host's 8 CPU devices (platform from the mesh: cpu, no HBM): the
    engine's step for --batch sequences (its bucket), a pool of batch x cache-len tokens, the
    expert-parallel MoE dispatch (the plan shards the experts)."""
    out = tmp_path / "r.json"
    argv = ["--config", TINY, "--topology", "local", "--mode", "decode", "--batch", "3"]
    argv += ["--mesh", "expert=2,tensor=4", "--cache-len", "64"]
    rc = main(argv + ["--json", str(out)])
    assert rc == 0, capsys.readouterr()
    r = json.loads(out.read_text())
    assert r["platform"] == "cpu" and r["chips"] == 8 and r["fits"] and r["hbm_gib"] is None
    assert r["mode"] == "decode" and r["rules"] == "serve_ep_tp"
    assert "EngineCore" in r["step_source"] and "expert_parallel" in r["step_source"]
    [p] = r["programs"]
    assert p["program"] == "step[4]" and p["phase"] == "decode"  # 3 sequences: bucket 4
    assert r["pool"]["pages"] == 3 * 4 and r["pool"]["tokens"] == 3 * 64
    assert r["weights_gib_per_chip"] > 0 and r["pool"]["gib_per_chip"] > 0


def test_local_devices_grpo_train_step_and_engine_at_once(tmp_path, capsys):
    """`--mode grpo` on this host's 8 CPU devices: the GRPO LoRA train step (objective grpo:
    its extra batch arrays, the dropless dispatch) and every program of the rollout engine built
    on the step's own abstract tree (base + adapters, the train plan's shardings), compiled by
    the same tool; memory per chip of both at once = max(train peak, rollout peak) + code."""
    out = tmp_path / "r.json"
    argv = ["--config", TINY, "--topology", "local", "--mode", "grpo", "--seq", "32"]
    argv += ["--set", "lora=true", "--set", "model.num_layers=2", "--max-seqs", "8"]
    argv += ["--token-budget", "8", "--page-size", "8"]
    assert main([*argv, "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["fits"] and r["mode"] == "grpo" and r["rules"] == "fsdp_ep"
    assert "objective grpo" in r["step_source"] and "LoRA rank 8" in r["step_source"]
    assert "all_to_all" not in r["step_source"]  # the inference (dropless) dispatch
    names = [e["program"] for e in r["engine_programs"]]
    assert names == ["step[1]", "step[2]", "step[4]", "step[8]", "score[8]"]
    assert r["pool"]["max_len"] == 33 and r["pool"]["pages"] == 8 * 5 + 1  # rows of seq + 1
    b = r["bytes"]
    assert b["at_once"] >= max(b["train_peak"], b["rollout_peak"]) > 0
    assert b["train_peak"] >= b["pool"] > 0 and b["weights"] > 0
    assert "both at once" in capsys.readouterr().out


def test_grpo_refusal_names_the_program_that_does_not_fit(monkeypatch, capsys):
    """An engine program the chip refuses (on the train layout every chip holds the whole
    pool: 512 x 4097 tokens was 256 GiB per v5p chip for the A52B) is named in the one-line
    error with the pool and what to lower; exit 6 (DoesNotFit)."""
    from hunyuan_jax.aot import grpo
    from hunyuan_jax.errors import DoesNotFit

    real, calls = grpo.compile_program, []

    def refuse_the_engine(program):
        calls.append(program)
        if len(calls) == 1:  # the train step compiles; the first engine program is refused
            return real(program)
        raise DoesNotFit("RESOURCE_EXHAUSTED: E1000: CompileTimeHbmOom: ...", 192.4, 95.7)

    monkeypatch.setattr(grpo, "compile_program", refuse_the_engine)
    argv = ["--config", TINY, "--topology", "local", "--mode", "grpo", "--seq", "32"]
    argv += ["--set", "lora=true", "--set", "model.num_layers=2", "--max-seqs", "8"]
    argv += ["--token-budget", "8", "--page-size", "8"]
    assert main(argv) == 6
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert (
        "the rollout engine's step[1] (pool " in err[0] and "GiB per chip) does not fit" in err[0]
    )
    assert err[0].endswith("lower --max-seqs or --max-len"), err[0]


# ---------------------------------------------------------------------------- XLA:TPU
@needs_libtpu
@pytest.mark.parametrize(
    "mode, extra",
    [
        ("train", ["--seq", "64"]),
        ("prefill", ["--seq", "32", "--cache-len", "128", "--batch", "2"]),
        ("decode", ["--cache-len", "256", "--batch", "4"]),
    ],
)
def test_tiny_compiles_for_v5p(mode, extra, tmp_path, capsys):
    out = tmp_path / "r.json"
    rc = main(["--config", TINY, "--topology", "v5p-8", "--mode", mode, "--json", str(out), *extra])
    text = capsys.readouterr().out
    assert rc == 0, text
    r = json.loads(out.read_text())
    assert r["platform"] == "tpu" and r["device_kind"].startswith("TPU v5")
    assert r["chips"] == 4 and r["hbm_gib"] == pytest.approx(95.73) and r["fits"]
    step = r if mode == "train" else r["programs"][0]  # serving: the engine's one program
    assert 0 < step["memory_gib"]["total"] < 1
    assert step["flops"]["compiled_raw_per_chip"] > 0
    # The tiny model's matmuls are smaller than the MXU and its step is microseconds: the
    # step-time model does not apply, and the report claims no MFU.
    mfu = step["mfu"]
    assert mfu["applies"] is False and "mfu" not in mfu
    assert any("hidden_size 96 below the v5p MXU" in why for why in mfu["limits"])
    assert 0 < mfu["step_time_s"] < flops.MIN_MODELED_STEP_S
    assert "does not apply" in text and "MFU 100" not in text
    if mode == "train":
        f = r["flops"]  # tiny.yaml: no remat
        assert f["ceiling"] == 1.0 and f["analytic_recompute_per_chip"] == 0
        assert r["mesh"]["expert"] == 4 and r["rules"] == "fsdp_ep"
        assert r["batch"] == 4  # default: one row per batch shard
        assert "TrainStep" in r["step_source"] and "expert_parallel" in r["step_source"]
        assert r["param_dtype"] == "float32"  # tiny.yaml's runtime section
        # Parameters and optimizer state are donated: the outputs alias them.
        assert r["memory_gib"]["aliased"] > 0.5 * r["memory_gib"]["arguments"]
        # In-process XLA:TPU cannot print the executable: no collectives, said so.
        assert "error" in r["comm"] and r["mfu"]["comm_time_s"] is None
        assert "collectives: not counted" in text
        assert "memory per chip" in text
    else:  # the engine's programs: infer.py, the server and rollouts run exactly these
        assert r["rules"] == "serve_ep_tp" and r["param_dtype"] == "bfloat16"
        assert "EngineCore" in r["step_source"] and len(r["programs"]) == 1
        assert step["phase"] == mode
        assert r["pool"]["tokens"] == {"prefill": 2 * 128, "decode": 4 * 256}[mode]
        assert step["program"] == {"prefill": "step[32]", "decode": "step[4]"}[mode]
        assert step["pool_collectives"] == [] and "page pool" in text


@needs_libtpu
def test_tiny_train_communication_from_the_cli_process(tmp_path):
    """`python -m hunyuan_jax.cli.aot` (its own process) reads the optimized HLO from XLA's dump: the
    layer scan's collectives counted per group (3 groups) and timed at v5p's ICI bandwidth.
    fp32 weights used in bf16 under full remat: no bf16 copy of a stacked weight outside the
    layer loops (XLA:TPU's bfloat16 propagation made one of every stacked weight before
    `qops.cast`; the A52B step kept 11.29 GiB per chip of them on 64 chips)."""
    out = tmp_path / "r.json"
    argv = ["--config", TINY, "--topology", "v5p-8", "--mode", "train", "--seq", "64"]
    argv += ["--set", "runtime.compute_dtype=bfloat16", "--set", "runtime.remat=full"]
    argv += ["--dump", str(tmp_path / "dump")]
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(Path.cwd()))
    for key in ("TPU_ACCELERATOR_TYPE", "TPU_WORKER_HOSTNAMES"):  # as on a fresh shell
        env.pop(key, None)  # (this process's in-process runs of the tool set them)
    proc = subprocess.run(
        [sys.executable, "-m", "hunyuan_jax.cli.aot", *argv, "--json", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    c = json.loads(out.read_text())["comm"]
    assert c["unknown_trip_counts"] == [] and 3 in c["loops"].values()
    assert {"all-to-all", "all-gather"} <= set(c["by_op"]) and c["total_bytes"] > 0
    assert c["ici_time_s"] == pytest.approx(c["total_bytes"] / 600e9)
    assert "collectives per chip per step" in proc.stdout
    assert "FLOP ceiling" in proc.stdout
    r = json.loads(out.read_text())
    assert r["param_dtype"] == "float32" and r["compute_dtype"] == "bfloat16"
    assert r["hoisted_cast_shapes"] == [] and r["hoisted_cast_gib"] == 0
    assert 0.75 < r["flops"]["ceiling"] < 0.82  # full remat: about one more forward (0.796)
    assert "the cast was hoisted" not in proc.stdout
    if not topology._has_tpu_hardware():  # libtpu's start-up warnings, silenced by the tool
        for noise in ("E0000", "unexpected worker hostname", "Failed to find host bounds"):
            assert noise not in proc.stderr, proc.stderr[-2000:]


@needs_libtpu
def test_tpu7x_fp8_experts_compile_for_a_prefill_chunk():
    """TPU7x, fp8 experts: XLA's ragged dot of bf16 rows by e4m3 values overshoots its scoped
    VMEM (CompileTimeScopedVmemOom at [1024, 2288] @ [16, 2288, 6400], the A52B's down
    projection per device at tensor=8: 6 of its 14 serve programs did not compile; 40 s to
    reproduce, not re-checked here). `dispatch.experts_fn_for` casts the values to bf16 first
    there (exact), and the routed experts of a 1024-token chunk compile at the A52B's per-device
    shapes; other chips keep the float8 ragged dot."""
    from hunyuan_jax.model import dispatch, moe, qops
    from sharding.plan import ShardingPlan

    cfg, policy = read_model_config(A52B), RuntimePolicy.inference("bfloat16")
    devices = topology.topology_devices(topology.parse_topology("tpu7x-8"))
    plan = ShardingPlan.create({"tensor": 1}, "serve_ep_tp", devices=devices[:1])
    fn = dispatch.experts_fn_for("prefill", cfg, policy, plan, 1024)
    assert fn.__wrapped__ is moe.dropless_experts  # moe.float8_as_activations
    v5p = topology.topology_devices(topology.parse_topology("v5p-8"))
    v5p_plan = ShardingPlan.create({"tensor": 1}, "serve_ep_tp", devices=v5p[:1])
    assert dispatch.experts_fn_for("prefill", cfg, policy, v5p_plan, 1024) is moe.dropless_experts
    rep = NamedSharding(plan.mesh, P())
    sds = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=rep)  # noqa: E731
    t, d, f, e = 1024, cfg.hidden_size, cfg.intermediate_size // 8, cfg.num_experts

    def routed(x, ids, gate, up, down, scale_f, scale_d):
        fp8 = lambda v, s: qops.QArray(v, s, None, jnp.float8_e4m3fn)  # noqa: E731
        w = moe.ExpertWeights(fp8(gate, scale_f), fp8(up, scale_f), fp8(down, scale_d))
        routing = moe.Routing(ids, jnp.ones((t, 1)), jnp.ones((t, e)) / e, jnp.zeros((t,)))
        return fn(x, routing, w)[0]

    args = (sds((t, d), jnp.bfloat16), sds((t, 1), jnp.int32))
    args += (sds((e, d, f), jnp.float8_e4m3fn),) * 2 + (sds((e, f, d), jnp.float8_e4m3fn),)
    args += (sds((e, 1, f), jnp.float32), sds((e, 1, d), jnp.float32))
    jax.jit(routed).lower(*args).compile()


@needs_libtpu
def test_exit_status_when_it_does_not_fit(tmp_path, capsys):
    # The compiler's own verdict: a 2^22-slot cache for 64 rows does not fit a v5e chip.
    rc = main(
        ["--config", TINY, "--topology", "v5e-4", "--mode", "decode", "--batch", "64"]
        + ["--cache-len", str(2**22), "--mesh", "data=1,tensor=4"]
        + ["--set", f"model.max_position_embeddings={2**22}"]
        + ["--json", str(tmp_path / "oom.json")]
    )
    captured = capsys.readouterr()
    assert rc == 6
    assert "DOES NOT FIT" in captured.out and "does not fit" in captured.err
    assert captured.err.count("\n") == 1
    r = json.loads((tmp_path / "oom.json").read_text())
    assert r["fits"] is False and r["available_gib"] == pytest.approx(15.75)
    assert r["required_gib"] > 15.75
    # A program that compiles but exceeds a given HBM budget fails the same way.
    argv = ["--config", TINY, "--topology", "v5p-8", "--mode", "decode", "--cache-len", "128"]
    assert main(argv + ["--hbm-gib", "1e-6"]) == 6
    assert "does not fit" in capsys.readouterr().err


@needs_libtpu
def test_unrolled_flops_close_to_analytic(tmp_path):
    out = tmp_path / "r.json"
    argv = ["--config", TINY, "--topology", "v5p-8", "--mode", "train", "--seq", "64"]
    assert main(argv + ["--unrolled-flops", "--json", str(out)]) == 0
    f = json.loads(out.read_text())["flops"]
    # The scan undercounts by about the number of layer groups (3); unrolled does not.
    assert f["compiled_unrolled_per_chip"] > 1.5 * f["compiled_raw_per_chip"]
    assert f["compiled_unrolled_per_group"] > 0
    ratio = f["compiled_unrolled_per_chip"] / f["analytic_hardware_per_chip"]
    assert 0.8 < ratio < 2.0, ratio


@needs_libtpu
def test_serve_compiles_every_engine_program(tmp_path, capsys):
    """--mode serve: exactly the engine's programs (EngineCore.programs for these sizes), each
    compiled for v5e-8 with one page pool sized to the chip (the largest program lands at the
    usable HBM less the margin), the pool's tokens and max_len sequences, the step-time model
    of the decode and prefill steps, and no collective that moves the pool."""
    from hunyuan_jax.engine.core import EngineCore
    from hunyuan_jax.model.policy import RuntimePolicy
    from hunyuan_jax.model.state import abstract_model

    out = tmp_path / "r.json"
    argv = ["--config", TINY, "--topology", "v5e-8", "--mode", "serve", "--max-seqs", "4"]
    argv += ["--hbm-gib", "2"]  # a small pool: the tiny model's [2, 8] pages pad 64x in TPU tiles
    rc = main(argv + ["--token-budget", "8", "--json", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text
    r = json.loads(out.read_text())
    cfg = read_model_config(TINY)
    core = EngineCore(
        abstract_model(cfg, RuntimePolicy.inference("bfloat16")),
        max_seqs=4, max_len=256, page_size=16, token_budget=8, compile=False,
    )  # fmt: skip
    want = [f"{n}[{t}]" for n, t in core.programs]
    assert [p["program"] for p in r["programs"]] == want
    assert want == ["step[1]", "step[2]", "step[4]", "step[8]", "score[8]"]
    assert r["mode"] == "serve" and r["fits"] and r["chips"] == 8
    assert r["mesh"]["tensor"] == 4 and r["rules"] == "serve_ep_tp"
    assert r["engine"]["attention"] == "pallas"  # head_dim 8, stored lane-padded to 128
    pool, hbm = r["pool"], r["hbm_gib"]
    assert pool["tokens"] == (pool["num_pages"] - 1) * 16 == pool["pages"] * 16
    assert pool["max_len_sequences"] == pytest.approx(pool["tokens"] / 256)
    most = 2 + pool_size.REFINE + 1 + pool_size.BISECT_MAX  # the search's bound
    assert pool["copies_of_pool"] >= 1 and 2 <= len(pool["probes"]) <= most
    for p in r["programs"]:
        m = p["memory_gib"]
        assert (
            p["fits"]
            and m["total"] <= hbm
            and m["pool"] == pytest.approx(pool["gib_per_chip"], abs=1e-3)
        )
        assert m["weights"] > 0 and m["temporaries"] > 0
        assert p["pool_collectives"] == []
        assert f"{p['program']} " in text
    largest = max(p["memory_gib"]["total"] for p in r["programs"])
    # The rule extrapolates the largest program's memory linearly in the pages from two probes;
    # on this tiny model's xla path (its [2, 8] minor dims pad to TPU tiles) it is a little
    # sublinear, so the pool lands a few percent short of the target, never above it.
    target = hbm - pool["margin_gib"]
    assert 0.9 * target < largest <= target + 0.01
    decode, prefill = r["programs"][2], r["programs"][3]
    assert decode["scenario"].startswith("decode: 4 sequences")
    assert prefill["scenario"].startswith("prefill: one 8-token chunk")
    for p in (decode, prefill):
        assert p["mfu"]["step_time_s"] > 0 and p["flops"]["analytic_model_per_chip"] > 0
        assert p["mfu"]["applies"] is False  # the tiny model: below the MXU, microseconds
    assert "page pool:" in text and "step[8] (prefill" in text


FAKE_PAGE, FAKE_BASE, FAKE_LIMIT = 256 * 1024, 25.11 * 2**30, 30.0 * 2**30


def _fake_pool_probe(compiled: list):
    """A stand-in for `aot.serve._probe`: the score program's total grows by 256 KiB a page
    from 25.11 GiB and the compiler refuses above 30 GiB (below usable - margin); the pages
    of each probe are appended to `compiled`."""
    gib, page, base, limit = 2**30, FAKE_PAGE, FAKE_BASE, FAKE_LIMIT

    def probe(job, model, sizes, max_len, pages, hbm_gib, hlo_dir, oom_ok=False):
        compiled.append(pages)
        total = base + pages * page
        if total > limit:
            assert oom_ok
            return {"program": "score[4096]", "pages": pages, "total": None}
        return {"program": "score[4096]", "pages": pages, "total": total,
                "pool_bytes": pages * page, "temp": gib, "compile_s": 0.0}  # fmt: skip

    return probe


def test_pool_sizing_bisects_below_a_refused_size(monkeypatch, capsys):
    """The pool rule after an out-of-memory verdict (as v6e-8 int4 met it: XLA refused the
    linear estimate, the halfway back-off fit, and the next estimate was the refused size
    again): it bisects below the refused size instead of stopping at the back-off, down to a
    bracket within 1 % (`pool_size.BISECT_TOL`), one progress line per probe on stderr."""
    monkeypatch.setattr(aot_serve, "_probe", _fake_pool_probe([]))
    rule = aot_serve.size_pool(None, None, aot_serve.ServeSizes(), 32768, 31.24, None)
    pages = [p["pages"] for p in rule["probes"]]
    totals = [p["total"] for p in rule["probes"]]
    assert pages[:2] == [2049, 4098] and totals[2] is None  # the estimate: refused
    assert pages[3] == (4098 + pages[2]) // 2 and totals[3] is not None  # halfway: fits
    assert pages[4] == (pages[3] + pages[2]) // 2 and totals[4] <= FAKE_LIMIT  # bisected
    assert rule["num_pages"] == max(p for p, t in zip(pages, totals) if t)
    boundary = int(
        (FAKE_LIMIT - FAKE_BASE) // FAKE_PAGE
    )  # the most pages the compiler takes: 20029
    search = rule["search"]
    assert search["lo"] == rule["num_pages"] <= boundary < search["hi"]
    assert search["hi"] - search["lo"] <= pool_size.BISECT_TOL * search["hi"]
    assert len(pages) - 3 <= pool_size.bisection_probes(4098, pages[2])  # 6 after the refusal
    err = capsys.readouterr().err
    assert err.count("pool sizing") == len(pages) - 2 and f"bisection of [4098, {pages[2]})" in err


@pytest.mark.parametrize(
    "limit_gib, slope_pages, stop",
    [
        (27.5, 1, "bracket"),  # the compiler refuses well below the target
        (30.6, 1, "bracket"),  # just below it
        (30.6, 2, "bracket"),  # a slope of 2 pages per page: the line creeps up, then bisects
        (40.0, 2, "within"),  # nothing refused: the line creeps up, a page per page hits it
        (40.0, 1, "within"),  # the line hits the target
    ],
)
def test_pool_search_finds_the_boundary_in_bounded_probes(limit_gib, slope_pages, stop):
    """`pool_size.largest_pool` with a fake compile (no TPU): total(P) = a + b P, refused above
    the compiler's limit. It ends with the most pages that fit (total <= target and not
    refused) within BISECT_TOL of the largest that does, in at most REFINE + BISECT_MAX
    probes (+ 1 at a page's own bytes a page when the line met no failure), and says why it
    stopped."""
    gib, page = 2**30, 256 * 1024
    base, target, limit = 25.11 * gib, 30.74 * gib, limit_gib * gib
    boundary = int((min(limit, target) - base) // page)  # the most pages that fit

    def measure(pages):
        total = base + pages * page
        return {"pages": pages, "total": None if total > limit else total}

    lines: list[str] = []
    probes, search = pool_size.largest_pool(
        measure,
        [measure(2049), measure(4098)],
        target,
        slope_pages * page,
        page,
        2**27,
        lines.append,
    )
    lo, hi = search["lo"], search["hi"]
    assert len(lines) == len(probes) - 2 <= pool_size.REFINE + 1 + pool_size.BISECT_MAX
    assert search["stopped"].startswith(stop), search
    assert lo <= boundary and all(
        p["pages"] <= lo for p in probes if p["total"] and p["total"] <= target
    )
    if stop == "bracket":
        assert boundary < hi and hi - lo <= pool_size.BISECT_TOL * hi
    else:
        assert target - (base + lo * page) < pool_size.CLOSE_GIB * gib and hi is None


def test_pool_bracket_seeds_the_bisection(monkeypatch, capsys):
    """`--pool-bracket LO,HI` (v6e-8 int4's 13,571-23,044 pages from an earlier run): LO is
    compiled and must fit, HI is taken as refused without a compile, and the search bisects
    between them at once (no line probes) to the same 1 % bracket around the compiler's
    boundary; a LO that does not fit is a usage error (exit 2)."""
    compiled: list[int] = []
    monkeypatch.setattr(aot_serve, "_probe", _fake_pool_probe(compiled))
    sizes = aot_serve.ServeSizes(pool_bracket=(13571, 23044))
    rule = aot_serve.size_pool(None, None, sizes, 32768, 31.24, None)
    assert compiled[0] == 13571 and 23044 not in compiled
    assert compiled[1] == (13571 + 23044) // 2  # straight to the bisection
    assert len(compiled) - 1 <= pool_size.bisection_probes(13571, 23044)
    boundary = int((FAKE_LIMIT - FAKE_BASE) // FAKE_PAGE)  # 20029
    search = rule["search"]
    assert search["lo"] == rule["num_pages"] <= boundary < search["hi"]
    assert search["hi"] - search["lo"] <= pool_size.BISECT_TOL * search["hi"]
    assert rule["probes"][1] == {"program": "score[4096]", "pages": 23044, "total": None,
                                 "given": "not compiled"}  # fmt: skip
    assert "--pool-bracket 13571,23044" in rule["rule"]
    err = capsys.readouterr().err
    assert err.count("pool sizing") == len(compiled)  # one line per compile
    assert "pool sizing, --pool-bracket's lower end: 13571 pages:" in err
    with pytest.raises(UsageError, match="lower end, 20100 pages, does not fit"):
        aot_serve.size_pool(None, None, aot_serve.ServeSizes(pool_bracket=(20100, 23044)),
                            32768, 31.24, None)  # fmt: skip


@pytest.mark.parametrize(
    "flags, why",
    [
        (["--pool-bracket", "9,5"], "2 <= LO < HI"),
        (["--pool-bracket", "x"], "LO,HI"),
        (["--pool-bracket", "2,9", "--num-pages", "5"], "one"),
    ],
)
def test_pool_bracket_bad_input_exits_2(flags, why, capsys):
    argv = ["--config", TINY, "--topology", "v6e-8", "--mode", "serve", *flags]
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse's own refusal of the value
        rc = e.code
    assert rc == 2 and why in capsys.readouterr().err


def test_chip_bytes_counts_int4_at_half_a_byte():
    """`aot.serve.chip_bytes` (the serve reports' weights and pool per chip): the largest shard
    of each array, int4 at 4 bits a value (numpy's itemsize says 1): a [16, 64] int4 weight
    over 4 devices is 16 x 64 / 4 / 2 = 128 bytes a chip, its [16, 1] bfloat16 scales
    replicated 32, unsharded 16 x 64 / 2 = 512."""
    mesh = Mesh(np.array(jax.devices()[:4]), ("tensor",))
    split, whole = NamedSharding(mesh, P(None, "tensor")), NamedSharding(mesh, P())
    w = jax.ShapeDtypeStruct((16, 64), jnp.int4, sharding=split)
    s = jax.ShapeDtypeStruct((16, 1), jnp.bfloat16, sharding=whole)
    assert aot_serve.chip_bytes({"w": w, "s": s}) == 128 + 32
    assert aot_serve.chip_bytes([jax.ShapeDtypeStruct((16, 64), jnp.int4)]) == 512


def test_local_devices_decode_step_int4(capsys, tmp_path):
    """`--weights int4` in the AOT tool: the engine's decode step compiles on this host's 8 CPU
    devices with the int4 model (default target group) and the report says so."""
    out = tmp_path / "r.json"
    argv = ["--config", TINY, "--topology", "local", "--mode", "decode", "--batch", "2"]
    argv += ["--mesh", "expert=2,tensor=4", "--cache-len", "64", "--weights", "int4"]
    rc = main(argv + ["--json", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text
    r = json.loads(out.read_text())
    assert r["policy"]["weights"] == "int4" and r["policy"]["int4_group_size"] == 128
    assert "matmul weights int4" in text and r["fits"] and r["weights_gib_per_chip"] > 0
