"""GeoLDM's autoencoder networks: ``EGNN_encoder_QM9`` and ``EGNN_decoder_QM9`` on our EGNN.

Both are E(3)-equivariant maps between per-atom data and per-atom latent points, built from the
same ``egnn.egnn_new.EGNN`` as the diffusion's dynamics (fast path by default), with GeoLDM's
parameter names (``egnn.*``, ``final_mlp.{0,2}.*``) so published checkpoints load strictly.
Neither network sees the diffusion time. Unlike EDM's dynamics they return *positions*
(the EGNN's x output, masked and re-centred per molecule), not a displacement.

* encoder: xh (B, N, 3 + F) = [x | one-hot | charge] -> (mu_x (B,N,3), x_std (B,N,1),
  mu_h (B,N,k), h_std (B,N,k)). EGNN with out width nf, then final_mlp nf -> nf -> 2k+1:
  channel 0 is a per-molecule log-variance of x (summed over atoms), 1..k the mean of h,
  k+1..2k a log-variance of h. GeoLDM never uses the two std heads (``EnHierarchicalVAE``
  replaces them by a constant), so they are returned only for completeness.
* decoder: z (B, N, 3 + k) -> (x_rec (B,N,3), h_rec (B,N,F)): class logits, then the charge
  prediction (raw atomic-number scale) when the model has charges.

How they run is the device policy's decision (``egnn.device_policy``), as for the dynamics:
on the CPU the molecules run in size groups, each padded only to its group's largest, in
cache-sized calls; elsewhere the padded batch runs as one block (GeoLDM's computation).
``group_by_size`` ('auto', 'true', 'false') overrides it; outputs are the same either way
('sum' aggregation: padded atoms never reach real ones).
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from egnn import device_policy
from egnn.egnn_new import EGNN, set_impl
from egnn.models import EGNN_dynamics_QM9
from equivariant_diffusion.utils import remove_mean_with_mask


def _nan_to_zero(t: torch.Tensor, what: str) -> torch.Tensor:
    """GeoLDM resets NaN outputs to zero (and says so) instead of propagating them."""
    if torch.isnan(t).any():
        warnings.warn(f"NaN in the {what}; reset to zero", RuntimeWarning, stacklevel=3)
        return torch.zeros_like(t)
    return t


class _LatentEGNN(nn.Module):
    """Shared wiring: masks, context, the EGNN (size-grouped or one padded block), re-centred positions."""

    n_dims: int
    context_node_nf: int
    hidden_nf: int
    egnn: EGNN

    # The grouping plan is the dynamics' (one implementation of the device policy): the same
    # size groups, chunking and per-mask cache, here for a network without a time input.
    _cached_plan = EGNN_dynamics_QM9._cached_plan
    _plan_calls = EGNN_dynamics_QM9._plan_calls
    _call_masks = EGNN_dynamics_QM9._call_masks

    def _init_policy(self, group_by_size: bool | str) -> None:
        self.group_by_size = group_by_size
        self.chunk_pairs = device_policy.cpu_chunk_pairs(self.hidden_nf)
        self._plan_cache = None

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_plan_cache"] = None  # mask-derived; a copy (the EMA model) plans its own
        return state

    def _run(self, xh: torch.Tensor, node_mask: torch.Tensor, edge_mask: torch.Tensor,
             context: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """xh (B, N, 3 + C) -> (x_out masked and centred (B,N,3), h_out masked (B,N,out))."""
        bs, n_nodes, _ = xh.shape
        calls = self._cached_plan(node_mask, edge_mask, xh.device)  # keyed on the caller's mask tensors
        node_mask = node_mask.reshape(bs, n_nodes, 1)
        xh = xh * node_mask
        x, h = xh[:, :, : self.n_dims], xh[:, :, self.n_dims :]
        if context is not None:
            h = torch.cat([h, context.reshape(bs, n_nodes, self.context_node_nf)], dim=2)
        if calls is None:
            h_out, x_out = self.egnn(h, x, node_mask, edge_mask.reshape(bs * n_nodes * n_nodes, 1))
        else:
            h_out, x_out = self._grouped(h, x, calls)
        x_out = _nan_to_zero(x_out * node_mask, f"{type(self).__name__} positions")
        return remove_mean_with_mask(x_out, node_mask, check_padding=False), h_out

    def _grouped(self, h: torch.Tensor, x: torch.Tensor, calls) -> tuple[torch.Tensor, torch.Tensor]:
        """The EGNN on each planned call of equal-size blocks; padded slots outside every call stay 0."""
        bs, n_nodes, _ = h.shape
        flat_h, flat_x = h.reshape(bs * n_nodes, -1), x.reshape(bs * n_nodes, -1)
        h_out = h.new_zeros(bs * n_nodes, self.egnn.embedding_out.out_features)
        x_out = x.new_zeros(bs * n_nodes, self.n_dims)
        for rows, _molecules, layout, mask_rows, edge_rows in calls:
            h_rows, x_rows = self.egnn(flat_h[rows], flat_x[rows], mask_rows, edge_rows, layout)
            h_out = h_out.index_copy(0, rows, h_rows)
            x_out = x_out.index_copy(0, rows, x_rows)
        return h_out.view(bs, n_nodes, -1), x_out.view(bs, n_nodes, self.n_dims)


def _egnn(in_node_nf: int, out_node_nf: int, hidden_nf: int, n_layers: int, device, act_fn, attention, tanh,
          norm_constant, inv_sublayers, sin_embedding, normalization_factor, aggregation_method) -> EGNN:
    return EGNN(
        in_node_nf=in_node_nf, in_edge_nf=1, hidden_nf=hidden_nf, device=device, act_fn=act_fn,
        n_layers=n_layers, attention=attention, out_node_nf=out_node_nf, tanh=tanh,
        norm_constant=norm_constant, inv_sublayers=inv_sublayers, sin_embedding=sin_embedding,
        normalization_factor=normalization_factor, aggregation_method=aggregation_method,
    )


class EGNN_encoder_QM9(_LatentEGNN):
    """GeoLDM's encoder: one EquivariantBlock (``n_layers``) and a final MLP to 2k+1 channels."""

    def __init__(
        self,
        in_node_nf: int,
        context_node_nf: int,
        out_node_nf: int,
        n_dims: int = 3,
        hidden_nf: int = 64,
        device: str | torch.device = "cpu",
        act_fn: nn.Module = nn.SiLU(),
        n_layers: int = 1,
        attention: bool = False,
        tanh: bool = False,
        mode: str = "egnn_dynamics",
        norm_constant: float = 0,
        inv_sublayers: int = 2,
        sin_embedding: bool = False,
        normalization_factor: float = 100,
        aggregation_method: str = "sum",
        include_charges: bool = True,
        group_by_size: bool | str = "auto",
    ):
        super().__init__()
        if mode != "egnn_dynamics":
            raise ValueError(f"unsupported encoder mode {mode!r}; GeoLDM's autoencoder is 'egnn_dynamics' only")
        self.in_node_nf = in_node_nf
        self.context_node_nf = context_node_nf
        self.out_node_nf = out_node_nf  # k = latent_nf
        self.n_dims = n_dims
        self.hidden_nf = hidden_nf
        self.include_charges = include_charges
        # Construction order = GeoLDM's (EGNN, then final_mlp): same init for the same seed.
        self.egnn = _egnn(in_node_nf + context_node_nf, hidden_nf, hidden_nf, n_layers, device, act_fn, attention,
                          tanh, norm_constant, inv_sublayers, sin_embedding, normalization_factor, aggregation_method)
        self.final_mlp = nn.Sequential(
            nn.Linear(hidden_nf, hidden_nf), act_fn, nn.Linear(hidden_nf, out_node_nf * 2 + 1)
        )
        self._init_policy(group_by_size)
        self.to(device)

    def forward(self, xh: torch.Tensor, node_mask: torch.Tensor, edge_mask: torch.Tensor,
                context: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        bs, n_nodes, _ = xh.shape
        mu_x, h_e = self._run(xh, node_mask, edge_mask, context)  # the caller's masks: the plan cache keys on them
        node_mask = node_mask.reshape(bs, n_nodes, 1)
        out = self.final_mlp(h_e) * node_mask
        k = self.out_node_nf
        x_std = torch.exp(0.5 * out[:, :, :1].sum(1, keepdim=True)).expand(bs, n_nodes, 1)
        mu_h = out[:, :, 1 : 1 + k]
        h_std = torch.exp(0.5 * out[:, :, 1 + k :])
        x_std = torch.where(torch.isnan(x_std), torch.ones_like(x_std), x_std)
        h_std = torch.where(torch.isnan(h_std), torch.ones_like(h_std), h_std)
        return mu_x, x_std, mu_h, h_std


class EGNN_decoder_QM9(_LatentEGNN):
    """GeoLDM's decoder: ``n_layers`` EquivariantBlocks from k latent channels to F data channels."""

    def __init__(
        self,
        in_node_nf: int,
        context_node_nf: int,
        out_node_nf: int,
        n_dims: int = 3,
        hidden_nf: int = 64,
        device: str | torch.device = "cpu",
        act_fn: nn.Module = nn.SiLU(),
        n_layers: int = 4,
        attention: bool = False,
        tanh: bool = False,
        mode: str = "egnn_dynamics",
        norm_constant: float = 0,
        inv_sublayers: int = 2,
        sin_embedding: bool = False,
        normalization_factor: float = 100,
        aggregation_method: str = "sum",
        include_charges: bool = True,
        group_by_size: bool | str = "auto",
    ):
        super().__init__()
        if mode != "egnn_dynamics":
            raise ValueError(f"unsupported decoder mode {mode!r}; GeoLDM's autoencoder is 'egnn_dynamics' only")
        self.in_node_nf = in_node_nf  # k
        self.context_node_nf = context_node_nf
        self.out_node_nf = out_node_nf  # F
        self.n_dims = n_dims
        self.hidden_nf = hidden_nf
        self.include_charges = include_charges
        self.egnn = _egnn(in_node_nf + context_node_nf, out_node_nf, hidden_nf, n_layers, device, act_fn, attention,
                          tanh, norm_constant, inv_sublayers, sin_embedding, normalization_factor, aggregation_method)
        self._init_policy(group_by_size)
        self.to(device)

    def forward(self, z: torch.Tensor, node_mask: torch.Tensor, edge_mask: torch.Tensor,
                context: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        x_rec, h_rec = self._run(z, node_mask, edge_mask, context)
        return x_rec, _nan_to_zero(h_rec, "decoder features")


def select_impl(module: nn.Module, impl: str) -> nn.Module:
    """``module`` with the 'fast' or 'reference' EGNN path (``egnn.egnn_new.set_impl``)."""
    set_impl(module, impl)
    return module
