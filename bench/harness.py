"""Timing shared by the benchmarks that compare sides (bench/train_step.py, bench/decode.py):
the sides run alternately, round after round, so that each sees the same machine load; each
timed quantity is reported as its median and spread over the rounds; the machine's float32
matmul peak (a 2048 x 2048 jnp.dot) is measured in the same rounds, so that FLOP/s figures
can be read as a fraction of what this machine did at that time; and a spread above
`BUSY_SPREAD` is flagged as a busy machine (the numbers of that run are not trustworthy).

    rounds = alternate({"jax": run_jax, "torch": run_torch}, rounds=5)
    stats = rounds["jax"]["step"]          # Stats: median, lo, hi, spread, samples

A side is a callable returning a dict {quantity: seconds} (e.g. prefill and decode seconds of
one generate call), or None: then the call itself is timed as {"time": seconds}.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable

import numpy as np

BUSY_SPREAD = 0.15  # (max - min) / median above this: the machine was busy


@dataclasses.dataclass(frozen=True)
class Stats:
    samples: tuple[float, ...]

    @property
    def median(self) -> float:
        return float(np.median(self.samples))

    @property
    def lo(self) -> float:
        return float(min(self.samples))

    @property
    def hi(self) -> float:
        return float(max(self.samples))

    @property
    def spread(self) -> float:
        """(max - min) / median over the rounds."""
        return (self.hi - self.lo) / self.median if self.median > 0 else 0.0

    def rate(self, amount: float) -> str:
        """`amount / seconds` as 'median (min-max)'."""
        return f"{amount / self.median:,.1f} ({amount / self.hi:,.1f}-{amount / self.lo:,.1f})"


def matmul_peak_fn(n: int = 2048) -> tuple[Callable[[], None], float]:
    """(one timed float32 n x n jnp.dot, its FLOPs). Compiled and warmed up here."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    dot = jax.jit(jnp.dot)
    dot(a, b).block_until_ready()
    return (lambda: dot(a, b).block_until_ready()), 2.0 * n**3


def memory_bandwidth_fn(mib: int = 512) -> tuple[Callable[[], None], float]:
    """(one timed reduction of a `mib` MiB float32 array, its bytes): the machine's memory read
    rate, far larger than any cache. Compiled and warmed up here."""
    import jax
    import jax.numpy as jnp

    a = jnp.ones((mib * 2**20 // 4,), jnp.float32)
    total = jax.jit(jnp.sum)
    total(a).block_until_ready()
    return (lambda: total(a).block_until_ready()), float(a.size * 4)


def alternate(
    sides: dict[str, Callable[[], dict[str, float] | None]],
    rounds: int,
    *,
    peak: bool = True,
    log: Callable[[str], None] | None = None,
) -> dict[str, dict[str, Stats]]:
    """Runs every side once per round, in turn, `rounds` times (plus the matmul peak as side
    "peak" with quantity "time" when `peak`). Returns {side: {quantity: Stats}}."""
    calls = dict(sides)
    if peak:
        dot, _ = matmul_peak_fn()

        def best_dot():  # the best of 3: one dot is short enough to be hit by a single hiccup
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                dot()
                times.append(time.perf_counter() - t0)
            return {"time": min(times)}

        calls["peak"] = best_dot
    out: dict[str, dict[str, list[float]]] = {k: {} for k in calls}
    for r in range(rounds):
        for name, fn in calls.items():
            t0 = time.perf_counter()
            got = fn()
            took = time.perf_counter() - t0
            if got is None:
                got = {"time": took}
            for q, s in got.items():
                out[name].setdefault(q, []).append(float(s))
        if log:
            log(f"# round {r + 1}/{rounds} done")
    return {k: {q: Stats(tuple(v)) for q, v in d.items()} for k, d in out.items()}


def peak_gflops(results: dict[str, dict[str, Stats]], n: int = 2048) -> Stats:
    """The matmul peak of `alternate`'s results as GFLOP/s samples."""
    return Stats(tuple(2.0 * n**3 / t / 1e9 for t in results["peak"]["time"].samples))


def machine_line() -> str:
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"{os.cpu_count()} CPUs, load average {load} (1/5/15 min)"


def busy_warnings(results: dict[str, dict[str, Stats]], limit: float = BUSY_SPREAD) -> list[str]:
    """One warning line naming every timed quantity whose spread exceeds `limit` (none: [])."""
    over = [
        f"{side} {q} {st.spread:.0%}"
        for side, qs in results.items()
        for q, st in qs.items()
        if st.spread > limit
    ]
    if not over:
        return []
    return [
        f"WARNING: the machine was busy ({machine_line()}): spread (max-min)/median above "
        f"{limit:.0%} in {', '.join(over)}; these numbers are not trustworthy"
    ]


def report_peak(results: dict[str, dict[str, Stats]]) -> float:
    """Prints the matmul peak line; returns its median GFLOP/s."""
    pk = peak_gflops(results)
    print(
        f"matmul peak (float32 2048^3 jnp.dot, same run): {pk.median:.1f} GFLOP/s "
        f"(min-max {pk.lo:.1f}-{pk.hi:.1f})"
    )
    return pk.median
