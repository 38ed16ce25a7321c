"""EDM's training loop (``train_test.py``): the step helpers, test, analyze_and_save, sampling.

The epoch loop itself is ``training.trainer.Trainer.train_epoch`` (``train_epoch`` here is its
front end with EDM's signature).

Differences from EDM / the GAGA fork, all deliberate:
* batches become model inputs in ``qm9.losses.preprocess_batch`` for training AND
  evaluation (the GAGA fork centred the one-hot only in training);
* the stability check samples with the run's own ``max_t`` (Gaussian start at T* with the
  run's ``dataset_var``) instead of the fork's hard-coded t = 800, variance 1;
* a NaN guard skips batches whose loss or gradient is not finite and stops the run after
  ``--nan_patience`` of them in a row;
* progress is a tqdm bar; under DDP every process trains on its shard and evaluations are
  summed over processes.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional

import torch
from tqdm import tqdm

from configs.errors import TrainingStopped
from configs.run_args import resolved_max_t, run_folder_of
from equivariant_diffusion.utils import remove_mean_with_mask, sample_center_gravity_zero_gaussian_with_mask
from qm9.losses import compute_loss_and_nll, pad_to_atoms, preprocess_batch
from training.clipping import Queue
from training.distributed import DistContext, all_reduce_max_int, all_reduce_sum, broadcast_object, gather_objects
from training.ema import EMA


class NanGuardError(TrainingStopped):
    """Too many consecutive batches with a non-finite loss or gradient."""


class StopRequested(Exception):
    """Raised by the hidden ``--stop_after_steps`` test hook (simulates a crash)."""


@dataclass
class TrainState:
    """Where a run is; saved in the resume state."""

    epoch: int = 0  # the epoch being trained (or next to train)
    step_in_epoch: int = 0  # batches of `epoch` this process has finished
    global_step: int = 0  # optimiser steps attempted (NaN-skipped ones included)
    nan_in_a_row: int = 0
    nan_total: int = 0
    best_nll_val: float = 1e8
    best_nll_test: float = 1e8
    # {"epoch", "train_nll", "epoch_seconds"} of a finished epoch whose validation has not completed
    # (a stop during validation); a resumed run validates it first.
    pending_validation: Optional[dict] = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainState":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


def _bar_interval() -> float:
    """Seconds between progress-bar refreshes: often on a terminal, rarely into a log file."""
    return 0.5 if sys.stderr.isatty() else 60.0


def random_rotation(x: torch.Tensor) -> torch.Tensor:
    """Rotate each molecule (B, N, 3) by a uniformly random proper rotation (about the origin)."""
    q, r = torch.linalg.qr(torch.randn(x.size(0), 3, 3, device=x.device, dtype=x.dtype))
    q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)  # Haar-uniform O(3)
    q = q * torch.linalg.det(q).sign().view(-1, 1, 1)  # det +1 (flip all columns: 3 is odd)
    return x @ q.transpose(1, 2)


def _prepare(args, data, device, dtype, ctx: DistContext | None = None, property_norms=None):
    """Model inputs of a training batch; with --conditioning the context holds the molecules' true
    property values normalised by ``property_norms`` (training.conditioning)."""
    x, h, node_mask, edge_mask, context = preprocess_batch(
        data, device, dtype, args.include_charges, args.zero_center_h, getattr(args, "conditioning", None) or (),
        property_norms,
    )
    if ctx is not None and ctx.distributed:
        # Every process pads to the global batch's largest molecule: the l2 loss divides by the
        # padded atom count, so DDP then optimises exactly the single-process (and --dp) objective.
        n_atoms = all_reduce_max_int(x.size(1), ctx)
        if context is not None:
            context = torch.nn.functional.pad(context, (0, 0, 0, n_atoms - context.size(1)))
        x, h, node_mask, edge_mask = pad_to_atoms(x, h, node_mask, edge_mask, n_atoms)
    if getattr(args, "augment_noise", 0) > 0:
        eps = sample_center_gravity_zero_gaussian_with_mask(x.size(), x.device, node_mask)
        x = remove_mean_with_mask(x + eps * args.augment_noise, node_mask)
    if getattr(args, "data_augmentation", False):
        x = random_rotation(x).detach()
    return x, h, node_mask, edge_mask, context


def _grad_norm(model: torch.nn.Module) -> float:
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return 0.0
    return float(torch.nn.utils.get_total_norm(grads, norm_type=2.0))


def train_epoch(
    args: argparse.Namespace,
    loader,
    epoch: int,
    model: torch.nn.Module,
    model_dp: torch.nn.Module,
    model_ema: torch.nn.Module,
    ema: EMA | None,
    device: torch.device,
    dtype: torch.dtype,
    optim: torch.optim.Optimizer,
    nodes_dist,
    gradnorm_queue: Queue,
    state: TrainState,
    ctx: DistContext | None = None,
    checkpoint_fn: Callable[[], None] | None = None,
    visualize_fn: Callable[[int, int], None] | None = None,
    log_fn: Callable[[dict], None] | None = None,
) -> float:
    """One epoch (or what is left of it after a resume); returns the mean training NLL.

    ``loader``'s sampler must already be positioned at ``state.step_in_epoch``. A compatible front
    end for ``training.trainer.Trainer.train_epoch`` over parts built elsewhere.
    """
    from training.trainer import Trainer

    trainer = Trainer(args, ctx or DistContext(device=device), model, nodes_dist)
    trainer.model_dp, trainer.model_ema, trainer.ema, trainer.optim = model_dp, model_ema, ema, optim
    trainer.gradnorm_queue, trainer.state, trainer.device, trainer.dtype = gradnorm_queue, state, device, dtype
    trainer.visualize_fn = visualize_fn
    trainer.log = log_fn or (lambda values: None)
    trainer.checkpoint = checkpoint_fn or (lambda: None)
    return trainer.train_epoch(epoch, loader)


def _count_nan_batch(args, state: TrainState, epoch: int, i: int, ctx: DistContext) -> None:
    state.nan_in_a_row += 1
    state.nan_total += 1
    if ctx.is_main:
        tqdm.write(f"warning: non-finite loss or gradient at epoch {epoch}, iter {i}; batch skipped "
                   f"({state.nan_in_a_row} in a row, {state.nan_total} in total)")
    if state.nan_in_a_row >= args.nan_patience:
        raise NanGuardError(
            f"training stopped: {state.nan_in_a_row} batches in a row gave a non-finite loss or gradient "
            f"(epoch {epoch}, iter {i}); lower --lr, check the data, or resume from the last good state "
            f"with --resume {run_folder_of(args)}"
        )


@torch.no_grad()
def test(
    args: argparse.Namespace,
    loader,
    epoch: int,
    eval_model: torch.nn.Module,
    device: torch.device,
    dtype: torch.dtype,
    nodes_dist,
    partition: str = "Test",
    ctx: DistContext | None = None,
    property_norms=None,
) -> float:
    """Mean NLL per molecule over ``loader`` (EDM's test); summed over processes under DDP.
    Conditional runs (``args.conditioning``) score each molecule given its true property values,
    normalised by ``property_norms``."""
    ctx = ctx or DistContext(device=device)
    was_training = eval_model.training
    eval_model.eval()
    total, count = 0.0, 0
    bar = tqdm(loader, desc=f"{partition} NLL epoch {epoch}", disable=not ctx.is_main, dynamic_ncols=True, leave=False,
               mininterval=_bar_interval())
    for data in bar:
        x, h, node_mask, edge_mask, context = preprocess_batch(
            data, device, dtype, args.include_charges, args.zero_center_h, getattr(args, "conditioning", None) or (),
            property_norms,
        )
        nll, _, _ = compute_loss_and_nll(args, eval_model, nodes_dist, x, h, node_mask, edge_mask, context)
        total += nll.item() * x.size(0)
        count += x.size(0)
        bar.set_postfix(nll=f"{total / count:.3f}", refresh=False)
    bar.close()
    eval_model.train(was_training)
    total, count = all_reduce_sum([total, float(count)], ctx)
    return total / count if count else float("nan")


def sampling_options(args: argparse.Namespace) -> dict[str, Any]:
    """Sampler options of a run: the Gaussian start at its own max_t (if < T) with its dataset_var."""
    T = int(args.diffusion_steps)
    max_t = resolved_max_t(args)
    return dict(
        start_step=max_t if max_t < T else None,
        dataset_var=float(getattr(args, "dataset_var", 1.0)),
        step_size=int(getattr(args, "sampling_step_size", 1)),
        sampler=str(getattr(args, "sampler", "ddpm")),
    )


@torch.no_grad()
def sample_molecules(
    args: argparse.Namespace,
    model_sample: torch.nn.Module,
    nodes_dist,
    dataset_info: dict,
    device: torch.device,
    n_samples: int,
    batch_size: int = 100,
    prop_dist=None,
    progress: bool = True,
    options: dict[str, Any] | None = None,
) -> dict[str, torch.Tensor]:
    """n_samples molecules as EDM's molecule dict {'one_hot', 'x', 'node_mask'} (padded to the max size).

    ``options``: sampler options (default: the run's, see ``sampling_options``).
    """
    from qm9.sampling import sample

    options = sampling_options(args) if options is None else options
    was_training = model_sample.training
    model_sample.eval()
    parts: dict[str, list[torch.Tensor]] = {"one_hot": [], "x": [], "node_mask": []}
    sizes = [min(batch_size, n_samples - start) for start in range(0, n_samples, batch_size)]
    for size in tqdm(sizes, desc="sampling", disable=not progress, dynamic_ncols=True, leave=False,
                     mininterval=_bar_interval()):
        nodesxsample = nodes_dist.sample(size)
        one_hot, charges, x, node_mask = sample(
            args, device, model_sample, dataset_info, prop_dist, nodesxsample=nodesxsample, **options
        )
        parts["one_hot"].append(one_hot.detach().cpu())
        parts["x"].append(x.detach().cpu())
        parts["node_mask"].append(node_mask.detach().cpu())
    model_sample.train(was_training)
    return concat_molecules([parts])


def concat_molecules(groups: list[dict[str, list[torch.Tensor]] | dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Concatenate molecule dicts of possibly different padded sizes (zero-padding the rest)."""
    tensors = {k: [] for k in ("one_hot", "x", "node_mask")}
    for g in groups:
        for k in tensors:
            v = g[k]
            tensors[k].extend(t for t in (v if isinstance(v, list) else [v]) if t.size(0) > 0)
    if not tensors["x"]:
        return {"one_hot": torch.zeros(0, 0, 0), "x": torch.zeros(0, 0, 3), "node_mask": torch.zeros(0, 0, 1)}
    n_max = max(t.size(1) for t in tensors["x"])
    out = {}
    for k, items in tensors.items():
        padded = [torch.nn.functional.pad(t, (0, 0) * (t.dim() - 2) + (0, n_max - t.size(1))) for t in items]
        out[k] = torch.cat(padded, dim=0)
    return out


def analyze_and_save(
    epoch: int,
    model_sample: torch.nn.Module,
    nodes_dist,
    args: argparse.Namespace,
    device: torch.device,
    dataset_info: dict,
    prop_dist=None,
    n_samples: int = 1000,
    batch_size: int = 100,
    ctx: DistContext | None = None,
    log_fn: Callable[[dict], None] | None = None,
) -> dict[str, float] | None:
    """Sample n_samples molecules (shared out over processes) and report EDM's stability metrics.

    Returns {'mol_stable', 'atm_stable', and with RDKit 'validity', 'uniqueness'}. No novelty: it
    needs the training set's SMILES, and EDM's 0.0 in its place would read as a measurement
    (``eval_analyze.py`` measures it).
    """
    from qm9.analyze import analyze_stability_for_molecules

    ctx = ctx or DistContext(device=device)
    if n_samples <= 0:
        return None
    if ctx.is_main:
        tqdm.write(f"Analyzing molecule stability at epoch {epoch} ({n_samples} samples)...")
    start = time.time()
    share = [n_samples // ctx.world_size + (r < n_samples % ctx.world_size) for r in range(ctx.world_size)]
    mine = sample_molecules(args, model_sample, nodes_dist, dataset_info, device, share[ctx.rank],
                            batch_size=min(batch_size, n_samples), prop_dist=prop_dist, progress=ctx.is_main)
    groups = gather_objects(mine, ctx)
    metrics = None
    if ctx.is_main:
        molecules = concat_molecules(groups)
        validity_dict, rdkit_tuple = analyze_stability_for_molecules(molecules, dataset_info)
        metrics = {k: float(v) for k, v in validity_dict.items()}
        if rdkit_tuple is not None:
            validity, uniqueness, _novelty_not_computed = rdkit_tuple[0]
            metrics.update(validity=float(validity), uniqueness=float(uniqueness))
        tqdm.write(f"Stability at epoch {epoch}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
                   + f" ({time.time() - start:.1f} s)")
        if log_fn is not None:
            log_fn(metrics)
    return broadcast_object(metrics, ctx)
