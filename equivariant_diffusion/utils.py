"""Per-molecule masking and centring on dense padded batches.

Shapes: x (B, N, C) with node_mask (B, N, 1) holding 1 for real atoms and 0 for padding.
"""
from __future__ import annotations

import torch


def sum_except_batch(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.size(0), -1).sum(-1)


def remove_mean_with_mask(x: torch.Tensor, node_mask: torch.Tensor, check_padding: bool = True) -> torch.Tensor:
    """Subtract each molecule's mean over its real atoms, per channel; padding stays 0."""
    if check_padding:
        masked_max_abs = (x * (1 - node_mask)).abs().sum().item()
        if masked_max_abs >= 1e-5:
            raise ValueError(f"padded entries are not zero (sum |x| = {masked_max_abs:.3g})")
    n = node_mask.sum(1, keepdim=True)
    mean = x.sum(1, keepdim=True) / n
    return x - mean * node_mask


def assert_mean_zero_with_mask(x: torch.Tensor, node_mask: torch.Tensor, eps: float = 1e-10) -> None:
    assert_correctly_masked(x, node_mask)
    largest = x.abs().sum(1, keepdim=True).max().item()
    error = x.sum(1, keepdim=True).abs().max().item()
    rel_error = error / (largest + eps)
    assert rel_error < 1e-2, f"mean is not zero, relative error {rel_error}"


def assert_correctly_masked(variable: torch.Tensor, node_mask: torch.Tensor) -> None:
    assert (variable * (1 - node_mask)).abs().max().item() < 1e-4, "variables not masked properly"


def sample_center_gravity_zero_gaussian_with_mask(
    size: tuple[int, ...], device: torch.device, node_mask: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Standard normal noise, masked, then centred per molecule (EDM's position noise)."""
    x = torch.randn(size, device=device, generator=generator)
    return remove_mean_with_mask(x * node_mask, node_mask, check_padding=False)


def sample_gaussian_with_mask(
    size: tuple[int, ...], device: torch.device, node_mask: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Standard normal noise on real atoms, zero on padding."""
    return torch.randn(size, device=device, generator=generator) * node_mask
