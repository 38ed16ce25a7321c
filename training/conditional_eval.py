"""EDM's conditional evaluation (``eval_conditional_qm9.py``), as a library.

A property classifier phi_c (trained on qm9_first_half, ``qm9/property_prediction``) scores
molecules of a conditional generator (trained on qm9_second_half). Tasks (edm_conditional.md §3.4):

* ``edm``: ``--iterations`` batches of ``--batch_size`` molecules; per batch, sizes N ~ p(N) and
  property values c ~ p(c | N) of the generator's training split; molecules sampled given c;
  MAE |phi_c(molecule) - c| in EDM units. Reported as the mean over all molecules and mean +- std
  over iterations.
* ``qm9_second_half``: the classifier on the generator's own training molecules with their true
  labels ("QM9 lower bound").
* ``naive``: the same molecules with shuffled labels ("Naive upper bound").
* ``table``: Table 3's rows in one go: Naive, #Atoms (``--numnodes_path``, on the second half),
  the generator, QM9 lower bound.
* ``qualitative``: ``--n_sweeps`` sweeps of 100 molecules of 19 atoms whose property runs from the
  smallest to the largest training value, one shared noise draw (EDM's
  ``sample_sweep_conditional``); XYZ files, a strip picture and (``--gif``) an animation.

Fixed here (EDM's code): exactly ``--iterations`` batches (EDM drew iterations + 1), generators
conditioned on several properties are evaluated (one classifier per ``--property``; EDM's label
was ``context.squeeze(1)``), and a #Atoms (numnodes) folder is evaluated like a classifier (EDM
forced model_name 'egnn'). The classifier's prediction is un-normalised with the classifier's own
mean/MAD (QM9's validation split), the label with the generator's (the same numbers for EDM's runs).
GAGA: sampling follows the run (its ``max_t`` and ``dataset_var``); ``--GA_timestep``,
``--dataset_var``, ``--sampling_step_size`` and ``--sampler`` override it.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from configs.errors import RunFolderError, UserInputError

TASKS = ("edm", "qm9_second_half", "naive", "table", "qualitative")


def classifier_norms(classifier_args: argparse.Namespace, datadir: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, MAD) the classifier was trained with: its property on QM9's validation split (EDM)."""
    from qm9.data.qm9 import load_qm9
    from qm9.utils import compute_mean_mad_from_dataloader

    valid = load_qm9(datadir, "valid", progress=False)
    if getattr(classifier_args, "data_subset", None):
        valid = {k: v[: classifier_args.data_subset] for k, v in valid.items()}
    norms = compute_mean_mad_from_dataloader(valid, [classifier_args.property])[classifier_args.property]
    return norms["mean"], norms["mad"]


@torch.no_grad()
def predict(classifier: torch.nn.Module, positions: torch.Tensor, one_hot: torch.Tensor, node_mask: torch.Tensor,
            mean: torch.Tensor, mad: torch.Tensor) -> torch.Tensor:
    """Physical predictions (B,) for padded molecules: positions (B,N,3), one_hot (B,N,5), node_mask (B,N[,1])."""
    from qm9.property_prediction.models_property import classifier_inputs

    bs, n_nodes, _ = positions.shape
    mask = node_mask.reshape(bs, n_nodes).float()
    edge_mask = (mask.unsqueeze(1) * mask.unsqueeze(2) * (1 - torch.eye(n_nodes))).reshape(bs * n_nodes * n_nodes, 1)
    batch = {"positions": positions.float(), "one_hot": one_hot.float(), "atom_mask": mask, "edge_mask": edge_mask}
    device = next(classifier.parameters()).device
    return classifier(**classifier_inputs(batch, device)).cpu() * mad + mean


def summarise(per_iteration: list[float], counts: list[int]) -> dict[str, float]:
    """MAE over all molecules, and mean +- std (and standard error) over iterations."""
    values = np.asarray(per_iteration, dtype=np.float64)
    weights = np.asarray(counts, dtype=np.float64)
    std = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    return {"mae": float((values * weights).sum() / weights.sum()), "mean_over_iterations": float(values.mean()),
            "std_over_iterations": std, "sem": std / math.sqrt(len(values)) if len(values) else float("nan"),
            "iterations": len(values), "molecules": int(weights.sum())}


def evaluate_generated(run, classifiers: dict[str, tuple[torch.nn.Module, torch.Tensor, torch.Tensor]], options: dict,
                       iterations: int, batch_size: int, device: torch.device, progress: bool = True) -> dict[str, dict]:
    """Task 'edm': ``iterations`` batches; per property, the classifier MAE on the generated molecules."""
    from qm9.sampling import sample

    args, norms = run.args, run.property_norms
    conditioning = list(args.conditioning)
    errors: dict[str, list[float]] = {p: [] for p in classifiers}
    counts: list[int] = []
    for _ in tqdm(range(iterations), desc="edm task", disable=not progress, dynamic_ncols=True, leave=False):
        nodesxsample = run.nodes_dist.sample(batch_size)
        context = run.prop_dist.sample_batch(nodesxsample)  # (B, P) normalised, EDM's p(c | N)
        one_hot, _charges, x, node_mask = sample(args, device, run.model, run.dataset_info, run.prop_dist,
                                                 nodesxsample=nodesxsample, context=context, **options)
        for prop, (classifier, mean, mad) in classifiers.items():
            column = conditioning.index(prop)
            label = context[:, column] * norms[prop]["mad"] + norms[prop]["mean"]
            pred = predict(classifier, x.cpu(), one_hot.cpu(), node_mask.cpu(), mean, mad)
            errors[prop].append(float((pred - label).abs().mean()))
        counts.append(len(nodesxsample))
    return {prop: summarise(values, counts) for prop, values in errors.items()}


def evaluate_dataset(arrays: dict[str, np.ndarray], classifier: torch.nn.Module, prop: str, mean: torch.Tensor,
                     mad: torch.Tensor, batch_size: int, shuffle_labels: bool = False, seed: int = 0,
                     progress: bool = True) -> dict[str, float]:
    """Tasks 'qm9_second_half' / 'naive': the classifier on real molecules (labels shuffled for 'naive')."""
    from qm9.data.collate import PaddedMoleculeDataset

    dataset = PaddedMoleculeDataset(arrays)
    labels = torch.as_tensor(np.asarray(arrays[prop], dtype=np.float32))
    if shuffle_labels:  # EDM's shuffle was unseeded; this one is seeded
        labels = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))]
    per_batch, counts = [], []
    for start in tqdm(range(0, len(dataset), batch_size), desc=prop, disable=not progress, dynamic_ncols=True,
                      leave=False):
        rows = list(range(start, min(start + batch_size, len(dataset))))
        batch = dataset.__getitems__(rows)
        pred = predict(classifier, batch["positions"], batch["one_hot"], batch["atom_mask"], mean, mad)
        per_batch.append(float((pred - labels[rows]).abs().mean()))
        counts.append(len(rows))
    return summarise(per_batch, counts)


def sweep(run, options: dict, out_dir: Path, n_sweeps: int, n_nodes: int = 19, n_frames: int = 100,
          gif: bool = False) -> list[Path]:
    """Task 'qualitative': ``n_sweeps`` property sweeps written as XYZ files, a strip picture and
    (``gif``) an animated GIF per sweep. Returns the pictures."""
    from qm9 import visualizer
    from qm9.sampling import sample_sweep_conditional

    pictures = []
    for i in range(n_sweeps):
        one_hot, charges, x, node_mask = sample_sweep_conditional(
            run.args, x_device(run), run.model, run.dataset_info, run.prop_dist, n_nodes=n_nodes, n_frames=n_frames,
            **options)
        folder = out_dir / f"sweep_{i}"
        visualizer.save_xyz_file(folder, one_hot, None, x, run.dataset_info, name="sweep", node_mask=node_mask)
        made = visualizer.visualize_chain(folder, run.dataset_info, all_frames=gif)
        if gif:
            frames = sorted(folder.glob("sweep_*.png"))
            made.append(write_gif(frames, folder / "sweep.gif"))
        pictures += made
    return pictures


def x_device(run) -> torch.device:
    return next(run.model.parameters()).device


def write_gif(frames: list[Path], path: Path, ms_per_frame: int = 100) -> Path:
    """An animated GIF of PNG frames (Pillow, which matplotlib already needs)."""
    from PIL import Image

    images = [Image.open(f).convert("RGB") for f in frames]
    if not images:
        raise UserInputError("no frames to animate")
    images[0].save(path, save_all=True, append_images=images[1:], duration=ms_per_frame, loop=0)
    return path


def load_classifiers(paths: list[str], properties: list[str], datadir: str, device: torch.device) -> dict[str, tuple]:
    """{property: (classifier, mean, MAD)} for each --classifiers_path, checked against --property."""
    from qm9.property_prediction.train_classifier import load_classifier

    if len(paths) != len(properties):
        raise UserInputError(f"give one --classifiers_path per --property ({len(properties)} properties, "
                             f"{len(paths)} classifier folders)")
    out = {}
    for path, prop in zip(paths, properties):
        model, cargs = load_classifier(path, device)
        if cargs.property != prop:
            raise RunFolderError(f"{path} is a classifier for {cargs.property!r}, not for --property {prop}; "
                                 "give the folders in the order of --property")
        mean, mad = classifier_norms(cargs, datadir)
        out[prop] = (model, mean, mad)
    return out


def write_json(path: Path, record: dict[str, Any]) -> None:
    from configs.atomic_io import atomic_write_bytes

    atomic_write_bytes(path, (json.dumps(record, indent=2) + "\n").encode())
