"""GAGA step 2: per molecule and timestep, is the noised molecule an independent Gaussian?

    python Gaussianity_test.py --model_path outputs/edm_qm9_GA_550 --test_name QM9
    python Gaussianity_test.py --test_name QM9 --n_molecules 2000     # schedule from flags
    python Gaussianity_test.py --model_path outputs/edm_geom_drugs_GA_650 --test_name GEOM --n_molecules 20000

Writes identity_to_gaussian_<test_name>/results_atoms_<n>.csv (one row per molecule and t:
statistics and pass flags, appended as molecules finish), config.json, and
gaussianity.png (pass rates, KS statistics and MI against t, T* marked). Tests: see
gaga/gaussianity.py. An interrupted run keeps what is done; add --resume to finish it.
GEOM-Drugs conformers are read from the memory-mapped table chunk by chunk, so only the
tested ones are ever loaded (GAGA's README used a random 10% sample: --n_molecules).

--evaluator paper runs the paper's dataset-level evaluator instead (gaga/evaluator_paper.py):
Dep(x_t), D_t, T_ID, T_DS, T* = max(T_ID, T_DS) for each variance convention, with
null-calibrated thresholds and bootstrap bands; it writes paper_evaluator.json,
paper_curves.csv, paper_t_star_vs_eps.csv and plots into the same folder.

A GeoLDM run (--model_path) is tested in its latent space (gaga/latent.py): the molecules are
encoded by the run's encoder (only the --n_molecules sample; the paper evaluator's default
sample without it), every statistic (the measured v, per-modality variances) is over the
encoded molecules, and the scalar --dataset_var defaults to the latents' RMS statistic, the
analogue of GAGA's 0.848. --space data tests the molecules themselves.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from configs.datasets_config import published_dataset_var
from configs.flags import Rule, at_least, compact_errors, positive
from gaga.cli import (
    add_source_flags, check_output_folder, check_source_flags, one_line_errors, resolve_data_spec, resolve_gamma, source_record,
)
from gaga.data import load_features
from gaga.gaussianity import DEFAULT_TIMESTEPS, TEST_MODALITIES, GaussianityConfig, test_channels
from gaga.gaussianity_run import run_gaussianity_test
from gaga.latent import add_space_flag, analysis_features, resolve_space
from gaga.schedule import check_timesteps, parse_timesteps
from gaga.step_estimation import check_quantile, load_results, per_timestep_summary, step_estimates
from gaga.variance import dataset_statistics, modality_mean_squares

FLAG_RULES = {
    "workers": at_least(1, high=256),
    "chunk_size": at_least(1, high=1_000_000),
    "dataset_var": positive(optional=True),
    "alpha": Rule(float, 0, 1, low_open=True, high_open=True),
    "mi_threshold": positive(),
    "mi_neighbors": at_least(1, high=1000),
    "mi_pairs": at_least(1, high=1_000_000),
    "quantile": Rule(float, 0, 1, low_open=True, high_open=True),
    # --evaluator paper
    "eps_dep": positive(optional=True),
    "eps_ds": positive(optional=True),
    "null_alpha": Rule(float, 0, 1, low_open=True, high_open=True),
    "null_replicates": at_least(1, high=10_000),
    "bootstrap": at_least(1, high=10_000),
    "mi_samples": at_least(2, high=10_000_000),
    "h_samples": at_least(2, high=10_000_000),
}


PAPER_GRID = "0:1000:50"


def add_paper_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--evaluator", default="scripts", choices=("scripts", "paper"),
                        help="scripts: per-molecule tests (GAGA's published scripts); paper: the paper's dataset-level T_ID/T_DS")
    group = parser.add_argument_group("--evaluator paper")
    group.add_argument("--convention", default="unbiased", help="primary v^: rms (README 0.848), variance, unbiased (paper), per_modality")
    group.add_argument("--eps_dep", type=float, default=None, help="MI threshold (nats); default: null-calibrated")
    group.add_argument("--eps_ds", type=float, default=None, help="KS-distance threshold; default: null-calibrated")
    group.add_argument("--null_alpha", type=float, default=0.05, help="thresholds = (1 - alpha) quantile on exactly Gaussian data")
    group.add_argument("--null_replicates", type=int, default=50)
    group.add_argument("--bootstrap", type=int, default=50, help="bootstrap replicates (molecules resampled) for the bands")
    group.add_argument("--mi_samples", type=int, default=4000, help="molecules used by the MI estimates")
    group.add_argument("--h_samples", type=int, default=2000, help="molecules used by the Gaussianity functional")
    group.add_argument("--size_sweep", default=None, help="e.g. 500,1000,2000,5000: T* on nested subsets, thresholds per size")

VARIANCE_MODES = {"scalar": "scalar", "per-modality": "per-modality", "per_modality": "per-modality", "measured": "per-modality"}


def parse_args(argv=None) -> argparse.Namespace:
    parser = compact_errors(argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                                    formatter_class=argparse.ArgumentDefaultsHelpFormatter))
    add_source_flags(parser)
    parser.add_argument("--test_name", default="QM9")
    parser.add_argument("--out_dir", default=None, help="default identity_to_gaussian_<test_name>")
    parser.add_argument("--n_molecules", type=int, default=None, help="random subset of the split (default: all with >= 4 atoms)")
    parser.add_argument("--seed", type=int, default=0)
    default_grid = f"{DEFAULT_TIMESTEPS[0]}:{DEFAULT_TIMESTEPS[-1]}:{DEFAULT_TIMESTEPS[1] - DEFAULT_TIMESTEPS[0]}"
    parser.add_argument("--timesteps", default=None,
                        help=f"grid: 300,350,400 or start:stop:step (stop included); default {default_grid}, paper evaluator {PAPER_GRID}")
    parser.add_argument("--workers", type=int, default=2, help="processes")
    parser.add_argument("--chunk_size", type=int, default=32, help="molecules per task")
    parser.add_argument("--variance_mode", default="scalar", choices=sorted(VARIANCE_MODES),
                        help="scalar: v = --dataset_var for every feature (the paper's isotropic approximation); "
                             "per-modality (= measured): each modality's measured variance (mean square over the split)")
    parser.add_argument("--dataset_var", type=float, default=None,
                        help="v in v_t = alpha_t^2 v + sigma_t^2 (scalar mode); default GAGA's README value, QM9 0.848, GEOM 0.952")
    parser.add_argument("--alpha", type=float, default=0.05, help="KS significance level: pass if p > alpha")
    parser.add_argument("--mi_threshold", type=float, default=0.1, help="MI tests pass if the mean MI (nats) < this")
    parser.add_argument("--mi_neighbors", type=int, default=3, help="k of the KSG estimator")
    parser.add_argument("--mi_pairs", type=int, default=10, help="random pairs per MI test")
    parser.add_argument("--quantile", type=float, default=0.95, help="for the T* quantile estimator shown on the plot")
    add_paper_flags(parser)
    add_space_flag(parser)
    parser.add_argument("--resume", action="store_true", help="finish an interrupted run with the same settings")
    parser.add_argument("--no_plot", action="store_true")
    parser.add_argument("--no_progress", action="store_true")
    return parser.parse_args(argv)


@one_line_errors
def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    check_source_flags(args, FLAG_RULES)
    check_quantile(args.quantile)
    gamma = resolve_gamma(args)
    default_grid = PAPER_GRID if args.evaluator == "paper" else f"{DEFAULT_TIMESTEPS[0]}:{DEFAULT_TIMESTEPS[-1]}:{DEFAULT_TIMESTEPS[1] - DEFAULT_TIMESTEPS[0]}"
    grid = check_timesteps(parse_timesteps(args.timesteps or default_grid), len(gamma) - 1)
    spec = resolve_data_spec(args)
    out_dir = Path(args.out_dir or f"identity_to_gaussian_{args.test_name}")
    check_output_folder(str(out_dir))
    if args.evaluator == "paper":
        from gaga.paper_cli import paper_main

        return paper_main(args, spec, gamma, grid)
    mode = VARIANCE_MODES[args.variance_mode]
    latent_run = resolve_space(args)
    dataset_var = args.dataset_var
    if dataset_var is None and latent_run is None:
        dataset_var = published_dataset_var(spec.dataset)  # checked before any data is read
    features, latent = analysis_features(args, spec, n_molecules=args.n_molecules, seed=args.seed,
                                          load_data=load_features, run=latent_run)
    if dataset_var is None:  # GAGA's published v is the data's; the latents' own README statistic instead
        dataset_var = dataset_statistics(features)["all"]["rms"]
        print(f"--dataset_var {dataset_var:.4f}: the latents' mean per-molecule RMS (the statistic of GAGA's 0.848)")

    if mode == "scalar":
        variances = {m: float(dataset_var) for m in TEST_MODALITIES}
    else:
        # Measured over the whole split (GEOM: streamed in bounded pieces), not only the tested sample.
        variances = modality_mean_squares(features, test_channels(features.channels, features.n_channels))
    config = GaussianityConfig(
        timesteps=tuple(grid), alpha=args.alpha, mi_threshold=args.mi_threshold, mi_neighbors=args.mi_neighbors,
        mi_pairs=args.mi_pairs, seed=args.seed, variances=variances,
    )
    extra = {"variance_mode": mode, "source": source_record(args, spec)}
    if latent is not None:
        extra["source"].update({k: v for k, v in latent.items() if k != "encode_seconds"})
    run = run_gaussianity_test(
        features, gamma, config, out_dir, n_molecules=None if latent is not None else args.n_molecules, workers=args.workers,
        chunk_size=args.chunk_size, resume=args.resume, progress=not args.no_progress, extra_record=extra,
    )
    seconds = time.perf_counter() - start

    results = load_results(out_dir)
    estimates = step_estimates(results, args.quantile)
    summary = per_timestep_summary(results)
    overall = estimates["pass"]
    print(f"{args.test_name}: {run['n_selected']} molecules x {len(grid)} timesteps "
          f"({run['n_computed']} computed now, {run['n_already_done']} from before) in {seconds:.1f} s "
          f"with {args.workers} worker(s); v = " + ", ".join(f"{k} {v:.4g}" for k, v in variances.items()))
    print(f"{'t':>5} {'pass':>6} {'pos':>6} {'types':>6} {'MIatoms':>8}")
    for t, row in summary.iterrows():
        print(f"{t:>5} {row['pass']:>6.3f} {row['pass_positions']:>6.3f} {row['pass_atom_types']:>6.3f} {row['pass_mi_atoms']:>8.3f}")
    if overall["t_star_mean"] is not None:
        print(f"T* (mean of first consistent passes) = {overall['t_star_mean']:.1f} (nearest grid point "
              f"{overall['t_star_mean_nearest_grid']}); q{args.quantile:g} quantile = {overall['t_star_quantile']}")
    else:
        print("no molecule passes at two consecutive grid points; extend the grid to larger t")
    if not args.no_plot:
        from gaga.plots import plot_gaussianity

        path = plot_gaussianity(
            summary, out_dir / "gaussianity.png", overall["t_star_mean"], overall["t_star_quantile"], args.quantile,
            args.alpha, args.mi_threshold, title=f"{args.test_name}: {run['n_selected']} molecules, v mode {mode}",
        )
        print(f"plot: {path}")
    (out_dir / "run_summary.json").write_text(json.dumps({**run, "seconds": round(seconds, 2), "t_star": estimates}, indent=2) + "\n")
    print(f"results: {out_dir}/results_atoms_<n>.csv; next: python GAGA_step_estimation.py --data_root {out_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
