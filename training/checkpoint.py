"""A run folder's files, written atomically (temp file + rename).

EDM's files (same names and formats, so EDM's tools read them):
* ``args.pickle`` (configs.run_args), ``generative_model.npy``, ``generative_model_ema.npy``,
  ``optim.npy``: ``torch.save`` of the state dicts of the best model by validation NLL,
  plus EDM's copies ``<name>_<epoch>.npy`` / ``args_<epoch>.pickle`` at each improvement.

Ours:
* ``resume_state.pt``: the *latest* state, written at the end of every epoch (and every
  ``--checkpoint_every_steps`` steps): model, EMA model, optimiser, epoch and step, the
  gradient-norm queue, all RNG states (per process under DDP), NaN counters, best NLLs.
  ``--resume`` continues from it bit-identically. It loads with ``weights_only=True``.
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from configs.atomic_io import atomic_write
from configs.errors import CheckpointError, RunFolderError, safe_load_reason
from configs.run_args import ARGS_FILE, save_run_args

MODEL_FILE = "generative_model.npy"
EMA_FILE = "generative_model_ema.npy"
OPTIM_FILE = "optim.npy"
RESUME_FILE = "resume_state.pt"
RESUME_FORMAT = 1


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to a temp file beside ``path``, fsync, then rename over ``path``."""
    return atomic_write(path, lambda f: torch.save(obj, f))


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DataParallel / DistributedDataParallel wrapper."""
    return model.module if hasattr(model, "module") and isinstance(model.module, torch.nn.Module) else model


def save_model_files(
    run_dir: str | os.PathLike,
    model: torch.nn.Module,
    model_ema: torch.nn.Module | None,
    optim: torch.optim.Optimizer,
    args,
    epoch: int | None = None,
) -> None:
    """EDM's best-model files; with ``epoch`` also EDM's per-epoch copies."""
    run_dir = Path(run_dir)
    suffixes = [""] if epoch is None else ["", f"_{epoch}"]
    for suffix in suffixes:
        atomic_torch_save(optim.state_dict(), run_dir / f"optim{suffix}.npy")
        atomic_torch_save(unwrap(model).state_dict(), run_dir / f"generative_model{suffix}.npy")
        if model_ema is not None:
            atomic_torch_save(unwrap(model_ema).state_dict(), run_dir / f"generative_model_ema{suffix}.npy")
    save_run_args(run_dir, args)
    if epoch is not None:
        save_run_args(run_dir, args, f"args_{epoch}.pickle")


# ---------------------------------------------------------------- RNG states


def capture_rng_state() -> dict[str, Any]:
    """torch, numpy, python and (if present) CUDA generator states, as weights_only-safe objects."""
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    version, py_internal, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "name": str(np_name), "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
            "pos": int(np_pos), "has_gauss": int(np_has_gauss), "cached_gaussian": float(np_gauss),
        },
        "python": {"version": int(version), "internal": list(py_internal), "gauss_next": py_gauss},
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))
    if state.get("cuda") and torch.cuda.is_available():
        if len(state["cuda"]) != torch.cuda.device_count():
            print(f"note: the run saved {len(state['cuda'])} CUDA RNG states, {torch.cuda.device_count()} GPUs are visible; "
                  "restoring the ones that fit")
        for i, s in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s, i)


# ---------------------------------------------------------------- resume state


def save_resume_state(run_dir: str | os.PathLike, state: dict[str, Any]) -> Path:
    return atomic_torch_save({"format": RESUME_FORMAT, **state}, Path(run_dir) / RESUME_FILE)


def load_resume_state(run_dir: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any] | None:
    """The run's resume state, or None when the folder has none (a legacy EDM/GAGA run)."""
    path = Path(run_dir) / RESUME_FILE
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - corrupt files raise many types
        raise CheckpointError(f"{path} is unreadable ({type(e).__name__}); delete it to resume from the best-model files instead") from None
    if not isinstance(state, dict) or state.get("format") != RESUME_FORMAT:
        state = state if isinstance(state, dict) else {}
        raise CheckpointError(f"{path} has format {state.get('format')}, this code reads format {RESUME_FORMAT}")
    return state


def resolve_resume_dir(path: str | os.PathLike) -> Path:
    """The run folder ``--resume`` names, or a one-line RunFolderError saying what is wrong."""
    run_dir = Path(path)
    if not run_dir.is_dir():
        raise RunFolderError(f"--resume {path}: no such folder; pass a run folder such as outputs/<exp_name>")
    if not (run_dir / ARGS_FILE).is_file():
        raise RunFolderError(f"--resume {path}: no {ARGS_FILE} there, so it is not a training run folder")
    if not (run_dir / RESUME_FILE).is_file() and not (run_dir / MODEL_FILE).is_file():
        raise RunFolderError(f"--resume {path}: the run has neither {RESUME_FILE} nor {MODEL_FILE}; nothing to continue from")
    return run_dir


def load_state_file(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """A ``.npy`` state dict written by torch.save (ours or EDM's), loaded safely; CheckpointError
    (one line naming the file) when it is unreadable or not a dict."""
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - corrupt files raise many types
        raise CheckpointError(f"{path} is unreadable ({type(e).__name__}: {safe_load_reason(e)})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, expected a state dict")
    return state

