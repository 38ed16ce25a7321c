"""Sample molecules from a trained run and report EDM's metrics (EDM's eval_analyze.py).

    python eval_analyze.py --model_path outputs/edm_qm9 --n_samples 10000
    python eval_analyze.py --model_path outputs/edm_qm9_GA_550 --n_samples 10000 --save_to_xyz True

Sampling follows the run (a GAGA run with --max_t T* starts from the Gaussian approximation
at T* with the run's --dataset_var); --start_step, --dataset_var, --sampling_step_size and
--sampler override it. Prints the metrics and writes them as JSON (default
<model_path>/eval_metrics.json; when the run folder is read-only the metrics are only printed).
Works with EDM's and the GAGA fork's run folders.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Sequence

import torch

from configs.atomic_io import unwritable_reason
from configs.errors import UserInputError, cli_errors
from configs.flags import at_least, check_flags, compact_errors, positive
from equivariant_diffusion.samplers import sampler_names
from training import distributed
from training.args import optional_int, str2bool
from training.loop import sample_molecules, test

MAX_SAMPLES = 1_000_000  # sampled molecules are held in memory until the metrics are computed

FLAG_RULES = {
    "n_samples": at_least(1, high=MAX_SAMPLES),
    "batch_size_gen": at_least(1, high=100_000),
    "seed": at_least(0, high=2**32 - 1),
    "start_step": at_least(1, optional=True),
    "dataset_var": positive(optional=True),
    "sampling_step_size": at_least(1, optional=True),
    "data_subset": at_least(1, optional=True),
}


def build_parser() -> argparse.ArgumentParser:
    p = compact_errors(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    p.add_argument("--model_path", type=str, default="outputs/edm_1", help="run folder holding args.pickle and the weights")
    p.add_argument("--n_samples", type=int, default=100, help="molecules to sample")
    p.add_argument("--batch_size_gen", type=int, default=100, help="molecules per sampling batch")
    p.add_argument("--save_to_xyz", type=str2bool, default=False, help="write the samples as XYZ files")
    p.add_argument("--save_to_sdf", type=str2bool, default=False, help="write the samples as one SDF file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--use_ema", type=str2bool, default=True, help="sample with the EMA weights when the run has them")
    p.add_argument("--start_step", type=optional_int, default=argparse.SUPPRESS,
                   help="start of the reverse chain (Gaussian start); default: the run's max_t if < T, 'None' = T")
    p.add_argument("--dataset_var", type=float, default=None, help="data variance of the Gaussian start (default: the run's)")
    p.add_argument("--sampling_step_size", type=int, default=None, help="stride of the reverse chain (default: the run's)")
    p.add_argument("--sampler", type=str, default=None, choices=sampler_names(), help="default: the run's (ddpm)")
    p.add_argument("--no_novelty", action="store_true", help="skip novelty (needs the training SMILES, cached after the first run)")
    p.add_argument("--eval_nll", type=str2bool, default=False, help="also compute the validation and test NLL")
    p.add_argument("--data_subset", type=optional_int, default=None, help="NLL on the first N molecules of each split only")
    p.add_argument("--datadir", type=str, default=None, help="dataset cache folder (default: the run's)")
    p.add_argument("--metrics_json", type=str, default=None, help="where to write the metrics (default <model_path>/eval_metrics.json)")
    p.add_argument("--no-cuda", dest="no_cuda", action="store_true")
    return p


@cli_errors
def main(argv: Sequence[str] | None = None) -> dict:
    from training.evaluate import evaluate_molecules, load_run, read_run_args, run_sampling_options, training_smiles

    eval_args = build_parser().parse_args(argv)
    check_flags(eval_args, FLAG_RULES)
    args = read_run_args(eval_args.model_path, datadir=eval_args.datadir)  # args.pickle only: nothing built yet
    options = run_sampling_options(args, eval_args)
    out_dir = Path(eval_args.model_path)
    path = Path(eval_args.metrics_json) if eval_args.metrics_json else out_dir / "eval_metrics.json"
    reason = unwritable_reason(path.parent)
    if reason and eval_args.metrics_json:
        raise UserInputError(f"--metrics_json: {reason}; choose a writable place")
    if reason or ((eval_args.save_to_xyz or eval_args.save_to_sdf) and unwritable_reason(out_dir)):
        print(f"note: {reason or unwritable_reason(out_dir)}; results are printed only "
              "(pass --metrics_json elsewhere to save the metrics)", file=sys.stderr)
    device = distributed.select_device(eval_args.no_cuda)
    torch.manual_seed(eval_args.seed)
    run = load_run(eval_args.model_path, device, use_ema=eval_args.use_ema, args=args)
    print(f"Sampling {eval_args.n_samples} molecules from {run.weights} with {options}")

    start = time.time()
    molecules = sample_molecules(args, run.model, run.nodes_dist, run.dataset_info, device, eval_args.n_samples,
                                 batch_size=eval_args.batch_size_gen, prop_dist=run.prop_dist, options=options)
    seconds_sampling = time.time() - start
    start = time.time()
    smiles = None if eval_args.no_novelty else training_smiles(args, run.dataset_info)
    metrics = evaluate_molecules(molecules, run.dataset_info, smiles)
    seconds_metrics = time.time() - start

    if (eval_args.save_to_xyz or eval_args.save_to_sdf) and not unwritable_reason(out_dir):
        from qm9 import visualizer

        folder = out_dir / "analyzed_molecules"
        if eval_args.save_to_xyz:
            visualizer.save_xyz_file(folder, molecules["one_hot"], None, molecules["x"], run.dataset_info,
                                     name="molecule", node_mask=molecules["node_mask"])
        if eval_args.save_to_sdf:
            visualizer.save_sdf_file(folder / "molecules.sdf", molecules["x"], molecules["one_hot"], run.dataset_info,
                                     node_mask=molecules["node_mask"])
        print(f"Molecules written to {folder}")

    if eval_args.eval_nll:
        from qm9.dataset import retrieve_dataloaders
        from training.data import build_loaders

        args.data_subset = eval_args.data_subset
        loaders = build_loaders(retrieve_dataloaders(args)[0], args)
        norms = run.property_norms  # conditional runs: NLL given the true property values (EDM's crashed here)
        metrics["nll_val"] = test(args, loaders["valid"], 0, run.model, device, torch.float32, run.nodes_dist, "Val",
                                  property_norms=norms)
        metrics["nll_test"] = test(args, loaders["test"], 0, run.model, device, torch.float32, run.nodes_dist, "Test",
                                   property_norms=norms)

    record = {
        "model_path": str(out_dir), "weights": run.weights.name, "n_samples": eval_args.n_samples, "seed": eval_args.seed,
        "sampling": options, "metrics": metrics,
        "seconds": {"sampling": round(seconds_sampling, 2), "metrics": round(seconds_metrics, 2)},
    }
    for key, value in metrics.items():
        print(f"{key}: {value:.4f}")
    if not reason:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=2) + "\n")
        print(f"Metrics written to {path}")
    return record


if __name__ == "__main__":
    main(sys.argv[1:])
