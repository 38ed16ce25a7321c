"""Exponential moving average of the weights (EDM: ``ema = beta * ema + (1 - beta) * param``)."""
from __future__ import annotations

import torch


class EMA:
    """EDM's EMA helper: ``EMA(beta).update_model_average(ema_model, model)`` after each step.

    Only trainable parameters are averaged; the rest (the fixed gamma lookup table) is
    copied, so rounding in ``beta * g + (1 - beta) * g`` can never drift a constant.
    The arithmetic is EDM's (two products, then a sum), batched over all tensors.
    """

    def __init__(self, beta: float):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {beta}")
        self.beta = float(beta)

    @torch.no_grad()
    def update_model_average(self, ma_model: torch.nn.Module, current_model: torch.nn.Module) -> None:
        averaged, current = [], []
        for ma_p, p in zip(ma_model.parameters(), current_model.parameters(), strict=True):
            if p.requires_grad:
                averaged.append(ma_p.data)
                current.append(p.data)
            else:
                ma_p.data.copy_(p.data)
        if not averaged:
            return
        torch._foreach_mul_(averaged, self.beta)
        torch._foreach_add_(averaged, torch._foreach_mul(current, 1.0 - self.beta))
