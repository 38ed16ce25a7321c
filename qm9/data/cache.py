"""Atomic, versioned array caches (.npz + a JSON manifest).

A cache folder holds ``manifest.json`` (format version, source description, a checksum
per file) and one ``.npz`` per split. Files are written to a temporary name and renamed,
so an interrupted build never leaves a file that looks complete; the manifest is written
last, so a folder without a matching manifest is rebuilt.
"""
from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from configs.atomic_io import atomic_write


class CacheError(RuntimeError):
    """A cache file exists but cannot be read (corrupt or truncated)."""


def file_sha1(path: Path) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def save_arrays(path: Path, arrays: dict[str, np.ndarray]) -> None:
    atomic_write(path, lambda f: np.savez(f, **arrays))


def load_arrays(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise CacheError(f"cannot read cache file {path}: {e}") from None


def read_manifest(folder: Path) -> dict[str, Any] | None:
    path = Path(folder) / "manifest.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    data = json.dumps(manifest, indent=1, sort_keys=True).encode()
    atomic_write(Path(folder) / "manifest.json", lambda f: f.write(data))


def manifest_matches(folder: Path, expected: dict[str, Any], files: list[str], verify_checksums: bool) -> bool:
    """True when the manifest describes ``expected`` and every listed file is present (and intact)."""
    manifest = read_manifest(folder)
    if manifest is None:
        return False
    if any(manifest.get(k) != v for k, v in expected.items()):
        return False
    sums = manifest.get("sha1", {})
    for name in files:
        path = Path(folder) / name
        if not path.exists() or name not in sums:
            return False
        if verify_checksums and file_sha1(path) != sums[name]:
            return False
    return True
