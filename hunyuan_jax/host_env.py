"""Process settings of the host that must be in place when the process starts: the command-line
entry points call `reexec_with_hugepage_malloc()` first thing under `if __name__ == "__main__"`.

XLA:CPU allocates each execution's temporary buffers with `posix_memalign` from worker
threads; glibc serves chunks that large with a fresh `mmap` and returns them with `munmap`, so
every step touches its temporaries' pages anew, 4 KiB at a time. glibc's tunable
`glibc.malloc.hugetlb=1` makes malloc advise transparent huge pages for those chunks (2 MiB
pages; the page faults and step times measured: docs/performance.md). Tunables
are read only when a process starts, hence the re-exec; it changes nothing else (same program,
arguments and environment plus that one tunable) and happens at most once (the tunable is
then set). It is skipped when the kernel has transparent huge pages off, off Linux/glibc, or
with HUNYUAN_JAX_NO_REEXEC=1 in the environment (debuggers, profilers that follow the pid).
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Mapping
from pathlib import Path

TUNABLE = "glibc.malloc.hugetlb=1"
OPT_OUT = "HUNYUAN_JAX_NO_REEXEC"
THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _thp_available(mode_file: Path = THP_MODE) -> bool:
    """Whether the kernel grants transparent huge pages on request ('always' or 'madvise')."""
    try:
        text = mode_file.read_text()
    except OSError:
        return False
    return "[never]" not in text


def hugepage_env(
    environ: Mapping[str, str], *, thp: bool, libc: tuple[str, str] = ("glibc", "")
) -> dict[str, str] | None:
    """The environment to re-exec with, or None when the process should run as it is."""
    if environ.get(OPT_OUT) == "1" or not thp or libc[0] != "glibc":
        return None
    tunables = environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb" in tunables:
        return None  # already set (by the user, or by our re-exec)
    env = dict(environ)
    env["GLIBC_TUNABLES"] = f"{tunables}:{TUNABLE}" if tunables else TUNABLE
    return env


def reexec_with_hugepage_malloc() -> None:
    """Re-executes this Python command line with glibc's huge-page malloc advice (see the
    module docstring); returns without doing anything when that does not apply."""
    if sys.platform != "linux":
        return
    env = hugepage_env(os.environ, thp=_thp_available(), libc=platform.libc_ver())
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
