"""Dataset facts (atom encoders, atom-count histograms, colours) in one place.

The numbers live in ``datasets_info.json`` beside this file; they are EDM's
(computed from EDM's QM9 train split and from GEOM-Drugs).  ``get_dataset_info``
returns them with EDM's field names and integer keys, so user code written
against EDM's ``configs/datasets_config.py`` keeps working.
"""
from __future__ import annotations

import copy
import functools
import json
from pathlib import Path
from typing import Any

_INFO_FILE = Path(__file__).with_name("datasets_info.json")
_INT_KEYED_FIELDS = ("n_nodes", "atom_types")

# (dataset name, remove_h) -> key in datasets_info.json
_KEYS = {
    ("qm9", False): "qm9_with_h",
    ("qm9", True): "qm9_without_h",
    ("geom", False): "geom_with_h",
    ("geom", True): "geom_no_h",
}
# Aliases users type for the same datasets.
_ALIASES = {
    "qm9": "qm9",
    "geom": "geom",
    "geom_drugs": "geom",
    "drugs": "geom",
}


@functools.lru_cache(maxsize=None)
def _load_all() -> dict[str, dict[str, Any]]:
    raw = json.loads(_INFO_FILE.read_text())
    out = {}
    for key, info in raw.items():
        info = dict(info)
        for field in _INT_KEYED_FIELDS:
            info[field] = {int(k): int(v) for k, v in info[field].items()}
        out[key] = info
    return out


def dataset_choices() -> list[str]:
    return sorted(_ALIASES)


def get_dataset_info(dataset: str, remove_h: bool) -> dict[str, Any]:
    """EDM's ``get_dataset_info``: the facts of ``dataset`` with or without hydrogens.

    Returns a fresh copy (callers may mutate it).  Raises ``ValueError`` listing the
    valid choices for an unknown dataset.
    """
    name = _ALIASES.get(str(dataset).lower())
    if name is None:
        raise ValueError(
            f"unknown dataset {dataset!r}; choose one of: {', '.join(dataset_choices())}"
        )
    key = _KEYS[(name, bool(remove_h))]
    return copy.deepcopy(_load_all()[key])


# GAGA's published figures (seed README): dataset variance v (the mean per-molecule RMS of the
# centred, normalised features) and the characteristic step T*.
GAGA_PUBLISHED = {
    "qm9": {"dataset_var": 0.848, "t_star": 550},
    "geom": {"dataset_var": 0.952, "t_star": 650},
}


def published_dataset_var(dataset: str) -> float:
    """GAGA's published v for a dataset (QM9 0.848, GEOM-Drugs 0.952)."""
    name = _ALIASES.get(str(dataset).lower())
    if name is None:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of: {', '.join(dataset_choices())}")
    return GAGA_PUBLISHED[name]["dataset_var"]
