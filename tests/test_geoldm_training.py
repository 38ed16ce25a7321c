"""GeoLDM through main_qm9.py / main_geom_drugs.py: its flags, a tiny run of its README command
(train, sample, evaluate), GeoLDM + GAGA (--max_t, Gaussian shortcut), a VAE-only run then a
latent diffusion from it (--ae_path), --resume (bit-identical, and from a GeoLDM-written folder)."""
from __future__ import annotations

import argparse
import json
import pickle
import shutil

import numpy as np
import pytest
import torch

import eval_analyze
import eval_sample
import GAGA_test
from configs.errors import UserInputError
from configs.run_args import load_run_args, save_run_args
from equivariant_diffusion.latent_diffusion import EnLatentDiffusion
from training.args import fill_legacy_defaults, parse_args
from training.checkpoint import RESUME_FILE, load_resume_state
from training.latent_args import GEOLDM_FLAGS, latent_kind
from training.run import main
from test_resume import assert_same  # bit-identical nested states

pytestmark = pytest.mark.usefixtures("one_thread")

# GeoLDM's README training commands, as written there.
QM9_README = (
    "--n_epochs 3000 --n_stability_samples 1000 --diffusion_noise_schedule polynomial_2 --diffusion_noise_precision 1e-5 "
    "--diffusion_steps 1000 --diffusion_loss_type l2 --batch_size 64 --nf 256 --n_layers 9 --lr 1e-4 "
    "--normalize_factors [1,4,10] --test_epochs 20 --ema_decay 0.9999 --train_diffusion --trainable_ae --latent_nf 1 "
    "--exp_name geoldm_qm9"
)
DRUGS_README = (
    "--n_epochs 3000 --n_stability_samples 500 --diffusion_noise_schedule polynomial_2 --diffusion_steps 1000 "
    "--diffusion_noise_precision 1e-5 --diffusion_loss_type l2 --batch_size 32 --nf 256 --n_layers 4 --lr 1e-4 "
    "--normalize_factors [1,4,10] --test_epochs 1 --ema_decay 0.9999 --normalization_factor 1 --model egnn_dynamics "
    "--visualize_every_batch 10000 --train_diffusion --trainable_ae --latent_nf 2 --exp_name geoldm_drugs"
)
# The same commands at test scale: 33 molecules = batches of 16, 16 and 1 (GeoLDM fails on a batch of 1).
SMALL = ["--data_subset", "33", "--nf", "16", "--n_layers", "2", "--diffusion_steps", "10", "--n_epochs", "2",
         "--test_epochs", "1", "--n_stability_samples", "4", "--batch_size", "16", "--ema_decay", "0.9",
         "--visualize_every_batch", "0"]


def small(root, datadir, command: str, *extra: str) -> list[str]:
    return [*command.split(), "--output_root", str(root), "--datadir", str(datadir), *SMALL, *extra]



def section(state: dict, prefix: str) -> dict:
    return {k: v for k, v in state.items() if k.startswith(prefix)}


# ----------------------------------------------------------------------------- flags


@pytest.mark.parametrize("script, command, k", [("qm9", QM9_README, 1), ("geom", DRUGS_README, 2)])
def test_geoldm_readme_commands_parse_with_geoldm_semantics(script, command, k):
    args = parse_args(command.split(), script)
    assert latent_kind(args) == "geoldm"
    assert (args.train_diffusion, args.trainable_ae, args.latent_nf, args.kl_weight, args.ae_path) == (True, True, k, 0.01, None)
    assert args.zero_center_h is False  # the latent is never centred (GeoLDM)
    assert args.include_charges is (script == "qm9") and args.normalization_factor == 1


def test_the_geoldm_args_helper_is_the_readme_command_at_any_size():
    from training.args import geoldm_qm9_args

    readme = vars(parse_args(QM9_README.split()))
    assert {**readme, "context_node_nf": 0} == vars(geoldm_qm9_args())  # the README sizes are its defaults
    small = geoldm_qm9_args(64, 4, 2, "--egnn_impl", "reference")
    assert (small.nf, small.n_layers, small.latent_nf, small.egnn_impl) == (64, 4, 2, "reference")
    assert {k: v for k, v in vars(small).items() if k not in ("nf", "n_layers", "latent_nf", "egnn_impl", "context_node_nf")} == {
        k: v for k, v in readme.items() if k not in ("nf", "n_layers", "latent_nf", "egnn_impl")}


@pytest.mark.parametrize("flags, kind, latent_nf, kl_weight", [
    ([], "edm", None, None),
    (["--train_diffusion"], "geoldm", 4, 0.01),  # GeoLDM's defaults
    (["--train_diffusion", "False"], "vae", 4, 0.01),
    (["--latent_nf", "2"], "vae", 2, 0.01),  # GeoLDM's first-stage command: no --train_diffusion
    (["--kl_weight", "0.1"], "vae", 4, 0.1),
])
def test_which_flags_make_which_run(flags, kind, latent_nf, kl_weight):
    args = parse_args(["--diffusion_noise_schedule", "polynomial_2", "--diffusion_loss_type", "l2", *flags])
    assert latent_kind(args) == kind and args.latent_nf == latent_nf and args.kl_weight == kl_weight
    if kind == "edm":
        assert all(getattr(args, f) is None for f in GEOLDM_FLAGS)


def test_old_edm_pickles_stay_edm_and_geoldm_pickles_load_as_geoldm():
    edm = parse_args(["--diffusion_noise_schedule", "polynomial_2", "--diffusion_loss_type", "l2"])
    legacy = argparse.Namespace(**{k: v for k, v in vars(edm).items() if k not in GEOLDM_FLAGS})
    assert latent_kind(fill_legacy_defaults(legacy)) == "edm"
    # GeoLDM's own pickle: its flags as bools/ints, none of our fields.
    geoldm = argparse.Namespace(**{k: v for k, v in vars(legacy).items() if k not in ("zero_center_h", "dataset_var")})
    geoldm.__dict__.update(train_diffusion=True, trainable_ae=True, latent_nf=2, kl_weight=0.01, ae_path=None, cuda=True)
    filled = fill_legacy_defaults(geoldm)
    assert latent_kind(filled) == "geoldm" and filled.zero_center_h is False and filled.latent_nf == 2
    geoldm.train_diffusion = False
    assert latent_kind(fill_legacy_defaults(geoldm)) == "vae"


# ----------------------------------------------------------------------------- GeoLDM end to end


@pytest.fixture(scope="module")
def geoldm_run(tmp_path_factory, qm9_datadir):
    root = tmp_path_factory.mktemp("geoldm")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    summary = main(small(root, qm9_datadir, QM9_README))
    torch.set_num_threads(threads)
    return root / "geoldm_qm9", summary


def test_geoldm_readme_run_trains_samples_and_evaluates(geoldm_run, tmp_path):
    run, summary = geoldm_run
    assert summary["kind"] == "geoldm" and isinstance(summary["model"], EnLatentDiffusion)
    assert summary["state"]["epoch"] == 2 and summary["state"]["global_step"] == 6 and summary["state"]["nan_total"] == 0
    assert np.isfinite(summary["best_nll_val"]) and set(summary["stability"]) >= {"mol_stable", "atm_stable", "validity"}
    args = load_run_args(run)
    assert (args.train_diffusion, args.trainable_ae, args.latent_nf, args.kl_weight, args.ae_path) == (True, True, 1, 0.01, None)
    # GeoLDM's run-folder layout and key names.
    state = torch.load(run / "generative_model_ema.npy", weights_only=True)
    assert list(state)[:2] == ["buffer", "gamma.gamma"]
    assert {k.split(".")[0] for k in state} == {"buffer", "gamma", "dynamics", "vae"}
    assert state["vae.decoder.egnn.embedding.weight"].shape == (16, 1) and state["dynamics.egnn.embedding.weight"].shape == (16, 2)
    # As released: the encoder is never trained, the decoder and the denoiser are.
    first = torch.load(run / "generative_model_0.npy", weights_only=True)
    last = load_resume_state(run)["model"]
    assert_same(section(first, "vae.encoder."), section(last, "vae.encoder."))
    for prefix in ("vae.decoder.", "dynamics."):
        assert any(not torch.equal(first[k], last[k]) for k in section(first, prefix)), prefix
    # The eval "NLL" counts k = 1 dof per atom for the latent h (GeoLDM: 3), a fixed shift.
    assert summary["model"].h_constants_dof == 1

    record = eval_analyze.main(["--model_path", str(run), "--n_samples", "4", "--batch_size_gen", "4", "--no_novelty",
                                "--eval_nll", "True", "--data_subset", "8", "--metrics_json", str(tmp_path / "m.json")])
    assert 0.0 <= record["metrics"]["atm_stable"] <= 1.0
    assert record["sampling"] == {"start_step": None, "dataset_var": 1.0, "step_size": 1, "sampler": "ddpm"}
    written = eval_sample.main(["--model_path", str(run), "--n_samples", "2", "--n_chains", "1", "--n_tries", "1",
                                "--keep_frames", "3", "--n_nodes", "9"])
    assert (run / "eval" / "molecules" / "grid.png").is_file() and (run / "eval" / "chain_0" / "chain.png").is_file()
    assert all(p.is_file() for paths in written.values() for p in paths)


def test_geoldm_resume_after_a_crash_is_bit_identical(geoldm_run, tmp_path, qm9_datadir):
    run, _ = geoldm_run
    main(small(tmp_path, qm9_datadir, QM9_README, "--checkpoint_every_steps", "2", "--stop_after_steps", "4"))
    crashed = load_resume_state(tmp_path / "geoldm_qm9")
    assert crashed["state"]["epoch"] == 1 and crashed["state"]["step_in_epoch"] == 1
    with pytest.raises(UserInputError, match="--latent_nf cannot change when resuming"):
        main(["--resume", str(tmp_path / "geoldm_qm9"), "--latent_nf", "2"])
    summary = main(["--resume", str(tmp_path / "geoldm_qm9"), "--trainable_ae", "--latent_nf", "1"])  # as stored: accepted
    assert summary["kind"] == "geoldm" and summary["state"]["epoch"] == 2
    assert_same(load_resume_state(run), load_resume_state(tmp_path / "geoldm_qm9"))
    for name in ("generative_model.npy", "generative_model_ema.npy", "optim.npy"):
        assert_same(torch.load(run / name, weights_only=True), torch.load(tmp_path / "geoldm_qm9" / name, weights_only=True), name)


def test_a_geoldm_written_folder_resumes_and_evaluates_on_the_cpu(geoldm_run, tmp_path):
    """GeoLDM's own files only (its args.pickle with cuda=True, no resume state, no flow.npy): --resume
    continues from the best model, eval_analyze samples it, on the CPU."""
    run, _ = geoldm_run
    folder = tmp_path / "published"
    folder.mkdir()
    for name in ("generative_model.npy", "generative_model_ema.npy", "optim.npy"):
        shutil.copy(run / name, folder / name)
    ours = ("zero_center_h", "dataset_var", "sampling_step_size", "sampler", "seed", "output_root",
            "checkpoint_every_steps", "nan_patience", "stop_after_steps", "egnn_impl", "group_by_size", "compile",
            "compile_backend", "tf32", "overwrite")
    args = {k: v for k, v in vars(load_run_args(run)).items() if k not in ours}  # data_subset kept: tiny data
    args.update(cuda=True, resume=None)
    (folder / "args.pickle").write_bytes(pickle.dumps(argparse.Namespace(**args)))
    record = eval_analyze.main(["--model_path", str(folder), "--n_samples", "2", "--batch_size_gen", "2", "--no_novelty"])
    assert "atm_stable" in record["metrics"]
    summary = main(["--resume", str(folder), "--n_epochs", str(args["current_epoch"] + 1), "--n_stability_samples", "0"])
    assert summary["kind"] == "geoldm" and summary["state"]["global_step"] == 3 and (folder / RESUME_FILE).is_file()


# ----------------------------------------------------------------------------- GeoLDM + GAGA


def test_geoldm_gaga_trains_with_max_t_and_samples_with_the_shortcut(tmp_path, qm9_datadir, monkeypatch):
    summary = main(small(tmp_path, qm9_datadir, QM9_README, "--max_t", "6", "--dataset_var", "0.5", "--n_epochs", "1"))
    run = tmp_path / "geoldm_qm9"
    args = load_run_args(run)
    assert args.max_t == 6 and args.zero_center_h is False and args.dataset_var == 0.5
    assert summary["stability"] is not None
    # The training draw t ~ U{0..max_t} (tests/test_geoldm_models.py checks the draw on this attribute).
    assert summary["model"].max_t == 6 and summary["model_ema"].max_t == 6

    calls = []
    phi = EnLatentDiffusion.phi
    monkeypatch.setattr(EnLatentDiffusion, "phi", lambda self, *a, **k: calls.append(1) or phi(self, *a, **k))
    record = eval_analyze.main(["--model_path", str(run), "--n_samples", "2", "--batch_size_gen", "2", "--no_novelty"])
    assert record["sampling"] == {"start_step": 6, "dataset_var": 0.5, "step_size": 1, "sampler": "ddpm"}
    assert len(calls) == 6 + 1  # the latent chain from T* = 6 (not T = 10), then p(z | z_0)

    GAGA_test.main(["--model_path", str(run), "--n_samples", "2", "--batch_size_gen", "2", "--no_novelty", "--iteration", "1",
                    "--compare", "--ddim_stride", "2", "--solver_steps", "[2]", "--out_dir", str(tmp_path / "gaga")])
    rows = [line.split("|")[1].strip() for line in next((tmp_path / "gaga").glob("*.md")).read_text().splitlines()
            if line.startswith("| ") and "setting" not in line]
    assert rows == ["GeoLDM full chain", "GAGA (T*=6)", "DDIM (stride 2)", "DDIM (stride 2) + GAGA",
                    "DPM-Solver++(2M), 2 steps", "DPM-Solver++(2M), 2 steps + GAGA"]


# ----------------------------------------------------------------------------- VAE-only, then --ae_path


def test_vae_only_run_then_a_latent_diffusion_from_its_folder(tmp_path, qm9_datadir):
    vae_argv = ["--exp_name", "vae", "--train_diffusion", "False", "--latent_nf", "2", "--diffusion_noise_schedule",
                "polynomial_2", "--diffusion_loss_type", "l2", "--output_root", str(tmp_path), "--datadir", str(qm9_datadir),
                *SMALL, "--n_epochs", "1", "--visualize_every_batch", "1"]
    summary = main(vae_argv)
    vae = tmp_path / "vae"
    assert summary["kind"] == "vae" and summary["stability"] is None and np.isfinite(summary["best_nll_val"])
    assert not list(vae.glob("epoch_*"))  # no pictures: nothing to sample
    ema = torch.load(vae / "generative_model_ema.npy", weights_only=True)
    assert {k.split(".")[0] for k in ema} == {"buffer", "encoder", "decoder"}
    # A VAE pickled on a GPU box: its cuda flag must not move the second stage off the CPU.
    vae_args = load_run_args(vae)
    vae_args.cuda = True
    save_run_args(vae, vae_args)

    ld = main(["--exp_name", "ld", "--train_diffusion", "--ae_path", str(vae), "--diffusion_noise_schedule", "polynomial_2",
               "--diffusion_loss_type", "l2", "--output_root", str(tmp_path), "--datadir", str(qm9_datadir), *SMALL,
               "--n_epochs", "1"])
    args = load_run_args(tmp_path / "ld")
    assert ld["kind"] == "geoldm" and args.latent_nf == 2 and args.trainable_ae is False and args.ae_path == str(vae)
    model = ld["model"]
    assert next(model.parameters()).device.type == "cpu" and not model.vae.training
    # The first stage is the VAE run's EMA weights, frozen through training (no recon term, no gradient).
    for key, value in ema.items():
        assert torch.equal(model.vae.state_dict()[key], value), key
    record = eval_analyze.main(["--model_path", str(tmp_path / "ld"), "--n_samples", "2", "--batch_size_gen", "2",
                                "--no_novelty"])
    assert "atm_stable" in record["metrics"]


def test_vae_only_run_works_on_geom(tmp_path):
    """GeoLDM's main_geom_drugs.py crashes on a VAE-only run (it samples); here it trains and validates."""
    import msgpack
    from rdkit import Chem
    from rdkit.Chem import AllChem

    from qm9.data.geom import build_geom_dataset

    record = {}
    for seed, smiles in enumerate(["CC(=O)Oc1ccccc1C(=O)O", "CC(=O)Nc1ccc(O)cc1", "Brc1ccc(cc1)C(=O)N", "c1ccncc1"]):
        mol = Chem.AddHs(Chem.MolFromSmiles(smiles))
        params = AllChem.ETKDGv3()
        params.randomSeed = seed
        ids = list(AllChem.EmbedMultipleConfs(mol, numConfs=5, params=params))
        z = np.array([a.GetAtomicNum() for a in mol.GetAtoms()], dtype=np.float64)
        record[smiles] = {"conformers": [
            {"xyz": np.column_stack([z, mol.GetConformer(c).GetPositions()]).tolist(), "totalenergy": -float(c)}
            for c in ids
        ]}
    (tmp_path / "drugs_crude.msgpack").write_bytes(msgpack.packb(record, use_bin_type=True))
    build_geom_dataset(tmp_path, conformations=5, progress=False)
    summary = main(["--exp_name", "vae_geom", "--output_root", str(tmp_path / "outputs"), "--datadir", str(tmp_path),
                    "--conformations", "5", "--nf", "16", "--n_layers", "2", "--latent_nf", "2", "--batch_size", "8",
                    "--n_epochs", "1", "--test_epochs", "1", "--n_stability_samples", "2", "--ema_decay", "0.9",
                    "--diffusion_noise_schedule", "polynomial_2", "--diffusion_loss_type", "l2"], script="geom")
    args = load_run_args(tmp_path / "outputs" / "vae_geom")
    assert summary["kind"] == "vae" and args.dataset == "geom" and args.include_charges is False
    assert summary["state"]["global_step"] >= 1 and np.isfinite(summary["best_nll_val"]) and summary["stability"] is None


# ----------------------------------------------------------------------------- equivariance of the latent sampler


def rotation(seed: int = 0) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(seed)))
    return q


@pytest.mark.parametrize("options", [dict(), dict(start_step=6, dataset_var=0.5), dict(sampler="ddim", step_size=2),
                                     dict(sampler="dpm_solver_2m", step_size=5, start_step=10)])
def test_latent_sampling_and_decode_are_rotation_equivariant(options):
    """Rotating every noise draw's position part rotates the decoded molecule and keeps its atom types,
    for the full chain, the Gaussian shortcut, DDIM and DPM-Solver++ on the latent chain."""
    from configs.datasets_config import get_dataset_info
    from qm9.models import get_latent_diffusion
    from qm9.sampling import masks_from_sizes

    args = parse_args([*QM9_README.split(), "--nf", "16", "--n_layers", "2", "--diffusion_steps", "10", "--latent_nf", "2"])
    args.context_node_nf = 0
    torch.manual_seed(0)
    model, _, _ = get_latent_diffusion(args, "cpu", get_dataset_info("qm9", False))
    model.eval()
    node_mask, edge_mask = masks_from_sizes(torch.tensor([7, 5]), 7, "cpu")
    draws, original = [], model.sample_combined_position_feature_noise

    def record(*a, **k):
        draws.append(original(*a, **k))
        return draws[-1]

    model.sample_combined_position_feature_noise = record
    x1, h1 = model.sample(2, 7, node_mask, edge_mask, None, **options)
    R = rotation()
    replayed = iter(list(draws))

    def replay(*a, **k):
        z = next(replayed).clone()
        z[:, :, :3] = z[:, :, :3] @ R
        return z

    model.sample_combined_position_feature_noise = replay
    x2, h2 = model.sample(2, 7, node_mask, edge_mask, None, **options)
    assert draws and next(replayed, None) is None  # every draw was replayed (DDIM, DPM: z_T only)
    torch.testing.assert_close(x2, x1 @ R, atol=2e-4, rtol=1e-4)
    assert not torch.allclose(x1, x2, atol=1e-2)  # the rotation is not trivial
    assert torch.equal(h1["categorical"], h2["categorical"]) and torch.equal(h1["integer"], h2["integer"])


def test_nan_guard_covers_the_reconstruction_term(monkeypatch, tmp_path, qm9_datadir):
    """A non-finite decoder loss (GeoLDM's own term) is skipped like EDM's, and stops the run after --nan_patience."""
    from configs.errors import TrainingStopped
    from equivariant_diffusion.latent_diffusion import EnHierarchicalVAE

    real = EnHierarchicalVAE.compute_reconstruction_error
    monkeypatch.setattr(EnHierarchicalVAE, "compute_reconstruction_error",
                        lambda self, xh_rec, xh: real(self, xh_rec, xh) * float("nan"))
    with pytest.raises(TrainingStopped) as stop:
        main(small(tmp_path, qm9_datadir, QM9_README, "--nan_patience", "2", "--n_stability_samples", "0"))
    assert "2 batches in a row gave a non-finite loss" in str(stop.value) and "epoch 0, iter 1" in str(stop.value)
    assert "\n" not in str(stop.value)


def test_geoldm_readme_recipe_trains_under_ddp(tmp_path, qm9_datadir):
    """Two CPU processes (gloo) on GeoLDM's README recipe stay in sync; the never-trained encoder
    is not a trainable parameter, so DDP does not stop at the second step (it would with GeoLDM's
    requires_grad=True encoder that never receives a gradient)."""
    import torch.multiprocessing as mp

    from test_distributed import _free_port, _worker

    argv = small(tmp_path, qm9_datadir, QM9_README, "--data_subset", "32", "--n_epochs", "1", "--n_stability_samples", "0")
    mp.spawn(_worker, args=(2, _free_port(), argv, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert ranks[0]["state"]["global_step"] == ranks[1]["state"]["global_step"] == 2  # 16 molecules per process, batches of 8
    for key in ("model", "model_ema"):
        for name, tensor in ranks[0][key].items():
            assert torch.equal(tensor, ranks[1][key][name]), f"{key}.{name}"
    assert_same(section(ranks[0]["model"], "vae.encoder."), section(ranks[0]["model_ema"], "vae.encoder."))


@pytest.mark.parametrize("k", [1, 2])
def test_eval_constant_counts_the_latent_channels(k):
    """The eval constant of -log p(z_h | z_0) of a run built here counts k dof per atom; GeoLDM's counts 3
    (14.512557 per atom at precision 1e-5, geoldm_architecture.md section 5.1)."""
    from configs.datasets_config import get_dataset_info
    from qm9.sampling import masks_from_sizes
    from training.latent_training import build_run_model

    args = parse_args([*QM9_README.split(), "--nf", "8", "--n_layers", "1", "--latent_nf", str(k)])
    args.context_node_nf = 0
    model, _, _ = build_run_model(args, "cpu", get_dataset_info("qm9", False))
    node_mask, _ = masks_from_sizes(torch.tensor([5, 3]), 5, "cpu")
    ours = model.log_constants_p_h_given_z0(torch.zeros(2, 5, 3), node_mask)
    model.h_constants_dof = None
    geoldm = model.log_constants_p_h_given_z0(torch.zeros(2, 5, 3), node_mask)
    torch.testing.assert_close(geoldm, torch.tensor([5.0, 3.0]) * 14.512557, rtol=1e-6, atol=0)
    torch.testing.assert_close(ours, geoldm * k / 3, rtol=1e-6, atol=0)
