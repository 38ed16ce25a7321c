"""The paper's dataset-level Gaussianity evaluator (gaga/evaluator_paper.py): its statistics
against closed forms and reference implementations, known answers on synthetic controls,
the files, and the --evaluator paper / GAGA_step_estimation.py command lines."""
from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
from scipy import special, stats

from gaga.evaluator_paper import (
    FlatSample,
    PaperConfig,
    centre_flat,
    evaluate_paper,
    first_below,
    first_staying_below,
    flat_from_features,
    read_paper_results,
    t_star_vs_eps,
    variance_conventions_flat,
    variance_conventions_from_table,
    write_paper_results,
)
from gaga.paper_stats import gaussianity_functional, ks_distance_sorted, ksg_terms
from gaga.schedule import alpha2_sigma2, gamma_table_from_flags, variance_at
from gaga.stat_tests import ksg_mutual_information
from gaga.synthetic import gaussian_control, geom_shaped_features, non_gaussian_control
from gaga.variance import per_molecule_table

GAMMA = gamma_table_from_flags("polynomial_2", 1000, 1e-5)
GRID = (0, 250, 500, 750, 1000)
FAST = PaperConfig(timesteps=GRID, null_replicates=20, bootstrap=0, mi_samples=400, h_samples=400, null_alpha=0.01)


def schedule(grid=GRID):
    return alpha2_sigma2(GAMMA, grid)


# --- statistics --------------------------------------------------------------------------------

@pytest.mark.parametrize("n,k", [(30, 3), (200, 3), (150, 1), (120, 5)])
def test_tree_ksg_equals_the_dense_estimator_that_matches_sklearn(n, k):
    rng = np.random.default_rng(n)
    x = rng.normal(size=(4, n)) * rng.uniform(0.1, 10, size=(4, 1))
    y = 0.6 * x + rng.normal(size=(4, n))
    y[0] = rng.normal(size=n)
    mi, terms = ksg_terms(x, y, k=k, rng=np.random.default_rng(7))
    np.testing.assert_allclose(mi, ksg_mutual_information(x, y, k=k, rng=np.random.default_rng(7)), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(np.maximum(special.digamma(n) + special.digamma(k) - terms.mean(axis=1), 0), mi, rtol=1e-12)


def test_mi_is_near_zero_for_independent_and_the_closed_form_for_dependent_pairs():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 4000))
    independent, _ = ksg_terms(x, rng.normal(size=(3, 4000)), rng=rng)
    rho = 0.8
    dependent, _ = ksg_terms(x, rho * x + np.sqrt(1 - rho**2) * rng.normal(size=(3, 4000)), rng=rng)
    assert independent.max() < 0.01
    np.testing.assert_allclose(dependent, -0.5 * np.log(1 - rho**2), atol=0.03)
    # a non-linear dependence with zero correlation is still seen
    nonlinear, _ = ksg_terms(x, x**2 + 0.1 * rng.normal(size=x.shape), rng=rng)
    assert nonlinear.min() > 0.5


def test_ks_distance_equals_scipy_and_a_known_shift():
    rng = np.random.default_rng(1)
    small = np.sort(rng.normal(0.3, 1.0, size=50))
    assert ks_distance_sorted(small, special.ndtr(small)) == pytest.approx(stats.kstest(small, "norm").statistic, abs=1e-12)
    shift = 0.5  # sup |Phi(x - delta) - Phi(x)| = 2 Phi(delta / 2) - 1
    big = np.sort(rng.normal(shift, 1.0, size=200_000))
    assert ks_distance_sorted(big, special.ndtr(big)) == pytest.approx(2 * special.ndtr(shift / 2) - 1, abs=0.005)


def test_weighted_ks_equals_the_ks_of_the_repeated_sample():
    rng = np.random.default_rng(2)
    x = np.sort(rng.normal(size=40))
    counts = rng.integers(0, 4, size=(3, 40)).astype(np.float64)
    counts[:, 0] += 1
    weighted = ks_distance_sorted(x, special.ndtr(x), counts)
    for r in range(3):
        repeated = np.repeat(x, counts[r].astype(int))
        assert weighted[r] == pytest.approx(stats.kstest(repeated, "norm").statistic, abs=1e-12)


def _explicit_u_norm(tensors: np.ndarray) -> float:
    """||E T||^2 over pairs n != m from per-sample tensors (N, ...)."""
    flat = tensors.reshape(len(tensors), -1)
    total = flat.sum(axis=0)
    return ((total @ total) - (flat * flat).sum()) / (len(flat) * (len(flat) - 1))


def test_gaussianity_functional_equals_explicit_cumulant_tensors():
    rng = np.random.default_rng(3)
    y = np.column_stack([rng.exponential(size=300), rng.normal(size=300), rng.uniform(size=300)])
    y[:, 1] += y[:, 0]
    h = gaussianity_functional(y, beta=2.0, weights={3: 0.5, 4: 0.25})
    z = (y - y.mean(0)) / y.std(0)
    sigma = z.T @ z / len(z)
    outer2 = np.einsum("ni,nj->nij", z, z)
    off = outer2 * (1 - np.eye(3))
    c3 = np.sqrt(_explicit_u_norm(np.einsum("ni,nj,nk->nijk", z, z, z)))
    m4_sq = _explicit_u_norm(np.einsum("ni,nj,nk,nl->nijkl", z, z, z, z))
    s = np.einsum("ij,kl->ijkl", sigma, sigma) + np.einsum("ik,jl->ijkl", sigma, sigma) + np.einsum("il,jk->ijkl", sigma, sigma)
    m4 = np.einsum("ni,nj,nk,nl->ijkl", z, z, z, z) / len(z)
    c4 = np.sqrt(m4_sq - 2 * (m4 * s).sum() + (s * s).sum())
    assert h["cov_offdiag"] == pytest.approx(np.sqrt(_explicit_u_norm(off)), rel=1e-9)
    assert h["c3"] == pytest.approx(c3, rel=1e-9) and h["c4"] == pytest.approx(c4, rel=1e-9)
    assert h["H2"] == pytest.approx(2.0 * h["cov_offdiag"]) and h["H4"] == pytest.approx(h["H2"] + 0.5 * c3 + 0.25 * c4)


def test_gaussianity_functional_is_near_zero_for_gaussian_and_large_for_non_gaussian_data():
    rng = np.random.default_rng(4)
    gaussian = gaussianity_functional(rng.normal(size=(3000, 6)) @ np.diag([1, 2, 3, 4, 5, 6.0]))  # scale-free
    assert gaussian["H4"] < 0.15
    skewed = gaussianity_functional(rng.exponential(size=(3000, 6)))
    assert skewed["c3"] > 4 and skewed["H4"] > 1.0


# --- the closed form and the data --------------------------------------------------------------

def test_papers_v_tilde_is_our_v_t_in_the_vp_schedule():
    grid = np.arange(0, 1001, 50)
    alpha2, sigma2 = schedule(grid)
    np.testing.assert_allclose(alpha2 + sigma2, 1.0, atol=1e-12)  # abar_t = alpha_t^2, sigma_t^2 = 1 - abar_t
    for v in (0.848, 0.727, 0.732):
        np.testing.assert_allclose(1 - alpha2 * (1 - v), variance_at(v, GAMMA, grid), rtol=1e-12)


def test_flat_samples_subset_centre_and_conventions_agree_with_the_variance_module():
    features = geom_shaped_features(60, seed=1, max_atoms=60)
    flat = flat_from_features(features)
    assert flat.n_molecules == 60 and flat.values.shape == (features.num_atoms.sum(), 19)
    np.testing.assert_allclose(np.add.reduceat(flat.values, flat.offsets, axis=0), 0, atol=1e-9)  # centred per molecule
    table_conv = variance_conventions_from_table(per_molecule_table(features), features.channels, features.n_channels)
    flat_conv = variance_conventions_flat(flat)
    for name in table_conv:
        np.testing.assert_allclose(flat_conv[name], table_conv[name], rtol=1e-10)
    sub = flat.subset(np.array([5, 2]))
    np.testing.assert_array_equal(sub.values, np.concatenate([features.values[5, : features.num_atoms[5]], features.values[2, : features.num_atoms[2]]]))
    eps = np.random.default_rng(0).normal(size=flat.values.shape)
    np.testing.assert_allclose(np.add.reduceat(centre_flat(eps, flat.sizes), flat.offsets, axis=0), 0, atol=1e-9)


def test_flat_sample_from_features_served_in_blocks_as_geom_serves_them():
    """GEOM's on-demand features come in several dense blocks (sorted by size); the flat sample keeps every molecule once."""
    from gaga.data import Features

    dense = geom_shaped_features(30, seed=2, max_atoms=40)

    class Blocked(Features):
        def subset(self, rows):
            f = Features.subset(self, rows)
            return Blocked(f.values, f.mask, f.num_atoms, f.index, f.channels)

        def blocks(self):
            order = np.argsort(self.num_atoms, kind="stable")
            for part in (order[::2], order[1::2]):
                yield part, Features.subset(self, part)

    blocked = Blocked(dense.values, dense.mask, dense.num_atoms, dense.index, dense.channels)
    rows = np.array([3, 7, 8, 20, 21, 29])
    flat = flat_from_features(blocked, rows)
    whole = flat_from_features(dense, rows)
    assert sorted(flat.index.tolist()) == sorted(whole.index.tolist()) == dense.index[rows].tolist()
    for i, mol in enumerate(flat.index):
        j = int(np.flatnonzero(whole.index == mol)[0])
        np.testing.assert_array_equal(flat.subset(np.array([i])).values, whole.subset(np.array([j])).values)


def test_geom_shaped_data_has_geoms_sizes_types_and_scale():
    features = geom_shaped_features(400, seed=0)
    assert features.channels == {"positions": slice(0, 3), "atom_types": slice(3, 19)}
    assert 35 < features.num_atoms.mean() < 55 and features.num_atoms.min() >= 3
    types = features.values[..., 3:].argmax(axis=-1)[features.mask]  # centring keeps the hot entry the largest
    fractions = np.bincount(types, minlength=16) / types.size
    assert fractions[0] == pytest.approx(0.446, abs=0.03) and fractions[2] == pytest.approx(0.40, abs=0.03)  # H, C
    rms = variance_conventions_flat(flat_from_features(features))["rms"][0]
    assert 0.8 < rms < 1.1  # GEOM-Drugs' published v = 0.952 is this statistic


# --- known answers of the evaluator ------------------------------------------------------------

def test_exactly_gaussian_data_gives_t_star_at_the_first_grid_point_and_h_at_the_null():
    sample = gaussian_control(400, seed=0)
    conventions = variance_conventions_flat(sample)
    result = evaluate_paper(sample, *schedule(), conventions, FAST)
    for name, record in result["per_convention"].items():
        assert record["T_star"] == GRID[0], name
    curves = result["curves"]
    assert (curves["H4"] <= 3 * curves["H4_null"] + 0.05).all()
    assert (curves["D_unbiased"] <= result["eps_ds"]).all() and (curves["Dep"] <= result["eps_dep"]).all()


def test_strongly_non_gaussian_data_is_gaussian_only_late_and_h_orders_the_data_sets():
    gaussian = gaussian_control(400, seed=1)
    bimodal = non_gaussian_control(400, seed=1)
    res_g = evaluate_paper(gaussian, *schedule(), variance_conventions_flat(gaussian), FAST)
    res_b = evaluate_paper(bimodal, *schedule(), variance_conventions_flat(bimodal), FAST)
    assert res_b["curves"]["H4"][0] > 10 * max(res_g["curves"]["H4"][0], 0.1)
    assert res_b["T_ID"] >= 500 and res_b["per_convention"]["variance"]["T_star"] >= 750
    assert res_g["per_convention"]["variance"]["T_star"] < res_b["per_convention"]["variance"]["T_star"]
    # D_t and Dep decrease along the forward process
    assert res_b["curves"]["D_variance"][0] > res_b["curves"]["D_variance"][2] > res_b["curves"]["D_variance"][-1]


def test_a_wrong_variance_convention_delays_t_ds_and_the_null_is_scale_free():
    sample = gaussian_control(400, seed=2)
    conventions = {"variance": np.ones(8), "too_small": np.full(8, 0.25)}
    result = evaluate_paper(sample, *schedule(), conventions, replace(FAST, convention="variance"))
    assert result["per_convention"]["variance"]["T_DS"] == 0
    assert result["per_convention"]["too_small"]["T_DS"] > 0  # N(0, 1) data vs N(0, 0.25) at small t
    scaled = FlatSample(sample.values * 7.0, sample.sizes, sample.channels, centred=False)
    again = evaluate_paper(scaled, *schedule(), {"variance": np.full(8, 49.0)}, replace(FAST, convention="variance"))
    assert again["eps_ds"] == pytest.approx(result["eps_ds"]) and again["eps_dep"] == pytest.approx(result["eps_dep"])


def test_rules_thresholds_bootstrap_and_eps_table():
    grid = np.array([0, 100, 200, 300])
    assert first_below(np.array([0.5, 0.2, 0.05, 0.3]), grid, 0.1) == 200
    assert first_staying_below(np.array([0.05, 0.2, 0.05, 0.03]), grid, 0.1) == 200
    assert first_below(np.array([0.5, 0.4, 0.3, 0.2]), grid, 0.1) is None
    sample = non_gaussian_control(300, seed=3)
    config = replace(FAST, bootstrap=20, eps_ds=0.05, eps_dep=0.02)
    result = evaluate_paper(sample, *schedule(), variance_conventions_flat(sample), config)
    assert result["eps_source"] == {"ds": "given", "dep": "given"} and result["eps_ds"] == 0.05
    c = result["curves"]
    assert (c["D_unbiased_lo"] <= c["D_unbiased_hi"]).all() and (c["Dep_lo"] <= c["Dep_hi"]).all()
    lo, hi = result["T_star_bootstrap"]["ci95"]
    assert lo is None or hi is None or lo <= hi
    table = t_star_vs_eps(result)
    ds = table[table["kind"] == "ds"]
    t = pd.to_numeric(ds["T_DS_unbiased"], errors="coerce").fillna(1e9).to_numpy()
    assert (np.diff(t) <= 0).all(), "a larger threshold is reached no later"


def test_a_whole_run_on_geom_shaped_molecules_with_a_given_dataset_var(tmp_path):
    from gaga.evaluator_paper import run_paper_evaluator

    features = geom_shaped_features(120, seed=5, max_atoms=50)
    config = replace(FAST, null_replicates=5, mi_samples=100, h_samples=100, bootstrap=5)
    result = run_paper_evaluator(features, GAMMA, config, tmp_path, n_molecules=100, dataset_var=0.952,
                                 size_sweep_sizes=[50], plot=False, progress=False)
    assert result["convention"] == "given" and result["per_convention"]["given"]["v_hat"][0] == 0.952
    assert set(result["per_convention"]) == {"rms", "variance", "unbiased", "per_modality", "given"}
    assert result["n_molecules"] == 100 and [row["n_molecules"] for row in result["size_sweep"]] == [50, 100]
    report = read_paper_results(tmp_path)
    assert report["convention"] == "given" and report["T_star"] == result["T_star"]


# --- files and command lines -------------------------------------------------------------------

def test_results_round_trip_and_thresholds_can_be_changed_afterwards(tmp_path):
    sample = non_gaussian_control(300, seed=4)
    result = evaluate_paper(sample, *schedule(), variance_conventions_flat(sample), FAST)
    write_paper_results(tmp_path, result, FAST)
    report = read_paper_results(tmp_path)
    assert report["T_star"] == result["T_star"] and report["per_convention"]["rms"]["T_ID"] == result["T_ID"]
    loose = read_paper_results(tmp_path, eps_dep=10.0, eps_ds=10.0)
    assert loose["T_star"] == GRID[0] and loose["eps_source"] == {"ds": "given", "dep": "given"}
    (tmp_path / "paper_curves.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="not a paper-evaluator curves file"):
        read_paper_results(tmp_path)


def test_paper_evaluator_cli_on_a_tiny_qm9_subset(qm9_datadir, tmp_path, capsys):
    import GAGA_step_estimation
    import Gaussianity_test

    out = tmp_path / "identity_to_gaussian_paper"
    Gaussianity_test.main([
        "--evaluator", "paper", "--datadir", str(qm9_datadir), "--n_molecules", "80", "--timesteps", "0,500,1000",
        "--out_dir", str(out), "--workers", "1", "--no_progress", "--null_replicates", "4", "--bootstrap", "5",
        "--mi_samples", "60", "--h_samples", "60", "--size_sweep", "40",
    ])
    printed = capsys.readouterr().out
    assert "T_ID" in printed and "per_modality" in printed and "n =     40" in printed
    record = json.loads((out / "paper_evaluator.json").read_text())
    assert record["n_molecules"] == 80 and set(record["per_convention"]) == {"rms", "variance", "unbiased", "per_modality"}
    assert record["per_convention"]["rms"]["v_hat"][0] == pytest.approx(0.848, abs=0.01)  # the README's statistic
    assert record["per_convention"]["unbiased"]["v_hat"][0] == pytest.approx(0.732, abs=0.01)
    for name in ("paper_curves.csv", "paper_t_star_vs_eps.csv", "paper_evaluator.png", "paper_t_star_vs_eps.png", "paper_t_star_vs_n.png"):
        assert (out / name).stat().st_size > 0, name
    assert not list(out.glob("results_atoms_*.csv")), "the per-molecule CSVs are not written in paper mode"

    GAGA_step_estimation.main(["--data_root", str(out), "--eps_ds", "0.5", "--eps_dep", "5"])
    printed = capsys.readouterr().out
    assert "unbiased" in printed and "T*" in printed
    saved = json.loads((out / "gaga_step.json").read_text())
    assert saved["paper"]["T_star"] == 0 and saved["paper"]["eps_ds"] == 0.5


@pytest.mark.parametrize("argv,message", [
    (["--convention", "median"], "unknown variance convention"),
    (["--null_alpha", "1.5"], "--null_alpha"),
    (["--eps_ds", "-1"], "--eps_ds"),
    (["--size_sweep", "20,x"], "--size_sweep"),
    (["--resume"], "drop --resume"),
])
def test_paper_evaluator_bad_input_gives_one_line_errors(qm9_datadir, tmp_path, capsys, argv, message):
    import Gaussianity_test

    with pytest.raises(SystemExit) as exit_info:
        Gaussianity_test.main(["--evaluator", "paper", "--datadir", str(qm9_datadir), "--out_dir", str(tmp_path / "x"),
                               "--no_progress", "--no_plot", "--n_molecules", "30", *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_step_estimation_eps_flags_need_paper_results(tmp_path, capsys):
    import GAGA_step_estimation

    tmp_path.joinpath("results_atoms_5.csv").write_text("index,t,pass\n0,1,1\n")
    with pytest.raises(SystemExit):
        GAGA_step_estimation.main(["--data_root", str(tmp_path), "--eps_ds", "0.1"])
    assert "--evaluator paper" in capsys.readouterr().err
