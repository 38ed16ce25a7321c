"""Names of the files in a Gaussianity results folder (identity_to_gaussian_<test_name>/)."""
from __future__ import annotations

from pathlib import Path

RESULTS_PATTERN = "results_atoms_*.csv"
CONFIG_FILE = "config.json"


def results_path(out_dir: str | Path, n_atoms: int) -> Path:
    """The CSV holding every tested molecule with n_atoms atoms."""
    return Path(out_dir) / f"results_atoms_{n_atoms}.csv"
