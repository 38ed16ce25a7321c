"""EDM's ``qm9_first_half`` / ``qm9_second_half``: the QM9 train split cut in two.

EDM (``qm9/data/utils.py::initialize_datasets``) permutes the rows of the train split (held
in ascending QM9 index order) with ``np.random.seed(42)``; the first 50,000 rows of the
permutation are ``qm9_first_half`` and the rest ``qm9_second_half``, each kept in permutation
order. Valid and test are not halved. The conditional generator trains on the second half;
the property classifier trains on the first half and is tested on the second.

The dataset names live here (``QM9_HALVES``, ``half_dataset_info``) until the dataset registry
(configs/datasets.py) takes them over.
"""
from __future__ import annotations

import os

import numpy as np

from configs.datasets_config import get_dataset_info
from qm9.data.qm9 import N_TRAIN, SPLITS, load_qm9

QM9_HALVES = ("qm9_first_half", "qm9_second_half")
HALF_SEED = 42

# EDM's configs/datasets_config.py::qm9_second_half['n_nodes'], in EDM's dict order: the
# Categorical index of DistributionNodes follows this order, so seeded draws need it.
# (tests/test_conditional_data.py checks it against the reconstructed half.)
QM9_SECOND_HALF_N_NODES = {
    19: 6944, 12: 845, 20: 4794, 21: 4962, 27: 132, 25: 754, 18: 6695, 14: 2587, 15: 3865,
    22: 1701, 17: 6461, 16: 5344, 23: 2380, 13: 1541, 24: 267, 10: 178, 7: 7, 11: 412, 8: 25,
    9: 62, 29: 15, 26: 17, 4: 3, 3: 1, 6: 5, 5: 3,
}


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
    """EDM's ``get_dataset_info('qm9_second_half')``: QM9's facts with the second half's size histogram.

    Like EDM, only the second half (with hydrogens) has one: the first half is the property
    classifier's training set and cannot train a generator.
    """
    if dataset != "qm9_second_half" or remove_h:
        raise ValueError(
            f"no generator dataset info for {dataset!r}{' without hydrogens' if remove_h else ''}: "
            "conditional generators train on qm9_second_half with hydrogens"
        )
    info = get_dataset_info("qm9", False)
    info["name"] = "qm9_second_half"
    info["n_nodes"] = dict(QM9_SECOND_HALF_N_NODES)
    return info
