"""The run-directory lock: one training process at a time uses a run directory.

Two train.py processes on one `--run-dir` overwrite each other's metrics, TensorBoard files and
checkpoints (orbax removes another process's unfinished checkpoint as a stale temporary
directory when it starts). `train_loop.train` therefore takes `<run>/run.lock` before it reads
or writes anything in the run, and holds it until its last checkpoint is written:

- The lock is `fcntl.flock(LOCK_EX | LOCK_NB)` on that file, held open for the whole run. The
  kernel releases it when the process ends in any way (exit, exception, SIGKILL, OOM kill), so
  on a local disk a dead process never keeps a run locked and nothing depends on process ids
  (which the system reuses). O_CREAT|O_EXCL alone could not tell a live holder from a dead one
  except by its pid, which a reused pid fools, and taking over its file is racy. On NFS, Linux
  maps flock onto NFS byte-range locks, so it holds across clients too.
- The file holds the holder's host, pid, process start time (clock ticks since boot, from
  /proc, to tell a reused pid) and wall-clock start (JSON), for the messages. A clean exit
  removes it.
- A second process gets `RunDirLocked` (a `CheckpointError`: exit 4) naming the holder, having
  touched nothing in the directory (opening the existing file neither creates nor changes it).
- A lock file left behind by a killed process: on the same host the flock is free, so the run
  is taken over with a warning naming the dead holder. Written by another host: that host's
  flock does not reach here on every file system, so it may still be running: refused, naming
  the holder. To force (after making sure no process there uses the run), delete the file.
- A file system without locks (flock fails with ENOLCK / EOPNOTSUPP): the file's holder decides
  alone (a live pid on this host, or any other host, refuses), with a warning that two
  processes starting at the same moment are not kept apart there.

Multi-host training: only process 0 takes the lock (`lock_run`); every process learns whether
it got it, and all stop with exit 4 if it did not.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from hunyuan_jax.errors import CheckpointError

LOCK_FILE = "run.lock"
_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


class RunDirLocked(CheckpointError):
    """The run directory is in use by another process (exit 4)."""


def _pid_start(pid: int) -> int | None:
    """The start time of process `pid` in clock ticks since boot (/proc/<pid>/stat field 22),
    None where /proc does not say (not Linux, no such process)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    try:  # the command name (field 2) is in parentheses and may hold spaces
        return int(stat[stat.rindex(")") + 2 :].split()[19])
    except (ValueError, IndexError):
        return None


def _alive(holder: dict) -> bool:
    """Whether the holder's process still runs on this host (its pid exists and, where
    recorded, started when the holder did: a reused pid is not the holder)."""
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        pass
    want, now = holder.get("pid_start"), _pid_start(pid)
    return want is None or now is None or want == now


def describe(holder: dict | None) -> str:
    if not holder:
        return "another process (the lock file names none)"
    return (
        f"pid {holder.get('pid')} on host {holder.get('host')!r} "
        f"(started {holder.get('started', '?')})"
    )


class RunLock:
    """`<run_dir>/run.lock`, held (flock) from `acquire` to `release`; a context manager."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self.fd: int | None = None

    # ------------------------------------------------------------------ file contents
    def _read(self, fd: int) -> dict | None:
        try:
            data = json.loads(os.pread(fd, 65536, 0).decode("utf-8") or "null")
        except (OSError, ValueError):
            return {"unreadable": True}
        return data if isinstance(data, dict) else None

    def _write(self, fd: int) -> None:
        pid = os.getpid()
        me = {
            "host": socket.gethostname(),
            "pid": pid,
            "pid_start": _pid_start(pid),
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        data = (json.dumps(me) + "\n").encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        os.fsync(fd)

    # ------------------------------------------------------------------ taking it
    def _open_locked(self, log) -> tuple[int, bool]:
        """(fd, whether flock holds it) of the lock file at `self.path`: retried when the
        file we locked was meanwhile removed by a holder releasing it."""
        for _ in range(20):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            locked = True
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = self._read(fd)
                os.close(fd)
                raise RunDirLocked(
                    f"run directory {self.run_dir} is in use by {describe(holder)} (lock file "
                    f"{self.path}): two runs in one directory overwrite each other's "
                    f"checkpoints; wait for it to finish, stop it, or use another --run-dir"
                ) from None
            except OSError as e:
                if e.errno not in _NO_LOCKS:
                    os.close(fd)
                    raise
                locked = False
                log(
                    f"[lock] warning: the file system of {self.path} has no locks "
                    f"({e.strerror}); only the holder named in it keeps a second run out"
                )
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                return fd, locked
            os.close(fd)  # we locked a file its holder had just removed: take the new one
        raise RunDirLocked(f"cannot lock {self.path}: it is replaced faster than it can be read")

    def acquire(self, log: Callable[[str], Any] = print) -> RunLock:
        """Takes the lock or raises RunDirLocked naming its holder (see the module doc)."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd, locked = self._open_locked(log)
        try:
            holder = self._read(fd)
            host = socket.gethostname()
            if holder and holder.get("unreadable"):
                log(
                    f"[lock] warning: {self.path} was unreadable (a holder killed while "
                    f"writing it?); taking it over"
                )
            elif holder and holder.get("host") != host:
                raise RunDirLocked(
                    f"run directory {self.run_dir} is locked by {describe(holder)}, another "
                    f"host than this one ({host!r}), which cannot tell whether that process "
                    f"still runs; if none does, delete {self.path} and rerun"
                )
            elif holder and not locked and _alive(holder):
                raise RunDirLocked(
                    f"run directory {self.run_dir} is in use by {describe(holder)} (lock file "
                    f"{self.path}); if that process does not use it, delete the file and rerun"
                )
            elif holder:
                log(
                    f"[lock] warning: taking over the stale lock {self.path} of "
                    f"{describe(holder)}, which no longer runs (killed?)"
                )
            self._write(fd)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        return self

    def release(self) -> None:
        """Removes the lock file (if it is still ours) and releases the lock."""
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        try:
            if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                os.unlink(self.path)
        except OSError:
            pass  # gone already, or the directory is unwritable: the flock still ends below
        finally:
            os.close(fd)

    def __enter__(self) -> RunLock:
        if self.fd is None:
            self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def lock_run(run_dir: str | Path, log: Callable[[str], Any] = print):
    """A context manager holding `run_dir`'s lock for a training run: taken by process 0
    only; every process raises RunDirLocked (exit 4) if process 0 could not take it."""
    lock, err = None, None
    if jax.process_index() == 0:
        try:
            lock = RunLock(run_dir).acquire(log)
        except RunDirLocked as e:
            err = e
    if jax.process_count() > 1:
        failed = bool(np.any(multihost_utils.process_allgather(np.asarray([err is not None]))))
        if failed and err is None:
            if lock is not None:
                lock.release()
            raise RunDirLocked(f"process 0 could not lock run directory {run_dir} (see its log)")
    if err is not None:
        raise err
    return lock if lock is not None else contextlib.nullcontext()
