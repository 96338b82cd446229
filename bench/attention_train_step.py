"""The train.py step at a long sequence with each attention implementation of the runtime
policy (`runtime.attention`: xla = the full score matrix, flash = blockwise online softmax with
its custom VJP), same weights and batch, sides alternating through bench/harness.py.

    python -m bench.attention_train_step [--config configs/small.yaml] [--seq 2048] [--rounds 3]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax
import numpy as np

from bench import harness
from hunyuan_jax.data.corpus import to_global
from hunyuan_jax.host_env import reexec_with_hugepage_malloc
from hunyuan_jax.model.state import init_model
from hunyuan_jax.train.config import load_configs
from hunyuan_jax.train.step import TrainStep
from sharding.plan import ShardingPlan

ROOT = Path(__file__).resolve().parent.parent


def _side(config: str, attention: str, seq: int, batch: int, overrides: list[str]):
    """A compiled step with `attention` and the function that runs it once (state and batch
    kept; the step donates its state, so each call continues from the last)."""
    mcfg, policy, tcfg = load_configs(
        config,
        [
            "mesh=data=1,fsdp=1,expert=1,tensor=1",
            "rules=fsdp",
            f"batch_size={batch}",
            f"seq_len={seq}",
            "micro_batches=1",
            "warmup_steps=0",
            f"runtime.attention={attention}",
            *overrides,
        ],
    )
    plan = ShardingPlan.create(tcfg.mesh, tcfg.rules)
    step = TrainStep(mcfg, policy, tcfg, plan)
    state = step.init_state(init_model(mcfg, policy, plan, tcfg.seed))
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, mcfg.vocab_size, (batch, seq + 1)).astype(np.int32)
    local = {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)).copy(),
        "segment_ids": np.ones((batch, seq), np.int32),
        "loss_mask": np.ones((batch, seq), np.float32),
    }
    data = to_global({k: v[None] for k, v in local.items()}, step.batch_sharding, batch)
    t0 = time.perf_counter()
    compiled = step.compile(state, data)
    compile_s = time.perf_counter() - t0
    box = {"state": state, "loss": []}

    def run():
        box["state"], metrics = compiled(box["state"], data)
        box["loss"].append(float(jax.block_until_ready(metrics["loss"])))

    run()  # warm-up
    return run, compile_s, box


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "small.yaml"))
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--sides", default="xla,flash")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    print(f"# {args.config}: {args.batch} x {args.seq} tokens per step; {harness.machine_line()}")
    sides, info = {}, {}
    for name in args.sides.split(","):
        run, compile_s, box = _side(args.config, name, args.seq, args.batch, args.overrides)
        sides[name], info[name] = run, (compile_s, box)
    results = harness.alternate(sides, args.rounds)
    harness.report_peak(results)
    print("| attention | step s, median (min-max) | tokens/s | compile s | first loss |")
    print("|---|---|---|---|---|")
    for name in sides:
        st = results[name]["time"]
        compile_s, box = info[name]
        print(
            f"| {name} | {st.median:.2f} ({st.lo:.2f}-{st.hi:.2f}) | "
            f"{st.rate(args.batch * args.seq)} | {compile_s:.1f} | {box['loss'][0]:.5f} |"
        )
    names = list(sides)
    if len(names) == 2:
        a, b = (results[n]["time"].median for n in names)
        print(f"{names[1]} / {names[0]} step time: {b / a:.2f}x")
    for line in harness.busy_warnings(results):
        print(line)
    print(f"# {harness.machine_line()} at the end")


if __name__ == "__main__":
    reexec_with_hugepage_malloc()  # as train.py / infer.py do (hunyuan_jax/host_env.py)
    main()
