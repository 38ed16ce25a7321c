"""Benchmark of the Gaussianity tests: seconds per molecule for the default 11-point grid.

    python bench/bench_gaussianity.py [--n_molecules 1000] [--workers 1 2]

Times run_gaussianity_test end to end (noising, KS, KSG MI, CSV writes; data loading
excluded) on a seeded random subset of the QM9 train split, and prints one JSON object.
The reference scripts take about 1.5 s per molecule on 2 cores; the target is < 0.1 s.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

try:  # installed (`pip install -e .`): the packages import as they are
    import configs  # noqa: F401
except ImportError:  # a plain checkout: import from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gaga.data import DataSpec, load_features  # noqa: E402
from gaga.gaussianity import GaussianityConfig  # noqa: E402
from gaga.gaussianity_run import run_gaussianity_test  # noqa: E402
from gaga.schedule import gamma_table_from_flags  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n_molecules", type=int, default=1000)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--datadir", default="qm9/temp")
    args = parser.parse_args()

    features = load_features(DataSpec(datadir=args.datadir), progress=False)
    gamma = gamma_table_from_flags("polynomial_2", 1000, 1e-5)
    config = GaussianityConfig()
    report = {"n_molecules": args.n_molecules, "timesteps": len(config.timesteps), "cpu_count": os.cpu_count(), "runs": []}
    for workers in args.workers:
        with tempfile.TemporaryDirectory() as out_dir:
            start = time.perf_counter()
            run = run_gaussianity_test(features, gamma, config, out_dir, n_molecules=args.n_molecules, workers=workers, progress=False)
            seconds = time.perf_counter() - start
        report["runs"].append({
            "workers": workers,
            "seconds": round(seconds, 3),
            "s_per_molecule": round(seconds / run["n_computed"], 5),
        })
    print(json.dumps(report))


if __name__ == "__main__":
    main()
