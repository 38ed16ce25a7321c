"""Reverse-chain samplers: one options object, validated in one place, and a name -> sampler registry.

A chain is fixed by ``SamplingOptions``: where it starts (EDM's z_T ~ N(0, I), or GAGA's
Gaussian start N(0, v_T* I) at ``start_step`` = T* with ``dataset_var`` = v), its stride
(``step_size``: steps t -> t - k) and the ``sampler`` that makes each step:

* ``ddpm``: EDM's ancestral step p(z_s | z_t) (stochastic);
* ``ddim``: the deterministic DDIM step (first-order solver of the probability-flow ODE);
* ``dpm_solver_2m``: DPM-Solver++(2M) (Lu et al. 2022), a second-order multistep solver of the
  same ODE in data-prediction form, for the VP schedule with EDM's epsilon parameterisation.
  With lambda_t = log(alpha_t / sigma_t) = -gamma_t / 2, x0_t = (z_t - sigma_t eps_t) / alpha_t and
  h = lambda_s - lambda_t, a step t -> s is
      z_s = (sigma_s / sigma_t) z_t - alpha_s (exp(-h) - 1) D,
  with D = x0_t on the first step and D = (1 + 1/(2r)) x0_t - 1/(2r) x0_prev afterwards
  (r = h_prev / h). The last step (to t = 0) is always first order: EDM's schedule ends at
  a tiny sigma_0, so lambda jumps there and extrapolating x0 across the jump costs more than
  it gains (on Gaussian data, 20 steps: error 1.8e-3 first-order final vs 4.7e-2 second-order;
  the DPM-Solver authors also drop to first order at the end of short chains).

Each sampler owns the reverse loop (``run``), so samplers with memory (multistep solvers)
fit the same interface. To add one: subclass ``Sampler``, decorate it with
``@register_sampler("name")``; every script takes its ``choices`` from ``sampler_names()``.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Protocol

import torch

from configs.errors import UserInputError


class DiffusionForSampling(Protocol):
    """What a sampler uses of ``EnVariationalDiffusion``."""

    T: int

    def _time(self, t_int: int, n_samples: int, device) -> torch.Tensor: ...
    def _recenter(self, z: torch.Tensor, node_mask: torch.Tensor) -> torch.Tensor: ...
    def gamma(self, t: torch.Tensor) -> torch.Tensor: ...
    def phi(self, z, t, node_mask, edge_mask, context) -> torch.Tensor: ...
    def sample_p_zs_given_zt(self, s, t, zt, node_mask, edge_mask, context, fix_noise=False) -> torch.Tensor: ...
    def sample_p_zs_given_zt_ddim(self, s, t, zt, node_mask, edge_mask, context) -> torch.Tensor: ...


StepCallback = Callable[[int, int, torch.Tensor], None]  # (s_int, t_int, z_s) after every step


class Sampler:
    """Runs the reverse chain z_start -> z_0 over ``schedule`` [(s_int, t_int), ...] (t_int descending)."""

    name: str = ""
    deterministic: bool = False  # decode z_0 by its mean (no noise) when the chain itself has none

    def run(self, model: DiffusionForSampling, z: torch.Tensor, schedule: list[tuple[int, int]], node_mask, edge_mask,
            context, fix_noise: bool = False, on_step: StepCallback | None = None) -> torch.Tensor:
        for s_int, t_int in schedule:
            z = self.step(model, s_int, t_int, z, node_mask, edge_mask, context, fix_noise)
            if on_step is not None:
                on_step(s_int, t_int, z)
        return z

    def step(self, model, s_int, t_int, z, node_mask, edge_mask, context, fix_noise):
        raise NotImplementedError


_REGISTRY: dict[str, type[Sampler]] = {}


def register_sampler(name: str) -> Callable[[type[Sampler]], type[Sampler]]:
    def add(cls: type[Sampler]) -> type[Sampler]:
        if name in _REGISTRY:
            raise ValueError(f"a sampler named {name!r} is already registered")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return add


def sampler_names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def get_sampler(name: str) -> Sampler:
    if name not in _REGISTRY:
        raise UserInputError(f"unknown sampler {name!r}; choose one of {', '.join(_REGISTRY)}")
    return _REGISTRY[name]()


def _times(model, s_int: int, t_int: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, t) as (B, 1) tensors of t_int / T, computed as EDM does."""
    return model._time(s_int, like.size(0), like.device), model._time(t_int, like.size(0), like.device)


@register_sampler("ddpm")
class Ancestral(Sampler):
    """EDM's ancestral sampler."""

    def step(self, model, s_int, t_int, z, node_mask, edge_mask, context, fix_noise):
        s, t = _times(model, s_int, t_int, z)
        return model.sample_p_zs_given_zt(s, t, z, node_mask, edge_mask, context, fix_noise=fix_noise)


@register_sampler("ddim")
class DDIM(Sampler):
    deterministic = True

    def step(self, model, s_int, t_int, z, node_mask, edge_mask, context, fix_noise):
        s, t = _times(model, s_int, t_int, z)
        return model.sample_p_zs_given_zt_ddim(s, t, z, node_mask, edge_mask, context)


@register_sampler("dpm_solver_2m")
class DPMSolverPP2M(Sampler):
    """DPM-Solver++(2M) in EDM's gamma parameterisation (see the module docstring)."""

    deterministic = True

    def run(self, model, z, schedule, node_mask, edge_mask, context, fix_noise=False, on_step=None):
        x0_prev = h_prev = None
        last = len(schedule) - 1
        for i, (s_int, t_int) in enumerate(schedule):
            s, t = _times(model, s_int, t_int, z)
            gamma_s, gamma_t = model.gamma(s).view(-1, 1, 1), model.gamma(t).view(-1, 1, 1)
            alpha_s, sigma_s = torch.sqrt(torch.sigmoid(-gamma_s)), torch.sqrt(torch.sigmoid(gamma_s))
            alpha_t, sigma_t = torch.sqrt(torch.sigmoid(-gamma_t)), torch.sqrt(torch.sigmoid(gamma_t))
            eps = model.phi(z, t, node_mask, edge_mask, context)
            x0 = (z - sigma_t * eps) / alpha_t
            h = 0.5 * (gamma_t - gamma_s)  # lambda_s - lambda_t > 0
            if x0_prev is None or i == last:
                d = x0
            else:
                r = h_prev / h
                d = (1 + 0.5 / r) * x0 - (0.5 / r) * x0_prev
            z = (sigma_s / sigma_t) * z - alpha_s * torch.expm1(-h) * d
            z = model._recenter(z * node_mask, node_mask)
            x0_prev, h_prev = x0, h
            if on_step is not None:
                on_step(s_int, t_int, z)
        return z


@dataclass(frozen=True)
class SamplingOptions:
    """A reverse chain. ``start_step`` None = EDM's full chain from z_T ~ N(0, I)."""

    sampler: str = "ddpm"
    start_step: int | None = None
    step_size: int = 1
    dataset_var: float = 1.0

    def validated(self, T: int, start_name: str = "the start step (T*)", stride_name: str = "the sampling step size",
                  var_name: str = "the dataset variance") -> "SamplingOptions":
        """These options if the chain can run on a model with T steps, else a one-line UserInputError.

        The names say what the values are called where they came from (e.g. ``--GA_timestep``)."""
        if self.sampler not in _REGISTRY:
            raise UserInputError(f"unknown sampler {self.sampler!r}; choose one of {', '.join(_REGISTRY)}")
        step = self.step_size
        if isinstance(step, bool) or int(step) != step or step < 1:
            raise UserInputError(f"{stride_name} must be a positive integer, got {step!r}")
        start = self.start_step
        if start is not None and (isinstance(start, bool) or int(start) != start or not 1 <= start <= T):
            raise UserInputError(f"{start_name} must be an integer in [1, {T}] (the model's diffusion steps), got {start!r}")
        first = T if start is None else int(start)
        if first % int(step):
            what = f"{start_name} {first}" if start is not None else f"the chain length T = {T}"
            raise UserInputError(f"{what} is not a multiple of {stride_name} {int(step)}")
        var = float(self.dataset_var)
        if not (var > 0 and var < float("inf")):
            raise UserInputError(f"{var_name} of the Gaussian start must be a finite positive number, got {self.dataset_var!r}")
        return replace(self, step_size=int(step), start_step=None if start is None else int(start), dataset_var=var)

    def schedule(self, T: int) -> list[tuple[int, int]]:
        """[(s_int, t_int), ...] from the start down to 0."""
        opts = self.validated(T)
        first = T if opts.start_step is None else opts.start_step
        return [(t - opts.step_size, t) for t in range(first, 0, -opts.step_size)]

    def n_steps(self, T: int) -> int:
        return (T if self.start_step is None else self.start_step) // self.step_size


def stride_for_steps(start: int, n_steps: int) -> int:
    """The largest stride k dividing ``start`` with at least ``n_steps`` steps (start // k >= n_steps)."""
    if not 1 <= n_steps <= start:
        raise UserInputError(f"a chain from step {start} can take between 1 and {start} steps, not {n_steps}")
    return max(k for k in range(1, start // n_steps + 1) if start % k == 0)

    def as_kwargs(self) -> dict:
        return dict(sampler=self.sampler, start_step=self.start_step, step_size=self.step_size, dataset_var=self.dataset_var)
