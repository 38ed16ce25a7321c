"""Typed errors of the library, and the one helper that turns them into one-line CLI errors.

Library code raises these (never ``SystemExit``), so a notebook can catch them
(``except RunFolderError``); the scripts' entry points print them as one line
``error: <message>`` on stderr and exit with status 2 (bad input: flags, files named by the
user) or 1 (the environment: full or read-only disk, missing dependency).

Every class derives from ``ValueError`` (except ``EnvironmentProblem``), so callers written
against the earlier ``ValueError``s keep working.
"""
from __future__ import annotations

import errno
import functools
import os
import sys
from typing import Any, Callable, TypeVar


class EdmError(Exception):
    """A problem the user can fix; the message is one line saying what to do."""

    exit_code = 1


class UserInputError(EdmError, ValueError):
    """A flag or value is invalid (type, range, combination)."""

    exit_code = 2


class RunFolderError(UserInputError):
    """A run folder (outputs/<exp_name>) is missing, unsafe, inconsistent or would be overwritten."""


class CheckpointError(RunFolderError):
    """A checkpoint that cannot be read or does not fit the model built from the run's args."""


class DataError(EdmError, ValueError):
    """A dataset file is missing, corrupt or holds values the code cannot use."""

    exit_code = 2


class EnvironmentProblem(EdmError):
    """Something outside the inputs: a missing package, a full or read-only disk."""

    exit_code = 1


class TrainingStopped(EdmError):
    """Training stopped on purpose (e.g. too many non-finite batches); the run folder is resumable."""

    exit_code = 1


class CliExit(SystemExit):
    """SystemExit carrying the status code *and* the message already printed (``str()`` gives the message)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(code)
        self.message = message

    def __str__(self) -> str:
        return self.message


# OSError numbers that mean "the disk/folder cannot take the write", not a bug.
WRITE_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT, errno.EFBIG}


def one_line(text: object) -> str:
    """``text`` on one line (whitespace runs collapsed)."""
    return " ".join(str(text).split())


def describe_os_error(e: OSError) -> str:
    """'cannot write <path>: No space left on device' and what to do."""
    where = e.filename if e.filename is not None else "a file"
    what = {
        errno.ENOSPC: "the disk is full; free space or choose another output folder",
        errno.EDQUOT: "the disk quota is exhausted; free space or choose another output folder",
        errno.EROFS: "the file system is read-only; choose a writable output folder",
        errno.EACCES: "permission denied; choose a writable output folder",
        errno.EPERM: "operation not permitted; choose a writable output folder",
        errno.EFBIG: "the file is too large for this file system",
    }.get(e.errno, e.strerror or type(e).__name__)
    return f"cannot write {where}: {what}"


F = TypeVar("F", bound=Callable[..., Any])


def cli_errors(main: F) -> F:
    """Decorate a script's ``main``: typed errors, ``ValueError``/missing files and unwritable
    disks become ``error: <one line>`` on stderr and ``SystemExit`` 2 (input) or 1 (environment).

    ``EDM_TRACEBACK=1`` in the environment re-raises instead (for debugging).
    """

    @functools.wraps(main)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return main(*args, **kwargs)
        except CliExit:
            raise
        except Exception as e:  # noqa: BLE001 - classified below, everything else re-raised
            code = exit_code_of(e)
            if code is None or os.environ.get("EDM_TRACEBACK"):
                raise
            message = one_line(describe_os_error(e) if isinstance(e, OSError) and e.errno in WRITE_ERRNOS else e)
            print(f"error: {message}", file=sys.stderr, flush=True)
            raise CliExit(code, message) from None

    return wrapper  # type: ignore[return-value]


def exit_code_of(e: BaseException) -> int | None:
    """The exit status a CLI reports for ``e``; None for errors that are bugs (kept as tracebacks)."""
    if isinstance(e, EdmError):
        return e.exit_code
    if isinstance(e, OSError) and e.errno in WRITE_ERRNOS:
        return 1
    if isinstance(e, (FileNotFoundError, NotADirectoryError, IsADirectoryError)):
        return 2
    if isinstance(e, ValueError):
        return 2
    return None


def safe_load_reason(error: BaseException) -> str:
    """Why ``torch.load(weights_only=True)`` refused a file, in one line, without torch's advice to
    disable the safe loader (a file that needs it is not one of ours, and may run code)."""
    sentences = [" ".join(part.split()) for part in str(error).replace("\n", ". ").split(". ")]
    blocked = [p for p in sentences if "unsupported" in p.lower() and "weights_only" not in p.lower()]
    if blocked:
        return (blocked[0].rstrip(".") + "; a checkpoint holds only tensors, so the file is refused "
                "(it was not written by this code or EDM, and may run code)")
    if "weights_only" in str(error).lower():
        return "it is not a plain tensor checkpoint, so the safe loader refuses it"
    return " ".join(str(error).split())
