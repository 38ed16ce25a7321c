"""GAGA's Gaussianity evaluator: the KS and KSG-MI building blocks, the per-molecule tests
on synthetic data with known answers, and the Gaussianity_test.py command line."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from configs.errors import TrainingStopped
from scipy import stats
from sklearn.feature_selection import mutual_info_regression

from gaga.data import Features, centre_per_molecule
from gaga.gaussianity import GaussianityConfig, evaluate_molecules
from gaga.gaussianity_run import run_gaussianity_test
from gaga.schedule import alpha2_sigma2, gamma_table_from_flags, variance_at
from gaga.stat_tests import ks_normal, ksg_mutual_information
from gaga.step_estimation import first_consistent_pass, load_results

GAMMA = gamma_table_from_flags("polynomial_2", 1000, 1e-5)
WIDE_GRID = (0, 100, 200, 300, 400, 500, 600, 700, 800, 900, 950, 1000)


# --- building blocks ---------------------------------------------------------------------

def test_ks_matches_scipy_kstest_exact():
    rng = np.random.default_rng(0)
    samples = rng.normal(0, 1.3, size=(6, 40))
    variances = np.array([1.0, 1.69, 0.5, 2.0, 1.69, 4.0])
    d, p = ks_normal(samples, variances)
    for i in range(len(samples)):
        ref = stats.kstest(samples[i], stats.norm(scale=np.sqrt(variances[i])).cdf, method="exact")
        assert d[i] == pytest.approx(ref.statistic, abs=1e-12)
        assert p[i] == pytest.approx(ref.pvalue, rel=1e-9, abs=1e-15)


@pytest.mark.parametrize("n_samples,k", [(8, 3), (20, 3), (29, 5), (50, 1)])
def test_ksg_mutual_information_matches_sklearn(n_samples, k):
    rng = np.random.default_rng(n_samples)
    x = rng.normal(size=(5, n_samples)) * rng.uniform(0.1, 10, size=(5, 1))  # sklearn rescales; so do we
    y = 0.7 * x + rng.normal(size=(5, n_samples))
    y[0] = rng.normal(size=n_samples)  # one independent pair
    ours = ksg_mutual_information(x, y, k=k)
    ref = [mutual_info_regression(x[i, :, None], y[i], n_neighbors=k, random_state=0)[0] for i in range(5)]
    np.testing.assert_allclose(ours, ref, rtol=1e-9, atol=1e-12)


def test_ksg_estimates_the_mutual_information_of_a_bivariate_gaussian():
    rng = np.random.default_rng(1)
    rho = 0.8
    x = rng.normal(size=(1, 3000))
    y = rho * x + np.sqrt(1 - rho**2) * rng.normal(size=(1, 3000))
    assert ksg_mutual_information(x, y)[0] == pytest.approx(-0.5 * np.log(1 - rho**2), abs=0.03)


def test_ksg_rejects_too_few_samples():
    with pytest.raises(ValueError, match="k < N"):
        ksg_mutual_information(np.zeros((1, 3)), np.zeros((1, 3)), k=3)


def test_variance_at_is_gagas_closed_form():
    a2, s2 = alpha2_sigma2(GAMMA, [550])
    assert variance_at(0.848, GAMMA, [550])[0] == pytest.approx(a2[0] * 0.848 + s2[0])
    assert variance_at(0.848, GAMMA, [550])[0] == pytest.approx(0.92605, abs=1e-5)  # GAGA's start scale^2 for QM9


# --- the evaluator on synthetic molecules ------------------------------------------------

def gaussian_molecules(n_mol: int, n_atoms: int, n_channels: int, variance: float, rng) -> np.ndarray:
    """Centred i.i.d. Gaussian molecules whose centred entries have variance exactly ``variance``."""
    raw = rng.normal(scale=np.sqrt(variance * n_atoms / (n_atoms - 1)), size=(n_mol, n_atoms, n_channels))
    return raw - raw.mean(axis=1, keepdims=True)


def evaluate(z0: np.ndarray, config: GaussianityConfig, seed: int = 0) -> dict[str, np.ndarray]:
    a2, s2 = alpha2_sigma2(GAMMA, config.timesteps)
    channels = {"positions": slice(0, 3), "atom_types": slice(3, z0.shape[-1])}
    return evaluate_molecules(z0, a2, s2, channels, config, np.random.default_rng(seed))


def test_exactly_gaussian_molecules_pass_at_every_t():
    v = 0.848
    z0 = gaussian_molecules(300, 20, 8, v, np.random.default_rng(0))
    config = GaussianityConfig(timesteps=WIDE_GRID, variances={"positions": v, "atom_types": v})
    out = evaluate(z0, config)
    # z_t is exactly N(0, v_t) at every t, so failures are the tests' own false alarms, the
    # same at every t: mostly the MI means' estimator noise (3 column pairs for positions).
    # KS errs far less often than alpha: the data are centred per molecule, and a sample
    # centred at its own mean sits closer to a zero-mean null than a fresh one (the same
    # effect as in Lilliefors' test), so the fully specified KS test is conservative here.
    pass_rate = out["pass"].mean(axis=0)
    assert pass_rate.min() > 0.75, pass_rate
    assert np.ptp(pass_rate) < 0.15, "no trend with t for Gaussian data"
    for modality in ("positions", "atom_types"):
        assert out[f"pass_ks_{modality}"].mean() > 1 - config.alpha
    first = first_consistent_pass(out["pass"], np.array(WIDE_GRID))
    assert np.nanmedian(first) == 0, "most Gaussian molecules pass from the first grid point on"


def test_strongly_non_gaussian_molecules_fail_early_and_pass_late():
    rng = np.random.default_rng(1)
    # Every atom is +3 or -3 in all 8 channels: bimodal marginals, identical columns.
    signs = rng.choice([-1.0, 1.0], size=(200, 20, 1))
    z0 = centre_per_molecule(np.repeat(3.0 * signs, 8, axis=2), np.ones((200, 20), bool))
    v = float((z0**2).mean())
    config = GaussianityConfig(timesteps=WIDE_GRID, variances={"positions": v, "atom_types": v})
    out = evaluate(z0, config)
    pass_rate = out["pass"].mean(axis=0)
    assert pass_rate[WIDE_GRID.index(300)] == 0.0
    assert out["pass_ks_positions"][:, :4].mean() == 0.0  # t <= 300
    assert out["pass_mi_features_positions"][:, :2].mean() == 0.0  # t <= 100
    assert pass_rate[-2:].min() > 0.7, pass_rate
    first = first_consistent_pass(out["pass"], np.array(WIDE_GRID))
    assert 600 <= np.nanmean(first) <= 950


def test_scalar_variance_far_from_the_data_variance_fails_ks_until_noise_dominates():
    # Atom-type-like data of variance 0.0075 tested against the scalar 0.848 (QM9's case).
    z0 = gaussian_molecules(200, 18, 8, 0.0075, np.random.default_rng(2))
    z0[..., :3] *= np.sqrt(1.9 / 0.0075)
    config = GaussianityConfig(timesteps=(100, 300, 550, 800, 1000))
    ks_types = evaluate(z0, config)["pass_ks_atom_types"].mean(axis=0)
    assert ks_types[0] == 0.0 and ks_types[-1] > 0.85
    assert np.all(np.diff(ks_types) >= -0.05)


def test_results_do_not_depend_on_the_number_of_workers_or_on_interruption(tmp_path):
    rng = np.random.default_rng(3)
    sizes = rng.integers(4, 9, size=40)
    mask = np.arange(9)[None, :] < sizes[:, None]
    values = centre_per_molecule(rng.normal(size=(40, 9, 8)) * mask[..., None], mask)
    features = Features(values, mask, sizes, np.arange(100, 140), {"positions": slice(0, 3), "atom_types": slice(3, 8)})
    config = GaussianityConfig(timesteps=(300, 500, 700))

    def table(folder):
        return load_results(folder).sort_values(["index", "t"]).reset_index(drop=True)

    run_gaussianity_test(features, GAMMA, config, tmp_path / "one", workers=1, chunk_size=3, progress=False)
    run_gaussianity_test(features, GAMMA, config, tmp_path / "two", workers=2, chunk_size=3, progress=False)
    pd.testing.assert_frame_equal(table(tmp_path / "one"), table(tmp_path / "two"))

    def interrupt_after_two_chunks(written):
        if written >= 4:
            raise KeyboardInterrupt

    with pytest.raises(TrainingStopped, match="--resume"):
        run_gaussianity_test(features, GAMMA, config, tmp_path / "cut", chunk_size=3, progress=False, on_chunk=interrupt_after_two_chunks)
    kept = load_results(tmp_path / "cut")
    assert kept["index"].nunique() >= 4, "finished chunks are on disk after an interruption"
    summary = run_gaussianity_test(features, GAMMA, config, tmp_path / "cut", chunk_size=3, progress=False, resume=True)
    assert summary["n_already_done"] >= 4 and summary["n_computed"] == 40 - summary["n_already_done"]
    pd.testing.assert_frame_equal(table(tmp_path / "one"), table(tmp_path / "cut"))


# --- command line --------------------------------------------------------------------------

def test_gaussianity_cli_smoke_on_a_tiny_qm9_subset(qm9_datadir, tmp_path, capsys):
    import GAGA_step_estimation
    import Gaussianity_test

    out = tmp_path / "identity_to_gaussian_tiny"
    Gaussianity_test.main([
        "--datadir", str(qm9_datadir), "--n_molecules", "20", "--timesteps", "400,550,700",
        "--out_dir", str(out), "--workers", "1", "--no_progress",
    ])
    files = sorted(out.glob("results_atoms_*.csv"))
    assert files and (out / "gaussianity.png").stat().st_size > 0
    results = pd.concat([pd.read_csv(f) for f in files])
    assert len(results) == 20 * 3 and set(results["t"]) == {400, 550, 700}
    assert {"ks_stat_positions", "ks_p_atom_types", "mi_features_positions", "mi_atoms", "pass", "pass_positions"} <= set(results.columns)
    assert all((pd.read_csv(f)["n_atoms"] == int(f.stem.split("_")[-1])).all() for f in files)
    assert json.loads((out / "config.json").read_text())["variances"] == {"positions": 0.848, "atom_types": 0.848}

    GAGA_step_estimation.main(["--data_root", str(out), "--quantile", "0.9"])
    printed = capsys.readouterr().out
    assert "T* mean" in printed
    saved = json.loads((out / "gaga_step.json").read_text())
    assert saved["t_star"]["pass"]["quantile"] == 0.9 and "pass_atom_types" in saved["t_star"]


@pytest.mark.parametrize("argv,message", [
    (["--timesteps", "300:1100:100"], "outside [0, 1000]"),
    (["--timesteps", "300,abc"], "cannot read the timestep grid"),
    (["--filter_n_atoms", "3"], "at least 4 atoms"),
    (["--quantile", "1.0"], "--quantile"),
    (["--alpha", "0"], "--alpha"),
])
def test_gaussianity_cli_bad_input_gives_one_line_errors(qm9_datadir, tmp_path, capsys, argv, message):
    import Gaussianity_test

    with pytest.raises(SystemExit) as exit_info:
        Gaussianity_test.main(["--datadir", str(qm9_datadir), "--out_dir", str(tmp_path / "x"), "--no_progress", "--no_plot", *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


# --- the schedule and data of a run folder -------------------------------------------------

def test_schedule_and_data_come_from_a_run_folder(tmp_path):
    import argparse

    import torch

    from configs.run_args import save_run_args
    from gaga.data import data_spec_from_run
    from gaga.schedule import gamma_table_from_run

    args = argparse.Namespace(
        dataset="qm9", datadir="somewhere", remove_h=False, include_charges=False, normalize_factors="[1,4,10]",
        diffusion_noise_schedule="polynomial_2", diffusion_steps=1000, diffusion_noise_precision=1e-5, max_t=550,
    )
    save_run_args(tmp_path, args)
    np.testing.assert_array_equal(gamma_table_from_run(tmp_path), GAMMA)  # recomputed from args.pickle
    stored = torch.from_numpy(GAMMA.copy())
    stored[550] = 0.5  # prove the table is read from the weights when they hold it
    torch.save({"gamma.gamma": stored, "other": torch.zeros(2)}, tmp_path / "generative_model_ema.npy")
    assert gamma_table_from_run(tmp_path)[550] == np.float32(0.5)
    spec = data_spec_from_run(tmp_path, datadir="qm9/temp")
    assert spec.normalize_factors == (1.0, 4.0, 10.0) and spec.include_charges is False and spec.datadir == "qm9/temp"
