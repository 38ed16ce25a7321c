"""The dataset registry: every name ``--dataset`` accepts, and what each dataset brings.

One ``DatasetEntry`` per dataset states its canonical name and aliases, its EDM
``dataset_info`` (atom encoder/decoder, size histogram, ...) with and without hydrogens, how
its molecules are loaded, the size of the molecule a denoising chain draws, its default data
folder, GAGA's published variance and T*, and which training script's defaults it follows.
Every consumer (training flags, data loading, sampling, evaluation, GAGA's tools) asks
``dataset_entry(name)`` instead of testing the spelling.

Loaders live in higher rooms (``qm9/``), so entries name them by dotted path
(``"package.module:function"``), imported only when called; an entry registered from user
code may pass the function itself. Adding a dataset::

    from configs.datasets import DatasetEntry, register_dataset

    register_dataset(DatasetEntry(
        name="my_set", family="qm9", chain_n_nodes=12,
        info={False: my_dataset_info},              # remove_h -> EDM dataset_info
        split_arrays="my_package.data:load_split",  # (datadir, split, remove_h, filter_n_atoms, progress) -> arrays
    ))
"""
from __future__ import annotations

import copy
import functools
import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from configs.errors import UserInputError

# Training-script families: main_qm9.py ('qm9') or main_geom_drugs.py ('geom') defaults and flags.
# The family also picks EDM's bond rules (GEOM's lookup for 'geom').
FAMILIES = ("qm9", "geom")

_INFO_FILE = Path(__file__).with_name("datasets_info.json")
_INT_KEYED_FIELDS = ("n_nodes", "atom_types")
REQUIRED_INFO_FIELDS = ("atom_encoder", "atom_decoder", "n_nodes", "max_n_nodes")


@functools.lru_cache(maxsize=None)
def _builtin_infos() -> dict[str, dict[str, Any]]:
    """datasets_info.json with EDM's integer keys (read once, on first use)."""
    raw = json.loads(_INFO_FILE.read_text())
    out = {}
    for key, info in raw.items():
        info = dict(info)
        for name in _INT_KEYED_FIELDS:
            info[name] = {int(k): int(v) for k, v in info[name].items()}
        out[key] = info
    return out


def resolve_hook(hook: str | Callable[..., Any]) -> Callable[..., Any]:
    """The function a hook names: ``"package.module:function"`` imported now, or the callable itself."""
    if callable(hook):
        return hook
    module, _, attr = str(hook).partition(":")
    if not module or not attr:
        raise ValueError(f"a dataset hook is 'package.module:function', got {hook!r}")
    return getattr(importlib.import_module(module), attr)


@dataclass(frozen=True)
class DatasetEntry:
    """What the code needs to know about one dataset.

    name            canonical name; ``dataset_info['name']`` and run folders record it
    family          'qm9' or 'geom': the training script whose defaults and flags apply
                    (main_qm9.py / main_geom_drugs.py) and EDM's bond rules
    info            remove_h -> the EDM dataset_info, or its key in datasets_info.json
    chain_n_nodes   atoms of the molecule a visualised denoising chain draws (EDM: QM9 19, GEOM 44)
    aliases         other spellings --dataset accepts (case-insensitive, like the name)
    split_arrays    padded arrays of one split: ``f(datadir, split, remove_h=, filter_n_atoms=,
                    progress=)`` returning positions/charges/one_hot/num_atoms/index (qm9.data.qm9.load_qm9);
                    given it, dataloaders, novelty SMILES and GAGA's features need nothing else
    loader          EDM's ``retrieve_dataloaders`` for the dataset, ``f(args) -> (loaders, charge_scale)``,
                    for data too large to densify (GEOM); default: batches of ``split_arrays``
    default_datadir data folder when a run or flag does not name one
    published_var   GAGA's published dataset variance v (the Gaussian start's default), if any
    published_t_star GAGA's published characteristic step T*, if any
    """

    name: str
    family: str
    info: Mapping[bool, Any]
    chain_n_nodes: int
    aliases: tuple[str, ...] = ()
    split_arrays: str | Callable[..., Any] | None = None
    loader: str | Callable[..., Any] | None = None
    default_datadir: str = "qm9/temp"
    published_var: float | None = None
    published_t_star: int | None = None

    def __post_init__(self) -> None:
        where = f"dataset {self.name!r}"
        for spelling in self.names:
            if not spelling or spelling != spelling.lower() or spelling != spelling.strip():
                raise ValueError(f"{where}: names are non-empty lower-case words, got {spelling!r}")
        if self.family not in FAMILIES:
            raise ValueError(f"{where}: family must be one of {', '.join(FAMILIES)}, got {self.family!r}")
        if not self.info or set(self.info) - {False, True}:
            raise ValueError(f"{where}: info maps remove_h (False/True) to a dataset_info, got keys {sorted(self.info)}")
        for remove_h, info in self.info.items():
            if not isinstance(info, str):
                missing = [f for f in REQUIRED_INFO_FIELDS if f not in info]
                if missing:
                    raise ValueError(f"{where}: dataset_info (remove_h={remove_h}) lacks {', '.join(missing)}")
        if int(self.chain_n_nodes) < 1:
            raise ValueError(f"{where}: chain_n_nodes must be >= 1, got {self.chain_n_nodes}")
        if self.split_arrays is None and self.loader is None:
            raise ValueError(f"{where}: give split_arrays (padded arrays per split) or loader (dataloaders)")
        if self.published_var is not None and not float(self.published_var) > 0:
            raise ValueError(f"{where}: published_var must be > 0, got {self.published_var}")

    @property
    def names(self) -> tuple[str, ...]:
        return (self.name, *self.aliases)

    def dataset_info(self, remove_h: bool) -> dict[str, Any]:
        """EDM's dataset_info with or without hydrogens: a fresh copy (callers may mutate it)."""
        info = self.info.get(bool(remove_h))
        if info is None:
            variant = "without hydrogens (--remove_h)" if remove_h else "with hydrogens (without --remove_h)"
            raise UserInputError(f"dataset {self.name!r} has no variant {variant}")
        info = copy.deepcopy(_builtin_infos()[info] if isinstance(info, str) else dict(info))
        info["name"] = self.name  # EDM code (bond rules, file names) reads the dataset from the info
        return info

    def require_published_var(self) -> float:
        """GAGA's published v, or a one-line error saying how to get one."""
        if self.published_var is None:
            raise UserInputError(
                f"dataset {self.name!r} has no published GAGA variance; pass --dataset_var "
                "(estimate it with Variance_Estimate.py)"
            )
        return float(self.published_var)


_ENTRIES: dict[str, DatasetEntry] = {}  # canonical name -> entry
_SPELLINGS: dict[str, str] = {}  # every accepted spelling -> canonical name


def register_dataset(entry: DatasetEntry) -> DatasetEntry:
    """Make ``entry`` (and its aliases) a ``--dataset`` choice everywhere. Registering the same
    entry twice is harmless; a name or alias already taken by another dataset is refused."""
    taken = [n for n in entry.names if _SPELLINGS.get(n, entry.name) != entry.name]
    if taken:
        raise ValueError(f"dataset name(s) {', '.join(taken)} already belong to another dataset")
    if entry.name in _ENTRIES and _ENTRIES[entry.name] != entry:
        raise ValueError(f"a dataset named {entry.name!r} is already registered")
    _ENTRIES[entry.name] = entry
    for spelling in entry.names:
        _SPELLINGS[spelling] = entry.name
    return entry


def unregister_dataset(name: str) -> None:
    """Forget a dataset and its aliases (tests, notebooks)."""
    entry = _ENTRIES.pop(dataset_entry(name).name)
    for spelling in entry.names:
        _SPELLINGS.pop(spelling, None)


def dataset_names() -> list[str]:
    """Every accepted spelling, sorted (the choices an error lists)."""
    return sorted(_SPELLINGS)


def find_dataset(name: object) -> DatasetEntry | None:
    """The entry of any accepted spelling (case-insensitive), or None."""
    canonical = _SPELLINGS.get(str(name).lower())
    return None if canonical is None else _ENTRIES[canonical]


def dataset_entry(name: object) -> DatasetEntry:
    """The entry of any accepted spelling; one-line UserInputError listing the choices otherwise."""
    entry = find_dataset(name)
    if entry is None:
        raise UserInputError(f"unknown dataset {name!r}; choose one of: {', '.join(dataset_names())}")
    return entry


def dataset_family(name: object, default: str = "qm9") -> str:
    """The training-script family of a dataset; ``default`` for names no entry knows (legacy
    args.pickle files are completed first and their dataset checked afterwards, with the file named)."""
    entry = find_dataset(name)
    return default if entry is None else entry.family


# --- the datasets EDM and GAGA ship (facts: EDM's configs and sample_chain, GAGA's README) ---
QM9 = register_dataset(DatasetEntry(
    name="qm9",
    family="qm9",
    info={False: "qm9_with_h", True: "qm9_without_h"},
    chain_n_nodes=19,
    split_arrays="qm9.data.qm9:load_qm9",
    default_datadir="qm9/temp",
    published_var=0.848,
    published_t_star=550,
))
GEOM = register_dataset(DatasetEntry(
    name="geom",
    family="geom",
    info={False: "geom_with_h", True: "geom_no_h"},
    chain_n_nodes=44,
    aliases=("geom_drugs", "drugs"),
    loader="qm9.data.geom:retrieve_geom_dataloaders",
    default_datadir="data/geom",
    published_var=0.952,
    published_t_star=650,
))

# EDM's halves of the QM9 train split (qm9.data.halves builds them: np.random.seed(42)
# permutation, 50,000 molecules each; valid/test not halved). The conditional generator trains
# on the second half, the property classifier on the first. EDM's
# configs/datasets_config.py::qm9_second_half['n_nodes'] in EDM's dict order (the Categorical
# index of DistributionNodes follows it, so seeded draws need it); the first half's histogram
# is the rest of QM9's (EDM has none). tests/test_conditional_data.py checks both on the data.
QM9_SECOND_HALF_N_NODES = {
    19: 6944, 12: 845, 20: 4794, 21: 4962, 27: 132, 25: 754, 18: 6695, 14: 2587, 15: 3865,
    22: 1701, 17: 6461, 16: 5344, 23: 2380, 13: 1541, 24: 267, 10: 178, 7: 7, 11: 412, 8: 25,
    9: 62, 29: 15, 26: 17, 4: 3, 3: 1, 6: 5, 5: 3,
}


def _qm9_half_info(name: str) -> dict[str, Any]:
    info = dict(_builtin_infos()["qm9_with_h"])
    if name == "qm9_second_half":
        info["n_nodes"] = dict(QM9_SECOND_HALF_N_NODES)
    else:
        rest = {n: c - QM9_SECOND_HALF_N_NODES.get(n, 0) for n, c in info["n_nodes"].items()}
        info["n_nodes"] = {n: c for n, c in rest.items() if c > 0}
    info["name"] = name
    return info


# GAGA's v and T* are properties of QM9's data, so the halves carry QM9's published values.
# Halves exist with hydrogens only (as in EDM).
QM9_FIRST_HALF, QM9_SECOND_HALF = (
    register_dataset(DatasetEntry(
        name=name, family="qm9", info={False: _qm9_half_info(name)}, chain_n_nodes=19,
        split_arrays=f"qm9.data.halves:{loader}", default_datadir="qm9/temp",
        published_var=0.848, published_t_star=550,
    ))
    for name, loader in (("qm9_first_half", "load_first_half"), ("qm9_second_half", "load_second_half"))
)
