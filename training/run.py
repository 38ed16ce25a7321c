"""A whole training run: what main_qm9.py / main_geom_drugs.py do (EDM's main script).

Per epoch: train; every ``test_epochs`` epochs check stability (unless break_train_epoch),
compute the validation and test NLL with the EMA model, and when the validation NLL
improves write EDM's best-model files; at the end of every epoch write the resume state.
"""
from __future__ import annotations

import argparse
import copy
import random
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from configs.atomic_io import remove_stale_temp_files, unwritable_reason
from configs.datasets_config import get_dataset_info
from configs.errors import CheckpointError, DataError, RunFolderError, UserInputError
from configs.run_args import ARGS_FILE, load_run_args, save_run_args
from egnn.device_policy import configure_matmul
from training import checkpoint as ckpt
from training.args import explicit_flags, fill_legacy_defaults, parse_args
from training.args_check import check_buildable, check_run_sizes
from training.clipping import new_gradnorm_queue
from training.data import build_loaders, per_process_batch_size
from training.distributed import DistContext, barrier, cleanup, gather_objects, setup, wrap_model
from training.ema import EMA
from training.loop import StopRequested, TrainState, analyze_and_save, test, train_epoch
from training.metrics_log import append_record
from training.wandb_logger import RunLogger

# Flags that may change when a run is resumed; every other flag is fixed by the run's args.pickle.
RESUME_OVERRIDABLE = {
    "n_epochs", "test_epochs", "n_stability_samples", "no_wandb", "wandb_usr", "online", "num_workers",
    "n_report_steps", "visualize_every_batch", "break_train_epoch", "datadir", "dp", "no_cuda", "save_model",
    "checkpoint_every_steps", "nan_patience", "stop_after_steps", "output_root", "data_file", "egnn_impl",
    "group_by_size", "compile", "compile_backend", "tf32",
}
# Files whose presence means a folder holds a training run that a fresh start would overwrite.
RUN_FILES = (ARGS_FILE, ckpt.MODEL_FILE, ckpt.EMA_FILE, ckpt.OPTIM_FILE, ckpt.RESUME_FILE)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resume_args(args: argparse.Namespace, argv: Sequence[str], script: str) -> tuple[argparse.Namespace, Path]:
    """The run's stored args, with the command line's overridable flags applied; its folder.

    A flag that would change the model or the data (e.g. --nf) is refused with one line.
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
        elif getattr(stored, key, None) != new:
            raise UserInputError(
                f"--{key} cannot change when resuming (the run has {getattr(stored, key, None)!r}, you passed {new!r}); "
                f"drop it, or start a new run"
            )
    stored.resume = str(run_dir)
    stored.stop_after_steps = args.stop_after_steps  # a test hook never carries over into the continuation
    return stored, run_dir


def build_optimizer(args: argparse.Namespace, model: torch.nn.Module) -> torch.optim.Optimizer:
    """EDM's get_optim: AdamW with amsgrad and a negligible weight decay."""
    return torch.optim.AdamW(model.parameters(), lr=args.lr, amsgrad=True, weight_decay=1e-12)


def _load_legacy_resume(run_dir: Path, model, model_ema, optim, args, state: TrainState) -> None:
    """Continue an EDM/GAGA run that has no resume state: its best-model files (RNG and queue start fresh)."""
    from qm9.models import load_generative_model

    load_generative_model(model, run_dir / ckpt.MODEL_FILE, args)
    if model_ema is not None:
        ema_file = run_dir / ckpt.EMA_FILE
        load_generative_model(model_ema, ema_file if ema_file.is_file() else run_dir / ckpt.MODEL_FILE, args)
    optim_file = run_dir / ckpt.OPTIM_FILE
    if optim_file.is_file():
        try:
            optim.load_state_dict(ckpt.load_state_file(optim_file))
        except CheckpointError:
            raise
        except (ValueError, KeyError, RuntimeError) as e:  # unreadable, or an optimiser of another model/kind
            raise CheckpointError(
                f"{optim_file} does not fit this model's optimiser ({type(e).__name__}: {' '.join(str(e).split())}); "
                f"move it away to continue with a fresh optimiser state"
            ) from None
    state.epoch = int(getattr(args, "current_epoch", args.start_epoch) or 0)
    print(f"note: {run_dir} has no {ckpt.RESUME_FILE}; continuing from its best model at epoch {state.epoch} "
          "(gradient-norm queue and RNG start fresh)")


def train(args: argparse.Namespace, ctx: DistContext, run_dir: Path, resuming: bool) -> dict[str, Any]:
    """Run (or continue) training; returns a summary (best NLLs, last stability metrics, state)."""
    from qm9.dataset import retrieve_dataloaders
    from qm9.models import get_model

    device, dtype = ctx.device, torch.float32
    args.cuda = device.type == "cuda"
    configure_matmul(device, bool(getattr(args, "tf32", False)))
    args.context_node_nf = 0
    seed_everything(args.seed)
    try:
        dataset_info = get_dataset_info(args.dataset, args.remove_h)
        dataloaders, _charge_scale = retrieve_dataloaders(args)
        loaders = build_loaders(dataloaders, args, ctx.rank, ctx.world_size)
        model, nodes_dist, prop_dist = get_model(args, device, dataset_info, loaders["train"])
    except DataError:
        raise
    except ValueError as e:
        raise DataError(" ".join(str(e).split())) from None
    model = model.to(device)
    optim = build_optimizer(args, model)
    gradnorm_queue = new_gradnorm_queue()
    model_ema = copy.deepcopy(model) if args.ema_decay > 0 else None
    ema = EMA(args.ema_decay) if args.ema_decay > 0 else None
    state = TrainState(epoch=args.start_epoch)

    # Loaded on the CPU: RNG states must stay CPU tensors (torch.set_rng_state, .numpy()); the
    # model and optimiser states are copied onto the parameters' device by load_state_dict.
    saved = ckpt.load_resume_state(run_dir, map_location="cpu") if resuming else None
    if saved is not None:
        unwrapped_state = saved["model"]
        model.load_state_dict(unwrapped_state, strict=True)
        if model_ema is not None:
            model_ema.load_state_dict(saved["model_ema"] if saved["model_ema"] is not None else unwrapped_state, strict=True)
        optim.load_state_dict(saved["optim"])
        gradnorm_queue.load_state_dict(saved["gradnorm_queue"])
        state = TrainState.from_dict(saved["state"])
        rng = saved["rng"]
        if len(rng) != ctx.world_size and ctx.is_main:
            print(f"note: the run was saved with {len(rng)} processes, resuming with {ctx.world_size}; "
                  "the continuation is not bit-identical")
        ckpt.restore_rng_state(rng[ctx.rank] if ctx.rank < len(rng) else rng[0])
        if saved.get("world_size", 1) != ctx.world_size and state.step_in_epoch:
            done = state.step_in_epoch * per_process_batch_size(args.batch_size, saved["world_size"]) * saved["world_size"]
            state.step_in_epoch = done // ctx.world_size // per_process_batch_size(args.batch_size, ctx.world_size)
        if ctx.is_main:
            print(f"Resuming {run_dir} at epoch {state.epoch}, batch {state.step_in_epoch}")
    elif resuming:
        _load_legacy_resume(run_dir, model, model_ema, optim, args, state)
    elif ctx.rank > 0:
        seed_everything(args.seed + ctx.rank)  # different noise per process; the weights come from rank 0

    model_dp = wrap_model(model, args, ctx)
    model_ema_eval = model_ema if model_ema is not None else model
    model_ema_dp = torch.nn.DataParallel(model_ema_eval) if isinstance(model_dp, torch.nn.DataParallel) else model_ema_eval

    logger = RunLogger(args, enabled=ctx.is_main and not args.no_wandb, run_dir=str(run_dir))
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_run_args(run_dir, args)
        n_params = sum(p.numel() for p in model.parameters())
        print(f"Run folder {run_dir}; {n_params:,} parameters; {len(loaders['train'].dataset)} training molecules; "
              f"device {device}; {ctx.world_size} process(es)")

    visualize_fn = None
    if ctx.is_main:
        from training.visualize import make_visualize_fn

        visualize_fn = make_visualize_fn(model_ema_eval, nodes_dist, args, device, dataset_info, prop_dist, run_dir, logger)

    def write_resume_state() -> None:
        if not args.save_model:
            return
        rng_states = gather_objects(ckpt.capture_rng_state(), ctx)
        if ctx.is_main:
            ckpt.save_resume_state(run_dir, {
                "state": state.to_dict(),
                "model": ckpt.unwrap(model).state_dict(),
                "model_ema": model_ema.state_dict() if model_ema is not None else None,
                "optim": optim.state_dict(),
                "gradnorm_queue": gradnorm_queue.state_dict(),
                "rng": rng_states,
                "world_size": ctx.world_size,
            })
        barrier(ctx)

    batch_size = per_process_batch_size(args.batch_size, ctx.world_size)
    last_metrics: dict[str, float] | None = None
    nll_val = nll_test = float("nan")
    try:
        for epoch in range(state.epoch, args.n_epochs):
            state.epoch = epoch
            loaders["train"].sampler.set_epoch(epoch, start=state.step_in_epoch * batch_size)
            start = time.time()
            train_nll = train_epoch(
                args, loaders["train"], epoch, model, model_dp, model_ema_eval, ema, device, dtype, optim, nodes_dist,
                gradnorm_queue, state, ctx, checkpoint_fn=write_resume_state, visualize_fn=visualize_fn, log_fn=logger.log,
            )
            state.epoch, state.step_in_epoch = epoch + 1, 0
            epoch_seconds = time.time() - start
            if ctx.is_main:
                resets = getattr(getattr(ckpt.unwrap(model), "dynamics", None), "nan_resets", 0)
                notes = f"; skipped batches so far {state.nan_total}" if state.nan_total else ""
                notes += f"; network NaN resets so far {resets}" if resets else ""
                print(f"Epoch {epoch}: train NLL {train_nll:.4f}, took {epoch_seconds:.1f} s{notes}")
            if epoch % args.test_epochs == 0:
                logger.log(ckpt.unwrap(model).log_info() if hasattr(ckpt.unwrap(model), "log_info") else {})
                if not args.break_train_epoch:
                    last_metrics = analyze_and_save(
                        epoch, model_ema_eval, nodes_dist, args, device, dataset_info, prop_dist,
                        n_samples=args.n_stability_samples, ctx=ctx, log_fn=logger.log,
                    )
                eval_model = model_ema_eval if ctx.distributed else model_ema_dp
                nll_val = test(args, loaders["valid"], epoch, eval_model, device, dtype, nodes_dist, "Val", ctx)
                nll_test = test(args, loaders["test"], epoch, eval_model, device, dtype, nodes_dist, "Test", ctx)
                if nll_val < state.best_nll_val:
                    state.best_nll_val, state.best_nll_test = nll_val, nll_test
                    if args.save_model and ctx.is_main:
                        args.current_epoch = epoch + 1
                        ckpt.save_model_files(run_dir, model, model_ema, optim, args, epoch=epoch)
                if ctx.is_main:
                    print(f"Val loss: {nll_val:.4f} \t Test loss: {nll_test:.4f}")
                    print(f"Best val loss: {state.best_nll_val:.4f} \t Best test loss: {state.best_nll_test:.4f}")
                logger.log({"Val loss": nll_val, "Test loss": nll_test, "Best cross-validated test loss": state.best_nll_test})
                if ctx.is_main and args.save_model:
                    append_record(run_dir, {
                        "epoch": epoch, "step": state.global_step, "epoch_seconds": round(epoch_seconds, 1),
                        "train_nll": train_nll, "val_nll": nll_val, "test_nll": nll_test, "stability": last_metrics,
                    })
            write_resume_state()
    except StopRequested as e:
        if ctx.is_main:
            print(str(e))
    finally:
        logger.finish()
    return {
        "best_nll_val": state.best_nll_val, "best_nll_test": state.best_nll_test, "nll_val": nll_val,
        "nll_test": nll_test, "stability": last_metrics, "state": state.to_dict(), "run_dir": str(run_dir),
        "model": model, "model_ema": model_ema, "optim": optim, "gradnorm_queue": gradnorm_queue,
    }


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


def main(argv: Sequence[str] | None = None, script: str = "qm9") -> dict[str, Any]:
    """Parse a training command line and run it (the body of main_qm9.py / main_geom_drugs.py).

    Raises UserInputError / RunFolderError / DataError (one line each) before any data is read
    when a flag or the run folder is wrong; the scripts print them via ``configs.errors.cli_errors``.
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
        return train(args, ctx, run_dir, resuming)
    finally:
        cleanup(ctx)
