"""EDM's ``qm9_first_half`` / ``qm9_second_half``: the QM9 train split cut in two.

EDM (``qm9/data/utils.py::initialize_datasets``) permutes the rows of the train split (held
in ascending QM9 index order) with ``np.random.seed(42)``; the first 50,000 rows of the
permutation are ``qm9_first_half`` and the rest ``qm9_second_half``, each kept in permutation
order. Valid and test are not halved. The conditional generator trains on the second half;
the property classifier trains on the first half and is tested on the second.

The dataset names live here (``QM9_HALVES``, ``qm9_half_entries``): ``register_qm9_halves()``
adds them to the dataset registry (configs/datasets.py).
"""
from __future__ import annotations

import os

import numpy as np

from configs.datasets import DatasetEntry, find_dataset, register_dataset
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


def _half_n_nodes(dataset: str) -> dict[int, int]:
    if dataset == "qm9_second_half":
        return dict(QM9_SECOND_HALF_N_NODES)
    # The first half is the rest of the train split (EDM defines no histogram for it; this one
    # is checked against the data in tests/test_conditional_data.py).
    full = get_dataset_info("qm9", False)["n_nodes"]
    rest = {n: full[n] - QM9_SECOND_HALF_N_NODES.get(n, 0) for n in full}
    return {n: c for n, c in rest.items() if c > 0}


def half_dataset_info(dataset: str, remove_h: bool = False) -> dict:
    """EDM's ``get_dataset_info('qm9_second_half')`` (QM9's facts with the half's size histogram),
    and the same for the first half. Halves exist with hydrogens only (as in EDM)."""
    if dataset not in QM9_HALVES:
        raise ValueError(f"unknown QM9 half {dataset!r}; choose one of: {', '.join(QM9_HALVES)}")
    if remove_h:
        raise ValueError(f"{dataset} exists with hydrogens only (EDM's conditional setting); drop --remove_h")
    info = get_dataset_info("qm9", False)
    info["name"] = dataset
    info["n_nodes"] = _half_n_nodes(dataset)
    return info


def load_first_half(datadir, split, remove_h=False, filter_n_atoms=None, progress=True) -> dict[str, np.ndarray]:
    """``load_qm9_half`` for qm9_first_half, with the dataset registry's split_arrays signature."""
    return load_qm9_half(datadir, "qm9_first_half", split, remove_h, filter_n_atoms, progress)


def load_second_half(datadir, split, remove_h=False, filter_n_atoms=None, progress=True) -> dict[str, np.ndarray]:
    """``load_qm9_half`` for qm9_second_half, with the dataset registry's split_arrays signature."""
    return load_qm9_half(datadir, "qm9_second_half", split, remove_h, filter_n_atoms, progress)


def qm9_half_entries() -> tuple[DatasetEntry, ...]:
    """Registry entries of the two halves (configs/datasets.py), ready to register.

    Not registered by default yet: the built-in registry (and its tests) list qm9 and geom
    only; ``register_qm9_halves`` adds them (the conditional CLI will, or configs/datasets.py
    once the halves become built-ins). GAGA's v and T* are properties of QM9's data, so the
    halves carry QM9's published values.
    """
    return tuple(
        DatasetEntry(
            name=name, family="qm9", info={False: half_dataset_info(name)}, chain_n_nodes=19,
            split_arrays=f"qm9.data.halves:{loader}", default_datadir="qm9/temp",
            published_var=0.848, published_t_star=550,
        )
        for name, loader in (("qm9_first_half", "load_first_half"), ("qm9_second_half", "load_second_half"))
    )


def register_qm9_halves() -> None:
    """Make --dataset qm9_first_half / qm9_second_half known to every registry consumer."""
    for entry in qm9_half_entries():
        if find_dataset(entry.name) is None:
            register_dataset(entry)
