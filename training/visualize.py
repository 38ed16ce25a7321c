"""In-training pictures (EDM's save_and_sample_chain / sample_different_sizes_and_save).

Written under ``<run>/epoch_<e>_<i>/``: ``chain/`` (XYZ + PNG frames of one denoising chain
and ``chain.png``) and ``molecules/`` (a few samples as XYZ + PNG and ``grid.png``); a conditional
run also writes ``conditional/``, EDM's property sweep (``save_and_sample_conditional``).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from qm9 import visualizer
from qm9.sampling import sample, sample_chain, sample_sweep_conditional
from training.loop import sampling_options


def chain_frames(args: argparse.Namespace) -> int:
    """Frames to keep from a chain: EDM's 100, or fewer if the chain is shorter."""
    options = sampling_options(args)
    start = options["start_step"] or int(args.diffusion_steps)
    return max(1, min(100, start // options["step_size"]))


@torch.no_grad()
def save_and_sample_chain(model, args, device, dataset_info, prop_dist, folder: Path, n_tries: int = 1) -> list[Path]:
    was_training = model.training
    model.eval()
    one_hot, charges, x = sample_chain(args, device, model, n_tries, dataset_info, prop_dist,
                                       keep_frames=chain_frames(args), **sampling_options(args))
    model.train(was_training)
    visualizer.save_xyz_file(folder, one_hot, charges, x, dataset_info, id_from=0, name="chain")
    return visualizer.visualize_chain(folder, dataset_info)


@torch.no_grad()
def sample_different_sizes_and_save(model, nodes_dist, args, device, dataset_info, prop_dist, folder: Path,
                                    n_samples: int = 5) -> list[Path]:
    was_training = model.training
    model.eval()
    nodesxsample = nodes_dist.sample(n_samples)
    one_hot, charges, x, node_mask = sample(args, device, model, dataset_info, prop_dist,
                                            nodesxsample=nodesxsample, **sampling_options(args))
    model.train(was_training)
    visualizer.save_xyz_file(folder, one_hot, charges, x, dataset_info, id_from=0, name="molecule", node_mask=node_mask)
    return visualizer.visualize(folder, dataset_info, max_num=n_samples)


@torch.no_grad()
def save_and_sample_conditional(model, args, device, dataset_info, prop_dist, folder: Path) -> list[Path]:
    """EDM's sweep: 100 molecules of 19 atoms whose property runs over its training range, one
    shared noise draw; XYZ files and a picture strip."""
    was_training = model.training
    model.eval()
    one_hot, charges, x, node_mask = sample_sweep_conditional(args, device, model, dataset_info, prop_dist,
                                                              **sampling_options(args))
    model.train(was_training)
    visualizer.save_xyz_file(folder, one_hot, None, x, dataset_info, id_from=0, name="conditional", node_mask=node_mask)
    return visualizer.visualize_chain(folder, dataset_info)


def make_visualize_fn(model_sample, nodes_dist, args, device, dataset_info, prop_dist, run_dir: Path, logger=None):
    """The callback train_epoch calls every ``--visualize_every_batch`` batches (rank 0)."""

    def visualize_fn(epoch: int, batch: int) -> None:
        folder = Path(run_dir) / f"epoch_{epoch}_{batch}"
        save_and_sample_chain(model_sample, args, device, dataset_info, prop_dist, folder / "chain")
        sample_different_sizes_and_save(model_sample, nodes_dist, args, device, dataset_info, prop_dist, folder / "molecules")
        if getattr(args, "conditioning", None) and prop_dist is not None:
            save_and_sample_conditional(model_sample, args, device, dataset_info, prop_dist, folder / "conditional")

    return visualize_fn
