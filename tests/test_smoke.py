"""README command 1, the CPU smoke run, run as the README runs it (after setup): the whole stack
on the embedded defaults passes all five of its stages, with no involuntary rematerialisation
printed by any compile. ~2 min on 2 cores (it trains 60 steps)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_smoke_run_passes_as_in_the_readme(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # the smoke run sets its own
    env["JAX_PLATFORMS"] = "cpu"
    argv = [sys.executable, "-m", "hunyuan_jax.cli.smoke", "--workdir", str(tmp_path)]
    p = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-4000:]
    assert "[smoke] PASS (5/5 steps" in out, out[-4000:]
    assert "Involuntary full rematerialization" not in out
