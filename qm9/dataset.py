"""EDM's entry point for data: ``retrieve_dataloaders(args) -> (dataloaders, charge_scale)``."""
from __future__ import annotations

import argparse

import torch

from configs.datasets_config import get_dataset_info
from qm9.data.collate import make_dataloader
from qm9.data.halves import QM9_HALVES, load_qm9_half
from qm9.data.qm9 import SPLITS, load_qm9


def retrieve_dataloaders(args: argparse.Namespace):
    """Loaders 'train', 'valid', 'test' yielding EDM batch dicts, and the largest atomic number.

    Uses args.dataset, args.datadir, args.batch_size, args.num_workers, args.remove_h,
    args.filter_n_atoms (and, for GEOM, its own fields; see qm9.data.geom).
    """
    dataset = str(getattr(args, "dataset", "qm9")).lower()
    halves = dataset in QM9_HALVES  # EDM's qm9_first_half / qm9_second_half (conditional generation)
    if not halves:
        get_dataset_info(dataset, getattr(args, "remove_h", False))  # validates the name with a clear error
    if dataset.startswith("geom") or dataset == "drugs":
        from qm9.data.geom import retrieve_geom_dataloaders

        return retrieve_geom_dataloaders(args)
    datadir = getattr(args, "datadir", "qm9/temp")
    remove_h = bool(getattr(args, "remove_h", False))
    filter_n_atoms = getattr(args, "filter_n_atoms", None)
    batch_size = int(getattr(args, "batch_size", 64))
    num_workers = int(getattr(args, "num_workers", 0))
    seed = getattr(args, "data_seed", None)
    loaders = {}
    for split in SPLITS:
        if halves:
            arrays = load_qm9_half(datadir, dataset, split, remove_h=remove_h, filter_n_atoms=filter_n_atoms)
        else:
            arrays = load_qm9(datadir, split, remove_h=remove_h, filter_n_atoms=filter_n_atoms)
        loaders[split] = make_dataloader(
            arrays, batch_size=batch_size, shuffle=(split == "train"), num_workers=num_workers, seed=seed
        )
    charge_scale = torch.tensor(9)
    return loaders, charge_scale
