"""From a batch dict to the training objective (EDM's ``qm9/losses.py``).

``preprocess_batch`` is the single place where a batch becomes model inputs; training and
evaluation both use it, so the evaluation NLL sees exactly what training sees (the GAGA fork
centred the one-hot in training but not in evaluation).
"""
from __future__ import annotations

import torch

from equivariant_diffusion.utils import assert_correctly_masked, assert_mean_zero_with_mask, remove_mean_with_mask


def preprocess_batch(
    data: dict[str, torch.Tensor],
    device: str | torch.device,
    dtype: torch.dtype,
    include_charges: bool,
    zero_center_h: bool,
):
    """(x, h, node_mask, edge_mask, context) from EDM's batch dict, as the training loop builds them.

    data: positions (B,N,3), one_hot (B,N,C) bool, charges (B,N) or (B,N,1), atom_mask (B,N),
    edge_mask (B*N*N,1). x is centred per molecule; the one-hot too iff zero_center_h (GAGA);
    h['integer'] is the charges (B,N,1) if include_charges else an empty tensor.
    """
    x = data["positions"].to(device, dtype)
    node_mask = data["atom_mask"].to(device, dtype).unsqueeze(2)
    edge_mask = data["edge_mask"].to(device, dtype)
    one_hot = data["one_hot"].to(device, dtype)
    if include_charges:
        charges = data["charges"].to(device, dtype)
        if charges.dim() == 2:
            charges = charges.unsqueeze(2)
    else:
        charges = torch.zeros(0, device=device, dtype=dtype)

    x = remove_mean_with_mask(x, node_mask)
    if zero_center_h:
        one_hot = remove_mean_with_mask(one_hot, node_mask)
    assert_correctly_masked(x, node_mask)
    assert_correctly_masked(one_hot, node_mask)
    if include_charges:
        assert_correctly_masked(charges, node_mask)
    assert_mean_zero_with_mask(x, node_mask)
    h = {"categorical": one_hot, "integer": charges}
    return x, h, node_mask, edge_mask, None


def pad_to_atoms(x, h, node_mask, edge_mask, n_atoms: int):
    """The same batch padded with masked atoms to ``n_atoms`` slots (no-op if it has that many).

    Used under DDP so every process pads to the global batch's largest molecule: the l2 loss
    divides by the padded atom count, and then equals the single-process objective.
    """
    bs, n = x.shape[0], x.shape[1]
    if n_atoms == n:
        return x, h, node_mask, edge_mask
    if n_atoms < n:
        raise ValueError(f"cannot pad a batch of {n} atom slots down to {n_atoms}")
    extra = n_atoms - n

    def pad(t: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.pad(t, (0, 0, 0, extra)) if t.numel() else t

    h = {k: pad(v) for k, v in h.items()}
    node_mask = pad(node_mask)
    mask = node_mask.squeeze(2)
    edge = mask.unsqueeze(1) * mask.unsqueeze(2)
    edge = edge * (1 - torch.eye(n_atoms, device=edge.device, dtype=edge.dtype))
    # Keep the caller's edge mask on the old slots (it may differ from the fully connected one).
    edge[:, :n, :n] = edge_mask.reshape(bs, n, n).to(edge.dtype)
    return pad(x), h, node_mask, edge.reshape(bs * n_atoms * n_atoms, 1).to(edge_mask.dtype)


def compute_loss_and_nll(args, generative_model, nodes_dist, x, h, node_mask, edge_mask, context):
    """(nll, reg_term, mean_abs_z): nll = mean_b(-log p(x_b, h_b) - log p(N_b)) as in EDM."""
    bs, n_nodes, n_dims = x.size()
    probabilistic_model = getattr(args, "probabilistic_model", "diffusion")
    if probabilistic_model != "diffusion":
        raise ValueError(f"unsupported probabilistic_model {probabilistic_model!r}; only 'diffusion' exists")
    edge_mask = edge_mask.view(bs, n_nodes * n_nodes)
    assert_correctly_masked(x, node_mask)
    neg_log_pxh = generative_model(x, h, node_mask, edge_mask, context)
    n_atoms = node_mask.squeeze(2).sum(1).long()
    log_pN = nodes_dist.log_prob(n_atoms)
    assert neg_log_pxh.size() == log_pN.size()
    nll = (neg_log_pxh - log_pN).mean(0)
    reg_term = torch.tensor([0.0], device=nll.device)
    mean_abs_z = 0.0
    return nll, reg_term, mean_abs_z
