"""Draw molecules from a trained model (EDM's ``qm9/sampling.py``) with GAGA's options.

Outputs are padded to the dataset's largest molecule (``dataset_info['max_n_nodes']``), as in
EDM, so batches from several calls can be concatenated. Inside, the network runs on groups
of equal-sized molecules (see ``egnn.models``), so padding costs no work.
"""
from __future__ import annotations

import torch
from torch.nn import functional as F

from configs.datasets import dataset_entry
from equivariant_diffusion.utils import assert_correctly_masked, assert_mean_zero_with_mask


def masks_from_sizes(n_nodes: torch.Tensor, max_n_nodes: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """node_mask (B, N, 1) with the first n_b slots real, edge_mask (B*N*N, 1) without self loops."""
    slots = torch.arange(max_n_nodes)
    node_mask = (slots.unsqueeze(0) < n_nodes.reshape(-1, 1).cpu()).float()
    bs = node_mask.size(0)
    edge_mask = node_mask.unsqueeze(1) * node_mask.unsqueeze(2)
    edge_mask = edge_mask * (1 - torch.eye(max_n_nodes)).unsqueeze(0)
    return node_mask.unsqueeze(2).to(device), edge_mask.view(bs * max_n_nodes * max_n_nodes, 1).to(device)


def sample(
    args,
    device,
    generative_model,
    dataset_info: dict,
    prop_dist=None,
    nodesxsample: torch.Tensor = torch.tensor([10]),
    context=None,
    fix_noise: bool = False,
    start_step: int | None = None,
    dataset_var: float = 1.0,
    step_size: int = 1,
    sampler: str = "ddpm",
):
    """(one_hot (B,N,C), charges (B,N,1) or (B,N,0), x (B,N,3), node_mask (B,N,1)) for the
    atom counts ``nodesxsample``; N = dataset_info['max_n_nodes'].

    start_step/dataset_var/step_size/sampler: GAGA's Gaussian start and strided or DDIM
    chains (see ``EnVariationalDiffusion.sample``); the defaults are EDM's full chain.
    """
    max_n_nodes = dataset_info["max_n_nodes"]
    nodesxsample = torch.as_tensor(nodesxsample).reshape(-1)
    if len(nodesxsample) == 0:
        raise ValueError("nodesxsample is empty: ask for at least one molecule")
    if int(nodesxsample.max()) > max_n_nodes or int(nodesxsample.min()) < 1:
        raise ValueError(f"atom counts must be in [1, {max_n_nodes}], got {nodesxsample.tolist()}")
    if getattr(args, "context_node_nf", 0):
        raise ValueError("conditional sampling (context_node_nf > 0) is not supported")
    batch_size = len(nodesxsample)
    node_mask, edge_mask = masks_from_sizes(nodesxsample, max_n_nodes, device)

    x, h = generative_model.sample(
        batch_size, max_n_nodes, node_mask, edge_mask, None, fix_noise=fix_noise,
        start_step=start_step, dataset_var=dataset_var, step_size=step_size, sampler=sampler,
    )
    assert_correctly_masked(x, node_mask)
    assert_mean_zero_with_mask(x, node_mask)
    one_hot, charges = h["categorical"], h["integer"]
    assert_correctly_masked(one_hot.float(), node_mask)
    if getattr(args, "include_charges", True):
        assert_correctly_masked(charges.float(), node_mask)
    return one_hot, charges, x, node_mask


def sample_chain(
    args,
    device,
    flow,
    n_tries: int,
    dataset_info: dict,
    prop_dist=None,
    n_nodes: int | None = None,
    keep_frames: int = 100,
    start_step: int | None = None,
    dataset_var: float = 1.0,
    step_size: int = 1,
    sampler: str = "ddpm",
):
    """A denoising chain of one molecule for visualisation: (one_hot, charges, x) per frame.

    Frames run from noise to the final molecule, whose frame is repeated 10 times. Tries up
    to n_tries chains and keeps the first whose final molecule is stable (EDM's behaviour).
    ``n_nodes``: atoms of the molecule; default the dataset's chain size (configs/datasets.py).
    """
    from qm9.analyze import check_stability  # metrics live beside sampling, import on use

    if n_nodes is None:
        n_nodes = dataset_entry(getattr(args, "dataset", "qm9")).chain_n_nodes  # EDM: QM9 19, GEOM 44
    if getattr(args, "context_node_nf", 0):
        raise ValueError("conditional sampling (context_node_nf > 0) is not supported")
    num_classes = len(dataset_info["atom_decoder"])
    n_steps = (start_step if start_step is not None else flow.T) // max(int(step_size), 1)
    keep_frames = max(1, min(keep_frames, n_steps))  # a short chain has fewer frames
    node_mask, edge_mask = masks_from_sizes(torch.tensor([n_nodes]), n_nodes, device)
    one_hot = charges = x = None
    for i in range(n_tries):
        chain = flow.sample_chain(
            1, n_nodes, node_mask, edge_mask, None, keep_frames=keep_frames,
            start_step=start_step, dataset_var=dataset_var, step_size=step_size, sampler=sampler,
        )
        chain = torch.flip(chain, dims=[0])  # noise first, final molecule last
        chain = torch.cat([chain, chain[-1:].repeat(10, 1, 1)], dim=0)
        types = torch.argmax(chain[:, :, 3 : 3 + num_classes], dim=2)
        stable = check_stability(
            chain[-1, :, 0:3].cpu().numpy(), types[-1].cpu().numpy(), dataset_info
        )[0]
        x = chain[:, :, 0:3]
        one_hot = F.one_hot(types, num_classes=num_classes)
        charges = torch.round(chain[:, :, 3 + num_classes :]).long()
        if stable:
            print("Found stable molecule to visualize :)")
            break
        if i == n_tries - 1:
            print("Did not find stable molecule, showing last sample.")
    return one_hot, charges, x
