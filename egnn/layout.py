"""How the molecules of a network call are laid out in memory: blocks of equal padded size.

Block g holds b_g molecules padded to m_g atoms. Atom features are stored flat, block after
block, as (sum_g b_g*m_g, C) rows; pair features (every ordered atom pair of a molecule,
self pairs included) as (sum_g b_g*m_g*m_g, C) rows. Per-atom and per-pair operations
(linear layers, activations) run once on the flat tensors; only the few operations that pair
atoms up (broadcasting over i and j, summing over senders j) loop over the blocks.

A padded batch (B, N) is the single block (B, N); grouping molecules by size gives several
blocks with less padding.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from itertools import accumulate

import torch


@dataclass(frozen=True)
class PairLayout:
    blocks: tuple[tuple[int, int], ...]  # (molecules b, padded atoms m) per block

    # Cached: the dense ops call the block views several times per layer (frozen dataclasses
    # allow it, cached_property writes the instance __dict__ directly).
    @cached_property
    def node_offsets(self) -> tuple[int, ...]:
        return (0, *accumulate(b * m for b, m in self.blocks))

    @cached_property
    def pair_offsets(self) -> tuple[int, ...]:
        return (0, *accumulate(b * m * m for b, m in self.blocks))

    @property
    def n_nodes(self) -> int:
        return self.node_offsets[-1]

    @property
    def n_pairs(self) -> int:
        return self.pair_offsets[-1]

    def node_blocks(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Views (b, m, C) of a flat (n_nodes, C) tensor, one per block."""
        offsets = self.node_offsets
        return [flat[offsets[g] : offsets[g + 1]].view(b, m, flat.shape[-1]) for g, (b, m) in enumerate(self.blocks)]

    def pair_blocks(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Views (b, m, m, C) of a flat (n_pairs, C) tensor, one per block."""
        offsets = self.pair_offsets
        return [flat[offsets[g] : offsets[g + 1]].view(b, m, m, flat.shape[-1]) for g, (b, m) in enumerate(self.blocks)]

    def slots_per_node(self, like: torch.Tensor) -> torch.Tensor:
        """(n_nodes, 1): the padded size m of each atom's block (EDM's 'mean' divides by it)."""
        sizes = [torch.full((b * m, 1), float(m), dtype=like.dtype, device=like.device) for b, m in self.blocks]
        return torch.cat(sizes) if sizes else like.new_zeros(0, 1)


def single_block(bs: int, n_nodes: int) -> PairLayout:
    return PairLayout(((bs, n_nodes),))
