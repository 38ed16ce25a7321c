"""Pictures of a trained run: sampled molecules and denoising chains as PNG (EDM's eval_sample.py).

    python eval_sample.py --model_path outputs/edm_qm9 --n_samples 10 --n_chains 2

Writes under <model_path>/eval/: molecules/ (XYZ + PNG per molecule, grid.png) and
chain_<k>/ (XYZ + PNG per frame from noise to molecule, chain.png as a strip). Sampling
follows the run (Gaussian start at its max_t for GAGA runs) unless overridden.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

import torch

from configs.errors import UserInputError, cli_errors
from configs.flags import at_least, check_flags, compact_errors, positive
from equivariant_diffusion.samplers import sampler_names
from training import distributed
from training.args import optional_int, str2bool

FLAG_RULES = {
    "n_samples": at_least(0, high=10_000),
    "n_chains": at_least(0, high=1000),
    "n_tries": at_least(1, high=10_000),
    "n_nodes": at_least(1, optional=True),
    "keep_frames": at_least(1, high=100_000),
    "seed": at_least(0, high=2**32 - 1),
    "start_step": at_least(1, optional=True),
    "dataset_var": positive(optional=True),
    "sampling_step_size": at_least(1, optional=True),
}


def build_parser() -> argparse.ArgumentParser:
    p = compact_errors(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    p.add_argument("--model_path", type=str, default="outputs/edm_1", help="run folder holding args.pickle and the weights")
    p.add_argument("--n_samples", type=int, default=10, help="molecules to draw as pictures")
    p.add_argument("--n_chains", type=int, default=1, help="denoising chains to draw")
    p.add_argument("--n_tries", type=int, default=10, help="chains tried per picture until one ends stable (EDM)")
    p.add_argument("--n_nodes", type=int, default=None,
                   help="atoms of the chain molecule (default: the dataset's, configs/datasets.py: QM9 19, GEOM 44)")
    p.add_argument("--keep_frames", type=int, default=100, help="frames kept per chain")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--use_ema", type=str2bool, default=True)
    p.add_argument("--start_step", type=optional_int, default=argparse.SUPPRESS,
                   help="start of the reverse chain; default: the run's max_t if < T, 'None' = T")
    p.add_argument("--dataset_var", type=float, default=None)
    p.add_argument("--sampling_step_size", type=int, default=None)
    p.add_argument("--sampler", type=str, default=None, choices=sampler_names())
    p.add_argument("--no-cuda", dest="no_cuda", action="store_true")
    return p


@cli_errors
def main(argv: Sequence[str] | None = None) -> dict[str, list[Path]]:
    from configs.atomic_io import unwritable_reason
    from configs.datasets import dataset_entry
    from configs.datasets_config import get_dataset_info
    from qm9 import visualizer
    from qm9.sampling import sample, sample_chain
    from training.evaluate import load_run, read_run_args, run_sampling_options

    eval_args = build_parser().parse_args(argv)
    check_flags(eval_args, FLAG_RULES)
    args = read_run_args(eval_args.model_path)  # args.pickle only: nothing built yet
    options = run_sampling_options(args, eval_args)
    info = get_dataset_info(args.dataset, args.remove_h)
    if eval_args.n_nodes is None:
        eval_args.n_nodes = dataset_entry(args.dataset).chain_n_nodes
    n_steps = (options["start_step"] or int(args.diffusion_steps)) // options["step_size"]
    keep_frames = max(1, min(eval_args.keep_frames, n_steps))
    if not 1 <= eval_args.n_nodes <= info["max_n_nodes"]:
        raise UserInputError(f"--n_nodes must be between 1 and {info['max_n_nodes']}, got {eval_args.n_nodes}")
    out = Path(eval_args.model_path) / "eval"
    reason = unwritable_reason(out)
    if reason:
        raise UserInputError(f"{reason}: eval_sample.py writes its pictures there; copy the run folder somewhere writable")
    device = distributed.select_device(eval_args.no_cuda)
    torch.manual_seed(eval_args.seed)
    run = load_run(eval_args.model_path, device, use_ema=eval_args.use_ema, args=args)
    written: dict[str, list[Path]] = {}

    if eval_args.n_samples > 0:
        nodesxsample = run.nodes_dist.sample(eval_args.n_samples)
        one_hot, charges, x, node_mask = sample(args, device, run.model, info, run.prop_dist, nodesxsample=nodesxsample, **options)
        folder = out / "molecules"
        visualizer.save_xyz_file(folder, one_hot, charges, x, info, name="molecule", node_mask=node_mask)
        written["molecules"] = visualizer.visualize(folder, info, max_num=eval_args.n_samples)
        print(f"{eval_args.n_samples} molecules drawn in {folder}")

    for k in range(eval_args.n_chains):
        one_hot, charges, x = sample_chain(args, device, run.model, eval_args.n_tries, info, run.prop_dist,
                                           n_nodes=eval_args.n_nodes, keep_frames=keep_frames, **options)
        folder = out / f"chain_{k}"
        visualizer.save_xyz_file(folder, one_hot, charges, x, info, name="chain")
        written[f"chain_{k}"] = visualizer.visualize_chain(folder, info, all_frames=True)
        print(f"chain {k} drawn in {folder} ({len(x)} frames)")
    return written


if __name__ == "__main__":
    main(sys.argv[1:])
