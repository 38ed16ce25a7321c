"""Evaluate a property-conditional generator with property classifiers (EDM's eval_conditional_qm9.py).

    python eval_conditional_qm9.py --generators_path outputs/exp_cond_alpha \
        --classifiers_path qm9/property_prediction/outputs/exp_class_alpha --property alpha \
        --iterations 100 --batch_size 100 --task edm
    # Table 3's rows at once (Naive, #Atoms, the generator, QM9 lower bound):
    python eval_conditional_qm9.py --generators_path outputs/exp_cond_alpha --task table \
        --classifiers_path qm9/property_prediction/outputs/exp_class_alpha --property alpha \
        --numnodes_path qm9/property_prediction/outputs/exp_class_alpha_numnodes --iterations 100 --batch_size 100
    # GAGA: sample from the Gaussian approximation at T* (a run trained with --max_t does so by default)
    python eval_conditional_qm9.py ... --task edm --GA_timestep 550 --dataset_var 0.848 [--sampler ddim --sampling_step_size 2]

Tasks: edm, qm9_second_half (lower bound), naive (upper bound), table, qualitative (sweeps;
--gif animates them). Results: printed, and written to outputs/<exp_name>/eval_conditional_<task>.json.
The logic is training/conditional_eval.py.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Sequence

import torch

from configs.atomic_io import unwritable_reason
from configs.errors import UserInputError, cli_errors
from configs.flags import at_least, check_flags, check_plain_name, compact_errors, positive
from equivariant_diffusion.samplers import sampler_names
from training import distributed
from training.args import optional_int, str2bool
from training.conditional_eval import TASKS

FLAG_RULES = {
    "batch_size": at_least(1, high=100_000),
    "iterations": at_least(1, high=10**6),
    "n_sweeps": at_least(0, high=10_000),
    "seed": at_least(0, high=2**32 - 1),
    "GA_timestep": at_least(1, optional=True),
    "dataset_var": positive(optional=True),
    "sampling_step_size": at_least(1, optional=True),
    "data_subset": at_least(1, optional=True),
    "log_interval": at_least(1),
    "n_frames": at_least(2, high=10_000),
    "n_nodes": at_least(1, high=29),
}


def build_parser() -> argparse.ArgumentParser:
    p = compact_errors(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    a = p.add_argument
    # EDM's flags
    a("--exp_name", type=str, default="debug_alpha", help="results go to outputs/<exp_name>")
    a("--generators_path", type=str, default="outputs/exp_cond_alpha_pretrained", help="the conditional run folder")
    a("--classifiers_path", type=str, nargs="+", default=["qm9/property_prediction/outputs/exp_class_alpha_pretrained"],
      help="classifier folder(s), one per --property")
    a("--property", type=str, nargs="+", default=["alpha"], help="property (or properties) to evaluate")
    a("--no-cuda", dest="no_cuda", action="store_true", default=False)
    a("--debug_break", type=str2bool, default=False, help="one iteration only")
    a("--log_interval", type=int, default=5, help="accepted for EDM compatibility (progress is a bar)")
    a("--batch_size", type=int, default=1, help="molecules per iteration")
    a("--iterations", type=int, default=20, help="batches of generated molecules (exactly this many)")
    a("--task", type=str, default="qualitative", choices=TASKS)
    a("--n_sweeps", type=int, default=10, help="qualitative: number of property sweeps")
    # this implementation
    a("--numnodes_path", type=str, default=None, help="table: the #Atoms baseline's folder (--model_name numnodes)")
    a("--seed", type=int, default=0)
    a("--use_ema", type=str2bool, default=True, help="sample with the EMA weights when the run has them")
    a("--GA_timestep", type=optional_int, default=argparse.SUPPRESS,
      help="GAGA: start the reverse chain at this step from N(0, dataset_var); default: the run's max_t if < T, 'None' = T")
    a("--dataset_var", type=float, default=None, help="GAGA: variance of the Gaussian start (default: the run's)")
    a("--sampling_step_size", type=int, default=None, help="stride of the reverse chain, e.g. DDIM's (default: the run's)")
    a("--sampler", type=str, default=None, choices=sampler_names(), help="ddpm, ddim, ... (default: the run's)")
    a("--gif", type=str2bool, default=False, help="qualitative: also an animated GIF per sweep")
    a("--n_frames", type=int, default=100, help="qualitative: molecules per sweep (EDM: 100)")
    a("--n_nodes", type=int, default=19, help="qualitative: atoms of the swept molecules (EDM: 19)")
    a("--datadir", type=str, default=None, help="dataset cache folder (default: the run's)")
    a("--data_subset", type=optional_int, default=None, help="qm9_second_half/naive/table: first N molecules of the half")
    a("--output_root", type=str, default="outputs", help="parent of outputs/<exp_name>")
    return p


@cli_errors
def main(argv: Sequence[str] | None = None) -> dict:
    from configs.datasets import dataset_entry, resolve_hook
    from training import conditional_eval as ce
    from training.evaluate import load_run, read_run_args, run_sampling_options

    flags = build_parser().parse_args(argv)
    check_flags(flags, FLAG_RULES)
    check_plain_name("--exp_name", flags.exp_name)
    args = read_run_args(flags.generators_path, datadir=flags.datadir)
    conditioning = list(getattr(args, "conditioning", None) or [])
    if not conditioning:
        raise UserInputError(f"{flags.generators_path} is not a conditional run (trained without --conditioning)")
    needs_generation = flags.task in ("edm", "table", "qualitative")
    if flags.task in ("edm", "table"):
        missing = [p for p in flags.property if p not in conditioning]
        if missing:
            raise UserInputError(f"--property {' '.join(missing)}: the generator is conditioned on {' '.join(conditioning)} only")
    if flags.task == "table" and flags.numnodes_path is None:
        raise UserInputError("--task table needs --numnodes_path (a classifier folder trained with --model_name numnodes)")
    sampling = argparse.Namespace(dataset_var=flags.dataset_var, sampling_step_size=flags.sampling_step_size,
                                  sampler=flags.sampler)
    if hasattr(flags, "GA_timestep"):
        sampling.start_step = flags.GA_timestep
    options = run_sampling_options(args, sampling)
    out_dir = Path(flags.output_root) / flags.exp_name
    reason = unwritable_reason(out_dir)
    if reason:
        raise UserInputError(f"{reason}; choose another --output_root")
    device = distributed.select_device(flags.no_cuda)
    iterations = 1 if flags.debug_break else flags.iterations

    classifiers = {}
    if flags.task != "qualitative":
        classifiers = ce.load_classifiers(flags.classifiers_path, flags.property, args.datadir, device)
    torch.manual_seed(flags.seed)
    run = load_run(flags.generators_path, device, use_ema=flags.use_ema, args=args)
    record = {"generators_path": flags.generators_path, "task": flags.task, "weights": run.weights.name,
              "sampling": options, "seed": flags.seed, "results": {}}
    if needs_generation:
        print(f"Generator {run.weights} conditioned on {' '.join(conditioning)}; sampling with {options}")

    def half_arrays() -> dict:
        arrays = resolve_hook(dataset_entry(args.dataset).split_arrays)(args.datadir, "train", remove_h=False, progress=False)
        if flags.data_subset is not None:
            arrays = {k: v[: flags.data_subset] for k, v in arrays.items()}
        return arrays

    start = time.time()
    results = record["results"]
    if flags.task in ("qm9_second_half", "naive", "table"):
        arrays = half_arrays()
        for prop, (model, mean, mad) in classifiers.items():
            if flags.task in ("naive", "table"):
                results.setdefault(prop, {})["naive"] = ce.evaluate_dataset(arrays, model, prop, mean, mad,
                                                                            flags.batch_size, shuffle_labels=True,
                                                                            seed=flags.seed)
            if flags.task in ("qm9_second_half", "table"):
                results.setdefault(prop, {})["qm9_second_half"] = ce.evaluate_dataset(arrays, model, prop, mean, mad,
                                                                                      flags.batch_size)
        if flags.task == "table":
            numnodes = ce.load_classifiers([flags.numnodes_path], flags.property[:1], args.datadir, device)
            (prop, (model, mean, mad)), = numnodes.items()
            results[prop]["numnodes"] = ce.evaluate_dataset(arrays, model, prop, mean, mad, flags.batch_size)
    if flags.task in ("edm", "table"):
        for prop, summary in ce.evaluate_generated(run, classifiers, options, iterations, flags.batch_size, device).items():
            results.setdefault(prop, {})["edm"] = summary
    if flags.task == "qualitative":
        pictures = ce.sweep(run, options, out_dir / "qualitative", flags.n_sweeps, n_nodes=flags.n_nodes,
                            n_frames=flags.n_frames, gif=flags.gif)
        record["pictures"] = [str(p) for p in pictures]
        print(f"{flags.n_sweeps} sweeps written to {out_dir / 'qualitative'}")
    record["seconds"] = round(time.time() - start, 1)

    names = {"naive": "Naive (upper bound)", "numnodes": "#Atoms", "edm": "generator", "qm9_second_half": "QM9 (lower bound)"}
    for prop, rows in results.items():
        for key in ("naive", "numnodes", "edm", "qm9_second_half"):
            if key in rows:
                r = rows[key]
                spread = f" (mean +- std over {r['iterations']} iterations: {r['mean_over_iterations']:.4f} +- " \
                         f"{r['std_over_iterations']:.4f})" if key == "edm" else ""
                print(f"{prop} {names[key]}: MAE {r['mae']:.4f} over {r['molecules']} molecules{spread}")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"eval_conditional_{flags.task}.json"
    ce.write_json(path, record)
    print(f"Results written to {path}")
    return record


if __name__ == "__main__":
    main(sys.argv[1:])
