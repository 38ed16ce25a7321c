"""EDM's ``configs/datasets_config.py`` names, answered by the dataset registry (configs/datasets.py).

The numbers live in ``datasets_info.json`` beside this file; they are EDM's (computed from
EDM's QM9 train split and from GEOM-Drugs). ``get_dataset_info`` returns them with EDM's
field names and integer keys, so user code written against EDM keeps working.
"""
from __future__ import annotations

from typing import Any

from configs.datasets import QM9, GEOM, dataset_entry, dataset_names


def dataset_choices() -> list[str]:
    return dataset_names()


def get_dataset_info(dataset: str, remove_h: bool) -> dict[str, Any]:
    """EDM's ``get_dataset_info``: the facts of ``dataset`` with or without hydrogens.

    Returns a fresh copy (callers may mutate it). Raises ``UserInputError`` (a ``ValueError``)
    listing the valid choices for an unknown dataset.
    """
    return dataset_entry(dataset).dataset_info(remove_h)


# GAGA's published figures (seed README): dataset variance v (the mean per-molecule RMS of the
# centred, normalised features) and the characteristic step T*; the registry holds them.
GAGA_PUBLISHED = {
    entry.name: {"dataset_var": entry.published_var, "t_star": entry.published_t_star} for entry in (QM9, GEOM)
}


def published_dataset_var(dataset: str) -> float:
    """GAGA's published v for a dataset (QM9 0.848, GEOM-Drugs 0.952)."""
    return dataset_entry(dataset).require_published_var()
