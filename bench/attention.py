"""Forward+backward time of causal attention: xla (reference, materialised scores) vs flash
(blockwise, hunyuan_jax.model.kernels.flash), on this machine's default JAX backend (CPU here).

    python -m bench.attention                       # B=1, S=2048, H=8, KVH=2, D=64, float32
    python -m bench.attention --seq 4096 --rounds 9

Each timed call is jit(grad) of <attention(q, k, v), w> w.r.t. q, k, v (compiled beforehand).
The sides alternate (xla, flash, then flash, xla, ...) for `--rounds` rounds, so a load change
on a shared machine hits both; each side reports its median and min-max spread. The run also
times a 2048x2048 float32 jnp.dot in the same rounds: the machine's own matmul peak, to read
the attention rates against. FLOPs counted: the causal half of the 6 matmuls' worth of useful
work (forward QK^T and PV, backward dV, dP, dK, dQ) = 6*B*H*S^2*D; flash also recomputes QK^T
in the backward, and both sides' masked work beyond the causal half is not counted.
A spread (max-min)/median over 20% on any line means the machine was busy: compare with care.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

# Before jax is imported: jax reads JAX_PLATFORMS when it is imported (a CPU benchmark;
# set JAX_PLATFORMS to run it elsewhere).
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
import numpy as np

from hunyuan_jax.model.kernels import AttentionMask, reference_attention
from hunyuan_jax.model.kernels.flash import flash_attention

BUSY_SPREAD = 0.20


def _timed(fn, *args) -> float:
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - t0


def _line(name: str, times: list[float], flops: float, extra: str = "") -> tuple[str, float]:
    med, lo, hi = statistics.median(times), min(times), max(times)
    spread = (hi - lo) / med
    text = (
        f"{name:<7} median {med * 1e3:9.2f} ms  spread {lo * 1e3:.2f}-{hi * 1e3:.2f} ms "
        f"({spread:5.1%})  {flops / med / 1e9:8.1f} GFLOP/s{extra}"
    )
    return text, spread


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--block-q", type=int, default=512)
    ap.add_argument("--block-kv", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args(argv)
    b, s, h, kvh, d = args.batch, args.seq, args.heads, args.kv_heads, args.head_dim

    rng = np.random.default_rng(0)
    q, w = (jnp.asarray(rng.standard_normal((b, s, h, d), np.float32)) for _ in range(2))
    k, v = (jnp.asarray(rng.standard_normal((b, s, kvh, d), np.float32)) for _ in range(2))
    mask = AttentionMask.causal(jnp.ones((b, s), jnp.int32))

    def fwd_bwd(attn):
        loss = lambda q, k, v: jnp.vdot(attn(q, k, v, mask), w)
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))

    flash = lambda *a: flash_attention(*a, block_q=args.block_q, block_kv=args.block_kv)
    sides = {"xla": fwd_bwd(reference_attention), "flash": fwd_bwd(flash)}
    grads = {n: f(q, k, v) for n, f in sides.items()}  # compile + warm up
    err = max(
        float(jnp.max(jnp.abs(a - r)) / jnp.max(jnp.abs(r)))
        for a, r in zip(grads["flash"], grads["xla"])
    )
    m = jnp.asarray(rng.standard_normal((2048, 2048), np.float32))
    dot = jax.jit(jnp.dot)
    dot(m, m).block_until_ready()

    times: dict[str, list[float]] = {"xla": [], "flash": [], "matmul": []}
    order = list(sides)
    for r in range(args.rounds):
        for name in order if r % 2 == 0 else order[::-1]:
            times[name].append(_timed(sides[name], q, k, v))
        times["matmul"].append(_timed(dot, m, m))

    print(
        f"attention fwd+bwd, causal, B={b} S={s} H={h} KVH={kvh} D={d} float32, "
        f"flash blocks {args.block_q}x{args.block_kv}; {args.rounds} alternating rounds on "
        f"{jax.devices()[0].device_kind} ({os.cpu_count()} CPUs, load average "
        f"{os.getloadavg()[0]:.1f}); flash vs xla grads max rel. diff {err:.1e}"
    )
    attn_flops = 6 * b * h * s * s * d
    peak = 2 * 2048**3 / statistics.median(times["matmul"])
    lines = [
        _line(
            n,
            times[n],
            attn_flops,
            f"  ({attn_flops / statistics.median(times[n]) / peak:.0%} of matmul peak)",
        )
        for n in sides
    ]
    lines.append(_line("matmul", times["matmul"], 2 * 2048**3, "  (2048x2048 f32 jnp.dot)"))
    for text, _ in lines:
        print(text)
    med = {n: statistics.median(times[n]) for n in sides}
    print(f"flash / xla time: {med['flash'] / med['xla']:.2f}")
    busy = [t.split()[0] for t, spread in lines if spread > BUSY_SPREAD]
    if busy:
        print(
            f"WARNING: spread over {BUSY_SPREAD:.0%} on {', '.join(busy)}: the machine was "
            "busy during the run; the medians are rough (rerun, or use more --rounds)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
