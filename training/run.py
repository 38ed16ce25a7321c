"""A whole training run: what main_qm9.py / main_geom_drugs.py do (EDM's main script).

This module owns the command line and the run folder (parse, --resume's stored args, refuse to
overwrite); the run itself is ``training.trainer.Trainer``. Per epoch: train; every
``test_epochs`` epochs check stability (unless break_train_epoch), compute the validation and
test NLL with the EMA model, and when the validation NLL improves write EDM's best-model files;
at the end of every epoch write the resume state.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

from configs.atomic_io import remove_stale_temp_files, unwritable_reason
from configs.errors import RunFolderError, UserInputError
from configs.run_args import ARGS_FILE, load_run_args
from training import checkpoint as ckpt
from training.args import explicit_flags, fill_legacy_defaults, parse_args
from training.args_check import check_buildable, check_run_sizes
from training.distributed import DistContext, cleanup, setup
from training.latent_training import trainer_class
from training.lr_schedule import check_resume_change
from training.trainer import Trainer, seed_everything

__all__ = ["RESUME_OVERRIDABLE", "RUN_FILES", "Trainer", "check_new_run_folder", "main", "resume_args",
           "seed_everything", "train"]

# Flags that may change when a run is resumed; every other flag is fixed by the run's args.pickle.
RESUME_OVERRIDABLE = {
    "n_epochs", "test_epochs", "n_stability_samples", "no_wandb", "wandb_usr", "online", "num_workers",
    "n_report_steps", "visualize_every_batch", "break_train_epoch", "datadir", "dp", "no_cuda", "save_model",
    "checkpoint_every_steps", "nan_patience", "stop_after_steps", "output_root", "data_file", "egnn_impl",
    "group_by_size", "compile", "compile_backend", "tf32",
}
# Files whose presence means a folder holds a training run that a fresh start would overwrite.
RUN_FILES = (ARGS_FILE, ckpt.MODEL_FILE, ckpt.EMA_FILE, ckpt.OPTIM_FILE, ckpt.RESUME_FILE)


def resume_args(args: argparse.Namespace, argv: Sequence[str], script: str) -> tuple[argparse.Namespace, Path]:
    """The run's stored args, with the command line's overridable flags applied; its folder.

    A flag that would change the model or the data (e.g. --nf) is refused with one line, and so
    is an --lr_schedule that would change the lr of an epoch the run has already begun.
    """
    run_dir = ckpt.resolve_resume_dir(args.resume)
    try:
        stored = fill_legacy_defaults(load_run_args(run_dir), script)
    except (ValueError, FileNotFoundError) as e:
        raise RunFolderError(f"--resume {args.resume}: {e}") from None
    check_run_sizes(stored, str(run_dir / ARGS_FILE))  # an untrusted args.pickle cannot ask for any size
    given = explicit_flags(argv, script) - {"resume", "start_epoch", "exp_name"}
    for key in sorted(given):
        new = getattr(args, key)
        if key in RESUME_OVERRIDABLE:
            setattr(stored, key, new)
        elif key == "lr_schedule" and new != getattr(stored, key, None):  # only the epochs not yet trained
            check_resume_change(stored.lr, stored.lr_schedule, new, epochs_started(run_dir, stored))
            stored.lr_schedule = new
        elif getattr(stored, key, None) != new:
            raise UserInputError(
                f"--{key} cannot change when resuming (the run has {getattr(stored, key, None)!r}, you passed {new!r}); "
                f"drop it, or start a new run"
            )
    stored.resume = str(run_dir)
    stored.stop_after_steps = args.stop_after_steps  # a test hook never carries over into the continuation
    return stored, run_dir


def epochs_started(run_dir: Path, args: argparse.Namespace) -> int:
    """How many epochs of the run have begun (a partly trained epoch counts)."""
    saved = ckpt.load_resume_state(run_dir, map_location="cpu")
    if saved is None:  # an EDM/GAGA run folder: its best model's epoch
        return int(getattr(args, "current_epoch", 0) or 0)
    state = saved.get("state", {})
    return int(state.get("epoch", 0)) + (1 if state.get("step_in_epoch", 0) else 0)


def train(args: argparse.Namespace, ctx: DistContext, run_dir: Path, resuming: bool,
          trainer_cls: type[Trainer] = Trainer) -> dict[str, Any]:
    """Run (or continue) training; returns a summary (best NLLs, last stability metrics, state).

    ``trainer_cls``: a ``training.trainer.Trainer`` subclass, e.g. a baseline's loss.
    """
    trainer = trainer_cls.build(args, ctx, run_dir)
    trainer.restore(resuming)
    trainer.start()
    return trainer.fit()


def check_new_run_folder(run_dir: Path, overwrite: bool) -> None:
    """A fresh run may not silently replace an existing one: refuse unless --overwrite; check writability."""
    existing = [name for name in RUN_FILES if (run_dir / name).exists()]
    if existing and not overwrite:
        raise RunFolderError(
            f"{run_dir} already holds a training run ({', '.join(existing)}); continue it with --resume {run_dir}, "
            f"replace it with --overwrite, or choose another --exp_name"
        )
    reason = unwritable_reason(run_dir)
    if reason:
        raise RunFolderError(f"{reason}; choose another --output_root")
    remove_stale_temp_files(run_dir)


def main(argv: Sequence[str] | None = None, script: str = "qm9", trainer_cls: type[Trainer] = Trainer) -> dict[str, Any]:
    """Parse a training command line and run it (the body of main_qm9.py / main_geom_drugs.py).

    Raises UserInputError / RunFolderError / DataError (one line each) before any data is read
    when a flag or the run folder is wrong; the scripts print them via ``configs.errors.cli_errors``.
    ``trainer_cls`` trains (default ``training.trainer.Trainer``; a baseline passes its subclass).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv, script)
    resuming = args.resume is not None
    if resuming:
        args, run_dir = resume_args(args, argv, script)
        check_buildable(args)
        remove_stale_temp_files(run_dir)
    else:
        check_buildable(args)
        run_dir = Path(args.output_root) / args.exp_name
        check_new_run_folder(run_dir, args.overwrite)
    ctx = setup(args)
    try:
        trainer_cls = trainer_class(args, trainer_cls)  # GeoLDM runs: training/latent_training.py
        return train(args, ctx, run_dir, resuming, trainer_cls)
    finally:
        cleanup(ctx)
