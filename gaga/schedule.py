"""The noise schedule seen by GAGA: the gamma table of a run (or of flags) and v_t.

alpha_t^2 = sigmoid(-gamma_t), sigma_t^2 = sigmoid(gamma_t) on the integer grid t = 0..T.
GAGA's closed form for zero-centred data of variance v: Var(z_t) = alpha_t^2 v + sigma_t^2.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from configs.run_args import load_run_args
from equivariant_diffusion.noise_schedule import GammaNetwork, alpha2_from_gamma, gamma_table, sigma2_from_gamma, variance_t

CHECKPOINT_FILES = ("generative_model_ema.npy", "generative_model.npy")
GAMMA_KEY = "gamma.gamma"


def gamma_table_from_flags(noise_schedule: str, steps: int, precision: float) -> np.ndarray:
    """float32 gamma[0..T] of a named schedule (bit-exact with checkpoints)."""
    if noise_schedule == "learned":
        raise ValueError(
            "a learned noise schedule has no fixed table: pass the run (--model_path) so its trained "
            "GammaNetwork is read, or use a predefined schedule such as polynomial_2"
        )
    if int(steps) < 1:
        raise ValueError(f"diffusion_steps must be >= 1, got {steps}")
    return gamma_table(noise_schedule, int(steps), float(precision)).numpy()


def learned_gamma_table(state: dict[str, torch.Tensor], steps: int) -> np.ndarray:
    """gamma(t_int / T) for t_int = 0..T of a learned schedule (EDM's GammaNetwork) in ``state``.

    Evaluated as one (T + 1, 1) batch in float32: values may differ from the per-batch
    evaluations during sampling by ~1e-3 (gamma is quantised in float32, layout-dependent).
    """
    net = GammaNetwork()
    net.load_state_dict({k[len("gamma."):]: v for k, v in state.items() if k.startswith("gamma.")})
    with torch.no_grad():
        grid = torch.arange(steps + 1, dtype=torch.float32).unsqueeze(1) / steps
        return net(grid).squeeze(1).numpy()


def gamma_table_from_run(run_dir: str | Path) -> np.ndarray:
    """The run's gamma table: read from its weights if they hold it, else recomputed from args.pickle.

    Both give the same float32 numbers for predefined schedules; reading the weights
    guards against a schedule whose code changed since training. A learned schedule is
    evaluated from the weights' GammaNetwork on the grid t_int / T.
    """
    args = load_run_args(run_dir)
    steps = int(getattr(args, "diffusion_steps", 1000))
    for name in CHECKPOINT_FILES:
        path = Path(run_dir) / name
        if not path.is_file():
            continue
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - a damaged file must not stop an analysis that only needs the schedule
            print(f"warning: cannot read {path} ({type(e).__name__}); recomputing the schedule from args.pickle", file=sys.stderr)
            break
        table = state.get(GAMMA_KEY) if isinstance(state, dict) else None
        if table is not None and tuple(table.shape) == (steps + 1,):
            return table.detach().cpu().float().numpy()
        if isinstance(state, dict) and "gamma.gamma_0" in state:
            return learned_gamma_table(state, steps)
        break
    return gamma_table_from_flags(
        str(getattr(args, "diffusion_noise_schedule", "polynomial_2")),
        steps,
        float(getattr(args, "diffusion_noise_precision", 1e-5)),
    )


def alpha2_sigma2(gamma: np.ndarray, timesteps: Iterable[int]) -> tuple[np.ndarray, np.ndarray]:
    """alpha_t^2 and sigma_t^2 (float64) at integer timesteps of a gamma table."""
    g = torch.from_numpy(np.asarray(gamma, dtype=np.float32)[np.asarray(list(timesteps), dtype=np.int64)]).double()
    return alpha2_from_gamma(g).numpy(), sigma2_from_gamma(g).numpy()


def variance_at(dataset_var: float | np.ndarray, gamma: np.ndarray, timesteps: Iterable[int]) -> np.ndarray:
    """GAGA's v_t = alpha_t^2 v + sigma_t^2 at integer timesteps (float64)."""
    g = torch.from_numpy(np.asarray(gamma, dtype=np.float32)[np.asarray(list(timesteps), dtype=np.int64)]).double()
    return variance_t(torch.as_tensor(dataset_var, dtype=torch.float64), g).numpy()


def check_timesteps(timesteps: Iterable[int], T: int) -> list[int]:
    """Sorted unique integer timesteps, each in [0, T]; a one-line ValueError otherwise."""
    grid = sorted({int(t) for t in timesteps})
    if not grid:
        raise ValueError("the timestep grid is empty; pass e.g. --timesteps 300:800:50")
    outside = [t for t in grid if t < 0 or t > T]
    if outside:
        raise ValueError(f"timesteps {outside} lie outside [0, {T}] (the schedule has T = {T} steps)")
    return grid


def parse_timesteps(text: str) -> list[int]:
    """A grid from "300,350,400" or "start:stop:step" (stop included), e.g. "300:800:50"."""
    text = str(text).strip()
    try:
        if ":" in text:
            parts = [int(p) for p in text.split(":")]
            if len(parts) != 3 or parts[2] <= 0:
                raise ValueError
            start, stop, step = parts
            if stop < start:
                raise ValueError
            return list(range(start, stop + 1, step))
        return [int(float(p)) if float(p).is_integer() else _not_integer(p) for p in text.replace(" ", "").split(",") if p]
    except ValueError:
        raise ValueError(f"cannot read the timestep grid {text!r}; use integers like 300,350,400 or start:stop:step like 300:800:50") from None


def _not_integer(p: str) -> int:
    raise ValueError(p)
