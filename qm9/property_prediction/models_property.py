"""EDM's property classifier (``qm9/property_prediction``'s "egnn") and #Atoms baseline ("numnodes").

The classifier is Satorras et al.'s invariant EGNN regressor: node features only, edges carry
the squared distance, coordinates never updated. Its layers are our dense ``egnn.egnn_new.GCL``
(same parameter names as EDM's ``E_GCL_mask``), so EDM's ``best_checkpoint.npy`` loads strictly
and the forward runs on the fast fused path. Predictions are in normalised units:
physical value = MAD * prediction + mean (edm_conditional.md §3.1, §3.3).

Inputs follow EDM's call ``model(h0, x, edges, edge_attr, node_mask, edge_mask, n_nodes)`` with
flat rows: h0 (B*N, 5) one-hot, x (B*N, 3), node_mask (B*N, 1), edge_mask (B*N*N, 1) =
mask_i * mask_j * (i != j). The graph is the fully connected N x N graph of each molecule
(EDM's ``get_adj_matrix``), which is what the dense layout computes; ``edges`` is only checked.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from egnn import device_policy
from egnn.dense_ops import linear
from egnn.egnn_new import GCL, squared_distances
from egnn.layout import PairLayout, single_block
from egnn.models import plan_size_groups

# EDM normalises the atom count by QM9's largest molecule, whatever the padding.
NUMNODES_SCALE = 29.0


def _check_flat(h0: torch.Tensor, x: torch.Tensor, node_mask: torch.Tensor, edge_mask: torch.Tensor, n_nodes: int) -> int:
    rows = h0.shape[0]
    if n_nodes <= 0 or rows % n_nodes:
        raise ValueError(f"{rows} node rows are not a whole number of molecules padded to n_nodes = {n_nodes}")
    bs = rows // n_nodes
    if x.shape[0] != rows or node_mask.numel() != rows or edge_mask.numel() != bs * n_nodes * n_nodes:
        raise ValueError(
            f"classifier inputs disagree: h0 {tuple(h0.shape)}, x {tuple(x.shape)}, node_mask {tuple(node_mask.shape)}, "
            f"edge_mask {tuple(edge_mask.shape)} for {bs} molecules of {n_nodes} slots"
        )
    return bs


def _check_edges(edges: Any, bs: int, n_nodes: int) -> None:
    if edges is None:
        return
    row, col = edges
    if len(row) != bs * n_nodes * n_nodes or len(col) != len(row):
        raise ValueError("the property classifier only supports EDM's fully connected graph (get_adj_matrix); pass edges=None")


class EGNN(nn.Module):
    """EDM's property classifier: embedding -> n_layers gated message-passing layers (edge
    feature ||x_i - x_j||^2) -> node_dec -> masked sum over atoms -> graph_dec -> (B,)."""

    def __init__(
        self,
        in_node_nf: int = 5,
        in_edge_nf: int = 0,
        hidden_nf: int = 128,
        device: str | torch.device = "cpu",
        act_fn: nn.Module = nn.SiLU(),
        n_layers: int = 7,
        coords_weight: float = 1.0,
        attention: bool = True,
        node_attr: int = 1,
    ):
        super().__init__()
        if in_edge_nf:
            raise ValueError("the property classifier takes no extra edge features (EDM passes in_edge_nf = 0)")
        if node_attr:
            # EDM's main_qm9_prop always passes node_attr 0 (its default); the variant that feeds
            # h0 to every node MLP is not part of the published recipe.
            raise ValueError("node_attr = 1 is not supported; EDM's classifiers use --node_attr 0")
        self.hidden_nf = hidden_nf
        self.n_layers = n_layers
        self.embedding = nn.Linear(in_node_nf, hidden_nf)
        for i in range(n_layers):
            layer = GCL(hidden_nf, hidden_nf, hidden_nf, normalization_factor=1, aggregation_method="sum",
                        edges_in_d=1, act_fn=act_fn, attention=False)
            # EDM's layer also creates (then deletes) a coordinate MLP before its attention MLP;
            # drawing the same initialisations keeps seeded weights identical to EDM's.
            unused = nn.Linear(hidden_nf, 1, bias=False)
            nn.init.xavier_uniform_(unused.weight, gain=0.001)
            nn.Linear(hidden_nf, hidden_nf)
            if attention:
                layer.attention = True
                layer.att_mlp = nn.Sequential(nn.Linear(hidden_nf, 1), nn.Sigmoid())
            self.add_module(f"gcl_{i}", layer)
        self.node_dec = nn.Sequential(nn.Linear(hidden_nf, hidden_nf), act_fn, nn.Linear(hidden_nf, hidden_nf))
        self.graph_dec = nn.Sequential(nn.Linear(hidden_nf, hidden_nf), act_fn, nn.Linear(hidden_nf, 1))
        # 'auto': on the CPU run size groups of molecules (less padding, same result: padding never
        # reaches the output); 'true' / 'false' force it (egnn.device_policy).
        self.group_by_size: str | bool = "auto"
        self.to(device)

    def forward(
        self,
        h0: torch.Tensor,
        x: torch.Tensor,
        edges: Any = None,
        edge_attr: torch.Tensor | None = None,
        node_mask: torch.Tensor | None = None,
        edge_mask: torch.Tensor | None = None,
        n_nodes: int | None = None,
    ) -> torch.Tensor:
        """Prediction (B,) in normalised units from flat rows (see the module docstring)."""
        if edge_attr is not None:
            raise ValueError("the property classifier takes no extra edge features; pass edge_attr=None")
        if node_mask is None or edge_mask is None or n_nodes is None:
            raise ValueError("the property classifier needs node_mask, edge_mask and n_nodes")
        n_nodes = int(n_nodes)
        bs = _check_flat(h0, x, node_mask, edge_mask, n_nodes)
        _check_edges(edges, bs, n_nodes)
        node_mask = node_mask.reshape(-1, 1).to(h0.dtype)
        edge_mask = edge_mask.reshape(-1, 1).to(h0.dtype)
        if device_policy.groups_by_size(self.group_by_size, h0.device):
            plan = self._plan_groups(node_mask.view(bs, n_nodes), edge_mask.view(bs, n_nodes, n_nodes))
            if plan is not None:
                return self._forward_groups(h0, x, node_mask, plan, bs)
        layout = single_block(bs, n_nodes)
        distances = squared_distances(x, layout)
        h = linear(h0, self.embedding.weight, self.embedding.bias)
        # EDM does not mask atoms inside the layers: padded slots evolve but send no message
        # (edge mask) and are dropped by the readout mask, so they are passed as "real" here.
        every_slot = torch.ones_like(node_mask)
        for i in range(self.n_layers):
            h = self._modules[f"gcl_{i}"](h, distances, every_slot, edge_mask, layout)
        h = self.node_dec(h) * node_mask
        h = h.view(bs, n_nodes, self.hidden_nf).sum(1)
        return self.graph_dec(h).squeeze(1)


    def _plan_groups(self, mask: torch.Tensor, edge_mask: torch.Tensor):
        """(rows, molecule order, PairLayout) of size blocks holding each molecule's real atoms, or
        None when one padded block is as cheap or the edge mask is not EDM's fully connected one."""
        sizes = mask.sum(1).round().long()
        bs, n_nodes = mask.shape
        pair = mask.unsqueeze(2) * mask.unsqueeze(1) * (1 - torch.eye(n_nodes, dtype=mask.dtype, device=mask.device))
        if not torch.equal(pair, edge_mask):
            return None
        bounds = plan_size_groups(sizes.tolist(), device_policy.group_overhead_pairs(self.hidden_nf, mask.device))
        if bounds == [n_nodes]:
            return None
        order = torch.argsort(mask, dim=1, descending=True, stable=True)  # real atoms first, in order
        rows, molecules, blocks, lower = [], [], [], -1
        for bound in bounds:
            members = torch.nonzero((sizes > lower) & (sizes <= bound)).flatten()
            lower = bound
            if len(members) == 0:
                continue
            if bound == 0:  # empty molecules: nothing to compute, their sum is 0 (as padded)
                continue
            rows.append((members.unsqueeze(1) * n_nodes + order[members, :bound]).flatten())
            molecules.append(members)
            blocks.append((len(members), bound))
        return torch.cat(rows), torch.cat(molecules), PairLayout(tuple(blocks))

    def _forward_groups(self, h0: torch.Tensor, x: torch.Tensor, node_mask: torch.Tensor, plan, bs: int) -> torch.Tensor:
        rows, molecules, layout = plan
        mask_rows = node_mask[rows]
        edge_rows = torch.cat([
            ((m * m.transpose(1, 2)) * (1 - torch.eye(m.shape[1], dtype=m.dtype, device=m.device))).reshape(-1, 1)
            for m in layout.node_blocks(mask_rows)
        ])
        distances = squared_distances(x[rows], layout)
        h = linear(h0[rows], self.embedding.weight, self.embedding.bias)
        every_slot = torch.ones_like(mask_rows)
        for i in range(self.n_layers):
            h = self._modules[f"gcl_{i}"](h, distances, every_slot, edge_rows, layout)
        h = self.node_dec(h) * mask_rows
        pooled = torch.cat([block.sum(1) for block in layout.node_blocks(h)])
        pooled = h.new_zeros(bs, self.hidden_nf).index_copy(0, molecules, pooled)
        return self.graph_dec(pooled).squeeze(1)


class NumNodes(nn.Module):
    """The #Atoms baseline: the property from the atom count alone, Linear(1, nf) -> SiLU -> Linear(nf, 1)."""

    def __init__(self, nf: int = 128, act_fn: nn.Module = nn.SiLU()):
        super().__init__()
        self.linear1 = nn.Linear(1, nf)
        self.linear2 = nn.Linear(nf, 1)
        self.act_fn = act_fn

    def forward(self, h0=None, x=None, edges=None, edge_attr=None, node_mask=None, edge_mask=None, n_nodes=None) -> torch.Tensor:
        """Prediction (B,) in normalised units; only node_mask (B*N, 1) and n_nodes are read."""
        if node_mask is None or n_nodes is None:
            raise ValueError("NumNodes needs node_mask and n_nodes")
        counts = node_mask.reshape(-1, int(n_nodes)).sum(1, keepdim=True)
        return self.linear2(self.act_fn(self.linear1(counts / NUMNODES_SCALE))).squeeze(1)


def get_model(model_name: str = "egnn", nf: int = 128, n_layers: int = 7, attention: bool = True,
              node_attr: int = 0, device: str | torch.device = "cpu") -> nn.Module:
    """EDM's main_qm9_prop.get_model: 'egnn' (the classifier) or 'numnodes' (the #Atoms baseline)."""
    if model_name == "egnn":
        return EGNN(in_node_nf=5, in_edge_nf=0, hidden_nf=nf, device=device, n_layers=n_layers,
                    coords_weight=1.0, attention=bool(attention), node_attr=node_attr)
    if model_name == "numnodes":
        return NumNodes(nf=128).to(device)  # EDM fixes the width at 128
    raise ValueError(f"unknown property model {model_name!r}; choose 'egnn' or 'numnodes'")


def classifier_inputs(batch: Mapping[str, torch.Tensor], device: str | torch.device = "cpu",
                      dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """Keyword arguments of a classifier call from an EDM batch dict (positions (B,N,3),
    one_hot (B,N,5), atom_mask (B,N), edge_mask (B*N*N,1)), as main_qm9_prop builds them."""
    bs, n_nodes, _ = batch["positions"].shape
    return {
        "h0": batch["one_hot"].reshape(bs * n_nodes, -1).to(device, dtype),
        "x": batch["positions"].reshape(bs * n_nodes, -1).to(device, dtype),
        "edges": None,
        "node_mask": batch["atom_mask"].reshape(bs * n_nodes, 1).to(device, dtype),
        "edge_mask": batch["edge_mask"].reshape(bs * n_nodes * n_nodes, 1).to(device, dtype),
        "n_nodes": n_nodes,
    }
