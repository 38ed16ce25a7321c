"""GAGA in GeoLDM's latent space (gaga/latent.py): the encoding, its centring and equivariance,
the variance identities on latents, the scripts on a GeoLDM run folder, and their one-line errors."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from configs.datasets_config import get_dataset_info
from configs.run_args import save_run_args
from gaga.latent import encode_arrays, encode_split, geoldm_run
from gaga.schedule import alpha2_sigma2, gamma_table_from_flags, variance_at
from gaga.variance import molecule_statistics, per_molecule_table
from qm9.models import get_autoencoder, get_latent_diffusion

torch.set_num_threads(1)


def geoldm_args(latent_nf: int = 2, include_charges: bool = True, **extra) -> argparse.Namespace:
    """The args GeoLDM's main_qm9.py pickles (--train_diffusion --trainable_ae), at a tiny width."""
    args = argparse.Namespace(
        model="egnn_dynamics", probabilistic_model="diffusion", nf=16, n_layers=1, latent_nf=latent_nf, inv_sublayers=1,
        attention=True, tanh=True, norm_constant=1, sin_embedding=False, condition_time=True, conditioning=[],
        context_node_nf=0, diffusion_steps=1000, diffusion_noise_schedule="polynomial_2", diffusion_noise_precision=1e-5,
        diffusion_loss_type="l2", normalize_factors=[1, 4, 10], include_charges=include_charges, normalization_factor=1,
        aggregation_method="sum", kl_weight=0.01, train_diffusion=True, trainable_ae=True, ae_path=None, ema_decay=0.9999,
        dataset="qm9", remove_h=False,
    )
    for key, value in extra.items():
        setattr(args, key, value)
    return args


def make_geoldm_run(folder: Path, seed: int = 0, **kwargs) -> Path:
    """A GeoLDM run folder as training saves one: args.pickle + generative_model_ema.npy (model at init)."""
    args = geoldm_args(**kwargs)
    torch.manual_seed(seed)
    model, _, _ = get_latent_diffusion(args, "cpu", get_dataset_info("qm9", False), None)
    folder.mkdir(parents=True, exist_ok=True)
    save_run_args(folder, args)
    torch.save(model.state_dict(), folder / "generative_model_ema.npy")
    return folder


def tiny_vae(latent_nf: int = 2, include_charges: bool = True, seed: int = 0, group_by_size: str = "auto"):
    torch.manual_seed(seed)
    vae, _, _ = get_autoencoder(geoldm_args(latent_nf, include_charges, group_by_size=group_by_size), "cpu",
                                get_dataset_info("qm9", False), None)
    return vae.eval()


def random_molecules(sizes=(5, 3, 9, 6, 9, 4, 7), n_slots: int = 10, seed: int = 0) -> dict[str, np.ndarray]:
    """load_qm9-style padded arrays: positions (Angstrom, not centred), one-hot, atomic numbers, index."""
    rng = np.random.default_rng(seed)
    m = len(sizes)
    positions = np.zeros((m, n_slots, 3), np.float32)
    charges = np.zeros((m, n_slots), np.int64)
    for i, n in enumerate(sizes):
        positions[i, :n] = rng.normal(scale=1.5, size=(n, 3)) + rng.normal(size=3) * 5  # off-centre on purpose
        charges[i, :n] = rng.choice([1, 6, 7, 8, 9], size=n)
    one_hot = charges[..., None] == np.array([1, 6, 7, 8, 9])
    return {"positions": positions, "charges": charges, "one_hot": one_hot, "index": np.arange(100, 100 + m)}


def encode(vae, arrays, **kwargs):
    return encode_arrays(vae, arrays["positions"], arrays["one_hot"], arrays["charges"], arrays["index"],
                         include_charges=vae.include_charges, **kwargs)


# ----------------------------------------------------------------------------- the encoding
@pytest.mark.parametrize("latent_nf,include_charges", [(1, True), (2, True), (2, False)])
def test_latents_have_the_latent_layout_and_are_centred_per_molecule(latent_nf, include_charges):
    arrays = random_molecules()
    features = encode(tiny_vae(latent_nf, include_charges), arrays)
    mask = arrays["charges"] > 0
    assert features.values.shape == (7, 10, 3 + latent_nf) and features.values.dtype == np.float64
    assert features.channels == {"positions": slice(0, 3), "latent_h": slice(3, 3 + latent_nf)}
    assert list(features.num_atoms) == [5, 3, 9, 6, 9, 4, 7] and list(features.index) == list(arrays["index"])
    assert np.all(features.values[~mask] == 0), "padding stays exactly zero"
    np.testing.assert_allclose(features.values.sum(axis=1), 0, atol=1e-5)  # every channel, mean 0 per molecule
    assert np.abs(features.values[..., 3:]).max() > 0, "the latent h is not trivially zero"


def test_latents_are_the_encoder_means_whatever_the_batching():
    """Batches sorted by size and split by the pair budget give the padded batch's encoder means."""
    arrays = random_molecules()
    vae = tiny_vae()
    x, h, mask, edge = padded_batch(arrays)
    with torch.no_grad():
        mu_x, _, mu_h, _ = vae.encode(x, h, mask, edge)
    mu_h = (mu_h - mu_h.sum(1, keepdim=True) / mask.sum(1, keepdim=True)) * mask
    expected = torch.cat([mu_x, mu_h], dim=2).double().numpy()
    for max_pairs in (1, 100, 10**6):  # one molecule per batch ... all in one
        np.testing.assert_allclose(encode(vae, arrays, max_pairs=max_pairs).values, expected, atol=2e-6)


def padded_batch(arrays: dict[str, np.ndarray]):
    """(x centred, h, node_mask, edge_mask) of the whole padded batch, as GeoLDM's loop builds them."""
    mask = torch.from_numpy(arrays["charges"] > 0).float().unsqueeze(2)
    n = mask.shape[1]
    edge = (mask * mask.transpose(1, 2) * (1 - torch.eye(n))).reshape(-1, 1)
    x = torch.from_numpy(arrays["positions"]) * mask
    x = x - x.sum(1, keepdim=True) / mask.sum(1, keepdim=True) * mask
    h = {"categorical": torch.from_numpy(arrays["one_hot"]).float() * mask,
         "integer": torch.from_numpy(arrays["charges"]).float().unsqueeze(2) * mask}
    return x, h, mask, edge


def test_grouped_and_padded_autoencoder_policies_give_the_same_outputs():
    """The CPU device policy (size groups) in the encoder and the decoder = GeoLDM's padded block."""
    arrays = random_molecules(sizes=(3,) * 30 + (20, 4, 20, 11), n_slots=20)  # uneven: groups pay off
    x, h, mask, edge = padded_batch(arrays)
    grouped, padded = tiny_vae(group_by_size="true"), tiny_vae(group_by_size="false")
    with torch.no_grad():
        outputs = [vae.encode(x, h, mask, edge) for vae in (grouped, padded)]
        z = torch.cat([outputs[0][0], outputs[0][2]], dim=2)
        decoded = [vae.decoder(z, mask, edge) for vae in (grouped, padded)]
    assert grouped.encoder._plan_cache[3] is not None and grouped.decoder._plan_cache[3] is not None, "size groups ran"
    assert padded.encoder._plan_cache is None and padded.decoder._plan_cache is None
    for a, b in zip(outputs[0] + decoded[0], outputs[1] + decoded[1]):
        torch.testing.assert_close(a, b, atol=2e-6, rtol=1e-5)


def test_rotating_the_molecules_rotates_the_latent_positions_and_keeps_latent_h_and_variance():
    arrays = random_molecules()
    vae = tiny_vae()
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(3)))
    rotated = dict(arrays, positions=(arrays["positions"] @ q.numpy().T + np.float32([4.0, -2.0, 7.0])).astype(np.float32)
                   * (arrays["charges"] > 0)[..., None])
    a, b = encode(vae, arrays), encode(vae, rotated)
    np.testing.assert_allclose(b.values[..., :3], a.values[..., :3] @ q.numpy().T.astype(np.float64), atol=2e-5)
    np.testing.assert_allclose(b.values[..., 3:], a.values[..., 3:], atol=2e-5)
    ta, tb = per_molecule_table(a), per_molecule_table(b)
    for key in ("mean_square_all", "mean_square_positions", "mean_square_latent_h", "rms_all", "unbiased_var_all"):
        np.testing.assert_allclose(tb[key], ta[key], rtol=1e-5, err_msg=key)


# ----------------------------------------------------------------------------- variance identities
def test_variance_of_all_latent_channels_is_the_channel_weighted_mean_of_the_modalities():
    features = encode(tiny_vae(latent_nf=2), random_molecules())
    table = per_molecule_table(features)
    mask = features.mask
    direct = (features.values**2 * mask[..., None]).sum(axis=(1, 2)) / (mask.sum(1) * 5)
    np.testing.assert_allclose(table["mean_square_all"], direct, rtol=1e-12)
    np.testing.assert_allclose(table["mean_square_all"],
                               (3 * table["mean_square_positions"] + 2 * table["mean_square_latent_h"]) / 5, rtol=1e-12)
    # centred, so the unbiased variance is the mean square times d / (d - 1)
    d = mask.sum(1) * 5
    np.testing.assert_allclose(table["unbiased_var_all"], table["mean_square_all"] * d / (d - 1), rtol=1e-10)


def test_noised_latents_have_gagas_closed_form_variance():
    """z_t = alpha_t z_0 + sigma_t eps (eps centred per molecule, as the tests draw it):
    E mean_sq(z_t) = alpha_t^2 mean_sq(z_0) + sigma_t^2 (n - 1) / n, i.e. GAGA's v_t up to the centring."""
    features = encode(tiny_vae(latent_nf=1), random_molecules(sizes=(9, 9, 9, 9)))
    z0 = features.values[:, :9]
    v = molecule_statistics(features.values, features.mask, slice(0, 4))["mean_square"]
    gamma = gamma_table_from_flags("polynomial_2", 1000, 1e-5)
    for t in (100, 650, 900):
        a2, s2 = (x[0] for x in alpha2_sigma2(gamma, [t]))
        rng = np.random.default_rng(t)
        eps = rng.standard_normal((20000,) + z0.shape)
        eps -= eps.mean(axis=2, keepdims=True)
        zt = np.sqrt(a2) * z0 + np.sqrt(s2) * eps
        measured = (zt**2).mean(axis=(0, 2, 3))
        expected = a2 * v + s2 * 8 / 9
        np.testing.assert_allclose(measured, expected, rtol=8e-3)  # ~5 standard errors; the centring term is 11%
        np.testing.assert_allclose(variance_at(v, gamma, [t]), a2 * v + s2, rtol=1e-12)


# ----------------------------------------------------------------------------- run folders and CLIs
def test_geoldm_runs_are_recognised_and_edm_runs_are_not(tmp_path):
    ldm = make_geoldm_run(tmp_path / "ldm")
    assert geoldm_run(ldm).kind == "ldm"
    # a first-stage-only run: train_diffusion False, VAE keys without the vae. prefix
    vae_dir = tmp_path / "vae"
    vae_dir.mkdir()
    save_run_args(vae_dir, geoldm_args(train_diffusion=False))
    torch.save(tiny_vae().state_dict(), vae_dir / "generative_model_ema.npy")
    assert geoldm_run(vae_dir).kind == "vae"
    # an EDM run: no latent_nf, never opened
    edm = tmp_path / "edm"
    edm.mkdir()
    save_run_args(edm, argparse.Namespace(dataset="qm9", nf=16, n_layers=1, diffusion_steps=1000))
    assert geoldm_run(edm) is None


def test_variance_cli_on_a_geoldm_run_encodes_the_sample(qm9_datadir, tmp_path, capsys):
    import Variance_Estimate
    from gaga.data import data_spec_from_run

    run = make_geoldm_run(tmp_path / "run", latent_nf=2)
    out = tmp_path / "variance"
    Variance_Estimate.main(["--model_path", str(run), "--datadir", str(qm9_datadir), "--n_molecules", "50",
                            "--out_dir", str(out), "--no_progress"])
    printed = capsys.readouterr().out
    assert "GeoLDM latents" in printed and "latent_h" in printed
    record = json.loads((out / "variance.json").read_text())
    assert record["n_molecules"] == 50 and record["features"] == {"positions": [0, 3], "latent_h": [3, 5]}
    assert record["source"]["space"] == "latent" and record["source"]["latent_nf"] == 2
    # the same numbers as the library on the same seeded subset
    features, _ = encode_split(geoldm_run(run), data_spec_from_run(str(run), datadir=str(qm9_datadir)),
                               n_molecules=50, seed=0, progress=False)
    stats = per_molecule_table(features)
    assert record["statistics"]["latent_h"]["mean_square"] == pytest.approx(float(stats["mean_square_latent_h"].mean()), rel=1e-9)
    # latent positions of an untrained encoder stay close to the data's (QM9 positions: ~1.9 A^2)
    assert 1.0 < record["statistics"]["positions"]["mean_square"] < 3.0

    # --space data: the molecules themselves, as for any run
    Variance_Estimate.main(["--model_path", str(run), "--datadir", str(qm9_datadir), "--n_molecules", "50",
                            "--out_dir", str(tmp_path / "data"), "--no_progress", "--space", "data"])
    data_record = json.loads((tmp_path / "data" / "variance.json").read_text())
    assert "atom_types" in data_record["features"] and "space" not in data_record["source"]


@pytest.mark.parametrize("latent_nf", [1, 2])
def test_gaussianity_cli_and_step_estimation_on_a_geoldm_run(qm9_datadir, tmp_path, capsys, latent_nf):
    import GAGA_step_estimation
    import Gaussianity_test

    run = make_geoldm_run(tmp_path / "run", latent_nf=latent_nf)
    out = tmp_path / "gauss"
    Gaussianity_test.main(["--model_path", str(run), "--datadir", str(qm9_datadir), "--n_molecules", "40",
                           "--timesteps", "300,600,900", "--workers", "1", "--out_dir", str(out), "--no_progress", "--no_plot"])
    printed = capsys.readouterr().out
    assert "latents' mean per-molecule RMS" in printed
    config = json.loads((out / "config.json").read_text())
    assert config["source"]["space"] == "latent" and config["source"]["latent_nf"] == latent_nf
    import pandas as pd

    results = pd.concat([pd.read_csv(p) for p in out.glob("results_atoms_*.csv")])
    assert len(results) == 3 * results["index"].nunique() and results["index"].nunique() >= 30
    assert results["mi_features_atom_types"].notna().all()  # latent_nf 1: one channel, no pair, no NaN
    assert results["pass"].iloc[-1] in (0, 1)
    GAGA_step_estimation.main(["--data_root", str(out), "--no_plot"])
    assert "molecules, grid 300..900 (3 points)" in capsys.readouterr().out
    assert (out / "gaga_step.json").is_file()


def test_paper_evaluator_on_a_geoldm_run(qm9_datadir, tmp_path, capsys):
    import Gaussianity_test

    run = make_geoldm_run(tmp_path / "run", latent_nf=1)
    out = tmp_path / "paper"
    Gaussianity_test.main([
        "--evaluator", "paper", "--model_path", str(run), "--datadir", str(qm9_datadir), "--n_molecules", "60",
        "--timesteps", "0,500,1000", "--out_dir", str(out), "--workers", "1", "--no_progress", "--no_plot",
        "--null_replicates", "3", "--bootstrap", "3", "--mi_samples", "50", "--h_samples", "50",
    ])
    assert "T_ID" in capsys.readouterr().out
    record = json.loads((out / "paper_evaluator.json").read_text())
    assert record["n_molecules"] == 60 and record["source"]["space"] == "latent"
    # v^ is the latents': 4 channels (3 positions + 1 latent h), not the data's 0.848
    assert record["per_convention"]["rms"]["v_hat"][0] != pytest.approx(0.848, abs=0.01)
    assert len(record["per_convention"]["per_modality"]["v_hat"]) == 4


# ----------------------------------------------------------------------------- one-line errors
def _one_line_error(main, argv, capsys) -> str:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err, err
    return err


def test_latent_space_errors_are_one_line(qm9_datadir, tmp_path, capsys):
    import Gaussianity_test
    import Variance_Estimate

    common = ["--datadir", str(qm9_datadir), "--n_molecules", "10", "--no_progress", "--out_dir", str(tmp_path / "o")]
    err = _one_line_error(Variance_Estimate.main, ["--space", "latent", *common], capsys)
    assert "--space latent needs --model_path" in err

    edm = tmp_path / "edm"
    edm.mkdir()
    save_run_args(edm, argparse.Namespace(dataset="qm9", nf=16, n_layers=1, diffusion_steps=1000, include_charges=False))
    err = _one_line_error(Variance_Estimate.main, ["--model_path", str(edm), "--space", "latent", *common], capsys)
    assert "is not a GeoLDM run" in err
    err = _one_line_error(Gaussianity_test.main, ["--model_path", str(edm), "--space", "latent", "--no_plot", *common], capsys)
    assert "is not a GeoLDM run" in err

    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    save_run_args(no_weights, geoldm_args())
    err = _one_line_error(Variance_Estimate.main, ["--model_path", str(no_weights), *common], capsys)
    assert "GeoLDM run without weights" in err

    wrong = make_geoldm_run(tmp_path / "wrong", latent_nf=2)
    save_run_args(wrong, geoldm_args(latent_nf=1))  # the weights are latent_nf 2's
    err = _one_line_error(Variance_Estimate.main, ["--model_path", str(wrong), *common], capsys)
    assert "does not fit the model" in err

    geom = make_geoldm_run(tmp_path / "geom_run")
    save_run_args(geom, geoldm_args(dataset="geom", include_charges=False))
    err = _one_line_error(Variance_Estimate.main, ["--model_path", str(geom), *common], capsys)
    assert "QM9 only" in err or "GEOM" in err
