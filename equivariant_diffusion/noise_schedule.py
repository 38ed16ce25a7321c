"""Noise schedules of the variance-preserving diffusion (EDM's conventions).

gamma(t) = -log(alpha_t^2 / sigma_t^2) of the normalised time t = t_int / T;
alpha_t^2 = sigmoid(-gamma_t), sigma_t^2 = sigmoid(gamma_t).

* Predefined schedules ('polynomial_<p>', 'cosine') are a table gamma[t_int], t_int = 0..T,
  computed once in float64 and stored as float32 (``gamma.gamma`` in checkpoints).
* EDM's learned schedule ('learned') is ``GammaNetwork``: a monotone network of t whose
  end points are the trainable gamma_0, gamma_1 (keys ``gamma.gamma_0``, ``gamma.gamma_1``,
  ``gamma.l{1,2,3}.{weight,bias}``, as in EDM's checkpoints).
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


class PositiveLinear(nn.Linear):
    """y = x softplus(W)^T + b: a linear layer with positive effective weights (monotone in x).

    ``weight`` is stored unconstrained (EDM's checkpoint layout); it is initialised like
    nn.Linear and then shifted by ``weight_init_offset`` so softplus(W) starts small.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, weight_init_offset: int = -2):
        self.weight_init_offset = weight_init_offset
        super().__init__(in_features, out_features, bias=bias)

    def reset_parameters(self) -> None:
        super().reset_parameters()  # kaiming-uniform weight, then the bias (EDM's RNG order)
        with torch.no_grad():
            self.weight.add_(self.weight_init_offset)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, nn.functional.softplus(self.weight), self.bias)


class GammaNetwork(nn.Module):
    """EDM's learned schedule (the VDM construction): gamma(t) = gamma_0 + (gamma_1 - gamma_0)
    * (g(t) - g(0)) / (g(1) - g(0)) with g(u) = l1(u) + l3(sigmoid(l2(l1(u)))) monotone in u.

    t has shape (..., 1) (EDM: (B, 1) float32). g(0) and g(1) are evaluated on tensors of t's
    shape, as EDM does: the l3 matmul's rounding depends on the row layout and the
    normalisation amplifies it (gamma is quantised to ~3e-4 in float32), so keeping the
    layout is what makes the values bit-identical to EDM's.
    """

    def __init__(self) -> None:
        super().__init__()
        self.l1 = PositiveLinear(1, 1)
        self.l2 = PositiveLinear(1, 1024)
        self.l3 = PositiveLinear(1024, 1)
        self.gamma_0 = nn.Parameter(torch.tensor([-5.0]))
        self.gamma_1 = nn.Parameter(torch.tensor([10.0]))

    def gamma_tilde(self, t: torch.Tensor) -> torch.Tensor:
        l1_t = self.l1(t)
        return l1_t + self.l3(torch.sigmoid(self.l2(l1_t)))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        gamma_tilde_0 = self.gamma_tilde(torch.zeros_like(t))
        gamma_tilde_1 = self.gamma_tilde(torch.ones_like(t))
        gamma_tilde_t = self.gamma_tilde(t)
        normalized = (gamma_tilde_t - gamma_tilde_0) / (gamma_tilde_1 - gamma_tilde_0)
        return self.gamma_0 + (self.gamma_1 - self.gamma_0) * normalized


def make_noise_schedule(noise_schedule: str, timesteps: int, precision: float) -> nn.Module:
    """The module computing gamma(t): ``GammaNetwork`` for 'learned', else the predefined table."""
    if noise_schedule == "learned":
        return GammaNetwork()
    return PredefinedNoiseSchedule(noise_schedule, timesteps=timesteps, precision=precision)


def alpha2_from_gamma(gamma: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(-gamma)


def sigma2_from_gamma(gamma: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(gamma)


def variance_t(dataset_var: float | torch.Tensor, gamma_t: torch.Tensor) -> torch.Tensor:
    """GAGA's closed form Var(z_t) = alpha_t^2 v + sigma_t^2 for zero-centred data of variance v."""
    return alpha2_from_gamma(gamma_t) * dataset_var + sigma2_from_gamma(gamma_t)
