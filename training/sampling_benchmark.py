"""Quality and speed of one trained model under several sampling settings (GAGA_test.py).

A *setting* is a reverse chain: where it starts (the full chain from N(0, I) at T, or GAGA's
Gaussian start N(0, v_T* I) at T*), its stride, and its sampler (ancestral DDPM or DDIM).
Each iteration samples ``n_samples`` molecules with sizes drawn from the training histogram,
times the sampling (wall clock), and evaluates them with EDM's metrics; iterations are
summarised as mean +- std, as in the GAGA paper's tables.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from configs.errors import UserInputError
from equivariant_diffusion.samplers import SamplingOptions, stride_for_steps

METRIC_COLUMNS = (
    ("atm_stable", "atom stab. (%)"),
    ("mol_stable", "mol stab. (%)"),
    ("validity", "validity (%)"),
    ("validity_x_uniqueness", "V x U (%)"),
    ("novelty", "novelty (%)"),
)


@dataclass(frozen=True)
class SamplingSetting:
    """One reverse chain. ``start_step`` None = EDM's full chain from z_T ~ N(0, I)."""

    label: str
    start_step: int | None
    step_size: int
    sampler: str
    dataset_var: float

    def n_steps(self, T: int) -> int:
        return (self.start_step or T) // self.step_size

    def options(self) -> dict[str, Any]:
        return dict(start_step=self.start_step, dataset_var=self.dataset_var, step_size=self.step_size, sampler=self.sampler)


def validate_chain(
    T: int, start_step: int | None, step_size: int, flag: str = "--GA_timestep", stride_flag: str = "--sampling_step_size"
) -> None:
    """One-line errors for a chain the sampler cannot run (checked before any sampling), naming the flags."""
    SamplingOptions("ddpm", start_step, step_size).validated(T, start_name=flag, stride_name=stride_flag)


def single_setting(shortcut: str, ga_timestep: int | None, step_size: int, sampler: str, dataset_var: float, T: int) -> SamplingSetting:
    """The setting of GAGA_test.py's flags: ``--shortcut Gaussian`` starts at T*, ``none`` at T."""
    if shortcut == "Gaussian":
        if ga_timestep is None:
            raise UserInputError("--shortcut Gaussian needs --GA_timestep (T*, e.g. 550 for QM9)")
        validate_chain(T, ga_timestep, step_size)
        label = f"{sampler.upper()} + Gaussian shortcut at T*={ga_timestep}" + (f", stride {step_size}" if step_size > 1 else "")
        return SamplingSetting(label, ga_timestep, step_size, sampler, dataset_var)
    if shortcut == "none":
        validate_chain(T, None, step_size)
        label = f"{sampler.upper()} full chain ({T} steps)" + (f", stride {step_size}" if step_size > 1 else "")
        return SamplingSetting(label, None, step_size, sampler, dataset_var)
    raise UserInputError(f"unknown --shortcut {shortcut!r}; choose 'Gaussian' or 'none'")


def comparison_settings(T: int, ga_timestep: int, ddim_stride: int, dataset_var: float,
                        solver_steps: Sequence[int] = ()) -> list[SamplingSetting]:
    """The paper's comparison: full chain, Gaussian shortcut, DDIM stride k, DDIM stride k + shortcut;
    then DPM-Solver++(2M) with about each of ``solver_steps`` steps, from T and from the shortcut
    (the stride is the largest divisor of the start giving at least that many steps)."""
    validate_chain(T, ga_timestep, 1)
    validate_chain(T, None, ddim_stride, stride_flag="--ddim_stride")
    validate_chain(T, ga_timestep, ddim_stride, stride_flag="--ddim_stride")
    settings = [
        SamplingSetting("EDM full chain", None, 1, "ddpm", dataset_var),
        SamplingSetting(f"GAGA (T*={ga_timestep})", ga_timestep, 1, "ddpm", dataset_var),
        SamplingSetting(f"DDIM (stride {ddim_stride})", None, ddim_stride, "ddim", dataset_var),
        SamplingSetting(f"DDIM (stride {ddim_stride}) + GAGA", ga_timestep, ddim_stride, "ddim", dataset_var),
    ]
    for n in solver_steps:
        for start, suffix in ((None, ""), (ga_timestep, " + GAGA")):
            stride = stride_for_steps(start or T, min(n, start or T))
            steps = (start or T) // stride
            settings.append(SamplingSetting(f"DPM-Solver++(2M), {steps} steps{suffix}", start, stride, "dpm_solver_2m", dataset_var))
    return settings


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA)"
    return f"CPU ({torch.get_num_threads()} threads)"


def run_setting(
    setting: SamplingSetting,
    sample_fn: Callable[[int, dict[str, Any]], dict[str, torch.Tensor]],
    evaluate_fn: Callable[[dict[str, torch.Tensor]], dict[str, float]],
    n_samples: int,
    iterations: int,
    T: int,
    device: torch.device,
    seed: int = 0,
    on_iteration: Callable[[int, dict[str, float], dict[str, torch.Tensor]], None] | None = None,
    completed: Sequence[dict[str, float]] = (),
) -> dict[str, Any]:
    """Sample and evaluate ``iterations`` times; per-iteration results and their mean/std.

    ``sample_fn(n_samples, options)`` returns EDM's molecule dict; ``evaluate_fn`` its metrics.
    Iteration i is seeded with ``seed + i`` so settings are compared on the same seeds.
    ``completed``: metrics of the first iterations measured earlier (a resumed evaluation); they are
    kept and only the remaining iterations run, with their own seeds.
    """
    runs = [dict(r) for r in completed][:iterations]
    for i in range(len(runs), iterations):
        torch.manual_seed(seed + i)
        np.random.seed(seed + i)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        molecules = sample_fn(n_samples, setting.options())
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        metrics = evaluate_fn(molecules)
        metrics.update(seconds=seconds, s_per_molecule=seconds / n_samples)
        runs.append(metrics)
        if on_iteration is not None:
            on_iteration(i, metrics, molecules)
    return {
        "setting": asdict(setting),
        "label": setting.label,
        "steps": setting.n_steps(T),
        "n_samples": n_samples,
        "iterations": runs,
        "mean": {k: float(np.mean([r[k] for r in runs])) for k in runs[0]},
        "std": {k: float(np.std([r[k] for r in runs])) for k in runs[0]},
        "device": device_name(device),
    }


def _pm(result: dict[str, Any], key: str, scale: float = 100.0, digits: int = 2) -> str:
    if key not in result["mean"]:
        return "n/a"
    mean, std = result["mean"][key] * scale, result["std"][key] * scale
    if len(result["iterations"]) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def markdown_table(results: list[dict[str, Any]], baseline_index: int | None = 0) -> str:
    """The paper-style table: metrics (mean ± std over iterations), steps, s/molecule, speed-up."""
    header = ["setting"] + [name for _, name in METRIC_COLUMNS] + ["steps", "s / molecule"]
    if baseline_index is not None:
        header.append("speed-up")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    base = results[baseline_index]["mean"]["s_per_molecule"] if baseline_index is not None else None
    for r in results:
        row = [r["label"]] + [_pm(r, key) for key, _ in METRIC_COLUMNS]
        row += [str(r["steps"]), _pm(r, "s_per_molecule", scale=1.0, digits=4)]
        if base is not None:
            row.append(f"{base / r['mean']['s_per_molecule']:.2f}x")
        lines.append("| " + " | ".join(row) + " |")
    n = results[0]["n_samples"]
    k = len(results[0]["iterations"])
    lines.append("")
    lines.append(f"{n} molecules per iteration, {k} iteration(s), mean ± std; sampling time is wall clock on "
                 f"{results[0]['device']}.")
    return "\n".join(lines)


def save_report(results: list[dict[str, Any]], out_stem: Path, baseline_index: int | None = 0, meta: dict | None = None) -> tuple[Path, Path]:
    """Write ``<stem>.md`` (the table) and ``<stem>.json`` (every number) atomically enough (small files)."""
    out_stem.parent.mkdir(parents=True, exist_ok=True)
    md = out_stem.with_suffix(".md")
    js = out_stem.with_suffix(".json")
    md.write_text(markdown_table(results, baseline_index) + "\n")
    js.write_text(json.dumps({"meta": meta or {}, "results": results}, indent=1))
    return md, js


def gaga_log_line(result: dict[str, Any], test_name: str) -> str:
    """One line for ``EDM_GA-T=<T*>-Shortcut_log.txt`` (the GAGA fork's running log)."""
    m = result["mean"]
    parts = [time.strftime("%Y-%m-%d %H:%M:%S"), test_name, result["label"], f"steps={result['steps']}",
             f"n_samples={result['n_samples']}", f"iterations={len(result['iterations'])}"]
    for key, name in METRIC_COLUMNS:
        if key in m:
            parts.append(f"{key}={m[key]:.4f}±{result['std'][key]:.4f}")
    parts.append(f"s_per_molecule={m['s_per_molecule']:.5f}")
    parts.append(f"device={result['device']}")
    return " | ".join(parts)


def append_gaga_log(run_dir: Path, t_star: int, line: str) -> Path:
    path = Path(run_dir) / f"EDM_GA-T={t_star}-Shortcut_log.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(line + "\n")
    return path


def check_sample_counts(n_samples: int, batch_size: int, iterations: int) -> int:
    """The batch size to sample with: ``batch_size``, or ``n_samples`` when fewer molecules are asked
    for (a batch larger than the request would only pad it)."""
    if n_samples < 1 or iterations < 1:
        raise UserInputError("--n_samples and --iteration must be at least 1")
    if batch_size < 1:
        raise UserInputError("--batch_size_gen must be at least 1")
    return min(batch_size, n_samples)
