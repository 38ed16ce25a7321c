"""Sample a trained run with GAGA's Gaussian shortcut and report quality and speed (GAGA_test.py).

    python GAGA_test.py --model_path=outputs/edm_qm9_GA_550 --n_samples=10000 \
        --sampling_step_size=1 --shortcut=Gaussian --test_name=QM9_GA \
        --dataset_var=0.848 --GA_timestep=550 --iteration=3

``--shortcut Gaussian`` starts the reverse chain at T* (--GA_timestep) from N(0, v_T* I) with
v_t = alpha_t^2 dataset_var + sigma_t^2; ``--shortcut none`` runs EDM's full chain from T.
``--sampler ddim`` makes the steps deterministic (DDIM) and stacks with both;
``--sampler dpm_solver_2m`` uses DPM-Solver++(2M). ``--compare`` evaluates in one table: full
chain, Gaussian shortcut, DDIM with stride --ddim_stride, DDIM + shortcut, and DPM-Solver++(2M)
with about each of --solver_steps steps (default 50 and 100), from T and from T*. Each iteration samples --n_samples molecules, times the
sampling and evaluates EDM's metrics; the mean ± std over iterations is printed and written
to <out_dir>/GAGA_test_<test_name>.md/.json, and a line is appended to
<out_dir>/EDM_GA-T=<T*>-Shortcut_log.txt (--out_dir defaults to --model_path; when that folder
is read-only, e.g. a published run, the table is only printed).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Sequence

import torch

from configs.atomic_io import unwritable_reason
from configs.errors import UserInputError, cli_errors
from configs.flags import at_least, check_flags, check_plain_name, compact_errors, number_list, positive
from equivariant_diffusion.samplers import sampler_names
from training import distributed
from training.args import str2bool
from training import sampling_benchmark as bench
from training.latent_args import latent_kind

MAX_SAMPLES = 1_000_000  # molecules per iteration; the samples are held in memory

FLAG_RULES = {
    "n_samples": at_least(1, high=MAX_SAMPLES),
    "batch_size_gen": at_least(1, high=100_000),
    "sampling_step_size": at_least(1),
    "dataset_var": positive(optional=True),
    "GA_timestep": at_least(1, optional=True),
    "iteration": at_least(1, high=1000),
    "ddim_stride": at_least(1),
    "seed": at_least(0, high=2**32 - 1000),
}


def build_parser() -> argparse.ArgumentParser:
    p = compact_errors(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    p.add_argument("--model_path", type=str, required=True, help="run folder holding args.pickle and the weights")
    p.add_argument("--n_samples", type=int, default=10000, help="molecules per iteration")
    p.add_argument("--batch_size_gen", type=int, default=100, help="molecules per sampling batch")
    p.add_argument("--sampling_step_size", type=int, default=1, help="stride of the reverse chain (s = t - stride)")
    p.add_argument("--shortcut", type=str, default="Gaussian", choices=("Gaussian", "none"),
                   help="'Gaussian': start at --GA_timestep from N(0, v_T* I); 'none': EDM's full chain from T")
    p.add_argument("--sampler", type=str, default="ddpm", choices=sampler_names())
    p.add_argument("--test_name", type=str, default="QM9_GA", help="names the output files")
    p.add_argument("--dataset_var", type=float, default=None,
                   help="dataset variance v of the Gaussian start (QM9 0.848, GEOM 0.952; default: the run's)")
    p.add_argument("--GA_timestep", type=int, default=None, help="T* (default: the run's --max_t)")
    p.add_argument("--iteration", type=int, default=3, help="repetitions for mean ± std")
    p.add_argument("--save_to_xyz", type=str2bool, default=False, help="write the first iteration's molecules as XYZ files")
    p.add_argument("--compare", action="store_true", help="evaluate full chain, shortcut, DDIM, DDIM + shortcut and DPM-Solver++(2M) rows in one table")
    p.add_argument("--ddim_stride", type=int, default=2, help="stride of the DDIM rows of --compare")
    p.add_argument("--solver_steps", type=number_list, default=[50, 100],
                   help="DPM-Solver++(2M) rows of --compare: about this many steps each, from T and from T* ([] for none)")
    p.add_argument("--seed", type=int, default=0, help="iteration i uses seed + i")
    p.add_argument("--use_ema", type=str2bool, default=True, help="sample with the EMA weights when the run has them")
    p.add_argument("--no_novelty", action="store_true", help="skip novelty (needs the training SMILES, cached after one run)")
    p.add_argument("--datadir", type=str, default=None, help="dataset cache folder, for novelty (default: the run's)")
    p.add_argument("--out_dir", type=str, default=None,
                   help="where the report and log go (default: --model_path; if that is read-only, the table is only printed)")
    p.add_argument("--no-cuda", dest="no_cuda", action="store_true")
    return p


def check_flags_gaga_test(flags: argparse.Namespace) -> None:
    """Every flag on its own, before the run folder is read."""
    check_flags(flags, FLAG_RULES)
    check_plain_name("--test_name", flags.test_name)
    flags.batch_size_gen = bench.check_sample_counts(flags.n_samples, flags.batch_size_gen, flags.iteration)


def _defaults_from_run(flags: argparse.Namespace, args: argparse.Namespace) -> tuple[int | None, float]:
    """T* and v: the flags, else what the run was trained with (``load_run`` fills a legacy run's
    dataset_var: the published value for GAGA-fork runs, 1 for EDM runs)."""
    from configs.run_args import resolved_max_t

    T = int(args.diffusion_steps)
    t_star = flags.GA_timestep
    if t_star is None and resolved_max_t(args) < T:
        t_star = resolved_max_t(args)
    dataset_var = args.dataset_var if flags.dataset_var is None else flags.dataset_var
    return t_star, float(dataset_var)


def output_folder(flags: argparse.Namespace) -> Path | None:
    """Where the report goes: --out_dir (must be writable), else the run folder if writable, else None (print only)."""
    if flags.out_dir is not None:
        reason = unwritable_reason(flags.out_dir)
        if reason:
            raise UserInputError(f"--out_dir: {reason}; choose a writable folder")
        return Path(flags.out_dir)
    reason = unwritable_reason(flags.model_path)
    if reason:
        print(f"note: {reason}; the results are printed only (pass --out_dir to save them)", file=sys.stderr)
        return None
    return Path(flags.model_path)


@cli_errors
def main(argv: Sequence[str] | None = None) -> list[dict]:
    from training.evaluate import evaluate_molecules, load_run, read_run_args, training_smiles
    from training.loop import sample_molecules

    flags = build_parser().parse_args(argv)
    check_flags_gaga_test(flags)
    args = read_run_args(flags.model_path, datadir=flags.datadir)  # args.pickle only: nothing built yet
    T = int(args.diffusion_steps)
    t_star, dataset_var = _defaults_from_run(flags, args)
    if not dataset_var > 0:
        raise UserInputError(f"--dataset_var must be a finite positive number, got {dataset_var}")
    if flags.compare:
        if t_star is None:
            raise UserInputError("--compare needs --GA_timestep (T*), or a run trained with --max_t")
        solver_steps = [int(n) for n in flags.solver_steps]
        if any(n != m or n < 1 for n, m in zip(solver_steps, flags.solver_steps)):
            raise UserInputError(f"--solver_steps must be positive integers, got {flags.solver_steps}")
        settings = bench.comparison_settings(T, t_star, flags.ddim_stride, dataset_var, solver_steps)
        if latent_kind(args) == "geoldm":  # the paper's name for this backbone's full-chain row
            settings[0] = dataclasses.replace(settings[0], label="GeoLDM full chain")
    else:
        settings = [bench.single_setting(flags.shortcut, t_star, flags.sampling_step_size, flags.sampler, dataset_var, T)]
    out_dir = output_folder(flags)

    device = distributed.select_device(flags.no_cuda)
    run = load_run(flags.model_path, device, use_ema=flags.use_ema, args=args)
    smiles = None if flags.no_novelty else training_smiles(args, run.dataset_info)

    def sample_fn(n: int, options: dict) -> dict:
        return sample_molecules(args, run.model, run.nodes_dist, run.dataset_info, device, n,
                                batch_size=flags.batch_size_gen, prop_dist=run.prop_dist, options=options)

    def evaluate_fn(molecules: dict) -> dict:
        return evaluate_molecules(molecules, run.dataset_info, smiles)

    run_dir = Path(flags.model_path)
    # One untimed single-step draw, so one-off start-up costs do not land on the first setting.
    sample_fn(1, dict(start_step=1, dataset_var=dataset_var, step_size=1, sampler="ddpm"))
    results = []
    for setting in settings:
        print(f"[GAGA_test] {setting.label}: {setting.n_steps(T)} steps, {flags.n_samples} molecules x {flags.iteration}",
              file=sys.stderr)
        on_iteration = None
        if flags.save_to_xyz and setting is settings[0] and out_dir is not None:
            on_iteration = _xyz_writer(out_dir / f"GAGA_test_{flags.test_name}_xyz", run.dataset_info)
        result = bench.run_setting(setting, sample_fn, evaluate_fn, flags.n_samples, flags.iteration, T, device,
                                   seed=flags.seed, on_iteration=on_iteration)
        results.append(result)
        if out_dir is not None:
            bench.append_gaga_log(out_dir, setting.start_step or T, bench.gaga_log_line(result, flags.test_name))

    baseline = 0 if flags.compare else None
    table = bench.markdown_table(results, baseline_index=baseline)
    print(table)
    meta = {"model_path": str(run_dir), "weights": str(run.weights), "test_name": flags.test_name,
            "dataset_var": dataset_var, "GA_timestep": t_star, "T": T}
    if out_dir is not None:
        md, js = bench.save_report(results, out_dir / f"GAGA_test_{flags.test_name}", baseline, meta)
        print(f"saved {md} and {js}", file=sys.stderr)
    return results


def _xyz_writer(folder: Path, dataset_info: dict):
    from qm9 import visualizer

    def write(iteration: int, metrics: dict, molecules: dict) -> None:
        if iteration == 0:
            visualizer.save_xyz_file(folder, molecules["one_hot"], None, molecules["x"], dataset_info,
                                     node_mask=molecules["node_mask"], name="molecule")

    return write


if __name__ == "__main__":
    main()
