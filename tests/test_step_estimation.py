"""T* estimation from hand-written pass tables, and GAGA_step_estimation.py's inputs."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from gaga.step_estimation import (
    estimate_t_star,
    first_consistent_pass,
    first_pass_histogram,
    load_results,
    pass_table,
    step_estimates,
)

GRID = np.array([300, 350, 400, 450, 500])
# molecule -> pass flags on GRID, and its first consistent pass (two consecutive grid points)
TABLE = {
    10: ([0, 1, 1, 1, 1], 350),
    11: ([1, 0, 1, 1, 0], 400),  # a lone pass at 300 does not count
    12: ([1, 1, 0, 0, 0], 300),  # passing and failing later still counts from 300
    13: ([0, 0, 0, 0, 1], None),  # a pass at the last grid point alone is not consistent
    14: ([0, 1, 0, 1, 0], None),
}


def long_table(table: dict, column: str = "pass") -> pd.DataFrame:
    rows = [{"index": m, "n_atoms": 9, "t": int(t), column: flag} for m, (flags, _) in table.items() for t, flag in zip(GRID, flags)]
    return pd.DataFrame(rows)


def test_first_consistent_pass_on_a_hand_written_table():
    passes = np.array([flags for flags, _ in TABLE.values()], dtype=bool)
    first = first_consistent_pass(passes, GRID)
    expected = [np.nan if t is None else t for _, t in TABLE.values()]
    np.testing.assert_array_equal(first, expected)


def test_mean_and_quantile_estimators():
    first = np.array([350, 400, 300, np.nan, np.nan])
    est = estimate_t_star(first, GRID, quantile=0.5)
    assert est["t_star_mean"] == pytest.approx(350.0)  # over the molecules that pass: (350 + 400 + 300) / 3
    assert est["t_star_mean_nearest_grid"] == 350 and est["t_star_mean_ceil_grid"] == 350
    assert est["t_star_quantile"] == 400  # sorted 300, 350, 400, inf, inf: the median is 400
    assert est["n_without_consistent_pass"] == 2 and est["n_molecules"] == 5
    # the 0.95 quantile falls among the molecules that never pass consistently
    assert estimate_t_star(first, GRID, quantile=0.95)["t_star_quantile"] is None
    assert estimate_t_star(np.array([300.0, 350.0, 350.0, 400.0]), GRID, 0.5)["t_star_mean_nearest_grid"] == 350
    assert estimate_t_star(np.array([300.0, 400.0, 400.0, 400.0]), GRID, 0.5)["t_star_mean_ceil_grid"] == 400  # mean 375
    assert estimate_t_star(np.array([np.nan]), GRID, 0.5)["t_star_mean"] is None


def test_estimates_from_a_long_results_table_per_pass_column():
    results = long_table(TABLE)
    results["pass_positions"] = 1  # every molecule passes the positions tests everywhere
    estimates = step_estimates(results, quantile=0.5)
    assert estimates["pass"]["t_star_mean"] == pytest.approx(350.0)
    assert estimates["pass_positions"]["t_star_mean"] == 300.0 and estimates["pass_positions"]["t_star_quantile"] == 300
    assert "pass_atom_types" not in estimates
    ids, grid, passes = pass_table(results)
    assert list(ids) == list(TABLE) and list(grid) == list(GRID) and passes.shape == (5, 5)
    counts = first_pass_histogram(results)
    assert counts == {"300": 1, "350": 1, "400": 1, "450": 0, "never": 2}


@pytest.mark.parametrize("quantile", [0.0, 1.0, -0.1, 1.5])
def test_quantile_must_lie_in_the_open_unit_interval(quantile):
    with pytest.raises(ValueError, match="--quantile"):
        estimate_t_star(np.array([300.0]), GRID, quantile)


def test_a_single_grid_point_cannot_give_a_consistent_pass():
    with pytest.raises(ValueError, match="two grid timesteps"):
        first_consistent_pass(np.ones((3, 1), bool), np.array([550]))


def test_mixed_grids_are_refused():
    results = long_table(TABLE)
    results = results[~((results["index"] == 10) & (results["t"] == 400))]
    with pytest.raises(ValueError, match="lack results"):
        pass_table(results)


def test_load_results_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_results(tmp_path / "missing")
    with pytest.raises(ValueError, match="holds no results"):
        load_results(tmp_path)
    (tmp_path / "results_atoms_9.csv").write_text("")
    with pytest.raises(ValueError, match="holds no results"):
        load_results(tmp_path)
    (tmp_path / "results_atoms_9.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="not a Gaussianity results file"):
        load_results(tmp_path)


def test_step_estimation_cli(tmp_path, capsys):
    import GAGA_step_estimation

    results = long_table(TABLE)
    for n, part in ((9, results[results["index"] < 12]), (10, results[results["index"] >= 12])):
        part.assign(n_atoms=n).to_csv(tmp_path / f"results_atoms_{n}.csv", index=False)
    GAGA_step_estimation.main(["--data_root", str(tmp_path), "--quantile", "0.5", "--no_plot"])
    printed = capsys.readouterr().out
    assert "T* = 350.0" in printed
    saved = json.loads((tmp_path / "gaga_step.json").read_text())
    assert saved["t_star"]["pass"]["t_star_quantile"] == 400

    with pytest.raises(SystemExit) as exit_info:
        GAGA_step_estimation.main(["--data_root", str(tmp_path / "nothing")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err
