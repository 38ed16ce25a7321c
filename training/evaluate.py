"""Evaluating a finished run folder (the shared part of eval_analyze.py and eval_sample.py).

``load_run`` rebuilds the model from ``args.pickle`` (ours, EDM's or the GAGA fork's: fields a
legacy pickle lacks take EDM's defaults; its centring mode is inferred) and loads the EMA
weights (``generative_model_ema.npy``) when the run kept an EMA, else ``generative_model.npy``.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from configs.datasets import dataset_entry, resolve_hook
from configs.datasets_config import get_dataset_info
from configs.errors import CheckpointError, DataError, RunFolderError, UserInputError
from configs.run_args import load_run_args, safe_datadir
from training.args import fill_legacy_defaults
from training.checkpoint import EMA_FILE, MODEL_FILE
from training.latent_args import check_samplable


@dataclass
class LoadedRun:
    args: argparse.Namespace
    model: torch.nn.Module
    nodes_dist: Any
    prop_dist: Any
    dataset_info: dict
    weights: Path
    property_norms: Any = None  # conditional runs: {prop: {'mean', 'mad'}} (training.conditioning)


def check_run_config(args: argparse.Namespace, source: str) -> None:
    """A run's stored arguments, checked before anything is built from them (untrusted input)."""
    from configs.flags import check_flags, parse_normalize_factors
    from training.args_check import TRAINING_RULES, check_run_sizes

    check_run_sizes(args, source)
    try:
        check_flags(args, {k: TRAINING_RULES[k] for k in ("max_t", "dataset_var", "sampling_step_size", "diffusion_noise_precision")})
        parse_normalize_factors(args.normalize_factors)
    except UserInputError as e:
        raise RunFolderError(f"{source}: {str(e).replace('--', '', 1)}") from None
    if args.max_t is not None and args.max_t > args.diffusion_steps:
        raise RunFolderError(f"{source}: max_t={args.max_t} exceeds diffusion_steps={args.diffusion_steps}")


def check_weights_fit_args(state: dict[str, torch.Tensor], args: argparse.Namespace, where: str) -> None:
    """Compare the weights' own sizes with what args.pickle asks for *before* a model is allocated
    (a strict load would refuse a mismatch anyway, but only after building a model of any size)."""
    embedding = state.get("dynamics.egnn.embedding.weight")
    if embedding is not None and embedding.dim() == 2:
        nf = int(embedding.shape[0])
        blocks = {key.split(".")[2] for key in state if key.startswith("dynamics.egnn.e_block_")}
        if nf != int(args.nf) or len(blocks) != int(args.n_layers):
            raise CheckpointError(
                f"checkpoint {where} holds a network with nf={nf}, n_layers={len(blocks)}, but the run's args.pickle "
                f"says nf={args.nf}, n_layers={args.n_layers}; the folder mixes files of different runs"
            )
        return
    # Another backbone: bound the model by the weights' size (EGNN-like: ~(10 + 7 sublayers) nf^2 per layer).
    held = sum(int(t.numel()) for t in state.values())
    estimate = int(args.n_layers) * (10 + 7 * int(getattr(args, "inv_sublayers", 1))) * int(args.nf) ** 2
    if estimate > 16 * held + 10_000_000:
        raise CheckpointError(
            f"checkpoint {where} holds {held:,} numbers but the run's args.pickle asks for a network of about "
            f"{estimate:,} parameters (nf={args.nf}, n_layers={args.n_layers}); refusing to build it"
        )


def read_run_args(model_path: str | os.PathLike, datadir: str | None = None) -> argparse.Namespace:
    """A run folder's args (legacy fields filled), checked, with a safe data folder; nothing is built."""
    run_dir = Path(model_path)
    args = fill_legacy_defaults(load_run_args(run_dir))
    source = str(run_dir / "args.pickle")
    check_run_config(args, source)
    check_samplable(args, run_dir)  # a GeoLDM VAE-only folder: nothing to sample (training/latent_training.py)
    args.datadir = safe_datadir(getattr(args, "datadir", None), datadir, args.dataset)
    args.context_node_nf = int(getattr(args, "context_node_nf", 0) or 0)
    try:
        get_dataset_info(args.dataset, args.remove_h)
    except ValueError as e:
        raise RunFolderError(f"{source}: {e}") from None
    return args


def load_run(
    model_path: str | os.PathLike, device: torch.device, use_ema: bool = True, datadir: str | None = None,
    args: argparse.Namespace | None = None,
) -> LoadedRun:
    """The run's args (legacy fields filled), its model with weights loaded strictly, in eval mode.
    A conditional run also gets its p(c | N) and property normaliser (read from its dataset).

    Raises RunFolderError / CheckpointError (one line) for a missing, unsafe or inconsistent folder.
    ``args``: the result of ``read_run_args`` when the caller already read it.
    """
    from qm9.models import check_state_dict, describe_run, read_state_dict
    from training.latent_training import build_run_model

    run_dir = Path(model_path)
    if args is None:
        args = read_run_args(run_dir, datadir)
    dataset_info = get_dataset_info(args.dataset, args.remove_h)
    weights = run_dir / (EMA_FILE if use_ema and args.ema_decay > 0 and (run_dir / EMA_FILE).is_file() else MODEL_FILE)
    state = read_state_dict(weights)
    check_weights_fit_args(state, args, str(weights))
    try:
        model, nodes_dist, prop_dist = build_run_model(args, device, dataset_info, None)  # EDM or GeoLDM
    except ValueError as e:
        raise RunFolderError(f"{run_dir / 'args.pickle'}: {' '.join(str(e).split())}") from None
    check_state_dict(model, state, str(weights), describe_run(args))
    model.load_state_dict(state, strict=True)
    model.to(device).eval()
    from training.conditioning import run_conditioning

    property_norms = None
    if getattr(args, "conditioning", None):  # p(c | N) and mean/MAD from the run's data, as EDM's scripts
        prop_dist, property_norms = run_conditioning(args)
    return LoadedRun(args, model, nodes_dist, prop_dist, dataset_info, weights, property_norms)


def run_sampling_options(args: argparse.Namespace, flags: argparse.Namespace) -> dict:
    """The run's sampling options with the command line's overrides, checked against the run's T."""
    from training.loop import sampling_options
    from training.sampling_benchmark import validate_chain

    options = sampling_options(args)
    if hasattr(flags, "start_step"):  # given on the command line: sample from there
        options["start_step"] = flags.start_step
    for key, option in (("dataset_var", "dataset_var"), ("sampling_step_size", "step_size"), ("sampler", "sampler")):
        if getattr(flags, key) is not None:
            options[option] = getattr(flags, key)
    validate_chain(int(args.diffusion_steps), options["start_step"], options["step_size"], flag="--start_step")
    if not float(options["dataset_var"]) > 0:
        raise UserInputError(f"--dataset_var must be a finite positive number, got {options['dataset_var']}")
    return options



def training_smiles(args: argparse.Namespace, dataset_info: dict, progress: bool = True) -> list[str]:
    """The training split's SMILES (for novelty), computed from its 3D structures once and cached in datadir."""
    from qm9.rdkit_functions import default_training_smiles_path, get_training_smiles

    entry = dataset_entry(args.dataset)
    if entry.split_arrays is not None:  # padded arrays: read the split directly (QM9)
        arrays = resolve_hook(entry.split_arrays)(args.datadir, "train", remove_h=args.remove_h, progress=False)
    else:
        from qm9.dataset import retrieve_dataloaders

        dataset = retrieve_dataloaders(args)[0]["train"].dataset
        arrays = getattr(dataset, "arrays", None)
        if arrays is None:
            raise DataError(f"cannot read the {args.dataset} training structures for novelty; pass --no_novelty")
    return get_training_smiles(dataset_info, arrays, default_training_smiles_path(args.datadir, dataset_info), progress=progress)


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
