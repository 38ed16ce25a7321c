"""T* estimators from per-molecule, per-timestep pass flags.

Each molecule's first consistent pass is the earliest grid point t_i at which it passes
at t_i and at the next grid point t_{i+1} (GAGA's README: "the GA timestep has
consistently passed the statistical test"); a molecule without two consecutive passes
has none. From these:
  * mean estimator (the README's): the mean of the first consistent passes over the
    molecules that have one; also given as the nearest grid point and the first grid
    point at or above it;
  * quantile estimator: the q-quantile (inverted CDF, so a grid point) over all molecules,
    molecules without a consistent pass counting as +infinity; None if more than 1 - q of
    the molecules never pass consistently within the grid.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from configs.errors import DataError
from gaga.results_files import RESULTS_PATTERN

# Pass-flag columns a results table may hold, and how the report names them.
PASS_COLUMNS = {
    "pass": "all tests",
    "pass_positions": "positions (KS + feature MI)",
    "pass_atom_types": "atom types (KS + feature MI)",
    "pass_mi_atoms": "MI between atoms",
    "pass_ks_positions": "KS positions",
    "pass_ks_atom_types": "KS atom types",
    "pass_mi_features_positions": "MI positions' features",
    "pass_mi_features_atom_types": "MI atom types' features",
}


def load_results(data_root: str | Path) -> pd.DataFrame:
    """All results_atoms_{n}.csv of a folder as one table; one-line errors when there are none."""
    data_root = Path(data_root)
    if not data_root.is_dir():
        raise FileNotFoundError(f"--data_root {data_root} does not exist; run Gaussianity_test.py first (it writes identity_to_gaussian_<test_name>/)")
    tables = []
    for path in sorted(data_root.glob(RESULTS_PATTERN)):
        try:
            table = pd.read_csv(path)
        except pd.errors.EmptyDataError:
            continue
        except (pd.errors.ParserError, UnicodeDecodeError) as e:
            raise DataError(f"{path} is not a readable CSV ({' '.join(str(e).split())}); "
                            "rerun Gaussianity_test.py --resume to repair it") from None
        if not {"index", "t", "pass"} <= set(table.columns):
            raise DataError(f"{path} is not a Gaussianity results file (it lacks the index, t and pass columns)")
        tables.append(check_results_schema(table, path))
    tables = [t for t in tables if len(t)]
    if not tables:
        raise ValueError(f"{data_root} holds no results (no non-empty {RESULTS_PATTERN}); run Gaussianity_test.py --test_name ... first")
    return pd.concat(tables, ignore_index=True)


def check_results_schema(table: pd.DataFrame, path: str | Path) -> pd.DataFrame:
    """Integer ids and timesteps, pass flags exactly 0 or 1: a hand-edited or damaged cell is a one-line
    error naming the file, its line and column (never silently read as True)."""
    out = table.copy()
    for column in ["index", "t", *[c for c in PASS_COLUMNS if c in table.columns]]:
        values = pd.to_numeric(table[column], errors="coerce")
        flags = column in PASS_COLUMNS
        bad = ~values.isin([0, 1]) if flags else ~(values.notna() & np.isfinite(values) & (values == values.round()))
        if bad.any():
            row = int(np.argmax(bad.to_numpy()))
            expected = "0 or 1" if flags else "an integer"
            raise DataError(f"{path}, line {row + 2}, column {column!r}: {table[column].iloc[row]!r} is not {expected}; "
                            "the file was edited or damaged (rerun Gaussianity_test.py)")
        out[column] = values.astype(np.int64)
    return out


def pass_table(results: pd.DataFrame, column: str = "pass") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(molecule ids, sorted grid, (M, T) bool pass flags) from a long results table."""
    wide = results.pivot_table(index="index", columns="t", values=column, aggfunc="first")
    if wide.isna().to_numpy().any():
        missing = int(wide.isna().to_numpy().any(axis=1).sum())
        raise ValueError(f"{missing} molecules lack results at some timesteps; the results mix different grids (rerun Gaussianity_test.py)")
    return wide.index.to_numpy(), wide.columns.to_numpy(dtype=np.int64), wide.to_numpy().astype(bool)


def first_consistent_pass(passes: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Per molecule the earliest grid t passing there and at the next grid point; NaN if none."""
    passes = np.asarray(passes, dtype=bool)
    grid = np.asarray(grid)
    if grid.size < 2:
        raise ValueError("T* needs at least two grid timesteps (a pass must hold at two consecutive ones)")
    consecutive = passes[:, :-1] & passes[:, 1:]
    first = grid[:-1][consecutive.argmax(axis=1)].astype(np.float64)
    first[~consecutive.any(axis=1)] = np.nan
    return first


def check_quantile(quantile: float) -> float:
    if not 0.0 < float(quantile) < 1.0:
        raise ValueError(f"--quantile must lie strictly between 0 and 1, got {quantile}")
    return float(quantile)


def estimate_t_star(first: np.ndarray, grid: np.ndarray, quantile: float = 0.95) -> dict:
    """Mean and quantile estimators of T* from first consistent passes (NaN = never)."""
    quantile = check_quantile(quantile)
    grid = np.asarray(grid)
    passing = first[~np.isnan(first)]
    mean = float(passing.mean()) if passing.size else None
    nearest = ceil = None
    if mean is not None:
        nearest = int(grid[np.argmin(np.abs(grid - mean))])
        at_or_above = grid[grid >= mean - 1e-9]
        ceil = int(at_or_above[0]) if at_or_above.size else None
    q_value = float(np.quantile(np.where(np.isnan(first), np.inf, first), quantile, method="inverted_cdf"))
    return {
        "t_star_mean": mean,
        "t_star_mean_nearest_grid": nearest,
        "t_star_mean_ceil_grid": ceil,
        "quantile": quantile,
        "t_star_quantile": int(q_value) if np.isfinite(q_value) else None,
        "n_molecules": int(first.size),
        "n_without_consistent_pass": int(np.isnan(first).sum()),
        "grid": [int(t) for t in grid],
    }


def step_estimates(results: pd.DataFrame, quantile: float = 0.95) -> dict[str, dict]:
    """T* estimates for every pass column present ('pass' = all tests, then per modality/test)."""
    check_quantile(quantile)
    out = {}
    for column in PASS_COLUMNS:
        if column in results.columns:
            _, grid, passes = pass_table(results, column)
            out[column] = estimate_t_star(first_consistent_pass(passes, grid), grid, quantile)
    return out


def per_timestep_summary(results: pd.DataFrame) -> pd.DataFrame:
    """Mean of every statistic and pass flag per timestep (rows: t)."""
    numeric = results.drop(columns=[c for c in ("index", "split_row", "n_atoms", "chunk") if c in results.columns])
    return numeric.groupby("t").mean()


def first_pass_histogram(results: pd.DataFrame, column: str = "pass") -> dict[str, int]:
    """How many molecules first pass consistently at each grid point ('never' for none)."""
    _, grid, passes = pass_table(results, column)
    first = first_consistent_pass(passes, grid)
    counts = {str(int(t)): int((first == t).sum()) for t in grid[:-1]}
    counts["never"] = int(np.isnan(first).sum())
    return counts
