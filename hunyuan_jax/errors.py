"""The errors a user can cause, one class per kind, each with its documented exit status.

Every CLI (train.py, infer.py, the converter, the AOT tool, the server) runs its body through
`run_cli`: an expected error becomes one line on stderr naming the file, key, tensor or line at
fault, and the process exits with the class's status; `--debug` shows the traceback instead.
Anything else is a bug and keeps Python's traceback (exit status 1).

| status | class | meaning |
|---|---|---|
| 0 | | success |
| 1 | (any other exception) | internal error: a bug, with its traceback |
| 2 | `UsageError`, `ConfigError` | bad command line or configuration (flag, YAML, key) |
| 3 | `DataError` | bad input data (training files, prompts file, preference data) |
| 4 | `CheckpointError` | checkpoint missing, truncated, corrupt or incompatible |
| 5 | `NonFiniteLoss` | training stopped on a non-finite loss or gradient |
| 6 | `DoesNotFit` | the program does not fit the accelerator's memory (AOT tool) |
| 130 | | interrupted (Ctrl-C) |
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable


class HunyuanError(Exception):
    """Base class of expected errors (subclasses set `exit_code`)."""

    exit_code = 1


class UsageError(HunyuanError, ValueError):
    """A bad command line: a flag, a value out of range, a missing argument."""

    exit_code = 2


class ConfigError(UsageError):
    """A bad configuration file or key (YAML, config.json, --set)."""


class DataError(HunyuanError, ValueError):
    """Bad input data; the message names the file and line."""

    exit_code = 3


class CheckpointError(HunyuanError, ValueError):
    """A checkpoint that is missing, truncated, corrupt or does not match the model."""

    exit_code = 4


class MissingShardError(CheckpointError, FileNotFoundError):
    """A shard listed in a checkpoint's index is not on disk."""


class NonFiniteLoss(HunyuanError, RuntimeError):
    """Training stopped because a step's loss or gradient was not finite."""

    exit_code = 5


class DoesNotFit(HunyuanError):
    """A compiled program needs more memory per chip than the chip has."""

    exit_code = 6

    def __init__(
        self, message: str, required_gib: float | None = None, available_gib: float | None = None
    ):
        super().__init__(message)
        self.required_gib, self.available_gib = required_gib, available_gib


EXIT_CODES = {
    0: "success",
    1: "internal error (a bug: the traceback is printed)",
    2: "usage or configuration error",
    3: "bad input data",
    4: "checkpoint missing, truncated, corrupt or incompatible",
    5: "training stopped on a non-finite loss",
    6: "does not fit the accelerator's memory",
    130: "interrupted",
}


def add_debug_flag(parser) -> None:
    parser.add_argument(
        "--debug",
        action="store_true",
        help="show the Python traceback of an error instead of one line",
    )


def os_error(e: OSError, cls: type[HunyuanError] | None = None) -> HunyuanError:
    """An OSError (disk full, permission denied, ...) as an expected error naming the file:
    `cls` (CheckpointError by default: what fails to be written or read is a checkpoint or
    a run directory)."""
    cls = cls or CheckpointError
    name = e.filename or ""
    if e.filename2:
        name = f"{name} -> {e.filename2}"
    reason = e.strerror or str(e) or type(e).__name__
    return cls(f"{name}: {reason}" if name else reason)


def run_cli(
    prog: str,
    main: Callable[[], int | None],
    debug: bool = False,
    oserror: type[HunyuanError] | None = None,
) -> int:
    """Runs `main()`; an expected error is printed as `prog: error: message` (one line) and
    returns its exit status. With `oserror` (a class), an OSError that escapes `main` is
    reported the same way as that class (`os_error`). With `debug` the exception propagates
    (full traceback)."""
    if not debug:
        _quiet_closed_event_loops()
        _quiet_orbax_error_logs()
    try:
        try:
            return int(main() or 0)
        except OSError as e:
            if oserror is None or debug or isinstance(e, HunyuanError):
                raise
            raise os_error(e, oserror) from e
    except HunyuanError as e:
        if debug:
            raise
        # Background work abandoned by the failure (e.g. orbax's other array reads after one
        # failed) may be collected later and print "Exception ignored in ..." tracebacks, or
        # asyncio's "Future exception was never retrieved" (timing-dependent: found flaky in
        # fresh-clone CI runs): the error is reported, the process ends; keep stderr to the
        # one line.
        sys.unraisablehook = lambda unraisable: None
        logging.getLogger("asyncio").disabled = True
        print(f"{prog}: error: {_one_line(e)}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


def _quiet_closed_event_loops() -> None:
    """When an orbax restore fails, orbax closes its event loop while tensorstore still has
    reads in flight; each of them then reports "RuntimeError: Event loop is closed" through
    `sys.unraisablehook`, a 30-line traceback per array, from another thread, possibly before
    the one-line error is printed; the abandoned read coroutines, when collected, report the
    same read error again ("Encountered error while reading array index"). Those (and only
    those) are dropped: the error itself reaches `run_cli` through the restore call."""
    original = sys.unraisablehook
    if getattr(original, "quiet_closed_event_loops", False):
        return

    def hook(unraisable):
        e = unraisable.exc_value
        if isinstance(e, RuntimeError) and str(e) == "Event loop is closed":
            return
        if str(e).startswith("Encountered error while reading array index"):
            return
        original(unraisable)

    hook.quiet_closed_event_loops = True
    sys.unraisablehook = hook


def _quiet_orbax_error_logs() -> None:
    """orbax logs each failure of its background threads (a save that hits a full disk) at
    ERROR with a traceback, several times over, and asyncio reports its abandoned write
    tasks ("Task exception was never retrieved"), before the failure is re-raised in the main
    thread, where it becomes the one-line error. Those records are dropped (`--debug` keeps
    them); other warnings and errors are not. (Found flaky in CI: whether asyncio reports an
    abandoned `_GatheringFuture` before exit depends on timing; its message does not name
    orbax, its exception's traceback does.)"""
    try:  # absl comes with orbax; imported here, not at start-up, to keep `errors` light
        from absl import logging as absl_logging  # first: absl creates its own logger class
    except ImportError:  # no orbax here either
        return

    def drop(record) -> bool:
        if record.levelno < logging.ERROR:
            return True
        if "/orbax/" in record.pathname:
            return False
        return not (record.name == "asyncio" and _from_orbax(record))

    drop.quiet_orbax = True
    for logger in (absl_logging.get_absl_logger(), logging.getLogger("asyncio")):
        if not any(getattr(f, "quiet_orbax", False) for f in logger.filters):
            logger.addFilter(drop)


def _from_orbax(record) -> bool:
    """Whether an asyncio record is about orbax's work: its message names orbax code (an
    abandoned Task's coroutine) or its exception was raised in orbax (a `_GatheringFuture`
    whose message names only the future)."""
    if "/orbax/" in record.getMessage():
        return True
    exc = record.exc_info[1] if record.exc_info else None
    tb = getattr(exc, "__traceback__", None)
    while tb is not None:
        if "/orbax/" in tb.tb_frame.f_code.co_filename:
            return True
        tb = tb.tb_next
    return False


def _one_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return " | ".join(line.strip() for line in text.splitlines() if line.strip())
