"""The paper evaluator on several data sets: T_ID, T_DS, T* per variance convention and the
Gaussianity functional H^(2), H^(4) along t, so Proposition 3.1's ordering can be checked;
optionally the scripts' per-molecule rule on the same GEOM-shaped molecules for comparison.

    python bench/paper_evaluator_datasets.py [--n_molecules 3000] [--scripts_molecules 1000]
        [--datadir qm9/temp] [--out outputs/paper_eval/datasets]

Data sets: exactly Gaussian (non-molecular control), strongly non-Gaussian (bimodal,
dependent; non-molecular control), a random QM9 train sample, and GEOM-shaped synthetic
molecules (gaga/synthetic.py; there is no real GEOM-Drugs on this machine). v^ of each
convention is measured on the evaluated sample itself. Writes results.json, results.md and
h_along_t.png, curves_<data set>.csv into --out and prints the table with wall times and T*
against eps_DS (rms/variance/unbiased/per_modality).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from gaga.data import DataSpec, load_features, random_subset_rows  # noqa: E402
from gaga.evaluator_paper import (  # noqa: E402
    PaperConfig,
    evaluate_paper,
    first_below,
    flat_from_features,
    t_star,
    variance_conventions_flat,
)
from gaga.schedule import alpha2_sigma2, gamma_table_from_flags  # noqa: E402
from gaga.synthetic import gaussian_control, geom_shaped_features, non_gaussian_control  # noqa: E402

SCRIPT_CONVENTIONS = ("rms", "variance", "unbiased", "per_modality")


def scripts_rule(features, conventions: dict, gamma: np.ndarray, grid: tuple[int, ...], n_molecules: int, workers: int) -> dict:
    """T* of the published scripts' per-molecule rule (mean of first consistent passes; q0.95) per convention."""
    from gaga.gaussianity import GaussianityConfig
    from gaga.gaussianity_run import run_gaussianity_test
    from gaga.step_estimation import load_results, step_estimates

    out = {}
    for name in SCRIPT_CONVENTIONS:
        v = conventions[name]
        variances = {"positions": float(v[0]), "atom_types": float(v[3])}
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as folder:
            run_gaussianity_test(features, gamma, GaussianityConfig(timesteps=grid, variances=variances), folder,
                                 n_molecules=n_molecules, workers=workers, progress=False)
            est = step_estimates(load_results(folder))["pass"]
        out[name] = {"t_star_mean": est["t_star_mean"], "t_star_quantile": est["t_star_quantile"],
                     "never": est["n_without_consistent_pass"], "seconds": round(time.perf_counter() - start, 1)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n_molecules", type=int, default=3000)
    parser.add_argument("--scripts_molecules", type=int, default=1000, help="GEOM-shaped molecules for the scripts' rule (0: skip)")
    parser.add_argument("--datadir", default="qm9/temp")
    parser.add_argument("--null_replicates", type=int, default=50)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="outputs/paper_eval/datasets")
    parser.add_argument("--datasets", default="gaussian,qm9,geom,non_gaussian", help="comma-separated subset of gaussian,qm9,geom,non_gaussian")
    parser.add_argument("--eps_ds", default="0.005,0.01,0.02,0.05,0.07,0.1", help="thresholds for the T*-vs-eps table")
    args = parser.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    gamma = gamma_table_from_flags("polynomial_2", 1000, 1e-5)
    config = PaperConfig(null_replicates=args.null_replicates, bootstrap=0, seed=args.seed, workers=args.workers)
    grid = config.timesteps
    alpha2, sigma2 = alpha2_sigma2(gamma, grid)

    wanted = set(args.datasets.split(","))
    unknown = wanted - {"gaussian", "qm9", "geom", "non_gaussian"}
    if unknown:
        raise SystemExit(f"error: unknown --datasets {sorted(unknown)}; choose from gaussian,qm9,geom,non_gaussian")
    samples = {}
    if "gaussian" in wanted:
        samples["Gaussian control"] = gaussian_control(args.n_molecules, seed=args.seed)
    if "qm9" in wanted:
        qm9 = load_features(DataSpec(datadir=args.datadir), progress=False)
        samples["QM9 (train sample)"] = flat_from_features(qm9, random_subset_rows(qm9.num_atoms, args.n_molecules, args.seed, min_atoms=2))
    if "geom" in wanted:
        geom = geom_shaped_features(args.n_molecules, seed=args.seed)
        samples["GEOM-shaped synthetic"] = flat_from_features(geom)
    if "non_gaussian" in wanted:
        samples["non-Gaussian control"] = non_gaussian_control(args.n_molecules, seed=args.seed)
    report: dict = {"n_molecules": args.n_molecules, "grid": list(grid), "null_replicates": args.null_replicates, "datasets": {}}
    curves = {}
    for name, sample in samples.items():
        conventions = variance_conventions_flat(sample)
        start = time.perf_counter()
        result = evaluate_paper(sample, alpha2, sigma2, conventions, config)
        seconds = time.perf_counter() - start
        curves[name] = {"curves": result["curves"], "T_star": result["T_star"]}
        slug = name.split(" ")[0].lower()
        pd.DataFrame({k: np.asarray(v) for k, v in result["curves"].items()}).to_csv(out / f"curves_{slug}.csv", index=False, float_format="%.6g")
        eps_rows = []
        for eps in [float(e) for e in args.eps_ds.split(",")]:
            row = {"eps_ds": eps}
            for c in result["per_convention"]:
                t_ds = first_below(result["curves"][f"D_{c}"], np.asarray(grid), eps)
                row[c] = t_star(result["T_ID"], t_ds)
            eps_rows.append(row)
        report["datasets"][name] = {
            "seconds": round(seconds, 1), "n_atoms": result["n_atoms"], "eps_ds": result["eps_ds"], "eps_dep": result["eps_dep"],
            "H2_t0": float(result["curves"]["H2"][0]), "H4_t0": float(result["curves"]["H4"][0]),
            "H4_null": float(result["curves"]["H4_null"][0]), "T_ID": result["T_ID"],
            "per_convention": {c: {"v_hat": r["v_hat"][0] if c != "per_modality" else [r["v_hat"][0], r["v_hat"][3]],
                                   "T_DS": r["T_DS"], "T_star": r["T_star"]} for c, r in result["per_convention"].items()},
            "T_star_vs_eps_ds": eps_rows,
        }
        print("  T* against eps_DS (eps_dep at its null value): " + "; ".join(
            f"{r['eps_ds']:g}: " + "/".join(str(r[c]) for c in result["per_convention"]) for r in eps_rows))
        print(f"{name}: {seconds:.1f} s, H4(t=0) {result['curves']['H4'][0]:.2f}, T_ID {result['T_ID']}, "
              + ", ".join(f"T*({c}) {r['T_star']}" for c, r in result["per_convention"].items()), flush=True)
        if name == "GEOM-shaped synthetic" and args.scripts_molecules:
            report["datasets"][name]["scripts_rule"] = scripts_rule(geom, conventions, gamma, grid, args.scripts_molecules, args.workers)
            print(f"  scripts' rule ({args.scripts_molecules} molecules): {report['datasets'][name]['scripts_rule']}", flush=True)

    from gaga.plots_paper import plot_h_datasets

    plot_h_datasets(curves, out / "h_along_t.png", title=f"H along t ({args.n_molecules} molecules each; T* with v^ unbiased)")
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = ["| data set | H^(2) at t=0 | H^(4) at t=0 | T_ID | T* rms | T* variance | T* unbiased | T* per-modality | wall |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in report["datasets"].items():
        pc = r["per_convention"]
        lines.append(f"| {name} | {r['H2_t0']:.2f} | {r['H4_t0']:.2f} | {r['T_ID']} | {pc['rms']['T_star']} | {pc['variance']['T_star']} | "
                     f"{pc['unbiased']['T_star']} | {pc['per_modality']['T_star']} | {r['seconds']} s |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
