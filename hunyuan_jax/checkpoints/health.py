"""Whether a checkpoint was saved from healthy training, and what to say when a run stops on a
non-finite loss.

A checkpoint at step S, the previous one at step P (0 for the first), is *healthy* when every
step of its window (P, S] that ran was finite and none of them spiked:

    loss(t)      <= LOSS_FACTOR * median(loss)       over the reference steps
    grad_norm(t) <= GRAD_FACTOR * median(grad_norm)  over the reference steps

for every finite t in (P, S]; the reference is the last REFERENCE_STEPS finite steps up to P
(at least MIN_REFERENCE of them; with fewer, e.g. the first checkpoint of a run, the window's
own first steps serve, and with fewer still only finiteness is judged). Steps skipped with
`on_nonfinite=skip` changed nothing and are only counted. LOSS_FACTOR = 1.5 and GRAD_FACTOR
= 5: a loss 50% above its recent median, or a gradient norm 5x its median, is a spike, not
noise. A slow drift (loss creeping up over hundreds of steps) moves the median along and is
not caught: look at metrics.jsonl.

The loop records `assess(...)` in each checkpoint's integrity record (`runs`); when a
run stops on a non-finite loss, `stop_report` names the last finite step, every kept
checkpoint with its health, the newest healthy one, and what to do.

Non-finite weights are never saved, so never called healthy: a step's loss and gradient are
computed from the weights before its update, so an update that overflows (a learning rate or
LR scale too large for float32, e.g. 1e39) leaves finite metrics and NaN / inf weights, which
only the next step's loss would show. `Checkpointer.save` therefore checks every float array
of the parameters and optimizer state first (`nonfinite_arrays`, one jitted pass on device,
at each save only) and stops the run with `NonFiniteLoss` (exit 5) and `stop_report`'s
message, instead of saving them (with `on_nonfinite=skip` too: no later batch can repair
them). Recording them as unhealthy instead would still leave a final checkpoint of NaN
weights behind a run that exits 0.
"""

from __future__ import annotations

import json
import math
from collections import deque
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from hunyuan_jax.checkpoints import integrity

LOSS_FACTOR = 1.5
GRAD_FACTOR = 5.0
REFERENCE_STEPS = 100
MIN_REFERENCE = 5


def _median(xs: list[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def _finite(x) -> bool:
    return x is not None and math.isfinite(float(x))


class History:
    """The recent steps of a run: (step, loss, grad_norm, ok), enough for `assess`."""

    def __init__(self, keep: int):
        self.steps: deque[tuple[int, float, float, bool]] = deque(maxlen=keep + REFERENCE_STEPS)

    @classmethod
    def from_metrics(cls, path: Path, up_to: int, keep: int) -> History:
        """Seeded from <run>/metrics.jsonl (steps <= up_to), so a resumed run judges its
        first checkpoint against the steps before the resume."""
        h = cls(keep)
        if path.is_file():
            for line in path.read_text().splitlines():
                try:
                    r = json.loads(line)
                    if r["step"] <= up_to:
                        h.add(r["step"], r["loss"], r["grad_norm"], r.get("ok", True))
                except (ValueError, KeyError, TypeError):
                    pass  # a line cut short by a kill
        return h

    def add(self, step: int, loss, grad_norm, ok: bool) -> None:
        ok = bool(ok) and _finite(loss) and _finite(grad_norm)
        self.steps.append((int(step), float(loss), float(grad_norm), ok))

    def last_finite(self) -> tuple[int, float] | None:
        for step, loss, _, ok in reversed(self.steps):
            if ok:
                return step, loss
        return None

    def assess(self, step: int, since: int) -> dict:
        """The health of a checkpoint at `step` whose window is (since, step]."""
        window = [r for r in self.steps if since < r[0] <= step]
        ran = [r for r in window if r[3]]
        ref = [r for r in self.steps if r[0] <= since and r[3]][-REFERENCE_STEPS:]
        if len(ref) < MIN_REFERENCE and len(ran) >= 2 * MIN_REFERENCE:
            ref, ran = ran[:MIN_REFERENCE], ran[MIN_REFERENCE:]
        out = {
            "step": step,
            "window": [since + 1, step],
            "finite_steps": len([r for r in window if r[3]]),
            "skipped_steps": len(window) - len([r for r in window if r[3]]),
            "loss_factor": LOSS_FACTOR,
            "grad_factor": GRAD_FACTOR,
            "reference_steps": len(ref),
        }
        if ran:
            out["loss_last"] = ran[-1][1]
            out["loss_max"] = max(r[1] for r in ran)
            out["grad_norm_max"] = max(r[2] for r in ran)
        if not window or not any(r[3] for r in window):
            return dict(out, healthy=False, reason="no finite step since the previous checkpoint")
        if len(ref) < MIN_REFERENCE:
            return dict(out, healthy=True, reason="finite (too few steps to judge spikes)")
        loss_med, grad_med = _median([r[1] for r in ref]), _median([r[2] for r in ref])
        out.update(loss_median=loss_med, grad_norm_median=grad_med)
        for s, loss, gnorm, _ in ran:
            if loss > LOSS_FACTOR * loss_med:
                return dict(
                    out,
                    healthy=False,
                    reason=f"loss {loss:.4g} at step {s} > {LOSS_FACTOR} x median {loss_med:.4g}",
                )
            if gnorm > GRAD_FACTOR * grad_med:
                return dict(
                    out,
                    healthy=False,
                    reason=(
                        f"grad norm {gnorm:.4g} at step {s} > {GRAD_FACTOR} x median {grad_med:.4g}"
                    ),
                )
        return dict(
            out,
            healthy=True,
            reason=(
                f"max loss {out['loss_max']:.4g} <= {LOSS_FACTOR} x median {loss_med:.4g}, max "
                f"grad norm {out['grad_norm_max']:.4g} <= {GRAD_FACTOR} x median {grad_med:.4g}"
            ),
        )


@jax.jit
def _nonfinite_flags(xs):
    return jnp.stack([~jnp.all(jnp.isfinite(x)) for x in xs])


def nonfinite_arrays(tree) -> list[str]:
    """The names (orbax's) of the float arrays of a (possibly sharded) pytree that hold a NaN
    or an infinity, computed where they live in one jitted pass (every process of a pod gets
    the same answer)."""
    items = [
        (n, x)
        for n, x in integrity.named_leaves(tree)
        if jnp.issubdtype(x.dtype, jnp.inexact) and x.size
    ]
    if not items:
        return []
    out = _nonfinite_flags([x for _, x in items])
    if not out.is_fully_addressable:  # multi-host: the (replicated) result of a reduction
        out = out.addressable_shards[0].data
    flags = np.asarray(jax.device_get(out))
    return [n for (n, _), bad in zip(items, flags) if bad]


def describe(step: int, health: dict | None) -> str:
    if health is None:
        return f"{step} (health not recorded)"
    word = "healthy" if health.get("healthy") else "UNHEALTHY"
    lo, hi = health.get("window", [None, step])
    return f"{step} {word} (steps {lo}-{hi}: {health.get('reason')})"


def stop_report(
    where: str, last_finite: tuple[int, float] | None, checkpoints: dict[int, dict | None], run_dir
) -> str:
    """The one-line message of a run stopped on a non-finite loss: `where` (the step and its
    values), the last finite step, the kept checkpoints with their health, the newest healthy
    one and what to do."""
    run_dir = Path(run_dir)
    parts = [f"{where}; stopped without saving"]
    if last_finite is not None:
        parts.append(f"last finite step: {last_finite[0]} (loss {last_finite[1]:.4g})")
    if not checkpoints:
        parts.append(
            "no checkpoint was saved: rerun from scratch with a lower learning rate "
            "(--set lr=...) or --set on_nonfinite=skip"
        )
        return "; ".join(parts)
    parts.append("checkpoints: " + ", ".join(describe(s, h) for s, h in checkpoints.items()))
    healthy = [s for s, h in checkpoints.items() if h and h.get("healthy")]
    latest = max(checkpoints)
    ckdir = run_dir / "checkpoints"
    if not healthy:
        parts.append(
            f"no checkpoint is healthy: delete {ckdir} and start over with a lower learning "
            f"rate (--set lr=...), or resume from step {latest} at your own risk"
        )
        return "; ".join(parts)
    best = max(healthy)
    newer = [s for s in checkpoints if s > best]
    todo = "rerun the same command (it resumes from it)"
    if newer:
        todo = f"delete the newer ones ({' '.join(f'rm -r {ckdir / str(s)}' for s in newer)}), then rerun"
    before = [s for s in healthy if s < best]
    again = (
        f" (if it spikes again, the damage was saved with it: go back to step {max(before)})"
        if before
        else ""
    )
    parts.append(
        f"newest healthy checkpoint: step {best}; to continue from it: {todo} with a lower "
        f"learning rate (--set lr=...) or --set on_nonfinite=skip to skip non-finite "
        f"batches{again}"
    )
    return "; ".join(parts)
