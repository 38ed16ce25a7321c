"""GEOM-Drugs conformers as GAGA features, built only for the conformers asked for.

GEOM-Drugs has ~7 million conformers (30 per molecule) of up to 181 atoms; densifying a
split as QM9 is densified would take (conformers x 181 x 19 channels x 8 bytes), about
160 GB for the train split and 16 GB even for GAGA's 10% sample. So ``GeomFeatures``
keeps only what the memory-mapped conformer table already gives for free (each
conformer's atom count and id) and builds dense, centred, normalised ``Features``
(``gaga.data.centred_features``, the same code as QM9) for the rows asked for:

- ``molecules(rows, n)``: the equal-size molecules of one Gaussianity chunk, (C, n, F);
- ``blocks()``: the whole selection in pieces of at most ``block_atoms`` padded atom slots
  (default 2^18: ~40 MB of float64 features for GEOM's 19 channels, ~200 MB peak), for
  the per-molecule variance statistics. Conformers are sorted by size inside windows of
  consecutive rows (~16 blocks' worth of atoms), so a block pads little (GEOM's mean size
  is a quarter of its largest) while reads from the table stay within a window;
- ``subset(rows)``: a seeded random sample (``--n_molecules``) costs nothing until used.

Gathering and padding are GeomDataset.padded_arrays (index arithmetic over the flat atom
table, no per-molecule loop); positions are float32 as in training batches, as for QM9.
"""
from __future__ import annotations

import sys
from typing import Iterator

import numpy as np

from gaga.data import DataSpec, Features, centred_features, feature_channels

DEFAULT_BLOCK_ATOMS = 1 << 18
WINDOW_BLOCKS = 16


class GeomFeatures:
    """The conformers ``rows`` of one GEOM split (a ``qm9.data.geom.GeomDataset``), as features on demand."""

    def __init__(self, dataset, spec: DataSpec, rows: np.ndarray | None = None, block_atoms: int = DEFAULT_BLOCK_ATOMS,
                 progress: bool = False):
        self.dataset = dataset
        self.spec = spec
        self.rows = np.arange(len(dataset), dtype=np.int64) if rows is None else np.asarray(rows, dtype=np.int64)
        self.num_atoms = np.asarray(dataset.num_atoms, dtype=np.int64)[self.rows]
        self.index = np.asarray(dataset.conformer_ids, dtype=np.int64)[self.rows]
        self.channels = feature_channels(len(dataset.atomic_nb), spec.include_charges)
        self.block_atoms = int(block_atoms)
        self.progress = progress

    def __len__(self) -> int:
        return int(self.rows.size)

    @property
    def n_channels(self) -> int:
        return max(sl.stop for sl in self.channels.values())

    def subset(self, rows: np.ndarray) -> "GeomFeatures":
        return GeomFeatures(self.dataset, self.spec, self.rows[np.asarray(rows, dtype=np.int64)], self.block_atoms, self.progress)

    def dense(self, rows: np.ndarray) -> Features:
        """Dense Features of the given rows, padded to the largest of them."""
        return centred_features(self.dataset.padded_arrays(self.rows[np.asarray(rows, dtype=np.int64)]), self.spec)

    def molecules(self, rows: np.ndarray, n_atoms: int) -> np.ndarray:
        """(C, n_atoms, F) features of the rows, all conformers of exactly n_atoms atoms."""
        return self.dense(rows).values[:, :n_atoms]

    def block_rows(self) -> list[np.ndarray]:
        """Row sets (each sorted) partitioning the selection, each padding to at most block_atoms slots
        (rows x their largest atom count; a single conformer larger than that is a block of its own)."""
        if len(self) == 0:
            return []
        sizes_all = self.num_atoms
        budget = max(self.block_atoms, int(sizes_all.max()))
        window = max(1, WINDOW_BLOCKS * budget // max(1, int(sizes_all.mean())))
        blocks = []
        for start in range(0, len(self), window):
            rows = np.arange(start, min(start + window, len(self)))
            rows = rows[np.argsort(sizes_all[rows], kind="stable")]
            sizes = sizes_all[rows]
            first = 0
            while first < rows.size:
                # Sizes ascend, so (count x last size) grows with the block's end: cut where it passes the budget.
                padded = np.arange(1, rows.size - first + 1) * sizes[first:]
                end = first + max(1, int(np.searchsorted(padded, budget, side="right")))
                blocks.append(np.sort(rows[first:end]))
                first = end
        return blocks

    def blocks(self) -> Iterator[tuple[np.ndarray, Features]]:
        pieces = self.block_rows()
        if self.progress and len(pieces) > 1:
            from tqdm import tqdm

            pieces = tqdm(pieces, desc="GEOM conformers", unit="block", file=sys.stderr)
        for rows in pieces:
            yield rows, self.dense(rows)


def load_geom_features(spec: DataSpec, split: str = "train", progress: bool = True) -> GeomFeatures:
    """The GEOM-Drugs split of the spec's data folder (EDM's split, permutation saved beside the data)."""
    from qm9.data.geom import DEFAULT_CONFORMATIONS, geom_datasets

    datasets = geom_datasets(
        spec.datadir,
        remove_h=spec.remove_h,
        conformations=spec.conformations or DEFAULT_CONFORMATIONS,
        filter_n_atoms=spec.filter_n_atoms,
        filter_molecule_size=spec.filter_molecule_size,
    )
    if split not in datasets:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(datasets)}")
    return GeomFeatures(datasets[split], spec, progress=progress)
