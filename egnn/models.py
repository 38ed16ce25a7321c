"""EDM's dynamics wrapper: the noise-prediction network phi(z_t, t) around the EGNN.

z layout: xh (B, N, 3 + F) = [x | h]; the network gets h plus a time channel (and context),
returns eps_hat with the same layout. Positions of the output are zero-centred per molecule;
in GAGA mode (``zero_center_h``) the feature part is too.

Molecules of a batch are independent and padded atoms never influence real ones (with
'sum' aggregation), so the network may run on groups of similar-sized molecules, each padded
only to its group's largest molecule (``group_by_size``). Outputs are the same as on the
padded batch; only wasted work on padded atom pairs is skipped.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from egnn.egnn_new import EGNN
from equivariant_diffusion.utils import remove_mean_with_mask


def plan_size_groups(sizes: list[int], overhead_pairs: float) -> list[int]:
    """Split molecule sizes into groups that minimise padded pairs plus a per-group overhead.

    ``sizes`` are the atom counts; returns the sorted list of group upper bounds (each
    group holds the molecules with size in (previous bound, bound]). Cost of a group with
    upper bound m and k molecules = k*m^2 + overhead_pairs. Exact dynamic programme over
    the distinct sizes (at most a few dozen).
    """
    distinct = sorted(set(sizes))
    counts = [sizes.count(s) for s in distinct]
    k = len(distinct)
    best = [0.0] + [float("inf")] * k  # best[j]: cost of covering distinct[:j]
    cut = [0] * (k + 1)
    for j in range(1, k + 1):
        m2 = distinct[j - 1] ** 2
        n_mols = 0
        for i in range(j - 1, -1, -1):  # group = distinct[i:j]
            n_mols += counts[i]
            cost = best[i] + n_mols * m2 + overhead_pairs
            if cost < best[j]:
                best[j], cut[j] = cost, i
    bounds = []
    j = k
    while j > 0:
        bounds.append(distinct[j - 1])
        j = cut[j]
    return bounds[::-1]


class EGNN_dynamics_QM9(nn.Module):
    """phi(z_t, t): EDM's ``EGNN_dynamics_QM9`` (mode 'egnn_dynamics')."""

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
        tanh: bool = False,
        mode: str = "egnn_dynamics",
        norm_constant: float = 0,
        inv_sublayers: int = 2,
        sin_embedding: bool = False,
        normalization_factor: float = 100,
        aggregation_method: str = "sum",
        zero_center_h: bool = False,
        group_by_size: bool = True,
    ):
        super().__init__()
        if mode != "egnn_dynamics":
            raise ValueError(f"unsupported dynamics mode {mode!r}; only 'egnn_dynamics' is implemented")
        self.mode = mode
        self.device = device
        self.egnn = EGNN(
            in_node_nf=in_node_nf + context_node_nf, in_edge_nf=1, hidden_nf=hidden_nf, device=device,
            act_fn=act_fn, n_layers=n_layers, attention=attention, tanh=tanh, norm_constant=norm_constant,
            inv_sublayers=inv_sublayers, sin_embedding=sin_embedding,
            normalization_factor=normalization_factor, aggregation_method=aggregation_method,
        )
        self.in_node_nf = in_node_nf
        self.context_node_nf = context_node_nf
        self.n_dims = n_dims
        self.condition_time = condition_time
        self.hidden_nf = hidden_nf
        # GAGA mode: the feature part of the output is masked and centred per molecule.
        self.zero_center_h = zero_center_h
        # Compute on size groups when that is exact ('sum' aggregation) and saves work.
        self.group_by_size = group_by_size
        # Largest number of atom pairs per network call (cache-sized edge tensors); 0 = no cap.
        self.chunk_pairs = int(2**20 // hidden_nf)
        # How often the NaN guard fired (EDM resets NaN outputs to zero and warns).
        self.nan_resets = 0
        self.to(device)

    def forward(self, t, xh, node_mask, edge_mask, context=None):
        return self._forward(t, xh, node_mask, edge_mask, context)

    def _forward(
        self,
        t: torch.Tensor,
        xh: torch.Tensor,
        node_mask: torch.Tensor,
        edge_mask: torch.Tensor,
        context: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """xh (B, N, 3+F), t (B, 1) or one value, node_mask (B, N, 1), edge_mask with B*N*N
        entries (any shape) -> eps_hat (B, N, 3+F)."""
        bs, n_nodes, dims = xh.shape
        node_mask = node_mask.reshape(bs, n_nodes, 1)
        edge_mask = edge_mask.reshape(bs, n_nodes, n_nodes, 1)
        xh = xh * node_mask
        if self.condition_time:
            t = t.to(xh.dtype)
            t = t.reshape(1, 1, 1).expand(bs, 1, 1) if t.numel() == 1 else t.reshape(bs, 1, 1)
        if context is not None:
            context = context.reshape(bs, n_nodes, self.context_node_nf)

        groups = self._size_groups(node_mask, edge_mask) if self.group_by_size else None
        if groups is None:
            vel, h_final = self._network(t, xh, node_mask, edge_mask, context)
        else:
            vel, h_final = self._network_grouped(t, xh, node_mask, context, groups)

        if torch.isnan(vel).any():
            self._nan_reset("positions")
            vel = torch.zeros_like(vel)
        if torch.isnan(h_final).any():
            self._nan_reset("features")
            h_final = torch.zeros_like(h_final)

        vel = remove_mean_with_mask(vel, node_mask, check_padding=False)
        if self.zero_center_h:
            h_final = remove_mean_with_mask(h_final, node_mask, check_padding=False)
        return torch.cat([vel, h_final], dim=2)

    def _nan_reset(self, what: str) -> None:
        self.nan_resets += 1
        warnings.warn(
            f"NaN in the predicted {what} noise; reset to zero (reset #{self.nan_resets})",
            RuntimeWarning, stacklevel=3,
        )

    def _network(self, t, xh, node_mask, edge_mask, context):
        """The EGNN on one padded block: returns (vel (B,N,3), h part (B,N,F)), both masked."""
        bs, n_nodes, dims = xh.shape
        x = xh[:, :, : self.n_dims]
        h = xh[:, :, self.n_dims :]
        if dims == self.n_dims:  # no features: EDM feeds a constant channel
            h = torch.ones(bs, n_nodes, 1, device=xh.device, dtype=xh.dtype)
        if self.condition_time:
            # The time channel is not masked (as in EDM); padded atoms never reach real ones.
            h = torch.cat([h, t.expand(bs, n_nodes, 1)], dim=2)
        if context is not None:
            h = torch.cat([h, context], dim=2)
        h_final, x_final = self.egnn(h, x, node_mask, edge_mask)
        vel = (x_final - x) * node_mask
        if context is not None:
            h_final = h_final[:, :, : -self.context_node_nf]
        if self.condition_time:
            h_final = h_final[:, :, :-1]
        if dims == self.n_dims:
            h_final = h_final[:, :, :0]
        return vel, h_final * node_mask

    def _size_groups(self, node_mask: torch.Tensor, edge_mask: torch.Tensor):
        """Groups of molecules to run separately, or None to run the padded batch as is.

        Grouping is exact only for 'sum' aggregation ('mean' divides by the padded size)
        and only for EDM's standard fully connected edge mask.
        """
        if self.egnn.aggregation_method != "sum":
            return None
        bs, n_nodes, _ = node_mask.shape
        mask = node_mask.reshape(bs, n_nodes)
        pair = mask.unsqueeze(2) * mask.unsqueeze(1)
        pair = pair * (1 - torch.eye(n_nodes, device=mask.device, dtype=mask.dtype))
        if not torch.equal(pair.reshape(edge_mask.shape), edge_mask):
            return None
        sizes = mask.sum(1).round().long()
        size_list = sizes.tolist()
        # Per-group fixed cost (kernel launches) expressed in atom pairs: small for wide layers.
        overhead_pairs = 64000.0 / self.hidden_nf
        bounds = plan_size_groups(size_list, overhead_pairs)
        max_pairs = self.chunk_pairs if self.chunk_pairs else float("inf")
        if len(bounds) == 1 and bounds[0] == n_nodes and bs * n_nodes**2 <= max_pairs:
            return None
        # Real atoms first (stable: keeps their order), padding after.
        order = torch.argsort(mask, dim=1, descending=True, stable=True)
        groups = []
        lower = -1
        for bound in bounds:
            members = torch.nonzero((sizes > lower) & (sizes <= bound)).flatten()
            lower = bound
            if bound == 0 or len(members) == 0:
                continue
            # Chunks of at most ~max_pairs atom pairs keep the edge tensors cache-sized.
            per_chunk = max(1, int(max_pairs // bound**2)) if max_pairs != float("inf") else len(members)
            for chunk in torch.split(members, per_chunk):
                groups.append((chunk, order[chunk, :bound]))
        return groups

    def _network_grouped(self, t, xh, node_mask, context, groups):
        bs, n_nodes, dims = xh.shape
        vel = xh.new_zeros(bs, n_nodes, self.n_dims)
        h_final = xh.new_zeros(bs, n_nodes, dims - self.n_dims)
        for members, slots in groups:
            rows = members.unsqueeze(1)
            xh_g = xh[rows, slots]
            mask_g = node_mask[rows, slots]
            m = slots.shape[1]
            mask_flat = mask_g.squeeze(2)
            edge_g = (mask_flat.unsqueeze(2) * mask_flat.unsqueeze(1)) * (
                1 - torch.eye(m, device=xh.device, dtype=xh.dtype)
            )
            t_g = t[members] if self.condition_time else t
            ctx_g = context[rows, slots] if context is not None else None
            vel_g, h_g = self._network(t_g, xh_g, mask_g, edge_g.unsqueeze(-1), ctx_g)
            vel = vel.index_put((rows, slots), vel_g)
            h_final = h_final.index_put((rows, slots), h_g)
        return vel, h_final
