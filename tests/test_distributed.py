"""DistributedDataParallel on the CPU (gloo): 2 processes train on disjoint shards and stay in sync."""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from training.data import EpochSampler


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, argv: list[str], out_dir: str) -> None:
    # What torchrun sets for each process.
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank), GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(1)
    from training.run import main

    summary = main(argv)
    torch.save({"model": summary["model"].state_dict(), "model_ema": summary["model_ema"].state_dict(),
                "optim_steps": len(summary["optim"].state_dict()["state"]), "state": summary["state"]},
               os.path.join(out_dir, f"rank{rank}.pt"))


def test_epoch_shards_are_disjoint_cover_the_data_and_follow_the_epoch():
    shards = [list(EpochSampler(10, shuffle=True, seed=3, rank=r, world_size=2)) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 5 and sorted(shards[0] + shards[1]) == list(range(10))
    padded = [list(EpochSampler(7, shuffle=True, seed=3, rank=r, world_size=2)) for r in range(2)]
    assert len(padded[0]) == len(padded[1]) == 4 and set(padded[0] + padded[1]) == set(range(7))
    sampler = EpochSampler(10, shuffle=True, seed=3)
    first = list(sampler)
    sampler.set_epoch(1)
    assert sorted(list(sampler)) == list(range(10)) and list(sampler) != first
    sampler.set_epoch(0, start=4)
    assert list(sampler) == first[4:] and len(sampler) == 6


def test_two_cpu_processes_stay_in_sync(tmp_path, qm9_datadir):
    argv = [
        "--exp_name", "ddp", "--output_root", str(tmp_path), "--datadir", str(qm9_datadir), "--data_subset", "64",
        "--nf", "16", "--n_layers", "2", "--diffusion_steps", "10", "--diffusion_noise_schedule", "polynomial_2",
        "--diffusion_loss_type", "l2", "--normalize_factors", "[1,4,10]", "--batch_size", "16", "--n_epochs", "2",
        "--test_epochs", "1", "--n_stability_samples", "4", "--visualize_every_batch", "0", "--ema_decay", "0.9",
        "--max_t", "6", "--include_charges=False",
    ]
    mp.spawn(_worker, args=(2, _free_port(), argv, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    # Each process ran 64 / 2 molecules per epoch in batches of 16 / 2: 4 steps per epoch.
    assert ranks[0]["state"]["global_step"] == ranks[1]["state"]["global_step"] == 8
    for key in ("model", "model_ema"):
        for name, tensor in ranks[0][key].items():
            assert torch.equal(tensor, ranks[1][key][name]), f"{key}.{name} differs between the processes"
    # Rank 0 wrote the run folder: its weights are the processes' common weights, with both RNG states.
    from training.checkpoint import load_resume_state

    saved = load_resume_state(tmp_path / "ddp")
    assert saved["world_size"] == 2 and len(saved["rng"]) == 2
    assert not torch.equal(saved["rng"][0]["torch"], saved["rng"][1]["torch"])  # different noise per process
    for name, tensor in ranks[0]["model"].items():
        assert torch.equal(tensor, saved["model"][name])
    assert (tmp_path / "ddp" / "generative_model_ema.npy").is_file()


def test_ddp_shards_padded_to_the_global_size_give_the_single_process_objective(monkeypatch, qm9_datadir):
    """The l2 loss divides by the padded atom count. A DDP process pads its shard to the global
    batch's largest molecule (training.loop), so the per-molecule losses, and hence DDP's averaged
    gradient, equal one process's on the whole batch; each shard at its own padding would not."""
    import numpy as np

    from configs.datasets_config import get_dataset_info
    from equivariant_diffusion import en_diffusion
    from qm9.data.collate import make_batch
    from qm9.data.qm9 import load_qm9
    from qm9.losses import pad_to_atoms, preprocess_batch
    from qm9.models import get_model
    from test_models import gaga_qm9_args

    arrays = load_qm9(str(qm9_datadir), "train", progress=False)
    order = np.argsort(arrays["num_atoms"][:200])
    rows = np.concatenate([order[:4], order[-4:]])  # shard 0: small molecules, shard 1: large ones
    args = gaga_qm9_args(nf=16, n_layers=1, diffusion_steps=100, max_t=100)
    torch.manual_seed(0)
    model, _, _ = get_model(args, "cpu", get_dataset_info("qm9", False), None)
    model.train()

    def batch_of(sel):
        b = make_batch(arrays["positions"][sel], arrays["charges"][sel], arrays["one_hot"][sel],
                       arrays["num_atoms"][sel], arrays["index"][sel])
        return preprocess_batch(b, "cpu", torch.float32, False, True)[:4]

    full = batch_of(rows)
    n_global = full[0].shape[1]
    torch.manual_seed(1)
    fixed_t = torch.randint(1, 101, (8, 1))
    fixed_eps = torch.randn(8, n_global, 3 + 5)
    current = {}

    def fixed_randint(low, high, size, device=None):
        return fixed_t[current["rows"]].clone()

    def fixed_noise(self, n_samples, n_nodes, node_mask):
        eps = fixed_eps[current["rows"], :n_nodes] * node_mask
        return eps - eps.sum(1, keepdim=True) / node_mask.sum(1, keepdim=True) * node_mask

    monkeypatch.setattr(en_diffusion.torch, "randint", fixed_randint)
    monkeypatch.setattr(en_diffusion.EnVariationalDiffusion, "sample_combined_position_feature_noise", fixed_noise)

    def losses(x, h, node_mask, edge_mask, sel):
        current["rows"] = sel
        with torch.no_grad():
            return model(x, h, node_mask, edge_mask)

    single = losses(*full, slice(0, 8))
    shards = [batch_of(rows[:4]), batch_of(rows[4:])]
    assert shards[0][0].shape[1] < n_global == shards[1][0].shape[1]
    padded = torch.cat([losses(*pad_to_atoms(*shards[k], n_global), slice(4 * k, 4 * k + 4)) for k in range(2)])
    torch.testing.assert_close(padded, single, rtol=1e-5, atol=1e-5)
    own = losses(*shards[0], slice(0, 4))  # the small shard at its own padding: a different objective
    assert not torch.allclose(own, single[:4], rtol=1e-3)
