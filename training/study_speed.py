"""Seconds per molecule of every row of the equal-budget table, measured in one process.

The evaluation (``study_eval``) times each iteration too, but its rows run in whichever process
and beside whatever else the machine does at the time (another row, training, the test suite),
so those timings compare badly across rows. Here all rows are sampled in turn in one process
with a fixed number of threads, on the same molecule sizes and seeds, after a warm-up per model:
the table's speed column. Results are stored in ``<cache_dir>/sampling_speed.json``, keyed by
the weights' hashes, and the table uses them when they match the evaluated weights.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

import numpy as np

from configs.atomic_io import read_json, write_json

from training.study_eval import EvalRow, weight_digests

SPEED_FILE = "sampling_speed.json"


def measure_speed(rows: Sequence[EvalRow], model_root: Path, n_batches: int = 2, batch_size: int = 100, seed: int = 0,
                  threads: int = 1, datadir: str | None = None, progress: bool = True) -> dict:
    """Sample ``n_batches`` batches of ``batch_size`` molecules per row in this process and time
    each batch (sampling only, as the evaluation times it); batch b of every row uses seed
    ``seed + b``, so all rows sample the same molecule sizes."""
    import torch

    from equivariant_diffusion.samplers import SamplingOptions, stride_for_steps
    from training.evaluate import load_run
    from training.loop import sample_molecules

    torch.set_num_threads(threads)
    device = torch.device("cpu")
    loaded = {run: load_run(model_root / run, device, datadir=datadir) for run in sorted({r.run for r in rows})}
    for run, lr in loaded.items():  # warm-up: allocator and kernels, off the clock (a 10-step chain)
        first = next(r for r in rows if r.run == run).options
        start = first["start_step"] or int(lr.args.diffusion_steps)
        warm = {**first, "sampler": "dpm_solver_2m", "step_size": stride_for_steps(start, 10)}
        sample_molecules(lr.args, lr.model, lr.nodes_dist, lr.dataset_info, device, batch_size, batch_size,
                         progress=False, options=warm)
    measured = {}
    for row in rows:
        lr = loaded[row.run]
        T = int(lr.args.diffusion_steps)
        options = SamplingOptions(**row.options).validated(T)
        seconds = []
        if progress:
            print(f"{row.label}: timing {n_batches} x {batch_size} molecules ...", end=" ", flush=True)
        for b in range(n_batches):
            torch.manual_seed(seed + b)
            np.random.seed(seed + b)
            start = time.perf_counter()
            sample_molecules(lr.args, lr.model, lr.nodes_dist, lr.dataset_info, device, batch_size, batch_size,
                             progress=False, options=row.options)
            seconds.append(time.perf_counter() - start)
        per_molecule = [s / batch_size for s in seconds]
        measured[row.slug] = {"label": row.label, "steps": (options.start_step or T) // options.step_size,
                              "batch_seconds": seconds, "s_per_molecule": float(np.mean(per_molecule)),
                              "s_per_molecule_std": float(np.std(per_molecule))}
        if progress:
            print(f"{measured[row.slug]['s_per_molecule']:.4f} s per molecule", flush=True)
    return {"weights": weight_digests(model_root, rows), "threads": threads, "n_batches": n_batches,
            "batch_size": batch_size, "seed": seed, "rows": measured}


def save_speed(record: dict, cache_dir: Path) -> Path:
    """Merge ``record`` into the stored speeds (rows measured earlier on other weights are dropped)."""
    path = cache_dir / SPEED_FILE
    old = read_json(path)
    if old is not None and old.get("weights") == record["weights"] and all(
            old.get(k) == record[k] for k in ("threads", "n_batches", "batch_size", "seed")):
        record = {**record, "rows": {**old["rows"], **record["rows"]}}
    write_json(path, record)
    return path


def stored_speed(cache_dir: Path, model_root: Path, rows: Sequence[EvalRow]) -> dict | None:
    """The stored speeds if they were measured on the weights in ``model_root`` (else None: the
    table then shows the evaluation's own timings)."""
    record = read_json(cache_dir / SPEED_FILE)
    if record is None:
        return None
    digests = weight_digests(model_root, rows)
    if any(record["weights"].get(run) != digest for run, digest in digests.items()):
        return None
    return record


def speed_table(record: dict) -> str:
    lines = ["| row | steps | s / mol (one process) |", "|---|---|---|"]
    for r in record["rows"].values():
        lines.append(f"| {r['label']} | {r['steps']} | {r['s_per_molecule']:.4f} ± {r['s_per_molecule_std']:.4f} |")
    return "\n".join(lines)
