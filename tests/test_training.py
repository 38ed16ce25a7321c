"""The training loop: EMA, adaptive clipping, the NaN guard, and a tiny run end to end (train, sample, evaluate)."""
from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch

from configs.run_args import load_run_args
from training.clipping import Queue, gradient_clipping, max_grad_norm, new_gradnorm_queue
from training.ema import EMA
from training.loop import random_rotation, sampling_options


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_argv(tmp_path, datadir, *extra: str) -> list[str]:
    """A run of a 2-layer, nf 16 model on 32 QM9 molecules (2 batches per epoch), T = 10."""
    return [
        "--exp_name", "tiny", "--output_root", str(tmp_path), "--datadir", str(datadir), "--data_subset", "32",
        "--nf", "16", "--n_layers", "2", "--diffusion_steps", "10", "--diffusion_noise_schedule", "polynomial_2",
        "--diffusion_loss_type", "l2", "--normalize_factors", "[1,4,10]", "--batch_size", "16", "--n_epochs", "2",
        "--test_epochs", "1", "--n_stability_samples", "4", "--visualize_every_batch", "0", "--ema_decay", "0.99",
        *extra,
    ]


# ------------------------------------------------------------------ EMA and clipping


def test_ema_is_edm_average_of_trainable_parameters_only():
    torch.manual_seed(0)
    model, ema_model = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    fixed = torch.nn.Parameter(torch.randn(4), requires_grad=False)
    model.register_parameter("fixed", fixed)
    ema_model.register_parameter("fixed", torch.nn.Parameter(torch.zeros(4), requires_grad=False))
    before = [p.detach().clone() for p in ema_model.parameters()]
    EMA(0.9).update_model_average(ema_model, model)
    for old, new, p in zip(before[:2], list(ema_model.parameters())[:2], list(model.parameters())[:2]):
        assert torch.equal(new, old * 0.9 + (1 - 0.9) * p)  # EDM's arithmetic, bit for bit
    assert torch.equal(ema_model.fixed, model.fixed)  # copied, never averaged


def test_gradnorm_queue_starts_at_3000_and_keeps_50():
    queue = new_gradnorm_queue()
    assert queue.items == [3000.0] and max_grad_norm(queue) == 4500.0
    queue.add(1000.0)
    assert max_grad_norm(queue) == pytest.approx(1.5 * 2000 + 2 * 1000)  # population std
    for k in range(60):
        queue.add(float(k))
    assert len(queue) == 50 and 3000.0 not in queue.items and queue.items[0] == 59.0


def test_gradient_clipping_clips_to_the_adaptive_limit_and_queues_it():
    layer = torch.nn.Linear(4, 1, bias=False)
    queue = Queue()
    queue.add(1.0)  # limit 1.5
    layer.weight.grad = torch.full_like(layer.weight, 10.0)  # norm 20
    norm = gradient_clipping(layer, queue, verbose=False)
    assert norm == pytest.approx(20.0)
    assert layer.weight.grad.norm().item() == pytest.approx(1.5, rel=1e-5)
    assert queue.items[0] == 1.5  # the limit, not the raw norm, enters the queue
    layer.weight.grad = torch.full_like(layer.weight, 0.1)  # norm 0.2 < limit: untouched, queued as is
    assert gradient_clipping(layer, queue, verbose=False) == pytest.approx(0.2)
    assert queue.items[0] == pytest.approx(0.2) and layer.weight.grad[0, 0].item() == pytest.approx(0.1)
    layer.weight.grad = torch.full_like(layer.weight, float("nan"))
    n_before = len(queue)
    assert np.isnan(gradient_clipping(layer, queue, verbose=False)) and len(queue) == n_before


def test_random_rotation_is_a_proper_rotation_per_molecule():
    torch.manual_seed(0)
    x = torch.randn(8, 5, 3)
    y = random_rotation(x)
    # Distances are kept, and a rotation (not a reflection) maps x to y: det of the fitted map is +1.
    assert torch.allclose(torch.cdist(x, x), torch.cdist(y, y), atol=1e-5)
    maps = torch.linalg.lstsq(x, y).solution
    assert torch.allclose(torch.linalg.det(maps), torch.ones(8), atol=1e-4)


# ------------------------------------------------------------------ sampling options


def test_stability_check_samples_with_the_runs_own_max_t_and_variance():
    edm = argparse.Namespace(diffusion_steps=1000, max_t=None, dataset_var=1.0, sampling_step_size=1, sampler="ddpm")
    assert sampling_options(edm)["start_step"] is None  # EDM: the full chain from N(0, I)
    gaga = argparse.Namespace(diffusion_steps=1000, max_t=550, dataset_var=0.848, sampling_step_size=1, sampler="ddpm")
    assert sampling_options(gaga) == {"start_step": 550, "dataset_var": 0.848, "step_size": 1, "sampler": "ddpm"}
    full = argparse.Namespace(diffusion_steps=1000, max_t=1000, dataset_var=0.9)
    assert sampling_options(full)["start_step"] is None


# ------------------------------------------------------------------ NaN guard


def _patch_loss(monkeypatch, make_bad):
    import training.loop as loop

    real = loop.compute_loss_and_nll

    def patched(args, model, nodes_dist, x, h, node_mask, edge_mask, context):
        nll, reg, z = real(args, model, nodes_dist, x, h, node_mask, edge_mask, context)
        return make_bad(nll, model), reg, z

    monkeypatch.setattr(loop, "compute_loss_and_nll", patched)


def test_nan_guard_stops_after_patience_with_a_clear_message(monkeypatch, tmp_path, qm9_datadir):
    from training.run import main

    _patch_loss(monkeypatch, lambda nll, model: nll * float("nan"))
    from configs.errors import TrainingStopped

    with pytest.raises(TrainingStopped) as stop:
        main(tiny_argv(tmp_path, qm9_datadir, "--nan_patience", "3"))
    message = str(stop.value)
    assert "3 batches in a row gave a non-finite loss" in message and "epoch 1, iter 0" in message
    assert "\n" not in message
    assert f"--resume {tmp_path / 'tiny'}" in message  # the run's real folder (--output_root), not outputs/


@pytest.mark.parametrize("kind", ["loss", "gradient"])
def test_nan_guard_skips_bad_batches_without_touching_the_model(monkeypatch, tmp_path, qm9_datadir, kind):
    from training.run import main

    def make_bad(nll, model):
        if kind == "loss":
            return nll + float("inf")
        # Finite loss (adds exactly 0) whose gradient is NaN: d sqrt(u)/du at u = 0 is inf, times 0.
        first = next(p for p in model.parameters() if p.requires_grad)
        return nll + torch.sqrt(first.sum() * 0.0)

    _patch_loss(monkeypatch, make_bad)
    summary = main(tiny_argv(tmp_path, qm9_datadir, "--nan_patience", "100", "--n_stability_samples", "0"))
    assert summary["state"]["nan_total"] == 4 and summary["state"]["nan_in_a_row"] == 4  # 2 epochs x 2 batches
    assert summary["optim"].state_dict()["state"] == {}  # the optimiser never stepped
    assert summary["gradnorm_queue"].items == [3000.0]
    for p, q in zip(summary["model"].parameters(), summary["model_ema"].parameters()):
        assert torch.equal(p, q)  # the EMA copy was never updated, the model never moved


# ------------------------------------------------------------------ end to end


def test_tiny_gaga_run_trains_samples_and_evaluates(tmp_path, qm9_datadir):
    import eval_analyze
    import eval_sample
    from training.run import main

    # A few hundred molecules: 256 per split, 4 batches of 64 per epoch.
    summary = main(tiny_argv(tmp_path, qm9_datadir, "--include_charges=False", "--max_t", "5", "--dataset_var", "0.848",
                             "--visualize_every_batch", "3", "--data_subset", "256", "--batch_size", "64"))
    run = tmp_path / "tiny"
    for name in ("args.pickle", "generative_model.npy", "generative_model_ema.npy", "optim.npy", "resume_state.pt"):
        assert (run / name).is_file(), name
    args = load_run_args(run)
    assert args.zero_center_h is True and args.max_t == 5 and args.current_epoch >= 1
    assert np.isfinite(summary["best_nll_val"]) and np.isfinite(summary["best_nll_test"])
    assert summary["state"]["epoch"] == 2 and summary["state"]["global_step"] == 8
    assert set(summary["stability"]) >= {"mol_stable", "atm_stable", "validity", "uniqueness"}
    assert "novelty" not in summary["stability"]  # not measured without the training SMILES: no 0.0 stand-in
    # The EMA moved away from the initial weights and lags behind the model.
    assert any(not torch.equal(p, q) for p, q in zip(summary["model"].parameters(), summary["model_ema"].parameters()))
    # EDM's visualisation at the first batch of a test epoch other than the first.
    assert (run / "epoch_1_0" / "chain" / "chain.png").is_file()
    assert (run / "epoch_1_0" / "molecules" / "grid.png").is_file()
    # The best-model weights load strictly into the model the run's args describe.
    state = torch.load(run / "generative_model_ema.npy", weights_only=True)
    assert set(state) == set(summary["model"].state_dict())

    record = eval_analyze.main(["--model_path", str(run), "--n_samples", "6", "--batch_size_gen", "4",
                                "--no_novelty", "--save_to_xyz", "True", "--save_to_sdf", "True"])
    saved = json.loads((run / "eval_metrics.json").read_text())
    assert saved["metrics"] == record["metrics"] and 0.0 <= saved["metrics"]["atm_stable"] <= 1.0
    assert saved["sampling"] == {"start_step": 5, "dataset_var": 0.848, "step_size": 1, "sampler": "ddpm"}
    assert len(list((run / "analyzed_molecules").glob("molecule_*.xyz"))) == 6
    assert (run / "analyzed_molecules" / "molecules.sdf").read_text().count("$$$$") == 6

    # A GAGA-fork args.pickle lacks our fields: the run still loads, in GAGA mode (it has max_t), with EDM defaults.
    import pickle

    legacy = vars(load_run_args(run))
    for field in ("zero_center_h", "dataset_var", "sampling_step_size", "sampler", "seed", "data_subset", "output_root",
                  "checkpoint_every_steps", "nan_patience", "stop_after_steps", "aggregation_method"):
        legacy.pop(field)
    (run / "args.pickle").write_bytes(pickle.dumps(argparse.Namespace(**legacy)))
    record = eval_analyze.main(["--model_path", str(run), "--n_samples", "4", "--no_novelty",
                                "--metrics_json", str(tmp_path / "legacy.json")])
    # ... and samples from the Gaussian start with the published QM9 variance, as the GAGA fork is run.
    assert record["sampling"] == {"start_step": 5, "dataset_var": 0.848, "step_size": 1, "sampler": "ddpm"}

    written = eval_sample.main(["--model_path", str(run), "--n_samples", "2", "--n_chains", "1", "--n_tries", "1",
                                "--keep_frames", "3", "--n_nodes", "9"])
    assert all(p.is_file() and p.suffix == ".png" for paths in written.values() for p in paths)
    assert (run / "eval" / "molecules" / "grid.png").is_file() and (run / "eval" / "chain_0" / "chain.png").is_file()


def test_tiny_geom_run_trains_and_checks_stability(tmp_path):
    """main_geom_drugs.py's path on a GEOM-format file of 4 drug-like molecules (RDKit conformers)."""
    import msgpack
    from rdkit import Chem
    from rdkit.Chem import AllChem

    from qm9.data.geom import build_geom_dataset
    from training.run import main

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

    summary = main([
        "--exp_name", "geom_tiny", "--output_root", str(tmp_path / "outputs"), "--datadir", str(tmp_path),
        "--conformations", "5", "--nf", "16", "--n_layers", "2", "--diffusion_steps", "10",
        "--diffusion_noise_schedule", "polynomial_2", "--diffusion_loss_type", "l2", "--batch_size", "8",
        "--n_epochs", "1", "--test_epochs", "1", "--n_stability_samples", "2", "--ema_decay", "0.99",
        "--max_t", "6", "--visualize_every_batch", "0",
    ], script="geom")
    args = load_run_args(tmp_path / "outputs" / "geom_tiny")
    assert args.dataset == "geom" and args.include_charges is False and args.normalize_factors == [1, 4, 10]
    assert summary["state"]["global_step"] >= 1 and np.isfinite(summary["best_nll_val"])
    assert set(summary["stability"]) >= {"mol_stable", "atm_stable", "validity"}


def test_wandb_is_never_required(monkeypatch, capsys):
    import sys

    from training.args import parse_args
    from training.wandb_logger import RunLogger

    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    logger = RunLogger(parse_args(["--wandb"]), enabled=True, run_dir=".")
    logger.log({"loss": 1.0})
    logger.finish()
    assert logger.run is None and "wandb is not installed" in capsys.readouterr().out
    assert RunLogger(parse_args([]), enabled=False, run_dir=".").run is None
