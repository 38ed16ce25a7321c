"""The dynamics' NaN guard, per molecule.

EDM resets the whole batch's predicted noise to zero when any entry is NaN. Molecules of a batch
are independent, so here only the molecules with a NaN are reset: one molecule that diverges
(e.g. an exploding chain) no longer zeroes the predictions for the other molecules of its batch,
which made sampling metrics depend on the batch size (measured: one such molecule in a batch of
100 left all 100 unstable). When no molecule has a NaN, the output is EDM's exactly.

The reset goes through ``torch.where``, so the autograd graph is kept and ``backward()`` always
runs; in training, a NaN inside the network normally makes the parameter gradients NaN too, and
the training loop skips such a step, as it did with EDM's batch-wide reset.
"""
from __future__ import annotations

import functools
import warnings

import torch


def guard(owner: torch.nn.Module, **parts: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The parts of a dynamics' output (name -> (B, N, D)), each with its NaN molecules reset to
    zero and a warning per part reset; one host sync for all parts when none has a NaN."""
    flags = [molecules_with_nan(part) for part in parts.values()]
    if not bool(functools.reduce(torch.logical_or, flags).any()):
        return tuple(parts.values())
    guarded = []
    for (what, part), bad in zip(parts.items(), flags):
        if bool(bad.any()):
            warn_reset(owner, what, bad)
            part = reset_molecules(part, bad)
        guarded.append(part)
    return tuple(guarded)


def molecules_with_nan(part: torch.Tensor) -> torch.Tensor:
    """(B, N, D) -> (B,) bool: which molecules have a NaN anywhere in ``part`` (no host sync)."""
    return torch.isnan(part).flatten(1).any(1)


def reset_molecules(part: torch.Tensor, bad: torch.Tensor) -> torch.Tensor:
    """``part`` (B, N, D) with the molecules flagged in ``bad`` (B,) set to zero."""
    return torch.where(bad.view(-1, 1, 1), torch.zeros_like(part), part)


def warn_reset(owner: torch.nn.Module, what: str, bad: torch.Tensor) -> None:
    """Count the reset on ``owner.nan_resets`` and warn with how many molecules it touched."""
    owner.nan_resets += 1
    warnings.warn(
        f"NaN in the predicted {what} noise of {int(bad.sum())} of {bad.numel()} molecule(s); reset to zero "
        f"for those (reset #{owner.nan_resets})",
        RuntimeWarning, stacklevel=5,  # warn_reset <- guard <- forward <- nn.Module's call frames
    )
