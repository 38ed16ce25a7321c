"""GeoLDM beyond the fixtures: published run folders load strictly, the first stage loads from
--ae_path, sampling goes through the sampler registry in latent space, equivariance, edge cases."""
from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from configs.datasets_config import get_dataset_info
from configs.errors import CheckpointError
from configs.run_args import load_run_args, save_run_args
from equivariant_diffusion.utils import remove_mean_with_mask
from qm9.losses import compute_loss_and_nll
from qm9.models import get_autoencoder, get_latent_diffusion, load_generative_model
from qm9.sampling import masks_from_sizes
from qm9.sampling import sample as qm9_sample

torch.set_num_threads(2)

KEY_LIST = Path(__file__).resolve().parent / "fixtures" / "geoldm_qm9_state_dict.txt"


def published_sections() -> dict[str, dict]:
    """The key lists of geoldm_qm9_state_dict.txt: title -> {argv, params, keys [(key, shape)]}."""
    sections, current = {}, None
    for line in KEY_LIST.read_text().splitlines():
        title = re.match(r"# ===== (.*) =====", line)
        if title:
            current = sections.setdefault(title.group(1), {"argv": "", "params": None, "keys": []})
        elif current is None:
            continue
        elif "argv:" in line:
            current["argv"] = line.split("argv:", 1)[1]
        elif line.startswith("# Parameters"):
            current["params"] = int(line.rsplit(":", 1)[1])
        elif line and not line.startswith("#"):
            key, shape = line.split("\t")[:2]
            current["keys"].append((key, tuple(int(d) for d in re.findall(r"\d+", shape))))
    return sections


def run_args(argv: str, **extra) -> argparse.Namespace:
    """The args a GeoLDM main script pickles for ``argv`` (the fields the builders read)."""
    flags = dict(re.findall(r"--(\w+) (\S+)", argv + " "))
    args = argparse.Namespace(
        model=flags.get("model", "egnn_dynamics"), probabilistic_model="diffusion", nf=int(flags["nf"]),
        n_layers=int(flags["n_layers"]), latent_nf=int(flags["latent_nf"]), inv_sublayers=1, attention=True,
        tanh=True, norm_constant=1, sin_embedding=False, condition_time=True, conditioning=[], context_node_nf=0,
        diffusion_steps=int(flags["diffusion_steps"]), diffusion_noise_schedule=flags["diffusion_noise_schedule"],
        diffusion_noise_precision=float(flags["diffusion_noise_precision"]), diffusion_loss_type="l2",
        normalize_factors=[1, 4, 10], kl_weight=0.01, train_diffusion=True, trainable_ae=True, ae_path=None,
        ema_decay=float(flags["ema_decay"]), cuda=True, remove_h=False,
    )
    for key, value in extra.items():
        setattr(args, key, value)
    return args


CONFIGS = {
    "QM9 README config (latent_nf 1)": ("qm9", dict(include_charges=True, normalization_factor=1, aggregation_method="sum")),
    "QM9 README config with --latent_nf 2 (the published QM9 checkpoint)": (
        "qm9", dict(include_charges=True, normalization_factor=1, aggregation_method="sum")),
    "Drugs README config (latent_nf 2)": (
        "geom", dict(include_charges=False, normalization_factor=1.0, aggregation_method="sum", dataset="geom")),
}


def test_key_list_has_the_three_published_configs():
    sections = published_sections()
    assert set(sections) == set(CONFIGS)
    assert [len(s["keys"]) for s in sections.values()] == [304, 304, 154]


@pytest.mark.parametrize("title", list(CONFIGS))
def test_published_run_folder_loads_strictly(tmp_path, title):
    """A run folder holding exactly the published keys and shapes (cuda=True pickled, as on a GPU
    box) loads strictly on the CPU; every stored tensor, the gamma table and the never-trained
    encoder included, is used as stored."""
    section = published_sections()[title]
    dataset, extra = CONFIGS[title]
    args = run_args(section["argv"], **extra)
    generator = torch.Generator().manual_seed(0)
    state = {key: torch.randn(shape, generator=generator) for key, shape in section["keys"]}
    save_run_args(tmp_path, args)
    torch.save(state, tmp_path / "generative_model_ema.npy")

    loaded_args = load_run_args(tmp_path)
    model, _, _ = get_latent_diffusion(loaded_args, "cpu", get_dataset_info(dataset, False), None)
    assert sum(p.numel() for p in model.parameters()) == section["params"]
    load_generative_model(model, tmp_path / "generative_model_ema.npy", loaded_args)
    loaded = model.state_dict()
    assert list(loaded) == [key for key, _ in section["keys"]]
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key
    assert torch.equal(model.gamma.gamma, state["gamma.gamma"])  # stored table, not recomputed

    if "latent_nf 2" in title and dataset == "qm9":  # a latent_nf 1 checkpoint is a one-line error here
        other = published_sections()["QM9 README config (latent_nf 1)"]
        torch.save({key: torch.zeros(shape) for key, shape in other["keys"]}, tmp_path / "k1.npy")
        with pytest.raises(CheckpointError, match=r"latent_nf=2.*embedding\.weight has shape \(256, 2\), the model expects \(256, 3\)") as info:
            load_generative_model(model, tmp_path / "k1.npy", loaded_args)
        assert "\n" not in str(info.value)


# ----------------------------------------------------------------------------- small models
def small_args(**overrides) -> argparse.Namespace:
    args = argparse.Namespace(
        model="egnn_dynamics", nf=16, n_layers=1, latent_nf=2, inv_sublayers=1, attention=True, tanh=True,
        norm_constant=1, sin_embedding=False, condition_time=True, context_node_nf=0, diffusion_steps=20,
        diffusion_noise_schedule="polynomial_2", diffusion_noise_precision=1e-5, diffusion_loss_type="l2",
        normalize_factors=[1, 4, 10], include_charges=True, normalization_factor=1, aggregation_method="sum",
        kl_weight=0.01, trainable_ae=True, ae_path=None, ema_decay=0.0, probabilistic_model="diffusion",
    )
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


def batch(sizes=(7, 4, 9), include_charges=True, seed=0):
    """A random molecule batch as the training loop passes it (x centred, raw one-hot, charges)."""
    generator = torch.Generator().manual_seed(seed)
    n = max(sizes)
    node_mask, edge_mask = masks_from_sizes(torch.tensor(sizes), n, "cpu")
    x = remove_mean_with_mask(torch.randn(len(sizes), n, 3, generator=generator) * node_mask, node_mask)
    classes = torch.randint(0, 5, (len(sizes), n), generator=generator)
    one_hot = torch.nn.functional.one_hot(classes, 5).float() * node_mask
    charges = torch.tensor([1.0, 6.0, 7.0, 8.0, 9.0])[classes].unsqueeze(2) * node_mask
    h = {"categorical": one_hot, "integer": charges if include_charges else torch.zeros(0)}
    return x, h, node_mask, edge_mask


def random_rotation(seed=0) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(seed)))
    return q


def test_autoencoder_is_e3_and_permutation_equivariant():
    torch.manual_seed(0)
    vae, _, _ = get_autoencoder(small_args(), "cpu", get_dataset_info("qm9", False))
    x, h, node_mask, edge_mask = batch()
    xh = vae._xh(x, h)
    mu_x, _, mu_h, _ = vae.encoder(xh, node_mask, edge_mask)
    rot = random_rotation()
    xh_rot = torch.cat([x @ rot, xh[:, :, 3:]], dim=2)
    mu_x_rot, _, mu_h_rot, _ = vae.encoder(xh_rot, node_mask, edge_mask)
    assert_close(mu_x_rot, mu_x @ rot, atol=1e-5, rtol=0)
    assert_close(mu_h_rot, mu_h, atol=1e-5, rtol=0)
    z = torch.cat([mu_x, mu_h], dim=2)
    x_rec, h_rec = vae.decoder(z, node_mask, edge_mask)
    x_rec_rot, h_rec_rot = vae.decoder(torch.cat([mu_x @ rot, mu_h], dim=2), node_mask, edge_mask)
    assert_close(x_rec_rot, x_rec @ rot, atol=1e-5, rtol=0)
    assert_close(h_rec_rot, h_rec, atol=1e-5, rtol=0)
    # Permuting the atoms of molecule 2 (9 atoms, no padding) permutes every output.
    perm = torch.randperm(9, generator=torch.Generator().manual_seed(1))
    xh_perm = xh.clone()
    xh_perm[2] = xh[2, perm]
    mu_x_perm, _, mu_h_perm, _ = vae.encoder(xh_perm, node_mask, edge_mask)
    assert_close(mu_x_perm[2], mu_x[2, perm], atol=1e-5, rtol=0)
    assert_close(mu_h_perm[2], mu_h[2, perm], atol=1e-5, rtol=0)


@pytest.mark.parametrize("train", [True, False])
def test_latent_diffusion_loss_is_invariant_to_rotations(train):
    """Rotating the molecules (and the x part of every noise draw) leaves every loss unchanged."""
    torch.manual_seed(0)
    model, _, _ = get_latent_diffusion(small_args(), "cpu", get_dataset_info("qm9", False))
    model.train(train)
    x, h, node_mask, edge_mask = batch()
    gen = torch.Generator().manual_seed(5)
    draws = [remove_mean_with_mask(torch.randn(3, 9, 5, generator=gen) * node_mask, node_mask) for _ in range(3)]
    rot = random_rotation(2)

    def rotated(z):
        return torch.cat([z[:, :, :3] @ rot, z[:, :, 3:]], dim=2)

    def loss_of(x_in, noises):
        queue = list(noises)
        take = lambda n_samples, n_nodes, node_mask: queue.pop(0)  # noqa: E731
        model.vae.sample_combined_position_feature_noise = take
        model.sample_combined_position_feature_noise = take
        torch.manual_seed(11)  # same t draw
        try:
            return model.compute_latent_loss(x_in, h, node_mask, edge_mask.view(3, -1), None)
        finally:
            del model.vae.sample_combined_position_feature_noise, model.sample_combined_position_feature_noise

    loss, terms = loss_of(x, draws)
    loss_rot, terms_rot = loss_of(x @ rot, [rotated(d) for d in draws])
    assert_close(terms_rot["z_xh"], rotated(terms["z_xh"]), atol=1e-5, rtol=0)
    assert_close(terms_rot["loss_recon"], terms["loss_recon"], rtol=1e-4, atol=1e-6)
    assert_close(loss_rot, loss, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("include_charges", [True, False])
def test_batch_of_one_molecule_has_losses_in_both_modes(include_charges):
    """GeoLDM's kl_prior asserts on B = 1; ours does not."""
    torch.manual_seed(0)
    model, nodes_dist, _ = get_latent_diffusion(small_args(include_charges=include_charges), "cpu",
                                                get_dataset_info("qm9", False))
    x, h, node_mask, edge_mask = batch(sizes=(6,), include_charges=include_charges)
    for train in (True, False):
        model.train(train)
        nll, _, _ = compute_loss_and_nll(small_args(), model, nodes_dist, x, h, node_mask, edge_mask, None)
        assert torch.isfinite(nll)
        vae_nll, _, _ = compute_loss_and_nll(small_args(), model.vae, nodes_dist, x, h, node_mask, edge_mask, None)
        assert torch.isfinite(vae_nll)


def test_frozen_first_stage_stays_frozen_and_adds_no_recon_term():
    torch.manual_seed(0)
    model, _, _ = get_latent_diffusion(small_args(trainable_ae=False), "cpu", get_dataset_info("qm9", False))
    assert not any(p.requires_grad for p in model.vae.parameters())
    model.train()
    assert model.training and model.dynamics.training and not model.vae.training
    x, h, node_mask, edge_mask = batch()
    loss, terms = model.compute_latent_loss(x, h, node_mask, edge_mask.view(3, -1), None)
    assert torch.count_nonzero(terms["loss_recon"]) == 0
    loss.mean().backward()
    assert all(p.grad is None for p in model.vae.parameters())
    assert any(p.grad is not None for p in model.dynamics.parameters())
    model.vae.train()  # GeoLDM's replaced vae.train raised TypeError here


def test_trainable_first_stage_trains_the_decoder_only():
    torch.manual_seed(0)
    model, _, _ = get_latent_diffusion(small_args(), "cpu", get_dataset_info("qm9", False))
    model.train()
    x, h, node_mask, edge_mask = batch()
    loss, terms = model.compute_latent_loss(x, h, node_mask, edge_mask.view(3, -1), None)
    assert (terms["loss_recon"] > 0).all()
    loss.mean().backward()
    assert all(p.grad is None for p in model.vae.encoder.parameters())
    assert all(p.grad is not None for p in model.vae.decoder.parameters())


def test_zero_center_h_is_refused_with_a_clear_message():
    from equivariant_diffusion.latent_diffusion import EnLatentDiffusion

    torch.manual_seed(0)
    model, _, _ = get_latent_diffusion(small_args(), "cpu", get_dataset_info("qm9", False))
    with pytest.raises(ValueError, match="zero_center_h"):
        EnLatentDiffusion(vae=model.vae, trainable_ae=True, dynamics=model.dynamics, in_node_nf=2, timesteps=20,
                          zero_center_h=True)


def test_bad_latent_nf_and_model_are_one_line_errors():
    info = get_dataset_info("qm9", False)
    with pytest.raises(ValueError, match="--latent_nf must be a positive integer"):
        get_latent_diffusion(small_args(latent_nf=0), "cpu", info)
    with pytest.raises(ValueError, match="needs --model egnn_dynamics"):
        get_autoencoder(small_args(model="gnn_dynamics"), "cpu", info)


def test_first_stage_loads_from_ae_path(tmp_path):
    """A VAE-only run folder (keys buffer, encoder.*, decoder.*; generative_model.npy without EMA)
    initialises the first stage; its args decide the VAE architecture and latent_nf."""
    info = get_dataset_info("qm9", False)
    torch.manual_seed(3)
    vae_args = small_args(latent_nf=3, nf=8, train_diffusion=False)
    vae, _, _ = get_autoencoder(vae_args, "cpu", info)
    assert set(k.split(".")[0] for k in vae.state_dict()) == {"buffer", "encoder", "decoder"}
    save_run_args(tmp_path, vae_args)
    torch.save(vae.state_dict(), tmp_path / "generative_model.npy")

    args = small_args(latent_nf=1, ae_path=str(tmp_path))
    model, _, _ = get_latent_diffusion(args, "cpu", info)
    assert args.latent_nf == 3 and model.in_node_nf == 3
    for key, value in vae.state_dict().items():
        assert torch.equal(model.vae.state_dict()[key], value), key
    assert model.dynamics.egnn.embedding.weight.shape == (16, 4)  # the run's nf, k + time


# ----------------------------------------------------------------------------- sampling
def sampling_model(include_charges=True):
    torch.manual_seed(0)
    model, _, _ = get_latent_diffusion(small_args(include_charges=include_charges), "cpu",
                                       get_dataset_info("qm9", False))
    return model.eval()


@pytest.mark.parametrize(
    "options",
    [
        dict(),
        dict(sampler="ddim", step_size=4),
        dict(sampler="dpm_solver_2m", step_size=5),
        dict(start_step=10, dataset_var=0.5, step_size=2),  # GAGA's Gaussian start in latent space
    ],
)
@pytest.mark.parametrize("include_charges", [True, False])
def test_sampling_runs_the_registered_sampler_in_latent_space_and_decodes(options, include_charges):
    model = sampling_model(include_charges)
    calls = []
    model.dynamics.register_forward_hook(lambda m, i, o: calls.append(o.shape))
    args = small_args(include_charges=include_charges)
    info = get_dataset_info("qm9", False)
    one_hot, charges, x, node_mask = qm9_sample(args, "cpu", model, info, nodesxsample=torch.tensor([5, 3]), **options)
    T = 20
    first = options.get("start_step", T)
    assert len(calls) == first // options.get("step_size", 1) + 1  # chain steps + the p(x | z_0) call
    assert all(shape[-1] == 3 + 2 for shape in calls)  # the network sees latent points
    assert x.shape == (2, info["max_n_nodes"], 3)
    assert one_hot.shape == (2, info["max_n_nodes"], 5)
    assert torch.equal(one_hot.sum(2), node_mask.squeeze(2))
    assert charges.shape[-1] == int(include_charges)


def test_gaussian_start_has_latent_width_and_the_closed_form_variance():
    model = sampling_model()
    node_mask, _ = masks_from_sizes(torch.tensor([9] * 400), 9, "cpu")
    torch.manual_seed(1)
    z = model.gaussian_start(400, 9, node_mask, start_step=10, dataset_var=0.3)
    assert z.shape == (400, 9, 5)
    var_t = model.variance_t(0.3, 10).item()
    # x part centred per molecule: variance (n-1)/n of the per-coordinate variance; h part plain.
    assert_close(z[:, :, 3:].var().item(), var_t, rtol=0.05, atol=0)
    assert_close(z[:, :, :3].pow(2).mean().item(), var_t * 8 / 9, rtol=0.05, atol=0)


def test_sample_chain_decodes_every_frame():
    model = sampling_model()
    node_mask, edge_mask = masks_from_sizes(torch.tensor([4, 6]), 6, "cpu")
    torch.manual_seed(2)
    chain = model.sample_chain(2, 6, node_mask, edge_mask, None, keep_frames=5)
    assert chain.shape == (10, 6, 3 + 5 + 1)
    frame_mask = node_mask.repeat(5, 1, 1)
    assert torch.equal(chain[:, :, 3:8].sum(2), frame_mask.squeeze(2))  # a decoded one-hot in every frame
    assert torch.equal(chain[:, :, 8:], torch.round(chain[:, :, 8:]))


def test_max_t_bounds_the_latent_training_draw(monkeypatch):
    """GAGA's --max_t reaches the latent objective through the parent's estimator."""
    torch.manual_seed(0)
    model, _, _ = get_latent_diffusion(small_args(max_t=5), "cpu", get_dataset_info("qm9", False))
    x, h, node_mask, edge_mask = batch()
    bounds = []
    original = torch.randint

    def spy(low, high, size, **kwargs):
        bounds.append((low, high))
        return original(low, high, size, **kwargs)

    monkeypatch.setattr(torch, "randint", spy)
    for train in (True, False):
        model.train(train)
        model.compute_latent_loss(x, h, node_mask, edge_mask.view(3, -1), None)
    assert bounds == [(0, 6), (1, 6)]
