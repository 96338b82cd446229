"""Training metrics: one JSON object per step in <run>/metrics.jsonl (process 0), the same
scalars as TensorBoard event files in <run>/tensorboard (tensorboardX, no TensorFlow), the
progress line, and the model-FLOPs utilisation estimate.

On resume, lines past the restored step are dropped (the file is rewritten atomically) so the
file always describes the run as it happened once; a line cut short by a kill is dropped too.
The event files get a purge marker at the resumed step, so TensorBoard hides the older
events past it in the same way. `read_scalars` reads the event files back (tests, scripts).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import jax
import numpy as np
from tensorboardX import SummaryWriter
from tensorboardX.proto import event_pb2

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
    """<run>/metrics.jsonl and <run>/tensorboard/ (process 0); on resume, lines past the
    restored step are dropped (and purged from TensorBoard's view)."""

    def __init__(self, run_dir: Path, start_step: int):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.tb_dir = Path(run_dir) / "tensorboard"
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
        self.tb = SummaryWriter(
            str(self.tb_dir), purge_step=start_step + 1 if start_step else None, flush_secs=10
        )

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self.fh.write(json.dumps(record) + "\n")
        self.fh.flush()
        step = record["step"]
        for key, value in record.items():
            if key == "step" or value is None:
                continue
            if isinstance(value, list):  # per-expert loads: their spread
                flat = np.ravel(np.asarray(value, np.float64))
                if flat.size:
                    self.tb.add_scalar(f"train/{key}_max", float(flat.max()), step)
                    self.tb.add_scalar(f"train/{key}_min", float(flat.min()), step)
            elif isinstance(value, int | float):  # bools too; anything else is not a scalar
                self.tb.add_scalar(f"train/{key}", float(value), step)

    def close(self) -> None:
        if self.enabled and not self.fh.closed:
            self.fh.close()
            self.tb.close()


def read_scalars(tb_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} of the scalar events in the event files of `tb_dir`, in
    file then record order (TFRecord framing: length, its CRC, the Event proto, its CRC)."""
    out: dict[str, list[tuple[int, float]]] = {}
    for f in sorted(Path(tb_dir).glob("events.out.tfevents.*")):
        data, pos = f.read_bytes(), 0
        while pos + 12 <= len(data):
            (n,) = struct.unpack_from("<Q", data, pos)
            event = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + n])
            pos += 12 + n + 4
            for v in event.summary.value:
                if v.HasField("simple_value"):
                    out.setdefault(v.tag, []).append((event.step, v.simple_value))
    return out


def to_record(step: int, m: dict) -> dict:
    """A step's device metrics as a JSON-able dict."""
    rec = {"step": step}
    for k, v in m.items():
        v = np.asarray(v)
        rec[k] = v.tolist() if v.ndim else (bool(v) if v.dtype == bool else float(v))
    return rec


def progress_line(step: int, m: dict, tokens_per_s: float, mfu: float | None) -> str:
    """The progress line of a `log_every` step. Next-token training shows its cross entropy
    (`ce`); DPO its own loss (`dpo`) and, only where the objective has one (dpo.sft_weight > 0),
    the weighted NLL term of the chosen replies (`sft`)."""
    load = np.asarray(m["expert_load"])
    if "grpo/policy_loss" in m:
        terms = f" | pg {float(m['grpo/policy_loss']):.4f}"
    elif "dpo/loss" in m:
        terms = f" | dpo {float(m['dpo/loss']):.4f}"
        if float(m["ce_loss"]) != 0.0:
            terms += f" | sft {float(m['ce_loss']):.4f}"
    else:
        terms = f" | ce {float(m['ce_loss']):.4f}"
    return (
        f"step {step:6d} | loss {float(m['loss']):.4f}{terms}"
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
        + (
            f" | reward {float(m['grpo/reward_mean']):.3f} kl {float(m['grpo/kl']):.4f} clip "
            f"{float(m['grpo/clip_fraction']):.3f} len {float(m['grpo/completion_len']):.1f}"
            if "grpo/reward_mean" in m
            else ""
        )
    )
