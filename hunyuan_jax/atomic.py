"""Atomic file writes: every file a run or the converter writes outside orbax goes through here.

A file is written to `<name>.tmp` beside its destination, flushed and fsync'd, then renamed
over the destination (`os.replace`, atomic on POSIX file systems) and the directory fsync'd:
a reader, or a rerun after `kill -9` or a power loss, sees the old file or the new one, never
a torn or 0-byte one. A `.tmp` left by a killed writer is simply overwritten by the next try.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path


def _tmp(path: Path) -> Path:
    return path.with_name(path.name + ".tmp")


def fsync_dir(directory: str | Path) -> None:
    """Make a rename in `directory` durable (best effort: some file systems refuse)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """Yields a temporary path to write `path`'s content to (by any writer, e.g. a library that
    takes a file name); on success it is fsync'd and renamed to `path`, on error removed."""
    path = Path(path)
    tmp = _tmp(path)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def write_bytes(path: str | Path, data: bytes) -> None:
    """`path` holds `data` or its previous content, never a part of it."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode())


def write_json(path: str | Path, obj) -> None:
    """JSON (indented) to a temp file, fsync, rename: readers see the old file or the new one."""
    write_text(path, json.dumps(obj, indent=1))


def copy_file(src: str | Path, dst: str | Path) -> None:
    """Copy `src` to `dst` atomically (`dst` is the old file or a complete copy)."""
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)
