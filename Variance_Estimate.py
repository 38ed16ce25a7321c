"""GAGA step 1: per-molecule and dataset variance of the centred, normalised features.

    python Variance_Estimate.py --model_path outputs/edm_qm9_GA_550 --test_name QM9
    python Variance_Estimate.py --dataset qm9 --test_name QM9          # no run needed
    python Variance_Estimate.py --model_path outputs/edm_geom_drugs_GA_650 --test_name GEOM
    python Variance_Estimate.py --dataset geom --datadir data/geom --test_name GEOM --n_molecules 500000
    python Variance_Estimate.py --model_path outputs/geoldm_qm9 --test_name GeoLDM --n_molecules 5000   # latents

Writes <out_dir>/per_molecule.csv (sorted by atom count), by_atom_count.csv and
variance.json, and prints the table. See gaga/variance.py for the definitions.
GEOM-Drugs is read in bounded pieces (gaga/geom_features.py), so the whole train split
fits in memory; --n_molecules takes a seeded random sample instead (GAGA's README: 10%).
A GeoLDM run (--model_path) is analysed in its latent space: the molecules are encoded by the
run's encoder first (gaga/latent.py; only the --n_molecules sample is encoded); --space data
analyses the molecules themselves.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pandas as pd

from configs.flags import compact_errors
from gaga.cli import add_source_flags, check_output_folder, check_source_flags, one_line_errors, resolve_data_spec, source_record
from gaga.data import load_features, random_subset_rows
from gaga.latent import add_space_flag, analysis_features
from gaga.variance import dataset_statistics, per_molecule_table, statistics_by_atom_count

LABELS = {"rms": "mean RMS (README)", "mean_square": "variance (mean sq.)", "unbiased_var": "unbiased var (paper)"}


def parse_args(argv=None) -> argparse.Namespace:
    parser = compact_errors(argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                                    formatter_class=argparse.ArgumentDefaultsHelpFormatter))
    add_source_flags(parser, schedule=False)
    parser.add_argument("--test_name", default="QM9", help="name of this analysis (output folder)")
    parser.add_argument("--out_dir", default=None, help="default outputs/variance_<test_name>")
    parser.add_argument("--n_molecules", type=int, default=None, help="seeded random subset of the split (default: all)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the --n_molecules subset")
    add_space_flag(parser)
    parser.add_argument("--no_progress", action="store_true")
    return parser.parse_args(argv)


def format_table(stats: dict[str, dict[str, float]]) -> str:
    header = f"{'features':<12}" + "".join(f"{LABELS[s]:>22}" for s in LABELS)
    lines = [header, "-" * len(header)]
    for modality, values in stats.items():
        lines.append(f"{modality:<12}" + "".join(f"{values[s]:>22.6f}" for s in LABELS))
    return "\n".join(lines)


@one_line_errors
def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    check_source_flags(args)
    spec = resolve_data_spec(args)
    out_dir = Path(args.out_dir or f"outputs/variance_{args.test_name}")
    check_output_folder(str(out_dir))
    features, latent = analysis_features(args, spec, n_molecules=args.n_molecules, seed=args.seed,
                                          load_data=load_features)
    if args.n_molecules is not None and latent is None:  # latents: only the sample was encoded
        features = features.subset(random_subset_rows(features.num_atoms, args.n_molecules, args.seed))
    out_dir.mkdir(parents=True, exist_ok=True)

    columns = per_molecule_table(features)
    table = pd.DataFrame(columns).sort_values(["n_atoms", "index"], kind="stable")
    table.to_csv(out_dir / "per_molecule.csv", index=False, float_format="%.8g")
    pd.DataFrame(statistics_by_atom_count(features, columns)).to_csv(out_dir / "by_atom_count.csv", index=False, float_format="%.8g")
    stats = dataset_statistics(features, columns)
    dataset_var = stats["all"]["rms"]
    source = source_record(args, spec)
    if args.n_molecules is not None:
        source.update(n_molecules=args.n_molecules, seed=args.seed)
    if latent is not None:
        source.update(latent)
    summary = {
        "test_name": args.test_name,
        "n_molecules": len(features),
        "source": source,
        "features": {k: [v.start, v.stop] for k, v in features.channels.items()},
        "statistics": stats,
        "dataset_var": dataset_var,
        "dataset_var_note": (
            "--dataset_var (GAGA_test.py, Gaussianity_test.py) is used as v in v_t = alpha_t^2 v + sigma_t^2. "
            "GAGA's README passes the mean per-molecule RMS of all features (statistics.all.rms, QM9: 0.848); "
            "the variance proper of all features is statistics.all.mean_square."
        ),
        "seconds": round(time.perf_counter() - start, 2),
    }
    (out_dir / "variance.json").write_text(json.dumps(summary, indent=2) + "\n")

    sample = f" (random sample, seed {args.seed})" if args.n_molecules is not None else ""
    if latent is None:
        print(f"{args.test_name}: {len(features)} molecules{sample} of the {args.split} split; features = positions/{spec.normalize_factors[0]:g}, "
              f"one-hot/{spec.normalize_factors[1]:g}" + (f", charges/{spec.normalize_factors[2]:g}" if spec.include_charges else "")
              + ", each channel centred per molecule")
    else:
        print(f"{args.test_name}: {len(features)} molecules{sample} of the {args.split} split; features = GeoLDM latents "
              f"(encoder mean): positions (3) and latent h ({latent['latent_nf']}), each channel centred per molecule, unscaled")
    print(format_table(stats))
    print(f"\n--dataset_var {dataset_var:.3f}   (the README's statistic: mean over molecules of the RMS of all features;"
          f" it enters v_t = alpha_t^2 v + sigma_t^2 as a variance. The variance proper is {stats['all']['mean_square']:.3f}.)")
    print(f"saved {out_dir}/per_molecule.csv, by_atom_count.csv, variance.json ({summary['seconds']:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
