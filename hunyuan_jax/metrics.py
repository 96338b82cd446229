"""Training metrics: one JSON object per step in <run>/metrics.jsonl (process 0), the progress
line, and the model-FLOPs utilisation estimate.

On resume, lines past the restored step are dropped (the file is rewritten atomically) so the
file always describes the run as it happened once; a line cut short by a kill is dropped too.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np

from hunyuan_jax import atomic

# bf16 peak FLOP/s per chip (SPEC 6), by device kind.
PEAK_BF16 = {
    "v4": 275e12,
    "v5p": 459e12,
    "v5 lite": 197e12,
    "v5e": 197e12,
    "v6 lite": 918e12,
    "v6e": 918e12,
}


def peak_flops_per_device(configured: float | None = None) -> float | None:
    """`configured`, else the bf16 peak of this process's TPU chip, else None."""
    if configured is not None:
        return configured
    dev = jax.devices()[0]
    if dev.platform != "tpu":
        return None
    kind = dev.device_kind.lower()
    for name, flops in sorted(PEAK_BF16.items(), key=lambda kv: -len(kv[0])):
        if name in kind:
            return flops
    return None


class MetricsLog:
    """<run>/metrics.jsonl (process 0); on resume, lines past the restored step are dropped."""

    def __init__(self, run_dir: Path, start_step: int):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.enabled = jax.process_index() == 0
        if not self.enabled:
            return
        kept = []
        if self.path.is_file():
            for line in self.path.read_text().splitlines():
                try:
                    if json.loads(line)["step"] <= start_step:
                        kept.append(line)
                except (json.JSONDecodeError, KeyError, TypeError):
                    pass  # a line cut short by a kill
        atomic.write_text(self.path, "".join(line + "\n" for line in kept))
        self.fh = open(self.path, "a")

    def write(self, record: dict) -> None:
        if self.enabled:
            self.fh.write(json.dumps(record) + "\n")
            self.fh.flush()

    def close(self) -> None:
        if self.enabled and not self.fh.closed:
            self.fh.close()


def to_record(step: int, m: dict) -> dict:
    """A step's device metrics as a JSON-able dict."""
    rec = {"step": step}
    for k, v in m.items():
        v = np.asarray(v)
        rec[k] = v.tolist() if v.ndim else (bool(v) if v.dtype == bool else float(v))
    return rec


def progress_line(step: int, m: dict, tokens_per_s: float, mfu: float | None) -> str:
    load = np.asarray(m["expert_load"])
    return (
        f"step {step:6d} | loss {float(m['loss']):.4f} | ce {float(m['ce_loss']):.4f}"
        f" | aux {float(m['aux_loss']):.3f} | rerouted "
        f"{float(m.get('rerouted_fraction', 0.0)):.3f} | load max/min "
        f"{load.max():.3f}/{load.min():.3f} | gnorm {float(m['grad_norm']):.3f} | "
        f"lr {float(m['lr']):.2e} | {tokens_per_s:,.0f} tok/s | MFU "
        + (f"{100 * mfu:.1f}%" if mfu is not None else "n/a")
        + (
            f" | dpo margin {float(m['dpo/reward_margin']):.3f} acc {float(m['dpo/accuracy']):.2f}"
            if "dpo/reward_margin" in m
            else ""
        )
    )
