"""Noise schedules of the variance-preserving diffusion (EDM's conventions).

A schedule is a table gamma[t] = -log(alpha_t^2 / sigma_t^2) for integer t = 0..T,
computed once in float64 and stored as float32 (``gamma.gamma`` in checkpoints).
alpha_t^2 = sigmoid(-gamma_t), sigma_t^2 = sigmoid(gamma_t).
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn


def clip_noise_schedule(alphas2: np.ndarray, clip_value: float = 0.001) -> np.ndarray:
    """Clip the per-step ratio alpha_t^2 / alpha_{t-1}^2 from below, for stable sampling."""
    alphas2 = np.concatenate([np.ones(1), alphas2], axis=0)
    ratio = np.clip(alphas2[1:] / alphas2[:-1], a_min=clip_value, a_max=1.0)
    return np.cumprod(ratio, axis=0)


def polynomial_schedule(timesteps: int, s: float = 1e-4, power: float = 3.0) -> np.ndarray:
    """alpha_t^2 = (1 - (t/T)^power)^2, ratio-clipped, then squeezed into [s, 1 - s]."""
    steps = timesteps + 1
    u = np.linspace(0, steps, steps)
    alphas2 = (1 - np.power(u / steps, power)) ** 2
    alphas2 = clip_noise_schedule(alphas2, clip_value=0.001)
    precision = 1 - 2 * s
    return precision * alphas2 + s


def cosine_schedule(timesteps: int, s: float = 0.008) -> np.ndarray:
    """Nichol & Dhariwal's cosine schedule of alpha_t^2 (T + 1 values)."""
    steps = timesteps + 2
    u = np.linspace(0, steps, steps)
    alphas_cumprod = np.cos(((u / steps) + s) / (1 + s) * math.pi * 0.5) ** 2
    alphas_cumprod = alphas_cumprod / alphas_cumprod[0]
    betas = np.clip(1 - (alphas_cumprod[1:] / alphas_cumprod[:-1]), a_min=0, a_max=0.999)
    return np.cumprod(1.0 - betas, axis=0)


def alphas2_for(noise_schedule: str, timesteps: int, precision: float) -> np.ndarray:
    """alpha_t^2 for t = 0..T of a named schedule ('cosine' or 'polynomial_<p>')."""
    if noise_schedule == "cosine":
        return cosine_schedule(timesteps)
    if noise_schedule.startswith("polynomial_"):
        try:
            power = float(noise_schedule.split("_", 1)[1])
        except ValueError:
            raise ValueError(f"bad noise schedule {noise_schedule!r}; expected e.g. 'polynomial_2'") from None
        return polynomial_schedule(timesteps, s=precision, power=power)
    raise ValueError(
        f"unknown noise schedule {noise_schedule!r}; choose 'cosine', 'polynomial_<power>' or 'learned'"
    )


def gamma_table(noise_schedule: str, timesteps: int, precision: float) -> torch.Tensor:
    """float32 table gamma[0..T] = -(log alpha_t^2 - log sigma_t^2), computed in float64."""
    alphas2 = alphas2_for(noise_schedule, timesteps, precision)
    sigmas2 = 1 - alphas2
    gamma = -(np.log(alphas2) - np.log(sigmas2))
    return torch.from_numpy(gamma).float()


class PredefinedNoiseSchedule(nn.Module):
    """gamma(t) by table lookup at t_int = round(t * T) (t is the normalised time t_int / T).

    The table is a non-trainable parameter named ``gamma`` so that checkpoints carry it
    as ``gamma.gamma`` exactly as EDM's do.
    """

    def __init__(self, noise_schedule: str, timesteps: int, precision: float):
        super().__init__()
        self.timesteps = int(timesteps)
        self.gamma = nn.Parameter(gamma_table(noise_schedule, timesteps, precision), requires_grad=False)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        t_int = torch.round(t * self.timesteps).long()
        return self.gamma[t_int]


def alpha2_from_gamma(gamma: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(-gamma)


def sigma2_from_gamma(gamma: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(gamma)


def variance_t(dataset_var: float | torch.Tensor, gamma_t: torch.Tensor) -> torch.Tensor:
    """GAGA's closed form Var(z_t) = alpha_t^2 v + sigma_t^2 for zero-centred data of variance v."""
    return alpha2_from_gamma(gamma_t) * dataset_var + sigma2_from_gamma(gamma_t)
