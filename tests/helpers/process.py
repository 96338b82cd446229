"""Running the converter as a real process and killing it from outside (no hooks inside it):
SIGKILL once its progress record (`<out>/.convert/progress.jsonl`) lists N slices."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from hunyuan_jax.checkpoints import converted as fmt

ROOT = Path(__file__).resolve().parents[2]


def converter_env(**extra) -> dict:
    """The environment of a converter child: this checkout first on the path, CPU JAX."""
    return dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu", **extra)


def converter_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "hunyuan_jax.cli.convert", *map(str, args)]


def recorded_slices(out: Path) -> int:
    """Complete lines in the progress record of an unfinished conversion into `out`."""
    try:
        return (Path(out) / fmt.WORK_DIR / fmt.WORK_PROGRESS).read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


@dataclasses.dataclass
class Killed:
    returncode: int  # -SIGKILL when it was killed; anything else: it ended on its own first
    recorded: int  # slices in the progress record when the signal was sent
    stderr: str

    @property
    def killed(self) -> bool:
        return self.returncode == -signal.SIGKILL


def kill_when_recorded(
    cmd: list[str], out: Path, n: int, env=None, timeout: float = 120.0
) -> Killed:
    """Start `cmd` (an hf-to-jax into `out`) and SIGKILL it as soon as its progress record
    lists at least `n` slices (polled every 2 ms, so a few more may be recorded by then).
    `n` = 0: as soon as the plan is recorded (before any slice is written)."""
    plan = Path(out) / fmt.WORK_DIR / fmt.WORK_PLAN
    with tempfile.TemporaryFile("w+") as err:
        p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err, text=True)
        deadline = time.monotonic() + timeout
        seen = 0
        try:
            while p.poll() is None and time.monotonic() < deadline:
                seen = recorded_slices(out)
                if seen >= n and (n > 0 or plan.is_file()):
                    break
                time.sleep(0.002)
        finally:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
            p.wait()
        err.seek(0)
        return Killed(p.returncode, seen, err.read())
