"""The Trainer: one training run as short steps (build, restore, start, train_epoch, validate, checkpoint, fit).

``training.run.train`` is ``Trainer.build(...)`` + ``restore`` + ``start`` + ``fit``; every step is a
method, so a baseline changes one of them in a subclass and leaves the rest (resume, DDP, NaN
guard, EMA, clipping, checkpoints, metrics.jsonl) as they are.

* **A new loss**: override ``loss(batch) -> (nll, reg_term)``. ``batch`` is ``(x, h, node_mask,
  edge_mask, context)`` as ``qm9.losses.preprocess_batch`` builds it (centred, augmented, padded
  under DDP); the optimiser minimises ``nll + args.ode_regularization * reg_term.sum()``, ``nll``
  is the reported training NLL. Validation and test keep EDM's NLL (``training.loop.test``).
* **A new t-schedule**: set ``self.diffusion.train_t_sampler = fn`` in ``__init__``, where
  ``fn(n, max_t, device)`` returns the (n, 1) integer steps in {0..max_t} of a training batch
  (default None: EDM's uniform draw). Evaluation keeps the uniform draw its NLL estimator needs.
* **A learning-rate or other schedule**: a piecewise-constant lr by epoch is the ``--lr_schedule``
  flag (``apply_lr_schedule``, at the start of every epoch). Anything else: override
  ``build_optimizer``, or ``after_step`` (called after every optimiser step that was taken); derive
  it from ``self.state.global_step`` so that a resumed run continues it exactly (only the state,
  model, EMA, optimiser, queue and RNG are saved).

Then train with ``training.run.main(argv, trainer_cls=MyTrainer)`` (or ``train(..., trainer_cls=)``).
``tests/test_trainer.py`` trains subclasses with a modified loss and t-schedule. Keep a loss free of ``.item()``
and other host syncs: the loop syncs once per step (the finiteness check) and the accelerator
tests count that.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import math
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from configs.datasets_config import get_dataset_info
from configs.errors import CheckpointError, DataError
from configs.run_args import save_run_args
from egnn.device_policy import configure_matmul
from training import checkpoint as ckpt
from training import loop
from training.clipping import gradient_clipping, new_gradnorm_queue
from training.data import build_loaders, per_process_batch_size
from training.distributed import DistContext, all_reduce_sum, all_true, barrier, gather_objects, wrap_model
from training.ema import EMA
from training.loop import StopRequested, TrainState, analyze_and_save, test
from training.lr_schedule import lr_at_epoch
from training.metrics_log import append_record
from training.signals import StopNow, StopOnSignal

Batch = tuple  # (x, h, node_mask, edge_mask, context), see qm9.losses.preprocess_batch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class Trainer:
    """A training run's parts (model, EMA copy, optimiser, clipping queue, state) and its steps."""

    def __init__(self, args: argparse.Namespace, ctx: DistContext, model: torch.nn.Module, nodes_dist, *,
                 run_dir: Path | None = None, loaders: dict | None = None, dataset_info: dict | None = None,
                 prop_dist=None, property_norms: dict | None = None) -> None:
        self.args, self.ctx, self.model, self.nodes_dist = args, ctx, model, nodes_dist
        self.run_dir, self.loaders, self.dataset_info, self.prop_dist = run_dir, loaders, dataset_info, prop_dist
        self.property_norms = property_norms  # --conditioning: mean/MAD of each property (training.conditioning)
        self.device, self.dtype = ctx.device, torch.float32
        self.stop_signal: StopOnSignal | None = None  # set while fit() runs
        self.optim = self.build_optimizer()
        self.gradnorm_queue = new_gradnorm_queue()
        self.model_ema = copy.deepcopy(model) if args.ema_decay > 0 else None
        self.ema = EMA(args.ema_decay) if args.ema_decay > 0 else None
        self.state = TrainState(epoch=args.start_epoch)
        self.model_dp = self.model_ema_dp = model  # wrapped for DDP / DataParallel by start()
        self.logger = self.visualize_fn = None
        self.nll_val = self.nll_test = float("nan")
        self.stability: dict[str, float] | None = None

    @property
    def model_eval(self) -> torch.nn.Module:
        """The model evaluated and sampled: the EMA copy if there is one."""
        return self.model_ema if self.model_ema is not None else self.model

    @property
    def diffusion(self) -> torch.nn.Module:
        """The diffusion model without its DDP / DataParallel wrapper."""
        return ckpt.unwrap(self.model)

    # ------------------------------------------------------------------ setting up

    @classmethod
    def build(cls, args: argparse.Namespace, ctx: DistContext, run_dir: Path) -> "Trainer":
        """Seed, read the data and build the model (a bad dataset or size is a one-line DataError)."""
        from qm9.dataset import retrieve_dataloaders
        from qm9.models import get_model
        from training.conditioning import setup_conditioning

        args.cuda = ctx.device.type == "cuda"
        configure_matmul(ctx.device, bool(getattr(args, "tf32", False)))
        args.context_node_nf = len(getattr(args, "conditioning", None) or [])
        seed_everything(args.seed)
        try:
            dataset_info = get_dataset_info(args.dataset, args.remove_h)
            dataloaders, _charge_scale = retrieve_dataloaders(args)
            loaders = build_loaders(dataloaders, args, ctx.rank, ctx.world_size)
            model, nodes_dist, prop_dist = get_model(args, ctx.device, dataset_info, loaders["train"])
            property_norms = setup_conditioning(args, loaders, prop_dist)
        except DataError:
            raise
        except ValueError as e:
            raise DataError(" ".join(str(e).split())) from None
        return cls(args, ctx, model.to(ctx.device), nodes_dist, run_dir=run_dir, loaders=loaders,
                   dataset_info=dataset_info, prop_dist=prop_dist, property_norms=property_norms)

    def build_optimizer(self) -> torch.optim.Optimizer:
        """EDM's get_optim: AdamW with amsgrad and a negligible weight decay."""
        return torch.optim.AdamW(self.model.parameters(), lr=self.args.lr, amsgrad=True, weight_decay=1e-12)

    def apply_lr_schedule(self, epoch: int) -> None:
        """Set every parameter group's lr to ``--lr_schedule``'s value for ``epoch`` (no schedule: leave it).

        Called at the start of every epoch (a resumed one too), so the lr a restored optimiser state
        carries is replaced by the schedule's; a plain float, no device work.
        """
        schedule = getattr(self.args, "lr_schedule", None)
        if not schedule:
            return
        lr = lr_at_epoch(self.args.lr, schedule, epoch)
        if any(group["lr"] != lr for group in self.optim.param_groups) and self.ctx.is_main:
            print(f"Epoch {epoch}: learning rate {lr:g} (--lr_schedule {schedule})")
        for group in self.optim.param_groups:
            group["lr"] = lr

    def restore(self, resuming: bool) -> None:
        """Continue from the run folder's resume state (or an EDM run's best-model files)."""
        # On the CPU: RNG states must stay CPU tensors; load_state_dict copies the rest onto the device.
        saved = ckpt.load_resume_state(self.run_dir, map_location="cpu") if resuming else None
        if saved is not None:
            self._load_saved(saved)
        elif resuming:
            self._load_legacy()
        elif self.ctx.rank > 0:
            seed_everything(self.args.seed + self.ctx.rank)  # different noise per process; weights come from rank 0

    def _load_saved(self, saved: dict[str, Any]) -> None:
        ctx, args = self.ctx, self.args
        self.model.load_state_dict(saved["model"], strict=True)
        if self.model_ema is not None:
            self.model_ema.load_state_dict(saved["model_ema"] if saved["model_ema"] is not None else saved["model"],
                                           strict=True)
        self.optim.load_state_dict(saved["optim"])
        self.gradnorm_queue.load_state_dict(saved["gradnorm_queue"])
        self.state = state = TrainState.from_dict(saved["state"])
        rng = saved["rng"]
        if len(rng) != ctx.world_size and ctx.is_main:
            print(f"note: the run was saved with {len(rng)} processes, resuming with {ctx.world_size}; "
                  "the continuation is not bit-identical")
        ckpt.restore_rng_state(rng[ctx.rank] if ctx.rank < len(rng) else rng[0])
        saved_world = saved.get("world_size", 1)
        if saved_world != ctx.world_size and state.step_in_epoch:
            done = state.step_in_epoch * per_process_batch_size(args.batch_size, saved_world) * saved_world
            state.step_in_epoch = done // ctx.world_size // per_process_batch_size(args.batch_size, ctx.world_size)
        if ctx.is_main:
            print(f"Resuming {self.run_dir} at epoch {state.epoch}, batch {state.step_in_epoch}")

    def _load_legacy(self) -> None:
        """An EDM/GAGA run without resume state: its best-model files (RNG and queue start fresh)."""
        from qm9.models import load_generative_model

        run_dir, args = self.run_dir, self.args
        load_generative_model(self.model, run_dir / ckpt.MODEL_FILE, args)
        if self.model_ema is not None:
            ema_file = run_dir / ckpt.EMA_FILE
            load_generative_model(self.model_ema, ema_file if ema_file.is_file() else run_dir / ckpt.MODEL_FILE, args)
        optim_file = run_dir / ckpt.OPTIM_FILE
        if optim_file.is_file():
            try:
                self.optim.load_state_dict(ckpt.load_state_file(optim_file))
            except CheckpointError:
                raise
            except (ValueError, KeyError, RuntimeError) as e:  # unreadable, or an optimiser of another model/kind
                raise CheckpointError(
                    f"{optim_file} does not fit this model's optimiser ({type(e).__name__}: {' '.join(str(e).split())}); "
                    f"move it away to continue with a fresh optimiser state"
                ) from None
        self.state.epoch = int(getattr(args, "current_epoch", args.start_epoch) or 0)
        print(f"note: {run_dir} has no {ckpt.RESUME_FILE}; continuing from its best model at epoch {self.state.epoch} "
              "(gradient-norm queue and RNG start fresh)")

    def start(self) -> None:
        """Wrap the model for DDP / DataParallel, open the logger, write args.pickle (after restore)."""
        from training.wandb_logger import RunLogger

        args, ctx, run_dir = self.args, self.ctx, self.run_dir
        self.model_dp = wrap_model(self.model, args, ctx)
        data_parallel = isinstance(self.model_dp, torch.nn.DataParallel)
        self.model_ema_dp = torch.nn.DataParallel(self.model_eval) if data_parallel else self.model_eval
        self.logger = RunLogger(args, enabled=ctx.is_main and not args.no_wandb, run_dir=str(run_dir))
        if not ctx.is_main:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        save_run_args(run_dir, args)
        n_params = sum(p.numel() for p in self.model.parameters())
        print(f"Run folder {run_dir}; {n_params:,} parameters; {len(self.loaders['train'].dataset)} training "
              f"molecules; device {ctx.device}; {ctx.world_size} process(es)")
        from training.visualize import make_visualize_fn

        self.visualize_fn = make_visualize_fn(self.model_eval, self.nodes_dist, args, ctx.device, self.dataset_info,
                                              self.prop_dist, run_dir, self.logger)

    def log(self, values: dict[str, Any]) -> None:
        if self.logger is not None:
            self.logger.log(values)

    # ------------------------------------------------------------------ training

    def loss(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(nll, reg_term) of one prepared batch: EDM's loss. The seam for a baseline's loss."""
        x, h, node_mask, edge_mask, context = batch
        # Looked up on training.loop, the one patch point that training and evaluation share.
        nll, reg_term, _ = loop.compute_loss_and_nll(self.args, self.model_dp, self.nodes_dist, x, h, node_mask,
                                                     edge_mask, context)
        return nll, reg_term

    def after_step(self) -> None:
        """Called after every optimiser step taken (not after skipped batches); for a baseline's schedule."""

    def train_epoch(self, epoch: int, loader=None) -> float:
        """One epoch (or what is left of it after a resume); returns the mean training NLL.

        The loader's sampler must already be positioned at ``state.step_in_epoch``.
        """
        loader = self.loaders["train"] if loader is None else loader
        self.model_dp.train()
        self.model.train()
        n_iterations = self.state.step_in_epoch + len(loader)
        nll_epoch: list[float] = []
        bar = tqdm(loader, total=len(loader), initial=0, desc=f"epoch {epoch}", disable=not self.ctx.is_main,
                   dynamic_ncols=True, leave=False, mininterval=loop._bar_interval())
        for i, data in enumerate(bar, start=self.state.step_in_epoch):
            nll = self.train_step(epoch, i, data, bar)
            if nll is not None:
                nll_epoch.append(nll)
            if self._after_batch(epoch, i, last_of_epoch=i + 1 >= n_iterations):
                break
        bar.close()
        sums = all_reduce_sum([float(np.sum(nll_epoch)), float(len(nll_epoch))], self.ctx)
        mean_nll = sums[0] / sums[1] if sums[1] else float("nan")
        self.log({"Train Epoch NLL": mean_nll})
        return mean_nll

    def train_step(self, epoch: int, i: int, data: dict, bar=None) -> float | None:
        """One optimiser step on batch ``i``; its NLL, or None if the NaN guard skipped it."""
        args, ctx, state = self.args, self.ctx, self.state
        batch = loop._prepare(args, data, self.device, self.dtype, ctx, self.property_norms)
        self.optim.zero_grad(set_to_none=True)
        nll, reg_term = self.loss(batch)
        loss = nll + args.ode_regularization * reg_term.sum()
        state.global_step += 1
        state.step_in_epoch = i + 1
        # A loss without a graph (nothing to back-propagate) is skipped like a non-finite one; every
        # process takes the same branch, so DDP's gradient all-reduce never waits for a missing peer.
        ok = all_true(bool(torch.isfinite(loss).item()) and loss.requires_grad, ctx)
        grad_norm = float("nan")
        if ok:
            loss.backward()
            grad_norm = (gradient_clipping(self.model, self.gradnorm_queue, verbose=ctx.is_main) if args.clip_grad
                         else loop._grad_norm(self.model))
            ok = math.isfinite(grad_norm)  # gradients are all-reduced: every process agrees
        nll_value = None
        if ok:
            self.optim.step()
            if self.ema is not None:
                self.ema.update_model_average(self.model_eval, self.model)
            state.nan_in_a_row = 0
            nll_value = nll.item()
            self.after_step()
        else:
            self.optim.zero_grad(set_to_none=True)
            loop._count_nan_batch(args, state, epoch, i, ctx)
        if ctx.is_main and i % max(args.n_report_steps, 1) == 0:
            self._report_step(bar, loss, nll, grad_norm)
        return nll_value

    def _report_step(self, bar, loss: torch.Tensor, nll: torch.Tensor, grad_norm: float) -> None:
        """The progress bar and the logger, every --n_report_steps batches (rank 0; host syncs)."""
        if bar is not None:
            bar.set_postfix(loss=f"{loss.item():.3f}", nll=f"{nll.item():.3f}", grad=f"{grad_norm:.1f}", refresh=False)
        self.log({"Batch NLL": nll.item()})

    def _after_batch(self, epoch: int, i: int, last_of_epoch: bool) -> bool:
        """Pictures, the mid-epoch resume state, the --stop_after_steps hook; True ends the epoch early."""
        args, state = self.args, self.state
        if (self.visualize_fn is not None and args.visualize_every_batch > 0 and epoch % args.test_epochs == 0
                and i % args.visualize_every_batch == 0 and not (epoch == 0 and i == 0)):
            self.visualize_fn(epoch, i)
            self.model_dp.train()
        if args.break_train_epoch:
            return True
        if args.checkpoint_every_steps and not last_of_epoch and state.global_step % args.checkpoint_every_steps == 0:
            self.checkpoint()
        if args.stop_after_steps is not None and state.global_step >= args.stop_after_steps:
            raise StopRequested(f"stopped after {state.global_step} steps (--stop_after_steps)")
        if self.stop_signal is not None and self.stop_signal.requested and not last_of_epoch:
            self.checkpoint()
            raise StopRequested(f"stopped by {self.stop_signal.requested} after {state.global_step} steps; "
                                f"the resume state is saved: continue with --resume {self.run_dir}")
        return False

    # ------------------------------------------------------------------ evaluation and checkpoints

    def evaluate(self, epoch: int) -> tuple[float, float]:
        """Validation and test NLL of the EMA model (summed over processes under DDP)."""
        eval_model = self.model_eval if self.ctx.distributed else self.model_ema_dp
        nll_val = test(self.args, self.loaders["valid"], epoch, eval_model, self.device, self.dtype, self.nodes_dist,
                       "Val", self.ctx, property_norms=self.property_norms)
        nll_test = test(self.args, self.loaders["test"], epoch, eval_model, self.device, self.dtype, self.nodes_dist,
                        "Test", self.ctx, property_norms=self.property_norms)
        return nll_val, nll_test

    def validate(self, epoch: int, train_nll: float, epoch_seconds: float) -> None:
        """Every test_epochs: stability, val/test NLL, EDM's best-model files, a metrics.jsonl record."""
        args, ctx, state = self.args, self.ctx, self.state
        self.log(self.diffusion.log_info() if hasattr(self.diffusion, "log_info") else {})
        if not args.break_train_epoch:
            self.stability = analyze_and_save(epoch, self.model_eval, self.nodes_dist, args, self.device,
                                              self.dataset_info, self.prop_dist, n_samples=args.n_stability_samples,
                                              ctx=ctx, log_fn=self.log)
        self.nll_val, self.nll_test = self.evaluate(epoch)
        if self.nll_val < state.best_nll_val:
            state.best_nll_val, state.best_nll_test = self.nll_val, self.nll_test
            if args.save_model and ctx.is_main:
                args.current_epoch = epoch + 1
                ckpt.save_model_files(self.run_dir, self.model, self.model_ema, self.optim, args, epoch=epoch)
        if ctx.is_main:
            print(f"Val loss: {self.nll_val:.4f} \t Test loss: {self.nll_test:.4f}")
            print(f"Best val loss: {state.best_nll_val:.4f} \t Best test loss: {state.best_nll_test:.4f}")
        self.log({"Val loss": self.nll_val, "Test loss": self.nll_test, "Best cross-validated test loss": state.best_nll_test})
        if ctx.is_main and args.save_model:
            append_record(self.run_dir, {
                "epoch": epoch, "step": state.global_step, "epoch_seconds": round(epoch_seconds, 1),
                "lr": self.optim.param_groups[0]["lr"],
                "train_nll": train_nll, "val_nll": self.nll_val, "test_nll": self.nll_test, "stability": self.stability,
            })

    def checkpoint(self) -> None:
        """Write the resume state (every process's RNG; rank 0 writes; all wait)."""
        if not self.args.save_model:
            return
        rng_states = gather_objects(ckpt.capture_rng_state(), self.ctx)
        if self.ctx.is_main:
            ckpt.save_resume_state(self.run_dir, {
                "state": self.state.to_dict(),
                "model": ckpt.unwrap(self.model).state_dict(),
                "model_ema": self.model_ema.state_dict() if self.model_ema is not None else None,
                "optim": self.optim.state_dict(),
                "gradnorm_queue": self.gradnorm_queue.state_dict(),
                "rng": rng_states,
                "world_size": self.ctx.world_size,
            })
        barrier(self.ctx)

    # ------------------------------------------------------------------ the run

    def fit(self) -> dict[str, Any]:
        """Epochs from state.epoch to n_epochs; returns the run's summary (see ``summary``)."""
        args, state = self.args, self.state
        batch_size = per_process_batch_size(args.batch_size, self.ctx.world_size)
        try:
            # Not under DDP: every process would have to agree on the step to stop at (a collective per step).
            self.stop_signal = StopOnSignal(enabled=not self.ctx.distributed and args.save_model).__enter__()
            if state.pending_validation is not None:  # stopped during the last validation: redo it first
                self._validate_saved_epoch()
            for epoch in range(state.epoch, args.n_epochs):
                state.epoch = epoch
                self.apply_lr_schedule(epoch)
                self.loaders["train"].sampler.set_epoch(epoch, start=state.step_in_epoch * batch_size)
                start = time.time()
                train_nll = self.train_epoch(epoch)
                state.epoch, state.step_in_epoch = epoch + 1, 0
                epoch_seconds = time.time() - start
                self._print_epoch(epoch, train_nll, epoch_seconds)
                if epoch % args.test_epochs == 0:
                    state.pending_validation = {"epoch": epoch, "train_nll": train_nll, "epoch_seconds": epoch_seconds}
                    self._validate_saved_epoch()
                else:
                    self.checkpoint()
                if self.stop_signal is not None and self.stop_signal.requested:
                    raise StopRequested(f"stopped by {self.stop_signal.requested} at the end of epoch {epoch}; the "
                                        f"resume state is saved: continue with --resume {self.run_dir}")
        except StopRequested as e:
            if self.ctx.is_main:
                print(str(e))
        finally:
            if self.stop_signal is not None:
                self.stop_signal.__exit__()
                self.stop_signal = None
            if self.logger is not None:
                self.logger.finish()
        return self.summary()

    def _validate_saved_epoch(self) -> None:
        """Validate ``state.pending_validation``'s epoch with the resume state written first, so a stop
        signal during the minutes of sampling ends the run at once and loses nothing: the validation
        reruns on --resume from the same RNG state, so the continuation stays bit-identical."""
        state = self.state
        pending = state.pending_validation
        self.checkpoint()
        try:
            with self.stop_signal.interrupting() if self.stop_signal is not None else contextlib.nullcontext():
                self.validate(pending["epoch"], pending["train_nll"], pending["epoch_seconds"])
        except StopNow as e:
            raise StopRequested(f"stopped by {e} during the validation of epoch {pending['epoch']}; the resume state "
                                f"is saved (the validation reruns first): continue with --resume {self.run_dir}") from None
        state.pending_validation = None
        self.checkpoint()

    def _print_epoch(self, epoch: int, train_nll: float, seconds: float) -> None:
        if not self.ctx.is_main:
            return
        resets = getattr(getattr(self.diffusion, "dynamics", None), "nan_resets", 0)
        notes = f"; skipped batches so far {self.state.nan_total}" if self.state.nan_total else ""
        notes += f"; network NaN resets so far {resets}" if resets else ""
        print(f"Epoch {epoch}: train NLL {train_nll:.4f}, took {seconds:.1f} s{notes}")

    def summary(self) -> dict[str, Any]:
        """Best and last NLLs, last stability metrics, state, and the trained objects."""
        state = self.state
        return {
            "best_nll_val": state.best_nll_val, "best_nll_test": state.best_nll_test, "nll_val": self.nll_val,
            "nll_test": self.nll_test, "stability": self.stability, "state": state.to_dict(),
            "run_dir": str(self.run_dir), "model": self.model, "model_ema": self.model_ema, "optim": self.optim,
            "gradnorm_queue": self.gradnorm_queue,
        }

