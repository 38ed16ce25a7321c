"""EDM's property-classifier training recipe as library pieces (main_qm9_prop.py, §3.2 of
edm_conditional.md): losses in normalised and physical units, Adam with (coupled) weight decay
and a cosine schedule that EDM steps at the *start* of every epoch."""
from __future__ import annotations

import warnings

import torch
from torch import nn

from qm9.property_prediction.models_property import classifier_inputs


def normalised_l1(pred: torch.Tensor, label: torch.Tensor, mean: torch.Tensor, mad: torch.Tensor) -> torch.Tensor:
    """Training loss: mean |pred - (label - mean) / MAD| over the batch (normalised units)."""
    return nn.functional.l1_loss(pred, (label - mean) / mad)


def physical_mae(pred: torch.Tensor, label: torch.Tensor, mean: torch.Tensor, mad: torch.Tensor) -> torch.Tensor:
    """Evaluation error: mean |MAD * pred + mean - label| in the property's (EDM) units."""
    return nn.functional.l1_loss(mad * pred + mean, label)


def make_optimizer(model: nn.Module, lr: float, weight_decay: float = 1e-16, epochs: int = 1000):
    """(Adam, CosineAnnealingLR(T_max=epochs)) as EDM builds them."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs)
    return optimizer, scheduler


def start_epoch(scheduler) -> float:
    """EDM steps the scheduler before each training epoch (so epoch e uses lr_{e+1}); returns that lr.

    PyTorch warns that the scheduler runs before the optimizer; this order is EDM's recipe,
    so the warning is silenced here.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before `optimizer.step\\(\\)`")
        scheduler.step()
    return scheduler.get_last_lr()[0]


def train_epoch(model: nn.Module, loader, optimizer, prop: str, mean: torch.Tensor, mad: torch.Tensor,
                device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> float:
    """One epoch of EDM's classifier training (one Adam step per batch on the normalised L1);
    returns the epoch's mean normalised L1 (batches weighted by size). The caller steps the
    scheduler first (``start_epoch``), as EDM does."""
    model.train()
    total, count = 0.0, 0
    for batch in loader:
        label = batch[prop].to(device, dtype)
        optimizer.zero_grad()
        loss = normalised_l1(model(**classifier_inputs(batch, device, dtype)), label, mean, mad)
        loss.backward()
        optimizer.step()
        total += loss.item() * len(label)
        count += len(label)
    return total / max(count, 1)


@torch.no_grad()
def evaluate_mae(model: nn.Module, loader, prop: str, mean: torch.Tensor, mad: torch.Tensor,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> float:
    """Mean |MAD * pred + mean - label| over every molecule of ``loader`` (EDM units), as EDM's
    ``test``: per-batch means weighted by batch size."""
    model.eval()
    total, count = 0.0, 0
    for batch in loader:
        label = batch[prop].to(device, dtype)
        pred = model(**classifier_inputs(batch, device, dtype))
        total += physical_mae(pred, label, mean, mad).item() * len(label)
        count += len(label)
    if count == 0:
        raise ValueError("evaluate_mae got an empty loader")
    return total / count
