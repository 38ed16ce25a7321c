"""Turn padded per-molecule arrays into EDM's batch dict.

Every dataset (QM9, GEOM) stores molecules as arrays padded to its largest molecule;
a batch is trimmed to the largest molecule *in the batch* (EDM's collate), which matters
because the l2 training loss is divided by the padded atom count.
"""
from __future__ import annotations

import numpy as np
import torch


def make_batch(
    positions: np.ndarray,
    charges: np.ndarray,
    one_hot: np.ndarray,
    num_atoms: np.ndarray,
    index: np.ndarray | None = None,
) -> dict[str, torch.Tensor]:
    """Batch dict with EDM's keys from padded arrays of B molecules.

    positions (B, M, 3) float, charges (B, M) int (0 = padding), one_hot (B, M, K) bool,
    num_atoms (B,). Real atoms occupy slots 0..n-1. Returns tensors trimmed to
    N = max(num_atoms): positions (B,N,3) float32, one_hot (B,N,K) bool, charges (B,N) int64,
    atom_mask (B,N) bool, edge_mask (B*N*N, 1) bool (no self-edges), num_atoms (B,), index (B,).
    """
    num_atoms = np.asarray(num_atoms)
    n = int(num_atoms.max()) if len(num_atoms) else 0
    charges_t = torch.as_tensor(np.ascontiguousarray(charges[:, :n]), dtype=torch.int64)
    atom_mask = charges_t > 0
    b = atom_mask.shape[0]
    not_self = ~torch.eye(n, dtype=torch.bool).unsqueeze(0)
    edge_mask = (atom_mask.unsqueeze(1) & atom_mask.unsqueeze(2) & not_self).reshape(b * n * n, 1)
    batch = {
        "positions": torch.as_tensor(np.ascontiguousarray(positions[:, :n]), dtype=torch.float32),
        "one_hot": torch.as_tensor(np.ascontiguousarray(one_hot[:, :n]), dtype=torch.bool),
        "charges": charges_t,
        "atom_mask": atom_mask,
        "edge_mask": edge_mask,
        "num_atoms": torch.as_tensor(num_atoms, dtype=torch.int64),
    }
    if index is not None:
        batch["index"] = torch.as_tensor(np.asarray(index), dtype=torch.int64)
    return batch


class PaddedMoleculeDataset(torch.utils.data.Dataset):
    """Map-style dataset over padded arrays; a batch is gathered in one indexing operation.

    ``__getitems__`` (used by DataLoader's batched fetch) returns the finished batch dict,
    so collation is a single vectorised gather instead of a per-molecule Python loop.
    """

    def __init__(self, arrays: dict[str, np.ndarray]):
        self.arrays = arrays
        self.property_keys = [
            k for k, v in arrays.items() if k not in ("num_atoms", "index") and v.ndim == 1 and v.dtype.kind == "f"
        ]

    def __len__(self) -> int:
        return len(self.arrays["num_atoms"])

    def __getitems__(self, indices) -> dict[str, torch.Tensor]:
        rows = np.asarray(indices, dtype=np.int64)
        a = self.arrays
        batch = make_batch(a["positions"][rows], a["charges"][rows], a["one_hot"][rows], a["num_atoms"][rows], a["index"][rows])
        # Per-molecule float properties (QM9's alpha, gap, ...) ride along, as in EDM's batches.
        for key in self.property_keys:
            batch[key] = torch.as_tensor(a[key][rows])
        return batch

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        batch = self.__getitems__([i])
        return {k: v[0] if k != "edge_mask" else v for k, v in batch.items()}


def passthrough_collate(batch):
    """DataLoader collate_fn for datasets whose ``__getitems__`` already builds the batch."""
    return batch


def make_dataloader(
    arrays: dict[str, np.ndarray] | torch.utils.data.Dataset, batch_size: int, shuffle: bool, num_workers: int = 0,
    drop_last: bool = False, seed: int | None = None,
) -> torch.utils.data.DataLoader:
    """DataLoader yielding EDM batch dicts; uses a DistributedSampler when torch.distributed is initialised.

    ``arrays`` is either padded arrays (wrapped in a PaddedMoleculeDataset) or a dataset whose
    ``__getitems__`` already returns a batch dict (e.g. GEOM's on-the-fly padding dataset).
    """
    dataset = arrays if isinstance(arrays, torch.utils.data.Dataset) else PaddedMoleculeDataset(arrays)
    sampler = None
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        sampler = torch.utils.data.distributed.DistributedSampler(dataset, shuffle=shuffle, seed=seed or 0, drop_last=drop_last)
        shuffle = False
    generator = None
    if seed is not None and sampler is None:
        generator = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, sampler=sampler, num_workers=num_workers,
        collate_fn=passthrough_collate, drop_last=drop_last, generator=generator,
        persistent_workers=num_workers > 0,
    )
