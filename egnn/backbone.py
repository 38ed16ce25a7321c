"""The contract between EnVariationalDiffusion and the noise-prediction network ("backbone").

A backbone is an ``nn.Module`` with

* ``forward(t, xh, node_mask, edge_mask, context=None) -> eps_hat``:
  - ``t``: normalised time t_int / T, shape (B, 1) (or a single value for the whole batch);
  - ``xh``: z_t = [x | h], (B, N, n_dims + F): positions then features, padding rows zero;
  - ``node_mask``: (B, N, 1), 1 for real atoms; ``edge_mask``: B*N*N entries (any shape),
    1 for pairs of distinct real atoms (EDM's mask; a backbone may ignore it);
  - ``context``: None, or (B, N, context_node_nf) conditioning features;
  - returns eps_hat with the layout and shape of ``xh``, zero on padding rows.
* ``n_dims``: the number of position channels at the front of ``xh`` (3).
* ``centres_positions``: True if ``forward`` already returns positions with zero mean per
  molecule (over real atoms). If False, the diffusion centres them (the position noise lives
  on the zero centre-of-mass subspace). Features are centred by the diffusion in GAGA mode;
  a backbone never needs to know about GAGA.
* ``rotation_equivariant``: True if rotating/reflecting the input positions rotates the
  position output and leaves the features unchanged (E(3)); the tests check what is declared.
  Every backbone must be equivariant to permutations of the atoms of a molecule.

Register a backbone under a ``--model`` name in ``egnn.registry``.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class Backbone(Protocol):
    n_dims: int
    centres_positions: bool
    rotation_equivariant: bool

    def forward(
        self,
        t: torch.Tensor,
        xh: torch.Tensor,
        node_mask: torch.Tensor,
        edge_mask: torch.Tensor,
        context: torch.Tensor | None = None,
    ) -> torch.Tensor:
        ...


def check_backbone(module: nn.Module) -> nn.Module:
    """``module`` if it satisfies ``Backbone``; else a one-line TypeError naming what is missing."""
    missing = [name for name in ("n_dims", "centres_positions", "rotation_equivariant") if not hasattr(module, name)]
    if not isinstance(module, nn.Module) or missing:
        what = f"missing attribute(s) {', '.join(missing)}" if missing else "not an nn.Module"
        raise TypeError(f"{type(module).__name__} is not a backbone ({what}); see egnn/backbone.py for the contract")
    return module
