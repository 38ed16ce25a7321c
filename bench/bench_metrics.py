"""Time EDM's metrics on QM9-sized molecules, or report the metrics of QM9's own molecules.

    python bench/bench_metrics.py                  # seconds for 10,000 molecules (JSON)
    python bench/bench_metrics.py --data-metrics   # atom/molecule stability, validity,
                                                   # uniqueness, novelty of the test split

Molecules are real QM9 test molecules (``qm9.data.qm9.load_qm9``).  The benchmark times
them as they are and with Gaussian noise on the coordinates (like an imperfect
generator: more unstable and invalid molecules, more fragments).  Novelty uses the
training SMILES, computed once from the training structures and cached under --datadir.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import time
from pathlib import Path

import numpy as np

try:  # installed (`pip install -e .`): the packages import as they are
    import configs  # noqa: F401
except ImportError:  # a plain checkout: import from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from configs.datasets_config import get_dataset_info  # noqa: E402
from qm9.analyze import analyze_stability_for_molecules  # noqa: E402
from qm9.rdkit_functions import default_training_smiles_path, get_training_smiles  # noqa: E402


def load_split(datadir: str, split: str, remove_h: bool) -> dict[str, np.ndarray]:
    try:
        from qm9.data.qm9 import load_qm9
    except ImportError as e:
        raise SystemExit(f"QM9 loader unavailable ({e}); this benchmark needs qm9/data/qm9.py") from None
    return load_qm9(datadir=datadir, split=split, remove_h=remove_h, progress=False)


def molecule_list(arrays: dict[str, np.ndarray], n: int | None = None, noise: float = 0.0, seed: int = 0) -> dict[str, np.ndarray]:
    """EDM's molecule dict {'one_hot', 'x', 'node_mask'} of the first n molecules."""
    count = len(arrays["num_atoms"]) if n is None else n
    if count > len(arrays["num_atoms"]):
        raise SystemExit(f"asked for {count} molecules but the split has {len(arrays['num_atoms'])}")
    positions = arrays["positions"][:count].astype(np.float32)
    if noise:
        positions = positions + np.random.default_rng(seed).normal(0.0, noise, positions.shape).astype(np.float32)
    mask = np.arange(positions.shape[1])[None, :] < arrays["num_atoms"][:count, None]
    return {"one_hot": arrays["one_hot"][:count], "x": positions, "node_mask": mask}


def training_smiles(datadir: str, info: dict, remove_h: bool) -> tuple[list[str], float]:
    start = time.perf_counter()
    smiles = get_training_smiles(info, load_split(datadir, "train", remove_h), default_training_smiles_path(datadir, info))
    return smiles, time.perf_counter() - start


def evaluate(molecules: dict, info: dict, train_smiles: list[str]) -> tuple[dict, float]:
    start = time.perf_counter()
    validity_dict, (rdkit_metrics, unique) = analyze_stability_for_molecules(molecules, info, dataset_smiles_list=train_smiles)
    seconds = time.perf_counter() - start
    validity, uniqueness, novelty = rdkit_metrics
    metrics = {
        "atom_stability": validity_dict["atm_stable"],
        "molecule_stability": validity_dict["mol_stable"],
        "validity": validity,
        "uniqueness": uniqueness,
        "novelty": novelty,
        "validity_x_uniqueness": validity * uniqueness,
    }
    return metrics, seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datadir", default="qm9/temp", help="QM9 cache folder (default: qm9/temp)")
    parser.add_argument("--n", type=int, default=10000, help="molecules to time (default 10000)")
    parser.add_argument("--noise", type=float, default=0.1, help="coordinate noise (Angstrom) for the noisy timing")
    parser.add_argument("--remove_h", action="store_true", help="QM9 without hydrogens")
    parser.add_argument("--data-metrics", action="store_true", help="report the metrics of the test split's own molecules")
    parser.add_argument("--split", default="test", choices=["train", "valid", "test"], help="split for --data-metrics")
    args = parser.parse_args(argv)

    info = get_dataset_info("qm9", args.remove_h)
    train_smiles, smiles_seconds = training_smiles(args.datadir, info, args.remove_h)
    arrays = load_split(args.datadir, args.split if args.data_metrics else "test", args.remove_h)
    report: dict = {"dataset": "qm9_without_h" if args.remove_h else "qm9_with_h",
                    "training_smiles": {"count": len(train_smiles), "seconds_to_get": round(smiles_seconds, 2)}}
    with contextlib.redirect_stdout(io.StringIO()):  # BasicMolecularMetrics prints EDM's lines
        if args.data_metrics:
            metrics, seconds = evaluate(molecule_list(arrays), info, train_smiles)
            report.update({"split": args.split, "n_molecules": int(len(arrays["num_atoms"])), "seconds": round(seconds, 2),
                           "metrics": {k: round(v, 5) for k, v in metrics.items()}})
        else:
            for label, noise in (("qm9_test_molecules", 0.0), (f"with_noise_{args.noise}A", args.noise)):
                metrics, seconds = evaluate(molecule_list(arrays, args.n, noise), info, train_smiles)
                report[label] = {"n_molecules": args.n, "seconds": round(seconds, 2),
                                 "metrics": {k: round(v, 4) for k, v in metrics.items()}}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
