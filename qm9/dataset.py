"""EDM's entry point for data: ``retrieve_dataloaders(args) -> (dataloaders, charge_scale)``.

Which dataset ``args.dataset`` names, and how it loads, is the registry's answer
(configs/datasets.py); this module builds the loaders of datasets stored as padded arrays.
"""
from __future__ import annotations

import argparse

import torch

from configs.datasets import DatasetEntry, dataset_entry, resolve_hook
from qm9.data.collate import make_dataloader
from qm9.data.qm9 import SPLITS


def retrieve_dataloaders(args: argparse.Namespace):
    """Loaders 'train', 'valid', 'test' yielding EDM batch dicts, and the largest atomic number.

    Uses args.dataset, args.datadir, args.batch_size, args.num_workers, args.remove_h,
    args.filter_n_atoms (and, for GEOM, its own fields; see qm9.data.geom).
    """
    entry = dataset_entry(getattr(args, "dataset", "qm9"))
    info = entry.dataset_info(getattr(args, "remove_h", False))  # a missing H/no-H variant: one clear line
    if entry.loader is not None:
        return resolve_hook(entry.loader)(args)
    return dense_dataloaders(args, entry, info)


def dense_dataloaders(args: argparse.Namespace, entry: DatasetEntry, info: dict):
    """Loaders over the padded arrays of each split (``entry.split_arrays``); QM9's path."""
    load_split = resolve_hook(entry.split_arrays)
    datadir = getattr(args, "datadir", entry.default_datadir)
    remove_h = bool(getattr(args, "remove_h", False))
    filter_n_atoms = getattr(args, "filter_n_atoms", None)
    batch_size = int(getattr(args, "batch_size", 64))
    num_workers = int(getattr(args, "num_workers", 0))
    seed = getattr(args, "data_seed", None)
    loaders = {}
    for split in SPLITS:
        arrays = load_split(datadir, split, remove_h=remove_h, filter_n_atoms=filter_n_atoms)
        loaders[split] = make_dataloader(
            arrays, batch_size=batch_size, shuffle=(split == "train"), num_workers=num_workers, seed=seed
        )
    return loaders, torch.tensor(max_atomic_number(info["atom_decoder"]))


def max_atomic_number(atom_decoder) -> int:
    """EDM's charge_scale: the largest atomic number among the dataset's atom types (QM9: F = 9)."""
    if not atom_decoder:
        raise ValueError("the dataset_info's atom_decoder is empty")
    from rdkit import Chem  # only the periodic table

    table = Chem.GetPeriodicTable()
    return max(int(table.GetAtomicNumber(str(symbol))) for symbol in atom_decoder)
