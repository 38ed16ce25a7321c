"""EDM's dynamics wrapper: the noise-prediction network phi(z_t, t) around the EGNN.

z layout: xh (B, N, 3 + F) = [x | h]; the network gets h plus a time channel (and context),
returns eps_hat with the same layout. Positions of the output are zero-centred per molecule;
in GAGA mode (``zero_center_h``) the feature part is too.

Molecules of a batch are independent and padded atoms never influence real ones (with
'sum' aggregation), so the network may run on groups of similar-sized molecules, each padded
only to its group's largest molecule (``group_by_size``). Outputs are the same as on the
padded batch; only wasted work on padded atom pairs is skipped. Whether it does depends on
the device (``egnn.device_policy``: grouped on the CPU, one padded block elsewhere).

Everything derived from the masks (the grouping plan) is cached for the mask tensors last
seen, so a sampling chain, which passes the same masks at every step, computes it once.
"""
from __future__ import annotations

import torch
from torch import nn

from egnn import device_policy, nan_guard
from egnn.egnn_new import EGNN
from egnn.layout import PairLayout, single_block
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
    """phi(z_t, t): EDM's ``EGNN_dynamics_QM9`` (mode 'egnn_dynamics'); a ``egnn.backbone.Backbone``."""

    # Backbone contract: the position output is re-centred here; E(3)-equivariant.
    centres_positions = True
    rotation_equivariant = True

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
        group_by_size: bool | str = "auto",
        compile_backend: str | None = None,
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
        # Size groups (exact for 'sum' aggregation): 'auto' = on the CPU only (egnn.device_policy).
        self.group_by_size = group_by_size
        # Largest number of atom pairs per grouped call on the CPU (cache-sized edge tensors); 0 = no cap.
        self.chunk_pairs = device_policy.cpu_chunk_pairs(hidden_nf)
        # torch.compile backend for the network on one padded block (None: eager).
        self.compile_backend = compile_backend
        self._compiled = None  # (owner id, compiled fn): a deep copy (the EMA model) compiles its own
        self._plan_cache = None  # (node_mask, edge_mask, their versions, setting, plan)
        # How often the NaN guard fired (egnn.nan_guard: NaN molecules' outputs reset to zero, with a warning).
        self.nan_resets = 0
        self.to(device)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_compiled"] = None  # compiled functions are neither copied nor pickled
        state["_plan_cache"] = None
        return state

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
        calls = self._cached_plan(node_mask, edge_mask, xh.device)  # keyed on the caller's mask tensors
        node_mask = node_mask.reshape(bs, n_nodes, 1)
        edge_mask = edge_mask.reshape(bs, n_nodes, n_nodes, 1)
        xh = xh * node_mask
        if self.condition_time:
            t = t.to(xh.dtype)
            t = t.reshape(1, 1, 1).expand(bs, 1, 1) if t.numel() == 1 else t.reshape(bs, 1, 1)
        if context is not None:
            context = context.reshape(bs, n_nodes, self.context_node_nf)

        if calls is None:  # the padded batch as one block
            vel, h_final = self._padded_network()(
                t.expand(bs, n_nodes, 1).reshape(-1, 1), xh.reshape(bs * n_nodes, dims),
                node_mask.reshape(-1, 1), edge_mask.reshape(-1, 1),
                None if context is None else context.reshape(bs * n_nodes, -1), single_block(bs, n_nodes),
            )
        else:
            vel, h_final = self._network_grouped(t, xh, node_mask, context, calls)
        vel = vel.view(bs, n_nodes, self.n_dims)
        h_final = h_final.view(bs, n_nodes, dims - self.n_dims)

        # The NaN guard (egnn.nan_guard): a molecule with a NaN in a part gets that part reset to
        # zero; one host sync for both parts in the common case of no NaN.
        vel, h_final = nan_guard.guard(self, positions=vel, features=h_final)

        vel = remove_mean_with_mask(vel, node_mask, check_padding=False)
        if self.zero_center_h:
            h_final = remove_mean_with_mask(h_final, node_mask, check_padding=False)
        return torch.cat([vel, h_final], dim=2)

    def _cached_plan(self, node_mask: torch.Tensor, edge_mask: torch.Tensor, device: torch.device):
        """``_plan_calls`` for these masks, or None (one padded block); computed once per mask pair."""
        if not device_policy.groups_by_size(self.group_by_size, device):
            return None
        key = (self.group_by_size, self.chunk_pairs, node_mask._version, edge_mask._version)
        cache = self._plan_cache
        if cache is not None and cache[0] is node_mask and cache[1] is edge_mask and cache[2] == key:
            return cache[3]
        plan = self._plan_calls(node_mask, edge_mask)
        if plan is not None:
            plan = self._call_masks(node_mask, plan)
        # The masks are kept alive by the cache, so their identity cannot be reused by new tensors.
        self._plan_cache = (node_mask, edge_mask, key, plan)
        return plan

    def _padded_network(self):
        """``self._network``, compiled with ``compile_backend`` if one is set."""
        if not self.compile_backend:
            return self._network
        if self._compiled is None or self._compiled[0] != id(self):
            self._compiled = (id(self), device_policy.compile_network(self._network, self.compile_backend))
        return self._compiled[1]

    def _network(self, t_nodes, xh, node_mask, edge_mask, context, layout: PairLayout):
        """The EGNN on flat rows (see ``egnn.layout``): xh (n_nodes, 3+F), t_nodes (n_nodes, 1),
        node_mask (n_nodes, 1), edge_mask (n_pairs, 1) -> (vel (n_nodes, 3), h part (n_nodes, F)),
        both masked."""
        n_rows, dims = xh.shape
        x = xh[:, : self.n_dims]
        h = xh[:, self.n_dims :]
        if dims == self.n_dims:  # no features: EDM feeds a constant channel
            h = torch.ones(n_rows, 1, device=xh.device, dtype=xh.dtype)
        if self.condition_time:
            # The time channel is not masked (as in EDM); padded atoms never reach real ones.
            h = torch.cat([h, t_nodes], dim=1)
        if context is not None:
            h = torch.cat([h, context], dim=1)
        h_final, x_final = self.egnn(h, x, node_mask, edge_mask, layout)
        vel = (x_final - x) * node_mask
        if context is not None:
            h_final = h_final[:, : -self.context_node_nf]
        if self.condition_time:
            h_final = h_final[:, :-1]
        if dims == self.n_dims:
            h_final = h_final[:, :0]
        return vel, h_final * node_mask

    def _plan_calls(self, node_mask: torch.Tensor, edge_mask: torch.Tensor):
        """Network calls on size blocks, or None to run the padded batch as is.

        Returns a list of calls (row index into the flat (B*N) atoms, molecule of each row,
        PairLayout). Grouping is exact only for 'sum' aggregation ('mean' divides by the
        padded size) and only for EDM's standard fully connected edge mask.
        """
        if self.egnn.aggregation_method != "sum":
            return None
        bs, n_nodes = node_mask.shape[0], node_mask.shape[1]
        node_mask = node_mask.reshape(bs, n_nodes, 1)
        edge_mask = edge_mask.reshape(bs, n_nodes, n_nodes, 1)
        mask = node_mask.reshape(bs, n_nodes)
        pair = mask.unsqueeze(2) * mask.unsqueeze(1)
        pair = pair * (1 - torch.eye(n_nodes, device=mask.device, dtype=mask.dtype))
        if not torch.equal(pair.reshape(edge_mask.shape), edge_mask):
            return None
        sizes = mask.sum(1).round().long()
        # Per-block fixed cost (a few small kernels per layer) expressed in atom pairs.
        device = node_mask.device
        bounds = plan_size_groups(sizes.tolist(), device_policy.group_overhead_pairs(self.hidden_nf, device))
        chunk = self.chunk_pairs if device.type == "cpu" else device_policy.chunk_pairs(self.hidden_nf, device)
        max_pairs = chunk if chunk else None
        if bounds == [n_nodes] and (max_pairs is None or bs * n_nodes**2 <= max_pairs):
            return None
        # Real atoms first (stable: keeps their order), padding after.
        order = torch.argsort(mask, dim=1, descending=True, stable=True)
        blocks = []  # (molecules, padded size)
        lower = -1
        for bound in bounds:
            members = torch.nonzero((sizes > lower) & (sizes <= bound)).flatten()
            lower = bound
            if bound == 0 or len(members) == 0:
                continue
            per_call = len(members) if max_pairs is None else max(1, max_pairs // bound**2)
            blocks += [(chunk, bound) for chunk in torch.split(members, per_call)]
        calls, current, current_pairs = [], [], 0
        for members, bound in blocks:  # pack blocks into calls of at most max_pairs pairs
            pairs = len(members) * bound**2
            if current and max_pairs is not None and current_pairs + pairs > max_pairs:
                calls.append(current)
                current, current_pairs = [], 0
            current.append((members, bound))
            current_pairs += pairs
        calls.append(current)
        plans = []
        for call in calls:
            rows = torch.cat([(members.unsqueeze(1) * n_nodes + order[members, :bound]).flatten() for members, bound in call])
            molecules = torch.cat([members.repeat_interleave(bound) for members, bound in call])
            plans.append((rows, molecules, PairLayout(tuple((len(members), bound) for members, bound in call))))
        return plans

    def _call_masks(self, node_mask: torch.Tensor, plan):
        """Per call: its atoms' node mask and its pair mask (each block fully connected among its
        real atoms, no self pairs); mask-derived, so cached with the plan."""
        flat_mask = node_mask.reshape(-1, 1)
        out = []
        for rows, molecules, layout in plan:
            mask_rows = flat_mask[rows]
            edge_rows = torch.cat([
                ((m * m.transpose(1, 2)) * (1 - torch.eye(m.shape[1], device=m.device, dtype=m.dtype))).reshape(-1, 1)
                for m in layout.node_blocks(mask_rows)
            ])
            out.append((rows, molecules, layout, mask_rows, edge_rows))
        return out

    def _network_grouped(self, t, xh, node_mask, context, calls):
        bs, n_nodes, dims = xh.shape
        flat_xh = xh.reshape(bs * n_nodes, dims)
        flat_context = None if context is None else context.reshape(bs * n_nodes, -1)
        t_molecules = t.reshape(-1, 1)
        vel = xh.new_zeros(bs * n_nodes, self.n_dims)
        h_final = xh.new_zeros(bs * n_nodes, dims - self.n_dims)
        for rows, molecules, layout, mask_rows, edge_rows in calls:
            t_rows = t_molecules[molecules] if self.condition_time else t
            context_rows = None if flat_context is None else flat_context[rows]
            vel_rows, h_rows = self._network(t_rows, flat_xh[rows], mask_rows, edge_rows, context_rows, layout)
            vel = vel.index_copy(0, rows, vel_rows)
            h_final = h_final.index_copy(0, rows, h_rows)
        return vel, h_final
