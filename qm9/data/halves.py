"""EDM's ``qm9_first_half`` / ``qm9_second_half``: the QM9 train split cut in two.

EDM (``qm9/data/utils.py::initialize_datasets``) permutes the rows of the train split (held
in ascending QM9 index order) with ``np.random.seed(42)``; the first 50,000 rows of the
permutation are ``qm9_first_half`` and the rest ``qm9_second_half``, each kept in permutation
order. Valid and test are not halved. The conditional generator trains on the second half;
the property classifier trains on the first half and is tested on the second.

Both are built-in datasets (configs/datasets.py registers them, with EDM's second-half size
histogram ``QM9_SECOND_HALF_N_NODES``); this module holds their loaders.
"""
from __future__ import annotations

import os

import numpy as np

from configs.datasets import QM9_FIRST_HALF, QM9_SECOND_HALF, QM9_SECOND_HALF_N_NODES, DatasetEntry, find_dataset, register_dataset
from qm9.data.qm9 import N_TRAIN, SPLITS, load_qm9

QM9_HALVES = ("qm9_first_half", "qm9_second_half")
HALF_SEED = 42

def half_rows(dataset: str) -> np.ndarray:
    """Rows of the (ascending-index) train split that form ``dataset``, in EDM's order."""
    if dataset not in QM9_HALVES:
        raise ValueError(f"unknown QM9 half {dataset!r}; choose one of: {', '.join(QM9_HALVES)}")
    # A private generator with the legacy seeding gives np.random.seed(42)'s permutation
    # without reseeding numpy's global RNG (EDM's side effect).
    perm = np.random.RandomState(HALF_SEED).permutation(N_TRAIN)
    half = N_TRAIN // 2
    return perm[:half] if dataset == "qm9_first_half" else perm[half:]


def load_qm9_half(
    datadir: str | os.PathLike,
    dataset: str,
    split: str = "train",
    remove_h: bool = False,
    filter_n_atoms: int | None = None,
    progress: bool = True,
) -> dict[str, np.ndarray]:
    """``load_qm9`` for a half: its train split is the half, valid/test are QM9's full ones."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    if split != "train":
        rows = None
    else:
        rows = half_rows(dataset)
    arrays = load_qm9(datadir, split, remove_h=remove_h, progress=progress)
    if rows is not None:
        arrays = {k: v[rows] for k, v in arrays.items()}
    if filter_n_atoms is not None:
        keep = arrays["num_atoms"] == int(filter_n_atoms)
        if not keep.any():
            raise ValueError(f"no {dataset} {split} molecule has exactly {filter_n_atoms} atoms (--filter_n_atoms)")
        arrays = {k: v[keep] for k, v in arrays.items()}
    return arrays


def half_dataset_info(dataset: str, remove_h: bool = False) -> dict:
    """EDM's ``get_dataset_info('qm9_second_half')`` (QM9's facts with the half's size histogram),
    and the same for the first half. Halves exist with hydrogens only (as in EDM)."""
    if dataset not in QM9_HALVES:
        raise ValueError(f"unknown QM9 half {dataset!r}; choose one of: {', '.join(QM9_HALVES)}")
    if remove_h:
        raise ValueError(f"{dataset} exists with hydrogens only (EDM's conditional setting); drop --remove_h")
    entry = QM9_FIRST_HALF if dataset == "qm9_first_half" else QM9_SECOND_HALF
    return entry.dataset_info(False)


def load_first_half(datadir, split, remove_h=False, filter_n_atoms=None, progress=True) -> dict[str, np.ndarray]:
    """``load_qm9_half`` for qm9_first_half, with the dataset registry's split_arrays signature."""
    return load_qm9_half(datadir, "qm9_first_half", split, remove_h, filter_n_atoms, progress)


def load_second_half(datadir, split, remove_h=False, filter_n_atoms=None, progress=True) -> dict[str, np.ndarray]:
    """``load_qm9_half`` for qm9_second_half, with the dataset registry's split_arrays signature."""
    return load_qm9_half(datadir, "qm9_second_half", split, remove_h, filter_n_atoms, progress)


def qm9_half_entries() -> tuple[DatasetEntry, ...]:
    """The halves' registry entries (built in: configs/datasets.py registers them)."""
    return (QM9_FIRST_HALF, QM9_SECOND_HALF)


def register_qm9_halves() -> None:
    """Register the halves again if a test or notebook unregistered them (they are built in)."""
    for entry in qm9_half_entries():
        if find_dataset(entry.name) is None:
            register_dataset(entry)
