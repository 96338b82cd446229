"""Peak resident memory of a child process, from Linux's VmHWM (tests and bench/convert.py).
The converter reports its own peak in its manifest (`convert.common.own_peak_rss_bytes`)."""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path


def vmhwm_bytes(pid: int | str) -> int | None:
    """VmHWM (peak RSS) of process `pid` ("self" for this one) in bytes; None if unreadable."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def run_measuring_peak_rss(cmd: list[str], env=None) -> tuple[int, int, float, str]:
    """Run `cmd`; (return code, its peak RSS in bytes, seconds, stderr). The peak is the child's
    VmHWM polled from /proc while it runs, not wait4's ru_maxrss: Linux carries the parent's
    high-water mark into a child across fork + exec, so a child of a 700 MB pytest process
    would report >= 700 MB. A peak in the last poll interval (50 ms) before exit is missed."""
    t0 = time.time()
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    err: list[str] = []
    reader = threading.Thread(target=lambda: err.append(proc.stderr.read()))
    reader.start()
    peak = 0
    while proc.poll() is None:
        peak = max(peak, vmhwm_bytes(proc.pid) or 0)
        time.sleep(0.05)
    reader.join()
    return proc.returncode, peak, time.time() - t0, err[0] if err else ""
