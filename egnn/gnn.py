"""EDM's non-equivariant baseline (``--model gnn_dynamics``): a plain message-passing GNN.

Positions are three ordinary input features, so nothing is rotation-equivariant (EDM trains
it with random rotations, ``--data_augmentation True``, as "GDM-aug"); translations are handled
by centring the input and the output. Parameter names and shapes are EDM's
(``dynamics.gnn.embedding``, ``dynamics.gnn.gcl_<l>.edge_mlp.0``, ...), so EDM checkpoints load.

EDM's GNN applies no edge mask: every slot pair of the padded batch (self loops and padded
atoms included) sends a message, so the output depends on the padded size N. This is
reproduced (checkpoint compatibility), which is why the batch always runs as one padded
block here, never in size groups.
"""
from __future__ import annotations

import torch
from torch import nn

from egnn import nan_guard
from egnn.dense_ops import linear
from egnn.egnn_new import GCL, FusedLayer, check_impl, set_impl
from egnn.layout import PairLayout, single_block
from equivariant_diffusion.utils import remove_mean_with_mask


class GNN(FusedLayer):
    """embedding -> n_layers GCLs on all slot pairs (no edge features, no edge mask) -> embedding_out."""

    def __init__(
        self,
        in_node_nf: int,
        in_edge_nf: int,
        hidden_nf: int,
        device: str | torch.device = "cpu",
        act_fn: nn.Module = nn.SiLU(),
        n_layers: int = 4,
        attention: bool = False,
        normalization_factor: float = 1,
        out_node_nf: int | None = None,
        aggregation_method: str = "sum",
        impl: str = "fast",
    ):
        super().__init__()
        check_impl(impl)
        if in_edge_nf:
            raise ValueError("edge features are not supported by gnn_dynamics (EDM passes none)")
        if aggregation_method not in ("sum", "mean"):
            raise ValueError(f"unknown aggregation_method {aggregation_method!r}; choose 'sum' or 'mean'")
        self.hidden_nf = hidden_nf
        self.n_layers = n_layers
        self.embedding = nn.Linear(in_node_nf, hidden_nf)
        self.embedding_out = nn.Linear(hidden_nf, in_node_nf if out_node_nf is None else out_node_nf)
        for i in range(n_layers):
            self.add_module(
                f"gcl_{i}",
                GCL(hidden_nf, hidden_nf, hidden_nf, normalization_factor=normalization_factor,
                    aggregation_method=aggregation_method, edges_in_d=0, act_fn=act_fn, attention=attention),
            )
        self.to(device)
        set_impl(self, impl)

    def fast_path_ok(self) -> bool:
        return type(self.embedding) is nn.Linear and type(self.embedding_out) is nn.Linear

    def forward(self, h: torch.Tensor, node_mask: torch.Tensor, layout: PairLayout) -> torch.Tensor:
        """Flat rows of one or more padded blocks: h (n_nodes, in_node_nf), node_mask (n_nodes, 1)
        -> (n_nodes, out_node_nf), masked."""
        # Every slot pair sends a message (EDM): no edge features, an all-ones "mask".
        no_edge_attr = h.new_zeros(layout.n_pairs, 0)
        all_pairs = h.new_ones(layout.n_pairs, 1)
        fast = self.use_fast()
        h = linear(h, self.embedding.weight, self.embedding.bias) if fast else self.embedding(h)
        for i in range(self.n_layers):
            h = self._modules[f"gcl_{i}"](h, no_edge_attr, node_mask, all_pairs, layout)
        h = linear(h, self.embedding_out.weight, self.embedding_out.bias) if fast else self.embedding_out(h)
        return h * node_mask


class GNN_dynamics_QM9(nn.Module):
    """phi(z_t, t) of EDM's mode 'gnn_dynamics': the GNN on [x, h, t] predicts [eps_x, eps_h].

    A ``egnn.backbone.Backbone``: positions of the output are centred here; not
    rotation-equivariant. ``in_node_nf`` counts the feature channels plus the time channel
    (as for ``EGNN_dynamics_QM9``).
    """

    centres_positions = True
    rotation_equivariant = False

    def __init__(
        self,
        in_node_nf: int,
        context_node_nf: int,
        n_dims: int,
        hidden_nf: int = 64,
        device: str | torch.device = "cpu",
        act_fn: nn.Module = nn.SiLU(),
        n_layers: int = 4,
        attention: bool = False,
        condition_time: bool = True,
        normalization_factor: float = 100,
        aggregation_method: str = "sum",
        impl: str = "fast",
    ):
        super().__init__()
        if context_node_nf:
            # EDM's version slices context columns off an output that has none (a shape error).
            raise ValueError("gnn_dynamics does not support --conditioning; use egnn_dynamics")
        self.gnn = GNN(
            in_node_nf=in_node_nf + n_dims, in_edge_nf=0, hidden_nf=hidden_nf, device=device, act_fn=act_fn,
            n_layers=n_layers, attention=attention, normalization_factor=normalization_factor,
            out_node_nf=n_dims + in_node_nf, aggregation_method=aggregation_method, impl=impl,
        )
        self.in_node_nf = in_node_nf
        self.context_node_nf = context_node_nf
        self.n_dims = n_dims
        self.condition_time = condition_time
        self.hidden_nf = hidden_nf
        self.nan_resets = 0
        self.to(device)

    def forward(
        self,
        t: torch.Tensor,
        xh: torch.Tensor,
        node_mask: torch.Tensor,
        edge_mask: torch.Tensor,
        context: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """xh (B, N, 3+F), t (B, 1) or one value, node_mask (B, N, 1); edge_mask is not used
        (EDM's GNN connects every slot pair) -> eps_hat (B, N, 3+F)."""
        bs, n_nodes, dims = xh.shape
        flat_mask = node_mask.reshape(bs * n_nodes, 1)
        xh = xh.reshape(bs * n_nodes, dims) * flat_mask
        x, h = xh[:, : self.n_dims], xh[:, self.n_dims :]
        if dims == self.n_dims:  # no features: EDM feeds a constant channel
            h = torch.ones(bs * n_nodes, 1, device=xh.device, dtype=xh.dtype)
        if self.condition_time:
            t = t.to(xh.dtype)
            t_nodes = t.reshape(-1, 1).expand(bs, n_nodes) if t.numel() > 1 else t.reshape(1, 1).expand(bs, n_nodes)
            h = torch.cat([h, t_nodes.reshape(bs * n_nodes, 1)], dim=1)  # unmasked, as in EDM
        out = self.gnn(torch.cat([x, h], dim=1), flat_mask, single_block(bs, n_nodes))
        vel = (out[:, : self.n_dims] * flat_mask).view(bs, n_nodes, self.n_dims)
        h_final = out[:, self.n_dims :]
        if self.condition_time:
            h_final = h_final[:, :-1]  # the time channel's output is discarded
        if dims == self.n_dims:
            h_final = h_final[:, :0]
        (vel,) = nan_guard.guard(self, positions=vel)  # EDM checks the positions only here
        vel = remove_mean_with_mask(vel, node_mask.reshape(bs, n_nodes, 1), check_padding=False)
        return torch.cat([vel, h_final.reshape(bs, n_nodes, -1)], dim=2)
