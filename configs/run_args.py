"""Run folders' ``args.pickle``: safe loading, saving, and the fields legacy runs lack.

A run folder (``outputs/<exp_name>/``) is the only hand-off between training and
everything after it. ``args.pickle`` is a pickled ``argparse.Namespace`` (EDM's format).
Unpickling can run code, so it is read with an unpickler that admits only
``argparse.Namespace`` and plain built-in types; anything else is refused.
"""
from __future__ import annotations

import argparse
import io
import os
import pickle
import sys
from pathlib import Path
from typing import Any

from configs.atomic_io import atomic_write_bytes
from configs.datasets import QM9, find_dataset
from configs.errors import RunFolderError

ARGS_FILE = "args.pickle"
# A run's arguments take a few kB; anything far larger is not an args.pickle (and is not read).
MAX_ARGS_BYTES = 1 << 20

_ALLOWED_GLOBALS = {
    ("argparse", "Namespace"),
    ("builtins", "list"),
    ("builtins", "dict"),
    ("builtins", "tuple"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "int"),
    ("builtins", "float"),
    ("builtins", "complex"),
    ("builtins", "str"),
    ("builtins", "bool"),
    ("builtins", "NoneType"),
    ("builtins", "slice"),
    ("collections", "OrderedDict"),
}


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle asks for a global outside the allow-list."""


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise UnsafePickleError(f"{module}.{name}")


def loads_args(data: bytes, source: str = "args.pickle") -> argparse.Namespace:
    """Unpickle run arguments, admitting only argparse.Namespace and plain built-in types."""
    try:
        obj = _RestrictedUnpickler(io.BytesIO(data)).load()
    except UnsafePickleError as e:
        raise RunFolderError(
            f"{source} asks to load {e}, which a run's arguments never need; refusing to unpickle it "
            "(only argparse.Namespace and plain built-in types are allowed)"
        ) from None
    except Exception as e:  # noqa: BLE001 - truncated/corrupt pickles raise many types
        raise RunFolderError(f"{source} is not a readable args pickle ({type(e).__name__}: {e})") from None
    if isinstance(obj, dict):
        obj = argparse.Namespace(**obj)
    if not isinstance(obj, argparse.Namespace):
        raise RunFolderError(f"{source} holds a {type(obj).__name__}, expected an argparse.Namespace")
    return obj


def load_run_args(run_dir: str | os.PathLike) -> argparse.Namespace:
    """The ``args.pickle`` of a run folder, with a one-line error when it is missing or unsafe."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunFolderError(f"run folder {run_dir} does not exist; pass the folder holding args.pickle (e.g. outputs/<exp_name>)")
    path = run_dir / ARGS_FILE
    if not path.is_file():
        raise RunFolderError(f"{path} is missing: {run_dir} is not a training run folder (it needs args.pickle and the weights)")
    size = path.stat().st_size
    if size > MAX_ARGS_BYTES:
        raise RunFolderError(f"{path} is {size:,} bytes, far more than a run's arguments take; refusing to read it")
    return loads_args(path.read_bytes(), source=str(path))


def run_folder_of(args: argparse.Namespace) -> str:
    """The folder a training run writes to: --resume's, else <output_root>/<exp_name>."""
    resume = getattr(args, "resume", None)
    if resume:
        return str(resume)
    return str(Path(getattr(args, "output_root", "outputs") or "outputs") / str(getattr(args, "exp_name", "")))


def save_run_args(run_dir: str | os.PathLike, args: argparse.Namespace, filename: str = ARGS_FILE) -> Path:
    """Write ``args.pickle`` (or ``filename``) atomically (temp file + rename)."""
    data = pickle.dumps(argparse.Namespace(**vars(args)), protocol=4)
    return atomic_write_bytes(Path(run_dir) / filename, data)


def infer_zero_center_h(args: argparse.Namespace) -> bool:
    """Whether a run centres the atom-type features per molecule (GAGA mode).

    Our runs record ``zero_center_h``. Legacy runs do not: the GAGA fork's args carry a
    ``max_t`` attribute (and that fork always centres), EDM's do not. A namespace built by
    hand with ``max_t=None`` counts as EDM.
    """
    value = getattr(args, "zero_center_h", None)
    if value is not None:
        return bool(value)
    return getattr(args, "max_t", None) is not None


def resolved_max_t(args: argparse.Namespace) -> int:
    """The largest training timestep of a run (T for EDM runs)."""
    T = int(getattr(args, "diffusion_steps", 1000))
    max_t = getattr(args, "max_t", None)
    return T if max_t is None else int(max_t)


def safe_datadir(run_datadir: object, user_datadir: str | None, dataset: str) -> str:
    """Where caches of an evaluated run are read and written: the user's --datadir when given; else
    the run's own datadir only if it is a relative path inside the working folder (an untrusted
    args.pickle must not choose where files are written), else the dataset's default folder."""
    if user_datadir is not None:
        return str(user_datadir)
    entry = find_dataset(dataset)  # an unknown name is reported by the caller, with the run named
    default = entry.default_datadir if entry is not None else QM9.default_datadir
    text = str(run_datadir or "")
    candidate = Path(text)
    if text and not candidate.is_absolute() and ".." not in candidate.parts and not text.startswith("~"):
        return text
    if text:
        print(f"note: the run's datadir {text!r} is outside the working folder; using {default} (pass --datadir to choose)",
              file=sys.stderr)
    return default
