"""EDM's E(n)-equivariant graph network, computed on dense padded batches.

Every ordered atom pair (i, j) of a molecule is an edge (self pairs included, masked out);
i receives the message from j. ``EGNN.forward`` takes a padded batch: h (B, N, nf), x (B, N, 3),
node_mask (B, N, 1), edge_mask (B, N, N, 1) with edge_mask[b, i, j] = 1 iff atoms i and j are
real and i != j. Inside, atoms and pairs are flat rows in blocks of equal padded size (see
``egnn.layout``): h (n_nodes, nf), pair features (n_pairs, C).

The parameters (names, shapes, init order) are EDM's, so EDM checkpoints load strictly.
What differs is the algebra, which gives the same numbers with much less work:

* A linear layer on the concatenation [h_i, h_j, e_ij] equals W_a h_i + W_b h_j + W_e e_ij + b.
  The per-atom projections W_a h and W_b h are computed once per layer (O(N) instead of O(N^2));
  only their pairwise sum and the tiny edge term live on the N^2 grid.
* Aggregation over senders is a masked sum along the j axis of a dense tensor, not a scatter.
* The big edge GEMMs, the pair pre-activation and the gated sum use the kernels of
  ``egnn.dense_ops`` (oneDNN GEMMs on CPU, backward passes without broadcast copies).

Two implementations of each layer give the same numbers (tests/test_egnn_reference.py):

* ``reference`` (``forward_reference``): EDM's equations read top to bottom, calling the
  modules as modules, e.g. m_ij = edge_mlp([h_i, h_j, e_ij]). Edit this one to try an idea.
* ``fast`` (the default): the fused algebra above. It computes exactly the module structure
  EDM builds (Linear, activation, Linear, ...); ``fast_path_ok`` checks that structure, and a
  layer whose modules were changed (e.g. a LayerNorm added to edge_mlp) runs the reference
  path instead, with a warning, so the change is used and never silently ignored.
"""
from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from egnn.dense_ops import factorised_pair_preactivation, gated_sum, linear, masked_sum, pair_differences
from egnn.layout import PairLayout, single_block


def squared_distances(x: torch.Tensor, layout: PairLayout) -> torch.Tensor:
    """||x_i - x_j||^2 per pair, (n_pairs, 1) (EDM calls these 'distances')."""
    return pair_differences(x, layout).pow(2).sum(-1, keepdim=True)


def factorised_preactivation(layer: nn.Linear, h: torch.Tensor, edge_attr: torch.Tensor, layout: PairLayout) -> torch.Tensor:
    """``layer(cat([h_i, h_j, edge_attr_ij]))`` for every pair, without the concatenation.

    ``layer.weight`` is (H, 2*nf + ef); its column blocks act on h_i (receiver), h_j (sender)
    and the edge features. Both per-atom projections come from one GEMM, and one hand-written
    backward covers the whole (``dense_ops.factorised_pair_preactivation``). Returns (n_pairs, H).
    """
    return factorised_pair_preactivation(h, layer.weight, layer.bias, edge_attr, layout)


IMPLS = ("fast", "reference")

# Activations the fused path may apply to a pre-activation tensor: elementwise, parameter-free.
_ELEMENTWISE = (nn.SiLU, nn.ReLU, nn.GELU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.ELU, nn.Softplus, nn.Identity)


def _is_mlp(module: nn.Module, pattern: str) -> bool:
    """True iff ``module`` is an nn.Sequential of exactly the pattern's layers: 'L' a plain
    nn.Linear (not a subclass: it may change forward), 'a' an elementwise activation."""
    if type(module) is not nn.Sequential or len(module) != len(pattern):
        return False
    for layer, kind in zip(module, pattern):
        if kind == "L" and type(layer) is not nn.Linear:
            return False
        if kind == "a" and type(layer) not in _ELEMENTWISE:
            return False
    return True


def check_impl(impl: str) -> str:
    if impl not in IMPLS:
        raise ValueError(f"unknown EGNN implementation {impl!r}; choose 'fast' or 'reference'")
    return impl


class FusedLayer(nn.Module):
    """A layer with a fused fast path and a plain reference path (``impl``).

    ``use_fast()`` is checked on every call (a few type checks): if the modules no longer
    have the structure the fast path computes, the reference path runs and a warning says so
    once per layer.
    """

    impl = "fast"

    def fast_path_ok(self) -> bool:
        raise NotImplementedError

    def use_fast(self) -> bool:
        if self.impl != "fast":
            return False
        if self.fast_path_ok():
            return True
        if not getattr(self, "_warned_fallback", False):
            self._warned_fallback = True
            warnings.warn(
                f"{type(self).__name__}: its modules differ from the structure the fast EGNN path fuses "
                "(Linear, activation, Linear, ...); this layer runs the reference path",
                UserWarning, stacklevel=3,
            )
        return False


def set_impl(module: nn.Module, impl: str) -> None:
    """Select 'fast' or 'reference' for every FusedLayer inside ``module`` (warns now, at
    construction, for layers whose structure the fast path cannot compute)."""
    check_impl(impl)
    for layer in module.modules():
        if isinstance(layer, FusedLayer):
            layer.impl = impl
            layer.use_fast()


def pair_rows(h: torch.Tensor, layout: PairLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """(h_i, h_j) for every pair (b, i, j), flat (n_pairs, C): EDM's h[row], h[col]."""
    receivers, senders = [], []
    for hb in layout.node_blocks(h):
        b, m, c = hb.shape
        receivers.append(hb.unsqueeze(2).expand(b, m, m, c).reshape(-1, c))
        senders.append(hb.unsqueeze(1).expand(b, m, m, c).reshape(-1, c))
    return torch.cat(receivers), torch.cat(senders)


def sum_over_senders(values: torch.Tensor, layout: PairLayout) -> torch.Tensor:
    """agg_i = sum_j values_ij, flat (n_nodes, C): EDM's unsorted_segment_sum over rows."""
    return torch.cat([vb.sum(2).reshape(-1, vb.shape[-1]) for vb in layout.pair_blocks(values)])


def _is_silu(module: nn.Module) -> bool:
    return type(module) is nn.SiLU


def _activate(act: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """act(x), in place when nothing needs the input (no autograd graph)."""
    if _is_silu(act):
        return nn.functional.silu(x, inplace=not (torch.is_grad_enabled() and x.requires_grad))
    return act(x)


def _linear_act(layer: nn.Linear, act: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """act(layer(x)), with SiLU fused into the GEMM where possible."""
    if _is_silu(act):
        return linear(x, layer.weight, layer.bias, silu=True)
    return act(linear(x, layer.weight, layer.bias))


def aggregate_scale(agg: torch.Tensor, layout: PairLayout, aggregation_method: str, normalization_factor: float) -> torch.Tensor:
    """EDM's normalisation of an aggregated sum: 'sum' divides by normalization_factor, 'mean'
    by the number of edge slots of a node, which in EDM's graph is the padded size N (masked
    pairs and the self loop included)."""
    if aggregation_method == "sum":
        return agg / normalization_factor
    if aggregation_method == "mean":
        return agg / layout.slots_per_node(agg)
    raise ValueError(f"unknown aggregation_method {aggregation_method!r}; choose 'sum' or 'mean'")


class GCL(FusedLayer):
    """Graph convolution: gated messages m_ij = MLP([h_i, h_j, e_ij]), h_i += MLP([h_i, sum_j m_ij])."""

    def __init__(
        self,
        input_nf: int,
        output_nf: int,
        hidden_nf: int,
        normalization_factor: float,
        aggregation_method: str,
        edges_in_d: int = 0,
        nodes_att_dim: int = 0,
        act_fn: nn.Module = nn.SiLU(),
        attention: bool = False,
    ):
        super().__init__()
        self.normalization_factor = normalization_factor
        self.aggregation_method = aggregation_method
        self.attention = attention
        if nodes_att_dim:
            raise ValueError("nodes_att_dim > 0 is not supported (EDM never uses it)")
        self.edge_mlp = nn.Sequential(
            nn.Linear(2 * input_nf + edges_in_d, hidden_nf), act_fn, nn.Linear(hidden_nf, hidden_nf), act_fn
        )
        self.node_mlp = nn.Sequential(
            nn.Linear(hidden_nf + input_nf, hidden_nf), act_fn, nn.Linear(hidden_nf, output_nf)
        )
        if attention:
            self.att_mlp = nn.Sequential(nn.Linear(hidden_nf, 1), nn.Sigmoid())

    def fast_path_ok(self) -> bool:
        return _is_mlp(self.edge_mlp, "LaLa") and _is_mlp(self.node_mlp, "LaL")

    def forward(
        self, h: torch.Tensor, edge_attr: torch.Tensor, node_mask: torch.Tensor, edge_mask: torch.Tensor,
        layout: PairLayout,
    ) -> torch.Tensor:
        """h (n_nodes, nf), edge_attr (n_pairs, ef), node_mask (n_nodes, 1), edge_mask (n_pairs, 1)."""
        if not self.use_fast():
            return self.forward_reference(h, edge_attr, node_mask, edge_mask, layout)
        mlp = self.edge_mlp
        m = _activate(mlp[1], factorised_preactivation(mlp[0], h, edge_attr, layout))
        m = _linear_act(mlp[2], mlp[3], m)
        if self.attention and type(self.att_mlp[1]) is nn.Sigmoid:
            agg = gated_sum(m, self.att_mlp[0].weight, self.att_mlp[0].bias, edge_mask, layout)
        else:
            gate = self.att_mlp(m) * edge_mask if self.attention else edge_mask
            agg = masked_sum(m, gate, layout)
        agg = aggregate_scale(agg, layout, self.aggregation_method, self.normalization_factor)
        node = self.node_mlp
        update = linear(_linear_act(node[0], node[1], torch.cat([h, agg], dim=-1)), node[2].weight, node[2].bias)
        h = h + update
        return h * node_mask

    def forward_reference(
        self, h: torch.Tensor, edge_attr: torch.Tensor, node_mask: torch.Tensor, edge_mask: torch.Tensor,
        layout: PairLayout,
    ) -> torch.Tensor:
        """EDM's GCL as written: same arguments and result as ``forward``."""
        h_i, h_j = pair_rows(h, layout)
        m_ij = self.edge_mlp(torch.cat([h_i, h_j, edge_attr], dim=1))
        if self.attention:
            m_ij = m_ij * self.att_mlp(m_ij)
        m_ij = m_ij * edge_mask
        agg = sum_over_senders(m_ij, layout)
        agg = aggregate_scale(agg, layout, self.aggregation_method, self.normalization_factor)
        h = h + self.node_mlp(torch.cat([h, agg], dim=1))
        return h * node_mask


class EquivariantUpdate(FusedLayer):
    """x_i += sum_j (x_i - x_j)/(|x_i - x_j| + c) * phi_x(h_i, h_j, e_ij)."""

    def __init__(
        self,
        hidden_nf: int,
        normalization_factor: float,
        aggregation_method: str,
        edges_in_d: int = 1,
        act_fn: nn.Module = nn.SiLU(),
        tanh: bool = False,
        coords_range: float = 10.0,
    ):
        super().__init__()
        self.tanh = tanh
        self.coords_range = coords_range
        self.normalization_factor = normalization_factor
        self.aggregation_method = aggregation_method
        # EDM creates (and re-initialises) the last layer before the others; keeping the order
        # keeps the random initialisation identical for the same seed.
        last = nn.Linear(hidden_nf, 1, bias=False)
        torch.nn.init.xavier_uniform_(last.weight, gain=0.001)
        self.coord_mlp = nn.Sequential(
            nn.Linear(2 * hidden_nf + edges_in_d, hidden_nf), act_fn, nn.Linear(hidden_nf, hidden_nf), act_fn, last
        )

    def forward(
        self,
        h: torch.Tensor,
        x: torch.Tensor,
        coord_diff: torch.Tensor,
        edge_attr: torch.Tensor,
        node_mask: torch.Tensor,
        edge_mask: torch.Tensor,
        layout: PairLayout,
    ) -> torch.Tensor:
        """x (n_nodes, 3), coord_diff (n_pairs, 3); returns the updated, masked x."""
        if not self.use_fast():
            return self.forward_reference(h, x, coord_diff, edge_attr, node_mask, edge_mask, layout)
        mlp = self.coord_mlp
        c = _activate(mlp[1], factorised_preactivation(mlp[0], h, edge_attr, layout))
        c = _linear_act(mlp[2], mlp[3], c)
        c = nn.functional.linear(c, mlp[4].weight, mlp[4].bias)  # (n_pairs, 1)
        weight = torch.tanh(c) * self.coords_range if self.tanh else c
        agg = masked_sum(coord_diff, weight * edge_mask, layout)
        agg = aggregate_scale(agg, layout, self.aggregation_method, self.normalization_factor)
        return (x + agg) * node_mask

    def fast_path_ok(self) -> bool:
        return _is_mlp(self.coord_mlp, "LaLaL")

    def forward_reference(
        self,
        h: torch.Tensor,
        x: torch.Tensor,
        coord_diff: torch.Tensor,
        edge_attr: torch.Tensor,
        node_mask: torch.Tensor,
        edge_mask: torch.Tensor,
        layout: PairLayout,
    ) -> torch.Tensor:
        """EDM's coordinate update as written: same arguments and result as ``forward``."""
        h_i, h_j = pair_rows(h, layout)
        phi_x = self.coord_mlp(torch.cat([h_i, h_j, edge_attr], dim=1))
        if self.tanh:
            trans = coord_diff * torch.tanh(phi_x) * self.coords_range
        else:
            trans = coord_diff * phi_x
        trans = trans * edge_mask
        agg = sum_over_senders(trans, layout)
        agg = aggregate_scale(agg, layout, self.aggregation_method, self.normalization_factor)
        return (x + agg) * node_mask


class EquivariantBlock(nn.Module):
    """inv_sublayers GCLs on h, then one coordinate update; edge features [|x_i-x_j|^2, d0_ij]."""

    def __init__(
        self,
        hidden_nf: int,
        edge_feat_nf: int = 2,
        device: str | torch.device = "cpu",
        act_fn: nn.Module = nn.SiLU(),
        n_layers: int = 2,
        attention: bool = True,
        norm_diff: bool = True,
        tanh: bool = False,
        coords_range: float = 15,
        norm_constant: float = 1,
        sin_embedding: nn.Module | None = None,
        normalization_factor: float = 100,
        aggregation_method: str = "sum",
    ):
        super().__init__()
        self.hidden_nf = hidden_nf
        self.n_layers = n_layers
        self.coords_range_layer = float(coords_range)
        self.norm_diff = norm_diff
        self.norm_constant = norm_constant
        self.sin_embedding = sin_embedding
        self.normalization_factor = normalization_factor
        self.aggregation_method = aggregation_method
        for i in range(n_layers):
            self.add_module(
                f"gcl_{i}",
                GCL(
                    hidden_nf, hidden_nf, hidden_nf,
                    edges_in_d=edge_feat_nf, act_fn=act_fn, attention=attention,
                    normalization_factor=normalization_factor, aggregation_method=aggregation_method,
                ),
            )
        self.add_module(
            "gcl_equiv",
            EquivariantUpdate(
                hidden_nf, edges_in_d=edge_feat_nf, act_fn=act_fn, tanh=tanh,
                coords_range=self.coords_range_layer,
                normalization_factor=normalization_factor, aggregation_method=aggregation_method,
            ),
        )
        self.to(device)

    def forward(
        self,
        h: torch.Tensor,
        x: torch.Tensor,
        node_mask: torch.Tensor,
        edge_mask: torch.Tensor,
        edge_attr: torch.Tensor,
        layout: PairLayout,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        diff = pair_differences(x, layout)
        radial = diff.pow(2).sum(-1, keepdim=True)
        coord_diff = diff / (torch.sqrt(radial + 1e-8) + self.norm_constant)
        if self.sin_embedding is not None:
            radial = self.sin_embedding(radial)
        edge_attr = torch.cat([radial, edge_attr], dim=-1)
        for i in range(self.n_layers):
            h = self._modules[f"gcl_{i}"](h, edge_attr, node_mask, edge_mask, layout)
        x = self._modules["gcl_equiv"](h, x, coord_diff, edge_attr, node_mask, edge_mask, layout)
        return h * node_mask, x


class SinusoidsEmbeddingNew(nn.Module):
    """EDM's sinusoidal embedding of squared distances: sin/cos of |d| at 6 frequencies."""

    def __init__(self, max_res: float = 15.0, min_res: float = 15.0 / 2000.0, div_factor: int = 4):
        super().__init__()
        self.n_frequencies = int(math.log(max_res / min_res, div_factor)) + 1
        # A non-persistent buffer: it moves with the model (no host-to-device copy per call) and
        # stays out of the state dict (EDM's checkpoints have no such key).
        self.register_buffer(
            "frequencies", 2 * math.pi * div_factor ** torch.arange(self.n_frequencies) / max_res, persistent=False
        )
        self.dim = len(self.frequencies) * 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.sqrt(x + 1e-8)
        emb = x * self.frequencies.to(x.dtype)
        return torch.cat((emb.sin(), emb.cos()), dim=-1).detach()


class EGNN(FusedLayer):
    """embedding -> n_layers EquivariantBlocks -> embedding_out, on dense padded batches.

    ``impl``: 'fast' (fused kernels, the default) or 'reference' (EDM's equations as written);
    same parameters and state-dict keys, same outputs.
    """

    def __init__(
        self,
        in_node_nf: int,
        in_edge_nf: int,
        hidden_nf: int,
        device: str | torch.device = "cpu",
        act_fn: nn.Module = nn.SiLU(),
        n_layers: int = 3,
        attention: bool = False,
        norm_diff: bool = True,
        out_node_nf: int | None = None,
        tanh: bool = False,
        coords_range: float = 15,
        norm_constant: float = 1,
        inv_sublayers: int = 2,
        sin_embedding: bool = False,
        normalization_factor: float = 100,
        aggregation_method: str = "sum",
        impl: str = "fast",
    ):
        super().__init__()
        check_impl(impl)
        if aggregation_method not in ("sum", "mean"):
            raise ValueError(f"unknown aggregation_method {aggregation_method!r}; choose 'sum' or 'mean'")
        if out_node_nf is None:
            out_node_nf = in_node_nf
        self.hidden_nf = hidden_nf
        self.n_layers = n_layers
        # EDM computes this per-layer range but never uses it (blocks get coords_range).
        self.coords_range_layer = float(coords_range / n_layers)
        self.norm_diff = norm_diff
        self.normalization_factor = normalization_factor
        self.aggregation_method = aggregation_method
        if sin_embedding:
            self.sin_embedding = SinusoidsEmbeddingNew()
            edge_feat_nf = self.sin_embedding.dim * 2
        else:
            self.sin_embedding = None
            edge_feat_nf = 2
        self.edge_feat_nf = edge_feat_nf
        self.embedding = nn.Linear(in_node_nf, hidden_nf)
        self.embedding_out = nn.Linear(hidden_nf, out_node_nf)
        for i in range(n_layers):
            self.add_module(
                f"e_block_{i}",
                EquivariantBlock(
                    hidden_nf, edge_feat_nf=edge_feat_nf, device=device, act_fn=act_fn,
                    n_layers=inv_sublayers, attention=attention, norm_diff=norm_diff, tanh=tanh,
                    coords_range=coords_range, norm_constant=norm_constant,
                    sin_embedding=self.sin_embedding,
                    normalization_factor=normalization_factor, aggregation_method=aggregation_method,
                ),
            )
        self.to(device)
        set_impl(self, impl)

    def fast_path_ok(self) -> bool:
        return type(self.embedding) is nn.Linear and type(self.embedding_out) is nn.Linear

    def forward(
        self, h: torch.Tensor, x: torch.Tensor, node_mask: torch.Tensor, edge_mask: torch.Tensor,
        layout: PairLayout | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded batch: h (B, N, in_node_nf), x (B, N, 3), node_mask (B, N, 1), edge_mask with
        B*N*N entries -> (h_out (B, N, out_node_nf) masked, x_out (B, N, 3)).

        With ``layout``: flat rows instead, h (n_nodes, in_node_nf), x (n_nodes, 3),
        node_mask (n_nodes, 1), edge_mask (n_pairs, 1) -> flat outputs.
        """
        if layout is None:
            bs, n_nodes = h.shape[0], h.shape[1]
            h_out, x_out = self.forward(
                h.reshape(bs * n_nodes, -1), x.reshape(bs * n_nodes, -1), node_mask.reshape(bs * n_nodes, 1),
                edge_mask.reshape(bs * n_nodes * n_nodes, 1), single_block(bs, n_nodes),
            )
            return h_out.view(bs, n_nodes, -1), x_out.view(bs, n_nodes, -1)
        distances = squared_distances(x, layout)
        if self.sin_embedding is not None:
            distances = self.sin_embedding(distances)
        fast = self.use_fast()
        h = linear(h, self.embedding.weight, self.embedding.bias) if fast else self.embedding(h)
        for i in range(self.n_layers):
            h, x = self._modules[f"e_block_{i}"](h, x, node_mask, edge_mask, edge_attr=distances, layout=layout)
        h = linear(h, self.embedding_out.weight, self.embedding_out.bias) if fast else self.embedding_out(h)
        return h * node_mask, x
