"""Multi-host training on one machine: 2 processes x 4 CPU devices (gloo collectives) run the
real train step (`hunyuan_jax.train.step.TrainStep`), save an orbax checkpoint from both
hosts, restore it into fresh sharded arrays and keep training; every loss must equal a
single-process run on 8 devices with the same mesh and the same global batches.

This file is also the worker script: `python tests/test_multihost.py --processes N --devices D
--run-dir DIR --out result.json`, with HUNYUAN_COORDINATOR / HUNYUAN_NUM_PROCESSES /
HUNYUAN_PROCESS_ID in the environment of each process (read by `distributed.initialize`).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MESH = "fsdp=2,expert=4"  # fsdp spans the two hosts, experts all-to-all within each
RULES = "fsdp_ep"
STEPS, SAVE_AT = 4, 2
BATCH, SEQ = 8, 32


# ============================================================================ worker
def worker(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--processes", type=int, required=True)
    ap.add_argument("--devices", type=int, required=True)
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)

    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={a.devices}"
    os.environ["JAX_PLATFORMS"] = "cpu"
    from hunyuan_jax import distributed

    dcfg = distributed.initialize(initialization_timeout=120)  # from HUNYUAN_* env vars
    assert dcfg.mode == ("explicit" if a.processes > 1 else "single"), dcfg

    import jax
    import jax.numpy as jnp
    import numpy as np

    from hunyuan_jax.checkpoints.runs import Checkpointer
    from hunyuan_jax.train.config import TrainConfig, load_configs
    from hunyuan_jax.train.step import TrainState, TrainStep
    from sharding.plan import ShardingPlan

    assert jax.process_count() == a.processes and jax.device_count() == 8, distributed.summary()
    t_start = time.time()
    tick = lambda what: print(f"[{time.time() - t_start:6.1f}s] {what}", flush=True)
    mcfg, policy, _ = load_configs(ROOT / "configs" / "tiny.yaml")
    tcfg = TrainConfig(
        run_dir=a.run_dir,
        batch_size=BATCH,
        seq_len=SEQ,
        steps=STEPS,
        lr=3e-3,
        warmup_steps=1,
        mesh=MESH,
        rules=RULES,
        async_checkpointing=True,
    )
    plan = ShardingPlan.create(tcfg.mesh, tcfg.rules)
    mesh = plan.mesh
    train_step = TrainStep(mcfg, policy, tcfg, plan)
    # Initial state from host numpy (seeded, identical on every host) placed straight into
    # its shardings: no initialiser to compile. Adam's state starts at zero.
    abstract, sh = train_step.abstract_state, train_step.shardings
    rng = np.random.default_rng(0)

    def init(path, a, s):
        value = (
            np.ones(a.shape, a.dtype)
            if "norm" in jax.tree_util.keystr(path)
            else (mcfg.initializer_range * rng.standard_normal(a.shape)).astype(a.dtype)
        )
        return jax.device_put(value, s)

    state = TrainState(
        jax.tree_util.tree_map_with_path(init, abstract.params, sh.params),
        jax.tree.map(
            lambda a, s: jax.device_put(np.zeros(a.shape, a.dtype), s),
            abstract.opt_state,
            sh.opt_state,
        ),
        jax.device_put(np.int32(0), sh.step),
    )
    b_sh = train_step.batch_sharding
    jitted = train_step  # TrainStep.__call__: the jitted step (with its frozen base, if any)
    tick("initialised")

    def global_batch(step: int) -> dict:
        """The same global batch in every run; each host builds only the rows it feeds."""
        rng = np.random.default_rng(1000 + step)
        ids = rng.integers(0, mcfg.vocab_size, (1, BATCH, SEQ + 1), dtype=np.int32)
        full = {
            "inputs": ids[..., :-1],
            "targets": ids[..., 1:],
            "positions": np.broadcast_to(np.arange(SEQ, dtype=np.int32), (1, BATCH, SEQ)),
            "segment_ids": np.ones((1, BATCH, SEQ), np.int32),
            "loss_mask": np.ones((1, BATCH, SEQ), np.float32),
        }
        lo, hi = distributed.process_rows(b_sh, (1, BATCH, SEQ), axis=1)
        return {
            k: distributed.host_local_to_global(np.ascontiguousarray(v[:, lo:hi]), b_sh, v.shape)
            for k, v in full.items()
        }

    checksum = jax.jit(
        lambda t: [
            jnp.sum(
                x.astype(jnp.float32)
                * jnp.arange(x.size, dtype=jnp.float32).reshape(x.shape)
                / x.size
            )
            for x in jax.tree.leaves(t)
        ],
        out_shardings=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()),
    )
    losses, t0 = [], time.time()
    ckpt = Checkpointer(a.run_dir, keep=2, async_save=True)
    for step in range(SAVE_AT):
        state, m = jitted(state, global_batch(step))
        losses.append(float(m["loss"]))
        tick(f"step {step + 1}")
    ckpt.save(
        SAVE_AT,
        state.params,
        state.opt_state,
        {str(p): {"step": SAVE_AT} for p in range(jax.process_count())},
    )
    ckpt.wait()
    tick("saved")
    saved_sums = np.asarray(checksum((state.params, state.opt_state)))
    del state  # continue from the checkpoint on disk only
    target = train_step.restore_target()
    params, opt_state, data = ckpt.restore(ckpt.latest_step(), target.params, target.opt_state)
    state = TrainState(params, opt_state, jax.device_put(jnp.asarray(SAVE_AT, jnp.int32), sh.step))
    restored_sums = np.asarray(checksum((state.params, state.opt_state)))
    tick("restored")
    for step in range(SAVE_AT, STEPS):
        state, m = jitted(state, global_batch(step))
        losses.append(float(m["loss"]))
    ckpt.close()
    tick("done")
    shard_files = sorted(
        str(p.relative_to(a.run_dir)) for p in Path(a.run_dir).rglob("*") if p.is_file()
    )
    if jax.process_index() == 0:
        Path(a.out).write_text(
            json.dumps(
                {
                    "losses": losses,
                    "processes": jax.process_count(),
                    "local_devices": jax.local_device_count(),
                    "data_state": data,
                    "restore_max_abs_diff": float(np.max(np.abs(saved_sums - restored_sums))),
                    "seconds": time.time() - t0,
                    "files": shard_files[:50],
                    "mesh": dict(mesh.shape),
                }
            )
        )


# ============================================================================ tests
@pytest.fixture
def clean_env(monkeypatch):
    for var in list(os.environ):
        if var.startswith(
            (
                "HUNYUAN_",
                "JAX_COORDINATOR",
                "JAX_NUM_PROCESSES",
                "JAX_PROCESS_ID",
                "TPU_WORKER",
                "SLURM_",
                "OMPI_",
                "PMI_",
                "MEGASCALE_",
                "JOBSET",
            )
        ):
            monkeypatch.delenv(var)
    return monkeypatch


def test_resolve_from_arguments_environment_and_clusters(clean_env):
    from hunyuan_jax import distributed as d

    assert d.resolve().mode == "single"
    r = d.resolve("10.0.0.2:8476", 4, 1)
    assert (r.mode, r.coordinator_address, r.num_processes, r.process_id, r.source) == (
        "explicit",
        "10.0.0.2:8476",
        4,
        1,
        "arguments",
    )
    clean_env.setenv("HUNYUAN_COORDINATOR", "head:1234")
    clean_env.setenv("HUNYUAN_NUM_PROCESSES", "2")
    clean_env.setenv("HUNYUAN_PROCESS_ID", "1")
    clean_env.setenv("HUNYUAN_LOCAL_DEVICE_IDS", "0,1")
    r = d.resolve()
    assert (r.mode, r.num_processes, r.process_id, r.local_device_ids, r.source) == (
        "explicit",
        2,
        1,
        (0, 1),
        "environment",
    )
    assert d.resolve(process_id=0).process_id == 0  # arguments win over the environment
    clean_env.delenv("HUNYUAN_PROCESS_ID")
    with pytest.raises(ValueError, match="process id"):
        d.resolve()
    clean_env.setenv("HUNYUAN_PROCESS_ID", "2")
    with pytest.raises(ValueError, match=r"not in \[0, 2\)"):
        d.resolve()
    for var in (
        "HUNYUAN_COORDINATOR",
        "HUNYUAN_NUM_PROCESSES",
        "HUNYUAN_PROCESS_ID",
        "HUNYUAN_LOCAL_DEVICE_IDS",
    ):
        clean_env.delenv(var)
    clean_env.setenv("TPU_WORKER_HOSTNAMES", "t1w0,t1w1,t1w2,t1w3")
    r = d.resolve()
    assert r.mode == "auto" and r.num_processes == 4 and "Cloud TPU" in r.source
    clean_env.delenv("TPU_WORKER_HOSTNAMES")
    clean_env.setenv("TPU_WORKER_HOSTNAMES", "localhost")  # a single-host TPU VM
    assert d.resolve().mode == "single"
    clean_env.setenv("SLURM_NTASKS", "8")
    assert d.resolve().mode == "auto"


def test_process_rows_on_one_host():
    import jax
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from hunyuan_jax import distributed as d
    from sharding.mesh import build_mesh

    mesh = build_mesh("fsdp=2,expert=4")
    sh = NamedSharding(mesh, P(None, ("fsdp", "expert"), None))
    assert d.process_rows(sh, (1, 16, 8), axis=1) == (0, 16)  # one host holds every row
    x = np.arange(16 * 8, dtype=np.int32).reshape(1, 16, 8)
    g = d.host_local_to_global(x, sh, x.shape)
    np.testing.assert_array_equal(np.asarray(g), x)
    assert "process 0 of 1" in d.summary() and jax.process_count() == 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(args: list[str], log: Path, **extra_env) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "JAX_", "HUNYUAN_"))}
    env.update(PYTHONPATH=str(ROOT), **extra_env)
    return subprocess.Popen(
        [sys.executable, __file__, *args],
        stdout=open(log, "w"),
        stderr=subprocess.STDOUT,
        env=env,
        cwd=ROOT,
    )


def _wait(procs, logs, timeout=420):
    deadline = time.time() + timeout
    for p, log in zip(procs, logs):
        try:
            rc = p.wait(timeout=max(deadline - time.time(), 1))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"worker timed out; log {log}:\n{log.read_text()[-3000:]}")
        if rc != 0:
            for q in procs:
                q.kill()
            pytest.fail(f"worker exited with {rc}; log {log}:\n{log.read_text()[-3000:]}")


@pytest.mark.slow  # three processes compiling the train step: ~45 s on 2 idle cores
def test_two_hosts_match_one_host_with_checkpoint_restore(tmp_path):
    pytest.importorskip("orbax.checkpoint")
    port = _free_port()
    multi = [
        _launch(
            [
                "--processes",
                "2",
                "--devices",
                "4",
                "--run-dir",
                str(tmp_path / "multi"),
                "--out",
                str(tmp_path / "multi.json"),
            ],
            tmp_path / f"multi{i}.log",
            HUNYUAN_COORDINATOR=f"127.0.0.1:{port}",
            HUNYUAN_NUM_PROCESSES="2",
            HUNYUAN_PROCESS_ID=str(i),
        )
        for i in range(2)
    ]
    single = _launch(
        [
            "--processes",
            "1",
            "--devices",
            "8",
            "--run-dir",
            str(tmp_path / "single"),
            "--out",
            str(tmp_path / "single.json"),
        ],
        tmp_path / "single.log",
    )
    _wait(
        multi + [single],
        [tmp_path / "multi0.log", tmp_path / "multi1.log", tmp_path / "single.log"],
    )
    m = json.loads((tmp_path / "multi.json").read_text())
    s = json.loads((tmp_path / "single.json").read_text())
    assert m["processes"] == 2 and m["local_devices"] == 4
    assert s["processes"] == 1 and s["local_devices"] == 8
    assert len(m["losses"]) == STEPS and all(l == l for l in m["losses"])
    # The restore gives back exactly what was saved, and training continues identically.
    assert m["restore_max_abs_diff"] == 0.0 and s["restore_max_abs_diff"] == 0.0
    assert m["data_state"] == {"0": {"step": SAVE_AT}, "1": {"step": SAVE_AT}}
    import numpy as np

    np.testing.assert_allclose(m["losses"], s["losses"], rtol=2e-6, atol=0)
    assert len(set(m["losses"])) == STEPS  # every step trains on a new batch
    # Both hosts wrote into one checkpoint (orbax OCDBT: a manifest plus per-process data).
    assert any(f.startswith(f"checkpoints/{SAVE_AT}/") for f in m["files"]), m["files"]


if __name__ == "__main__":
    worker()
