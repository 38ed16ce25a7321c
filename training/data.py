"""Training/evaluation loaders over the data helper's datasets, deterministic and resumable.

The permutation of epoch e is ``randperm(n, seed + e)`` (torch.distributed's convention), so
a resumed run sees the same order, and can start at any batch of an epoch. Under DDP each
process takes every world_size-th index of the (padded) permutation, so all processes run
the same number of steps. Iterating a loader never touches the global RNG: the noise of
the diffusion loss is then the same whether or not a run was interrupted.
"""
from __future__ import annotations

import argparse
from typing import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, Subset


class EpochSampler(Sampler[int]):
    """Indices of one epoch for one process: shuffled by (seed, epoch), sharded, resumable."""

    def __init__(self, n: int, shuffle: bool, seed: int = 0, rank: int = 0, world_size: int = 1, pad: bool = True):
        self.n, self.shuffle, self.seed = n, shuffle, seed
        self.rank, self.world_size, self.pad = rank, world_size, pad
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch's permutation and skip its first ``start`` indices of this process."""
        self.epoch, self.start = epoch, start

    def _epoch_indices(self) -> torch.Tensor:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.n, generator=g)
        else:
            order = torch.arange(self.n)
        if self.pad and self.world_size > 1 and self.n % self.world_size:
            extra = self.world_size - self.n % self.world_size
            order = torch.cat([order, order[:extra].repeat(-(-extra // max(self.n, 1)))[:extra]])
        return order[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self._epoch_indices()[self.start :].tolist())

    def __len__(self) -> int:
        return max(len(self._epoch_indices()) - self.start, 0)


def subset(dataset: Dataset, n: int | None) -> Dataset:
    """The first ``n`` molecules of a split (``--data_subset``); the whole split for None."""
    if n is None or n >= len(dataset):
        return dataset
    return Subset(dataset, range(n))


def make_loader(
    dataset: Dataset, batch_size: int, sampler: EpochSampler, collate_fn, num_workers: int = 0
) -> DataLoader:
    return DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate_fn, num_workers=num_workers,
        persistent_workers=num_workers > 0,
        # A private generator for the loader's base seed keeps the global torch RNG untouched.
        generator=torch.Generator().manual_seed(0),
    )


def per_process_batch_size(batch_size: int, world_size: int) -> int:
    """--batch_size is the global batch (as with EDM's DataParallel); each DDP process takes its share."""
    return max(1, batch_size // world_size)


def build_loaders(
    dataloaders: dict[str, DataLoader], args: argparse.Namespace, rank: int = 0, world_size: int = 1
) -> dict[str, DataLoader]:
    """Loaders 'train' (shuffled, resumable), 'valid' and 'test' (in order, sharded without padding)."""
    out = {}
    batch_size = per_process_batch_size(args.batch_size, world_size)
    for split, loader in dataloaders.items():
        dataset = subset(loader.dataset, args.data_subset)
        train = split == "train"
        sampler = EpochSampler(len(dataset), shuffle=train, seed=args.seed, rank=rank, world_size=world_size, pad=train)
        out[split] = make_loader(dataset, batch_size, sampler, loader.collate_fn, args.num_workers if train else 0)
    return out
