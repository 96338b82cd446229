"""The search for the largest page pool that fits: which pool sizes `aot.serve.size_pool` compiles
the engine's largest program at, and when it stops. The search knows nothing of compiles:
`measure(pages)` returns a probe {'pages', 'total': bytes per chip, or None for the compiler's
out-of-memory verdict, ...}, and a probe fits when its total is at most the target (usable HBM
less the margin).

1. Along the line: from the most pages that fit so far, the estimate pages + (target - total) /
   slope (the slope: bytes per page, measured by the caller's two first probes), up to REFINE
   probes. XLA schedules with fewer temporaries when the HBM gets tight, so the line alone leaves
   HBM unused; it stops at the first probe that does not fit, or when an estimate reaches a size
   that did not fit before. If every probe fitted, one more at the estimate with a page's own
   bytes per page (the least a page adds) looks for a size that does not.
2. Bisection, once a size has not fitted: between the most pages that fit (lo) and the fewest
   that did not (hi), the midpoint, until hi - lo <= BISECT_TOL x hi (the pool is then within
   1 % of the largest that fits), at most BISECT_MAX probes (a bracket of width w needs about
   log2(w / (BISECT_TOL hi)): 6 for v6e-8's 13,571-23,044 pages).
Both stop as soon as the largest fitting probe is within CLOSE_GIB of the target, or at the cap
of pages (the engine's int32 slots). This assumes the program's total grows with the pages
(monotone): a size that did not fit bounds every larger one.

Seeded (`--pool-bracket LO,HI`, e.g. an earlier run's bracket): LO is compiled (it must fit),
HI is taken as a size that did not fit (not compiled), and the search starts at step 2.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from hunyuan_jax.errors import DoesNotFit

GiB = 2**30
REFINE = 3  # probes along the line, at most
CLOSE_GIB = 0.1  # stop when the largest fitting probe is this close below the target
BISECT_TOL = 0.01  # stop bisecting when the bracket is this fraction of its upper end
BISECT_MAX = 8  # probes of the bisection, at most

Probe = dict[str, Any]


def fits(probe: Probe, target: float) -> bool:
    return probe["total"] is not None and probe["total"] <= target


def bracket(probes: list[Probe], target: float, cap: int) -> tuple[int, int]:
    """(the most pages that fit, 0 if none; the fewest that did not, cap + 1 if none)."""
    lo = max((p["pages"] for p in probes if fits(p, target)), default=0)
    hi = min((p["pages"] for p in probes if not fits(p, target)), default=cap + 1)
    return lo, hi


def progress(p: Probe, target: float, how: str) -> str:
    """The progress line of one probe."""
    total = "refused (out of memory)" if p["total"] is None else f"{p['total'] / GiB:.2f} GiB"
    verdict = "fits" if fits(p, target) else "does not fit"
    return f"pool sizing, {how}: {p['pages']} pages: {total}, {verdict} (target {target / GiB:.2f})"


def bisection_probes(lo: int, hi: int) -> int:
    """Probes the bisection needs to narrow [lo, hi) to BISECT_TOL (ignoring BISECT_MAX)."""
    n = 0
    while hi - lo > max(1, BISECT_TOL * hi):
        lo, n = (lo + hi) // 2, n + 1  # the worst case keeps the upper half
    return n


def largest_pool(
    measure: Callable[[int], Probe],
    probes: list[Probe],
    target: float,
    slope: float,
    page: float,
    cap: int,
    log: Callable[[str], None] | None = None,
    refine: int = REFINE,
) -> tuple[list[Probe], dict[str, Any]]:
    """Probe on from `probes` (those measured so far, each with 'pages' and 'total'; `slope`:
    the program's bytes per page, `page`: a page's own bytes, the least a page adds): (every
    probe in order, {'lo', 'hi', 'stopped'}: the final bracket and why the search stopped).
    `refine`: probes along the line, at most (0: bisect the given bracket straight away)."""
    probes = list(probes)
    say = log or _stderr

    def probe(pages: int, how: str) -> bool:
        p = measure(pages)
        probes.append(p)
        say(progress(p, target, how))
        return fits(p, target)

    def estimate(per_page: float) -> int:
        """The pages that reach the target from the largest fitting probe, at per_page."""
        best = max((p for p in probes if fits(p, target)), key=lambda p: p["pages"])
        return min(cap, best["pages"] + int((target - best["total"]) // per_page))

    def done() -> str:
        """Why the search is over ('' while it is not)."""
        lo, hi = bracket(probes, target, cap)
        if lo == 0:
            return "nothing fits"
        if target - max(p["total"] for p in probes if fits(p, target)) < CLOSE_GIB * GiB:
            return f"within {CLOSE_GIB} GiB of the target"
        if lo == cap:
            return "capped"
        if hi <= cap and hi - lo <= max(1, BISECT_TOL * hi):
            return f"bracket within {BISECT_TOL:.0%} of its upper end"
        return ""

    for _ in range(refine):  # 1. along the line, while the probes fit
        if done():
            break
        lo, hi = bracket(probes, target, cap)
        pages = estimate(slope)
        if not lo < pages < hi or not probe(pages, "linear estimate"):
            break
    lo, hi = bracket(probes, target, cap)
    if not done() and hi > cap and estimate(page) > lo:  # no size failed: find one
        probe(estimate(page), "upper end (one page's bytes a page)")
    bisections = 0
    while not done() and bisections < BISECT_MAX:  # 2. bisection
        lo, hi = bracket(probes, target, cap)
        if hi > cap:
            break
        probe((lo + hi) // 2, f"bisection of [{lo}, {hi})")
        bisections += 1
    lo, hi = bracket(probes, target, cap)
    stopped = done() or (
        f"bisection: {BISECT_MAX} probes" if bisections == BISECT_MAX else "no size failed"
    )
    return probes, {"lo": lo, "hi": None if hi > cap else hi, "stopped": stopped}


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def pool_rule(first, probes, search, margin_gib, hbm_gib, page, slope, cap, how) -> dict[str, Any]:
    """The pool rule's report from the search (`aot.serve.size_pool`): {'num_pages', the
    probes in GiB, ...}; DoesNotFit when not even two pages fit."""
    out = {
        "rule": "the most pages whose largest program totals at most usable HBM - margin, "
        f"found by compiling it ({how})",
        "probe_program": first["program"],
        "probes": [{k: _gib(k, v) for k, v in p.items()} for p in probes],
        "margin_gib": margin_gib,
        "page_bytes_per_chip": page,
        "program_bytes_per_page": slope,
        "copies_of_pool": slope / page,
        "search": search,
        "num_pages": search["lo"],  # the most pages that fit
    }
    if search["lo"] == cap:
        out["capped"] = f"{cap} pages: the engine's int32 slots"
    if out["num_pages"] < 2:
        rest = first["total"] - first["pool_bytes"]
        raise DoesNotFit(
            f"no room for a page pool: weights, temporaries and the {margin_gib} GiB "
            f"margin take {(rest / GiB + margin_gib):.2f} of {hbm_gib} GiB per chip",
            rest / GiB + margin_gib,
            hbm_gib,
        )
    return out


def _gib(key: str, value):
    """A probe's byte counts in GiB."""
    return value / GiB if value is not None and key.endswith(("total", "bytes", "temp")) else value
