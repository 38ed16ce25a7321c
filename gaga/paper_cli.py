"""``Gaussianity_test.py --evaluator paper``: flags -> gaga.evaluator_paper.run_paper_evaluator -> printout."""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from gaga.cli import source_record
from gaga.data import DataSpec
from gaga.evaluator_paper import PAPER_DEFAULT_MOLECULES, PaperConfig, format_paper_report, resolve_convention, run_paper_evaluator
from gaga.latent import analysis_features


def parse_sizes(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        sizes = [int(s) for s in str(text).replace(" ", "").split(",") if s]
    except ValueError:
        raise ValueError(f"cannot read --size_sweep {text!r}; use molecule counts like 500,1000,2000") from None
    if not sizes or min(sizes) < 10:
        raise ValueError(f"--size_sweep needs molecule counts >= 10, got {text!r}")
    return sizes


def paper_main(args: argparse.Namespace, spec: DataSpec, gamma: np.ndarray, grid: list[int]) -> int:
    if args.resume:
        raise ValueError("--resume applies to the per-molecule evaluator; the paper evaluator reruns in minutes (drop --resume)")
    start = time.perf_counter()
    sizes = parse_sizes(args.size_sweep)
    config = PaperConfig(
        timesteps=tuple(grid), convention=resolve_convention(args.convention), eps_dep=args.eps_dep, eps_ds=args.eps_ds,
        null_alpha=args.null_alpha, null_replicates=args.null_replicates, bootstrap=args.bootstrap,
        mi_neighbors=args.mi_neighbors, mi_samples=args.mi_samples, h_samples=args.h_samples, seed=args.seed,
        workers=max(1, args.workers),
    )
    config.validate()
    n_molecules = PAPER_DEFAULT_MOLECULES if args.n_molecules is None else args.n_molecules
    # A GeoLDM run: only the sample is encoded (every statistic is then over it); data: as loaded.
    features, latent = analysis_features(args, spec, n_molecules=n_molecules, seed=args.seed)
    out_dir = Path(args.out_dir or f"identity_to_gaussian_{args.test_name}")
    record = {"source": source_record(args, spec)}
    if latent is not None:
        record["source"].update(latent)
    result = run_paper_evaluator(
        features, gamma, config, out_dir, n_molecules=n_molecules, dataset_var=args.dataset_var, size_sweep_sizes=sizes,
        plot=not args.no_plot, progress=not args.no_progress, title=f"{args.test_name}: paper evaluator",
        extra_record=record,
    )
    seconds = time.perf_counter() - start
    print(f"{args.test_name}: {result['n_molecules']} molecules ({result['n_atoms']} atoms) x {len(grid)} timesteps "
          f"in {seconds:.1f} s; MI on {result['n_mi_samples']} molecules, {config.null_replicates} null replicates, "
          f"{config.bootstrap} bootstrap replicates")
    curves = result["curves"]
    primary = result["convention"]
    print(f"{'t':>5} {'Dep':>8} {'D_' + primary:>12} {'H2':>7} {'H4':>7}")
    for i, t in enumerate(curves["t"]):
        print(f"{int(t):>5} {curves['Dep'][i]:>8.4f} {curves['D_' + primary][i]:>12.4f} {curves['H2'][i]:>7.3f} {curves['H4'][i]:>7.3f}")
    print(format_paper_report(result["report"]))
    for row in result.get("size_sweep") or []:
        print(f"n = {row['n_molecules']:>6}: eps_dep {row['eps_dep']:.4g}, eps_DS {row['eps_ds']:.4g}, T_ID {row['T_ID']}, "
              + ", ".join(f"T*({k[len('T_star_'):]}) {v}" for k, v in row.items() if k.startswith("T_star_")))
    summary_path = out_dir / "paper_run_summary.json"
    summary_path.write_text(json.dumps({"seconds": round(seconds, 2), "T_star": result["T_star"], "T_ID": result["T_ID"],
                                        "T_DS": result["T_DS"], "convention": primary}, indent=2) + "\n")
    print(f"results: {out_dir}/paper_evaluator.json, {out_dir}/paper_curves.csv; plots: "
          + ", ".join(v for k, v in result["paths"].items() if k.startswith("plot")))
    return 0
