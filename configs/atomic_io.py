"""Atomic file writes: a temp file beside the target, fsync, then rename over it.

An interrupted write never leaves a file that looks complete (caches, checkpoints,
args.pickle). Used by every room that writes files others read back.

Temp files are named ``.<target>.<pid>.<random>.tmp``: one left behind by a killed process
(kill -9 mid-write) is recognised as ours and stale (its process is gone) and removed by the
next write of the same target, or by ``remove_stale_temp_files`` on a whole folder.
"""
from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable


def _default_file_mode() -> int:
    """rw for everyone the umask allows (mkstemp's temp files are private, 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


_TEMP_NAME = re.compile(r"^\.(?P<target>.+)\.(?P<pid>\d+)\.[A-Za-z0-9_]+\.tmp$")


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists but is someone else's: leave its files alone
    return True


def remove_stale_temp_files(folder: str | os.PathLike, target: str | None = None) -> list[Path]:
    """Delete the temp files of atomic writes in ``folder`` whose writing process is gone
    (only names this module creates; ``target`` limits it to one file's temps)."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        match = _TEMP_NAME.match(entry.name)
        if not match or (target is not None and match["target"] != target) or not entry.is_file():
            continue
        if _process_alive(int(match["pid"])):
            continue
        try:
            entry.unlink()
            removed.append(entry)
        except OSError:
            pass  # a read-only folder: nothing we can do, and nothing is lost
    return removed


def atomic_write(path: str | os.PathLike, write_fn: Callable[[BinaryIO], object]) -> Path:
    """Call ``write_fn(binary_file)`` on a temp file beside ``path``, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(path.parent, path.name)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    recorder = None
    try:
        with os.fdopen(fd, "wb") as f:
            recorder = _RecordingFile(f)
            write_fn(recorder)  # type: ignore[arg-type]
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _default_file_mode())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        # A full or read-only disk: an OSError naming the file the user knows, not the temp. Writers
        # such as torch.save turn the OSError of write() into a RuntimeError; the recorder kept it.
        cause = e if isinstance(e, OSError) else getattr(recorder, "error", None)
        if cause is not None and cause.errno is not None and (cause.filename in (None, tmp)):
            raise OSError(cause.errno, cause.strerror, str(path)) from None
        raise
    return path


class _RecordingFile:
    """A binary file that remembers the OSError of a failed write (then re-raises it)."""

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self.error: OSError | None = None

    def write(self, data) -> int:
        try:
            return self._f.write(data)
        except OSError as e:
            self.error = e
            raise

    def __getattr__(self, name: str):
        return getattr(self._f, name)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda f: f.write(data))


def unwritable_reason(folder: str | os.PathLike) -> str | None:
    """None if files can be created in ``folder``, else why not (one line). Nothing is created:
    a missing folder is judged by its nearest existing ancestor (where it would be made)."""
    folder = Path(folder)
    probe_dir = folder
    while not probe_dir.exists():
        if probe_dir.parent == probe_dir:
            break
        probe_dir = probe_dir.parent
    if not probe_dir.is_dir():
        return f"{folder} is not writable ({probe_dir} is a file, not a folder)"
    try:
        fd, probe = tempfile.mkstemp(prefix=f".write_probe.{os.getpid()}.", suffix=".tmp", dir=probe_dir)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        return f"{folder} is not writable ({e.strerror or type(e).__name__})"
    return None


def write_json(path: str | os.PathLike, data: object) -> Path:
    """``data`` as indented JSON, atomically (the folder is created); for caches read back later."""
    import json

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_bytes(path, (json.dumps(data, indent=1) + "\n").encode())


def read_json(path: str | os.PathLike) -> dict | None:
    """A JSON cache file's content, or None when it is missing or unreadable (then it is recomputed)."""
    import json

    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def file_digest(path: str | os.PathLike) -> str:
    """A short content hash (sha256, 16 hex digits): keys a cache to the weights it was computed from."""
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
