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
