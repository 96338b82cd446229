"""Benchmark of what the integrity record costs a training checkpoint: save and restore times
of the same state with and without the per-array digests (`hunyuan_jax.checkpoints.runs`), and
the digest pass alone.

    python -m bench.checkpoint                 # ~1.2 GB: 0.4 GB float32 params + Adam moments
    python -m bench.checkpoint --params-gb 1 --repeat 3

The state is synthetic (random float32 arrays shaped like stacked MoE weights, Adam's mu / nu,
a step count) on this host's first device. "without" is the plain orbax CheckpointManager
save / restore of the same items; "with" is `Checkpointer.save` (digests on device, then the
same save plus a small JSON item) and `Checkpointer.restore` (the same restore, then the
digests recomputed and compared). Saves are synchronous here so that their time is the
whole write; in training they are asynchronous and only the digest pass and the device ->
host copy block the step loop. Prints one line per measurement and a table (best of
`--repeat`).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path


def _state(params_gb: float, seed: int = 0):
    import jax
    import jax.numpy as jnp

    n = max(1, round(params_gb * 1e9 / 4 / (8 * 1024 * 2048)))  # [8, 1024, 2048] float32 blocks
    keys = jax.random.split(jax.random.key(seed), n)
    params = {
        f"layer_{i}": {"w": jax.random.normal(k, (8, 1024, 2048))} for i, k in enumerate(keys)
    }
    params["norm"] = jnp.ones((1024,))
    opt = {
        "count": jnp.zeros((), jnp.int32),
        "mu": jax.tree.map(lambda x: x * 0.1, params),
        "nu": jax.tree.map(lambda x: x * x, params),
    }
    jax.block_until_ready((params, opt))
    return params, opt


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params-gb", type=float, default=0.4)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args(argv)

    import jax
    import orbax.checkpoint as ocp

    from hunyuan_jax.checkpoints import integrity, runs

    params, opt = _state(args.params_gb)
    total_gb = sum(x.nbytes for x in jax.tree.leaves((params, opt))) / 1e9
    abstract = lambda t: jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), t
    )
    aparams, aopt = abstract(params), abstract(opt)
    data = {"0": {"epoch": 0, "cursor": 1}}
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_ckpt_"))
    times: dict[str, list[float]] = {}

    def timed(name, fn):
        t = time.perf_counter()
        out = fn()
        if hasattr(out, "keys"):  # an orbax Composite
            out = [out[k] for k in out.keys()]
        jax.block_until_ready(out)
        times.setdefault(name, []).append(time.perf_counter() - t)
        print(f"{name}: {times[name][-1]:.2f} s", flush=True)
        return out

    # Compile the digest pass once (its compile is per tree structure, once per run).
    t = time.perf_counter()
    integrity.tree_digests((params, opt))
    print(f"digest pass compile + first run: {time.perf_counter() - t:.2f} s", flush=True)
    try:
        for r in range(args.repeat):
            run = work / f"run{r}"
            ck = runs.Checkpointer(run, keep=10, async_save=False)
            plain = ocp.args.Composite(
                params=ocp.args.StandardSave(params),
                opt_state=ocp.args.StandardSave(opt),
                data=ocp.args.JsonSave(data),
            )
            timed("save without digests", lambda: ck.manager.save(1, args=plain, force=True))
            timed("save with digests", lambda: ck.save(2, params, opt, data))
            timed("digest pass alone", lambda: integrity.tree_digests((params, opt)))
            restore = ocp.args.Composite(
                params=ocp.args.StandardRestore(aparams),
                opt_state=ocp.args.StandardRestore(aopt),
                data=ocp.args.JsonRestore(),
            )
            timed("restore without verification", lambda: ck.manager.restore(1, args=restore))
            timed("restore with verification", lambda: ck.restore(2, aparams, aopt))
            ck.close()
            shutil.rmtree(run)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\nstate: {total_gb:.2f} GB (params {args.params_gb} GB float32 + Adam mu, nu)")
    print("| measurement | best s | GB/s |")
    print("|---|---|---|")
    for name, ts in times.items():
        print(f"| {name} | {min(ts):.2f} | {total_gb / min(ts):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
