"""Bond orders from interatomic distances (EDM's distance-threshold rule).

The bond lengths live once, in ``configs/bond_tables.json`` (picometres).  For an atom
pair (a, b) at distance d (Angstrom), with d_pm = 100 * d:

* no bond (0) unless d_pm < single[a][b] + 10;
* else a double bond (2) if a double length exists and d_pm < double[a][b] + 5,
  upgraded to triple (3) if a triple length exists and d_pm < triple[a][b] + 3;
* else a single bond (1).

Two forms of the same rule:

* scalar, EDM's public names: ``get_bond_order`` and ``geom_predictor``;
* vectorised: ``BondTables`` holds (n_types, n_types) threshold matrices in a dataset's
  atom-decoder order, so ``bond_orders`` turns a padded batch of distances (B, N, N) into
  bond orders with one numpy expression.

Both compare ``100.0 * d`` in float64 with ``length + margin`` (exact small integers), so
they agree bit for bit on any float distance, boundary values included.
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from configs.datasets import dataset_entry
from configs.errors import DataError

_TABLE_FILE = Path(__file__).resolve().parent.parent / "configs" / "bond_tables.json"


def _symmetrised(table: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    """Mirror every entry (a, b) to (b, a).

    The published tables list one pair (the C=S double bond) under C only.  EDM's GEOM code
    always looks pairs up in atom-decoder order, where C precedes S, so the entry counts in
    both orders; mirroring it makes the scalar function symmetric with the same outcome.
    """
    out: dict[str, dict[str, int]] = {a: dict(row) for a, row in table.items()}
    for a, row in table.items():
        for b, length in row.items():
            mirrored = out.setdefault(b, {}).setdefault(a, length)
            if mirrored != length:
                raise ValueError(f"{_TABLE_FILE}: bond length {a}-{b} is {length} but {b}-{a} is {mirrored}")
    return out


@functools.lru_cache(maxsize=1)
def _tables() -> dict[str, Any]:
    """EDM's bond tables, read on first use (nothing is read at import time)."""
    try:
        raw = json.loads(_TABLE_FILE.read_text())
        return dict(
            bonds1=_symmetrised(raw["single_bond_pm"]),
            bonds2=_symmetrised(raw["double_bond_pm"]),
            bonds3=_symmetrised(raw["triple_bond_pm"]),
            margin1=int(raw["margins_pm"]["single"]),
            margin2=int(raw["margins_pm"]["double"]),
            margin3=int(raw["margins_pm"]["triple"]),
            allowed_bonds=dict(raw["allowed_valence"]),
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise DataError(f"cannot read the bond tables {_TABLE_FILE} ({type(e).__name__}: {e}); restore it from git") from None


# EDM's module-level names (bonds1/2/3 and margin1/2/3 in picometres, allowed_bonds), loaded lazily.
_TABLE_NAMES = ("bonds1", "bonds2", "bonds3", "margin1", "margin2", "margin3", "allowed_bonds")


def __getattr__(name: str) -> Any:
    if name in _TABLE_NAMES:
        return _tables()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

# Two atoms closer than this (Angstrom) sit on top of each other: both count as unstable
# and the molecule as invalid.  Far below any bond length (H-H is 0.74 A), so it never
# touches a physical molecule.
OVERLAP_ANGSTROM = 1e-3


def get_bond_order(atom1: str, atom2: str, distance: float, check_exists: bool = False) -> int:
    """Bond order (0-3) of elements ``atom1``-``atom2`` at ``distance`` Angstrom.

    Without ``check_exists`` a pair with no single-bond length raises ``KeyError`` (as in
    EDM); with it such a pair has order 0.
    """
    d_pm = 100.0 * float(distance)
    single = _tables()["bonds1"].get(atom1, {}).get(atom2)
    if single is None:
        if check_exists:
            return 0
        raise KeyError(f"no single-bond length for {atom1}-{atom2}; pass check_exists=True to treat it as no bond")
    # Written as "d < threshold" so that a NaN distance is no bond.
    if not d_pm < single + _tables()["margin1"]:
        return 0
    double = _tables()["bonds2"].get(atom1, {}).get(atom2)
    if double is None or not d_pm < double + _tables()["margin2"]:
        return 1
    triple = _tables()["bonds3"].get(atom1, {}).get(atom2)
    if triple is not None and d_pm < triple + _tables()["margin3"]:
        return 3
    return 2


def geom_predictor(pair: Sequence[str], distance: float, limit_bonds_to_one: bool = False) -> int:
    """GEOM-Drugs variant: pairs without a single-bond length have order 0.

    ``limit_bonds_to_one`` maps every bond to order 1 (EDM uses it to build RDKit molecules).
    """
    order = get_bond_order(pair[0], pair[1], distance, check_exists=True)
    return min(order, 1) if limit_bonds_to_one else order


@dataclass(frozen=True)
class BondTables:
    """Distance thresholds (pm, float64) per atom-type pair, in atom-decoder order.

    ``single``/``double``/``triple`` hold length + margin; a missing length is -inf, so
    ``d_pm < threshold`` is never true for it.  ``allowed`` is (n_types, max_valence + 2)
    bool: ``allowed[t, v]`` says valence v is allowed for type t; the last column (any
    larger valence) is all False.
    """

    atom_decoder: tuple[str, ...]
    single: np.ndarray
    double: np.ndarray
    triple: np.ndarray
    allowed: np.ndarray
    geom: bool  # GEOM rules: missing pairs are no bond; RDKit bonds all single

    @property
    def max_valence_index(self) -> int:
        return self.allowed.shape[1] - 1


def _threshold_matrix(decoder: Sequence[str], lengths: dict[str, dict[str, int]], margin: int) -> np.ndarray:
    n = len(decoder)
    out = np.full((n, n), -np.inf, dtype=np.float64)
    for i, a in enumerate(decoder):
        for j, b in enumerate(decoder):
            if b in lengths.get(a, {}):
                out[i, j] = float(lengths[a][b] + margin)
    return out


def _allowed_valence_table(decoder: Sequence[str]) -> np.ndarray:
    missing = [a for a in decoder if a not in _tables()["allowed_bonds"]]
    if missing:
        raise ValueError(f"no allowed valence for atom types {missing} in {_TABLE_FILE}")
    allowed_bonds = _tables()["allowed_bonds"]
    valences = [allowed_bonds[a] if isinstance(allowed_bonds[a], list) else [allowed_bonds[a]] for a in decoder]
    max_valence = max(max(v) for v in valences)
    table = np.zeros((len(decoder), max_valence + 2), dtype=bool)
    for t, vals in enumerate(valences):
        table[t, vals] = True
    return table


@functools.lru_cache(maxsize=None)
def bond_tables(atom_decoder: tuple[str, ...], geom: bool) -> BondTables:
    """Threshold matrices for ``atom_decoder``; ``geom`` selects the GEOM-Drugs rules.

    Outside GEOM every pair of types must have a single-bond length (EDM raises KeyError
    for a missing pair); a decoder with a missing pair is rejected here, once.
    """
    decoder = tuple(atom_decoder)
    single = _threshold_matrix(decoder, _tables()["bonds1"], _tables()["margin1"])
    if not geom:
        missing = [f"{decoder[i]}-{decoder[j]}" for i, j in zip(*np.nonzero(np.isneginf(single))) if i <= j]
        if missing:
            raise ValueError(f"no single-bond length for pairs {missing}; use the GEOM rules (missing pair = no bond)")
    return BondTables(
        atom_decoder=decoder,
        single=single,
        double=_threshold_matrix(decoder, _tables()["bonds2"], _tables()["margin2"]),
        triple=_threshold_matrix(decoder, _tables()["bonds3"], _tables()["margin3"]),
        allowed=_allowed_valence_table(decoder),
        geom=geom,
    )


def tables_for(dataset_info: dict[str, Any]) -> BondTables:
    """The ``BondTables`` of an EDM ``dataset_info``: GEOM's rules for a dataset of the 'geom'
    family (configs/datasets.py), QM9's otherwise (also when the info names no dataset)."""
    name = dataset_info.get("name")
    geom = name is not None and dataset_entry(name).family == "geom"
    return bond_tables(tuple(dataset_info["atom_decoder"]), geom)


def bond_orders(distances: np.ndarray, type_a: np.ndarray, type_b: np.ndarray, tables: BondTables) -> np.ndarray:
    """Bond orders (int8, 0-3) for distances (Angstrom) between atoms of types a and b.

    All arguments broadcast together (e.g. (B, N, N), (B, N, 1), (B, 1, N)).  NaN
    distances give 0.
    """
    d_pm = 100.0 * np.asarray(distances, dtype=np.float64)
    is_bond = d_pm < tables.single[type_a, type_b]
    is_double = d_pm < tables.double[type_a, type_b]
    is_triple = d_pm < tables.triple[type_a, type_b]
    # Nested rule: triple only counts inside the double branch, double inside single.
    return (is_bond * (1 + is_double * (1 + is_triple))).astype(np.int8)


def pairwise_distances(positions: np.ndarray) -> np.ndarray:
    """(B, N, 3) -> (B, N, N) Euclidean distances in float64, summed in x, y, z order."""
    pos = np.asarray(positions, dtype=np.float64)
    squared = np.zeros(pos.shape[:-1] + pos.shape[-2:-1], dtype=np.float64)
    with np.errstate(invalid="ignore", over="ignore"):  # inf/NaN coordinates give NaN/inf distances
        for axis in range(3):  # three coordinates, not a loop over atoms
            diff = pos[..., :, None, axis] - pos[..., None, :, axis]
            squared += diff * diff
        return np.sqrt(squared)


@dataclass(frozen=True)
class BatchBonds:
    """Bond graph of a padded batch of molecules.

    ``orders``: (B, N, N) int8, symmetric, zero on the diagonal and for padding atoms.
    ``atom_ok``: (B, N) bool, a real atom whose geometry is usable: its molecule has only
    finite coordinates and no other atom overlaps it.
    """

    orders: np.ndarray
    atom_ok: np.ndarray


def batch_bonds(positions: np.ndarray, atom_types: np.ndarray, node_mask: np.ndarray, tables: BondTables) -> BatchBonds:
    """Bond orders of every atom pair of every molecule in one pass.

    positions (B, N, 3) Angstrom, atom_types (B, N) int indices into the decoder,
    node_mask (B, N) bool.  Memory is O(B N^2); callers chunk large batches
    (see ``chunk_slices``).
    """
    mask = np.asarray(node_mask, dtype=bool)
    types = np.where(mask, np.asarray(atom_types), 0).astype(np.intp)
    dist = pairwise_distances(positions)
    n = mask.shape[1]
    real_pair = mask[:, :, None] & mask[:, None, :] & ~np.eye(n, dtype=bool)
    orders = bond_orders(dist, types[:, :, None], types[:, None, :], tables)
    orders *= real_pair
    finite_molecule = (np.isfinite(np.asarray(positions, dtype=np.float64)).all(-1) | ~mask).all(-1)
    overlapped = ((dist < OVERLAP_ANGSTROM) & real_pair).any(-1)
    atom_ok = mask & ~overlapped & finite_molecule[:, None]
    return BatchBonds(orders=orders, atom_ok=atom_ok)


# Pairs per chunk: (B, N, N) float64 temporaries stay around 16 MB each.
PAIRS_PER_CHUNK = 2**21


def chunk_slices(n_molecules: int, n_atoms_max: int, pairs_per_chunk: int | None = None) -> list[slice]:
    """Molecule ranges whose (N, N) pair arrays together hold about ``pairs_per_chunk``
    (default ``PAIRS_PER_CHUNK``) entries."""
    pairs_per_chunk = PAIRS_PER_CHUNK if pairs_per_chunk is None else pairs_per_chunk
    size = max(1, pairs_per_chunk // max(1, n_atoms_max * n_atoms_max))
    return [slice(start, min(start + size, n_molecules)) for start in range(0, n_molecules, size)]


def check_atom_types(atom_types: np.ndarray, node_mask: np.ndarray, n_types: int) -> None:
    """ValueError unless every real atom's type indexes the atom decoder."""
    real = np.asarray(atom_types)[np.asarray(node_mask, dtype=bool)]
    if real.size and (real.min() < 0 or real.max() >= n_types):
        raise ValueError(f"atom types must be indices 0..{n_types - 1} into the atom decoder; got {real.min()}..{real.max()}")
