"""GAGA step 3: the characteristic step T* from the Gaussianity test results.

    python GAGA_step_estimation.py --data_root identity_to_gaussian_QM9 [--quantile 0.95]

Per molecule: the earliest grid t at which it passes at t and at the next grid point.
T* = their mean (GAGA's README estimator) and their q-quantile. Prints both, for all tests
and per modality/test, and saves <data_root>/gaga_step.json and first_pass.png.

If the folder holds the paper evaluator's results (Gaussianity_test.py --evaluator paper),
it also prints T_ID, T_DS and T* = max(T_ID, T_DS) per variance convention, with the saved
thresholds or with --eps_dep / --eps_ds (recomputed from paper_curves.csv), and adds them
to gaga_step.json under "paper".
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from configs.atomic_io import unwritable_reason
from configs.errors import UserInputError
from configs.flags import compact_errors
from gaga.cli import one_line_errors
from gaga.evaluator_paper import format_paper_report, has_paper_results, read_paper_results
from gaga.results_files import RESULTS_PATTERN
from gaga.step_estimation import PASS_COLUMNS, check_quantile, first_pass_histogram, load_results, step_estimates


def parse_args(argv=None) -> argparse.Namespace:
    parser = compact_errors(argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                                    formatter_class=argparse.ArgumentDefaultsHelpFormatter))
    parser.add_argument("--data_root", required=True, help="folder written by Gaussianity_test.py (identity_to_gaussian_<test_name>)")
    parser.add_argument("--quantile", type=float, default=0.95, help="q of the quantile estimator, in (0, 1)")
    parser.add_argument("--out", default=None, help="JSON output (default <data_root>/gaga_step.json)")
    parser.add_argument("--eps_dep", type=float, default=None, help="paper evaluator: MI threshold (default: the run's)")
    parser.add_argument("--eps_ds", type=float, default=None, help="paper evaluator: KS-distance threshold (default: the run's)")
    parser.add_argument("--no_plot", action="store_true")
    return parser.parse_args(argv)


def _fmt(value, digits: int = 1) -> str:
    return "-" if value is None else (f"{value:.{digits}f}" if isinstance(value, float) else str(value))


def paper_step(data_root: Path, eps_dep: float | None, eps_ds: float | None) -> dict | None:
    """The paper evaluator's T's of the folder, printed; None when it has none."""
    if not has_paper_results(data_root):
        if eps_dep is not None or eps_ds is not None:
            raise ValueError(f"--eps_dep/--eps_ds need the paper evaluator's results in {data_root}; run Gaussianity_test.py --evaluator paper")
        return None
    report = read_paper_results(data_root, eps_dep, eps_ds)
    print(format_paper_report(report) + "\n")
    return report


@one_line_errors
def main(argv=None) -> int:
    args = parse_args(argv)
    check_quantile(args.quantile)
    data_root = Path(args.data_root)
    paper = paper_step(data_root, args.eps_dep, args.eps_ds)
    if paper is not None and not any(data_root.glob(RESULTS_PATTERN)):
        out = Path(args.out) if args.out else data_root / "gaga_step.json"
        out.write_text(json.dumps({"data_root": str(data_root), "paper": paper}, indent=2) + "\n")
        print(f"saved {out}")
        return 0
    results = load_results(data_root)
    estimates = step_estimates(results, args.quantile)
    overall = estimates["pass"]
    q = f"q{args.quantile:g}"
    print(f"{data_root}: {overall['n_molecules']} molecules, grid {overall['grid'][0]}..{overall['grid'][-1]} ({len(overall['grid'])} points)")
    print(f"{'test':<28} {'T* mean':>8} {'nearest':>8} {q:>8} {'never':>6}")
    for column, est in estimates.items():
        print(f"{PASS_COLUMNS[column]:<28} {_fmt(est['t_star_mean']):>8} {_fmt(est['t_star_mean_nearest_grid']):>8} "
              f"{_fmt(est['t_star_quantile']):>8} {est['n_without_consistent_pass']:>6}")
    if overall["t_star_mean"] is None:
        print("no molecule passes at two consecutive grid points: extend the grid (Gaussianity_test.py --timesteps)")
    else:
        print(f"\nT* = {overall['t_star_mean']:.1f} (mean estimator; nearest grid point {overall['t_star_mean_nearest_grid']}), "
              f"{q} estimator = {_fmt(overall['t_star_quantile'])}"
              + ("" if overall["t_star_quantile"] is not None else f" (more than {1 - args.quantile:.0%} of molecules never pass consistently)"))
    counts = first_pass_histogram(results)
    out = Path(args.out) if args.out else data_root / "gaga_step.json"
    reason = unwritable_reason(out.parent)
    if reason and args.out:
        raise UserInputError(f"--out: {reason}; choose a writable place")
    if reason:
        print(f"note: {reason}; the estimates are printed only (pass --out to save them)", file=sys.stderr)
        return 0
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {"data_root": str(data_root), "t_star": estimates, "first_pass_counts": counts}
    if paper is not None:
        record["paper"] = paper
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"saved {out}")
    if not args.no_plot:
        from gaga.plots import plot_first_pass_histogram

        path = plot_first_pass_histogram(counts, data_root / "first_pass.png", overall["t_star_mean"], title=data_root.name)
        print(f"plot: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
