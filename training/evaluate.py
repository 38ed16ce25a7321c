"""Evaluating a finished run folder (the shared part of eval_analyze.py and eval_sample.py).

``load_run`` rebuilds the model from ``args.pickle`` (ours, EDM's or the GAGA fork's: fields a
legacy pickle lacks take EDM's defaults; its centring mode is inferred) and loads the EMA
weights (``generative_model_ema.npy``) when the run kept an EMA, else ``generative_model.npy``.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from configs.datasets_config import get_dataset_info
from configs.run_args import load_run_args
from training.args import fill_legacy_defaults
from training.checkpoint import EMA_FILE, MODEL_FILE


@dataclass
class LoadedRun:
    args: argparse.Namespace
    model: torch.nn.Module
    nodes_dist: Any
    prop_dist: Any
    dataset_info: dict
    weights: Path


def load_run(
    model_path: str | os.PathLike, device: torch.device, use_ema: bool = True, datadir: str | None = None
) -> LoadedRun:
    """The run's args (legacy fields filled), its model with weights loaded strictly, in eval mode."""
    from qm9.models import CheckpointError, get_model, load_generative_model

    run_dir = Path(model_path)
    try:
        args = fill_legacy_defaults(load_run_args(run_dir))
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(str(e)) from None
    if datadir is not None:
        args.datadir = datadir
    args.context_node_nf = int(getattr(args, "context_node_nf", 0) or 0)
    dataset_info = get_dataset_info(args.dataset, args.remove_h)
    try:
        model, nodes_dist, prop_dist = get_model(args, device, dataset_info, None)
    except ValueError as e:
        raise SystemExit(" ".join(str(e).split())) from None
    weights = run_dir / (EMA_FILE if use_ema and args.ema_decay > 0 and (run_dir / EMA_FILE).is_file() else MODEL_FILE)
    try:
        load_generative_model(model, weights, args)
    except CheckpointError as e:
        raise SystemExit(str(e)) from None
    model.to(device).eval()
    return LoadedRun(args, model, nodes_dist, prop_dist, dataset_info, weights)


def training_smiles(args: argparse.Namespace, dataset_info: dict) -> list[str]:
    """The training split's SMILES (for novelty), computed from its 3D structures once and cached in datadir."""
    from qm9.rdkit_functions import default_training_smiles_path, get_training_smiles

    if str(args.dataset).lower().startswith("qm9"):
        from qm9.data.qm9 import load_qm9

        arrays = load_qm9(args.datadir, "train", remove_h=args.remove_h, progress=False)
    else:
        from qm9.dataset import retrieve_dataloaders

        dataset = retrieve_dataloaders(args)[0]["train"].dataset
        arrays = getattr(dataset, "arrays", None)
        if arrays is None:
            raise SystemExit(f"cannot read the {args.dataset} training structures for novelty; pass --no_novelty")
    return get_training_smiles(dataset_info, arrays, default_training_smiles_path(args.datadir, dataset_info))


def evaluate_molecules(molecules: dict[str, torch.Tensor], dataset_info: dict, smiles: list[str] | None) -> dict[str, float]:
    """EDM's metrics of a molecule dict: stability, and with RDKit validity, uniqueness, novelty, V*U."""
    from qm9.analyze import analyze_stability_for_molecules

    validity_dict, rdkit_tuple = analyze_stability_for_molecules(molecules, dataset_info, smiles)
    metrics = {k: float(v) for k, v in validity_dict.items()}
    if rdkit_tuple is not None:
        validity, uniqueness, novelty = (float(v) for v in rdkit_tuple[0])
        metrics.update(validity=validity, uniqueness=uniqueness, novelty=novelty, validity_x_uniqueness=validity * uniqueness)
        if smiles is None:
            metrics.pop("novelty")
    return metrics
