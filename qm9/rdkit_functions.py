"""RDKit validity, uniqueness and novelty of generated 3D molecules (EDM's definitions).

A molecule is built from its atoms and the distance-rule bond orders of
``qm9.bond_analyze`` (GEOM: every bond added as SINGLE), sanitized, and reduced to the
canonical SMILES of its largest fragment (by atom count).

* validity   = molecules that sanitize / generated molecules
* uniqueness = distinct SMILES / valid molecules
* novelty    = unique SMILES absent from the training set's SMILES / unique SMILES

The training SMILES come from the training split's 3D structures through the same
pipeline, computed once and cached (``get_training_smiles``).

Molecules with 0 or 1 atoms, non-finite coordinates or overlapping atoms are invalid.
Bond orders are computed for a whole padded batch at once; the only per-molecule loop is
the one RDKit forces (building, sanitizing, writing SMILES).
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from rdkit import Chem, RDLogger

from configs.atomic_io import atomic_write_bytes
from qm9 import bond_analyze
from qm9.bond_analyze import BatchBonds, BondTables, batch_bonds, check_atom_types, chunk_slices, tables_for

# Sanitization failures are expected for generated molecules; RDKit would log each one.
RDLogger.DisableLog("rdApp.*")

_BOND_TYPES = {1: Chem.BondType.SINGLE, 2: Chem.BondType.DOUBLE, 3: Chem.BondType.TRIPLE}
# Bump when the way SMILES are computed changes; old caches are then recomputed.
TRAINING_SMILES_VERSION = 1


def to_numpy(array: Any) -> np.ndarray:
    """numpy view of a numpy array, list or torch tensor (any device)."""
    if hasattr(array, "detach"):
        array = array.detach().cpu().numpy()
    return np.asarray(array)


def pad_molecules(molecules: Sequence[tuple[Any, Any]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """EDM's list of (positions (n, 3), atom_types (n,)) -> padded positions (B, N, 3)
    float64, atom_types (B, N) int64 and node_mask (B, N) bool."""
    pos_list, type_list = [], []
    for k, (positions, atom_types) in enumerate(molecules):
        pos = to_numpy(positions).astype(np.float64, copy=False)
        types = to_numpy(atom_types).astype(np.int64, copy=False).reshape(-1)
        if pos.size == 0 and len(types) == 0:
            pos = pos.reshape(0, 3)
        if pos.ndim != 2 or pos.shape[1] != 3:
            raise ValueError(f"molecule {k}: positions must have shape (n_atoms, 3), got {pos.shape}")
        if len(pos) != len(types):
            raise ValueError(f"molecule {k}: {len(pos)} positions but {len(types)} atom types")
        pos_list.append(pos)
        type_list.append(types)
    counts = np.array([len(t) for t in type_list], dtype=np.int64)
    n_max = int(counts.max()) if len(counts) else 0
    mask = np.arange(n_max)[None, :] < counts[:, None]
    positions = np.zeros((len(counts), n_max, 3), dtype=np.float64)
    atom_types = np.zeros((len(counts), n_max), dtype=np.int64)
    if n_max:
        positions[mask] = np.concatenate(pos_list)
        atom_types[mask] = np.concatenate(type_list)
    return positions, atom_types, mask


def _atom_prototypes(tables: BondTables) -> list[Chem.Atom]:
    return [Chem.Atom(symbol) for symbol in tables.atom_decoder]


def _rwmol(atom_types: np.ndarray, orders: np.ndarray, prototypes: list[Chem.Atom], single_only: bool) -> Chem.RWMol:
    """RWMol with one atom per entry of atom_types and a bond per nonzero orders[i, j].

    Bonds are added as (i, j) with i > j in row-major order, EDM's order.
    """
    mol = Chem.RWMol()
    for t in atom_types.tolist():
        mol.AddAtom(prototypes[t])
    rows, cols = np.nonzero(np.tril(orders, -1))
    kinds = np.ones(len(rows), dtype=np.int64) if single_only else orders[rows, cols]
    for i, j, k in zip(rows.tolist(), cols.tolist(), kinds.tolist()):
        mol.AddBond(i, j, _BOND_TYPES[k])
    return mol


def build_molecule(positions: Any, atom_types: Any, dataset_info: dict[str, Any]) -> Chem.RWMol:
    """EDM's ``build_molecule``: an RDKit RWMol of one molecule from its 3D structure."""
    tables = tables_for(dataset_info)
    pos, types, mask = pad_molecules([(positions, atom_types)])
    check_atom_types(types, mask, len(tables.atom_decoder))
    bonds = batch_bonds(pos, types, mask, tables)
    return _rwmol(types[0], bonds.orders[0], _atom_prototypes(tables), single_only=tables.geom)


def mol2smiles(mol: Chem.Mol) -> str | None:
    """Sanitize ``mol`` in place and return its canonical SMILES; None if it fails."""
    try:
        Chem.SanitizeMol(mol)
    except Exception:  # noqa: BLE001 - RDKit raises several kinds; all mean invalid
        return None
    return Chem.MolToSmiles(mol)


def largest_fragment_smiles(mol: Chem.Mol) -> str | None:
    """Canonical SMILES of the largest fragment (by atom count, first on ties) of a valid
    molecule; None if it does not sanitize."""
    smiles = mol2smiles(mol)
    if smiles is None:
        return None
    if len(Chem.GetMolFrags(mol)) == 1:
        return smiles  # the whole molecule is its largest fragment
    fragments = Chem.GetMolFrags(mol, asMols=True)
    return mol2smiles(max(fragments, key=lambda m: m.GetNumAtoms()))


def smiles_from_bonds(bonds: BatchBonds, atom_types: np.ndarray, node_mask: np.ndarray, tables: BondTables) -> list[str | None]:
    """Largest-fragment SMILES of each molecule of a bonded batch (None = invalid).

    Molecules with fewer than 2 atoms, non-finite coordinates or overlapping atoms are
    invalid without asking RDKit.
    """
    prototypes = _atom_prototypes(tables)
    n_atoms = node_mask.sum(-1)
    usable = (n_atoms >= 2) & (bonds.atom_ok == node_mask).all(-1)
    out: list[str | None] = []
    for b in range(len(n_atoms)):  # RDKit works one molecule at a time
        if not usable[b]:
            out.append(None)
            continue
        real = node_mask[b]
        orders = bonds.orders[b][np.ix_(real, real)]
        out.append(largest_fragment_smiles(_rwmol(atom_types[b][real], orders, prototypes, tables.geom)))
    return out


def batch_smiles(positions: np.ndarray, atom_types: np.ndarray, node_mask: np.ndarray, tables: BondTables) -> list[str | None]:
    """Largest-fragment SMILES (None = invalid) of a padded batch, chunked to bound memory."""
    node_mask = np.asarray(node_mask, dtype=bool)
    atom_types = np.asarray(atom_types)
    check_atom_types(atom_types, node_mask, len(tables.atom_decoder))
    out: list[str | None] = []
    for chunk in chunk_slices(len(node_mask), node_mask.shape[1]):
        bonds = batch_bonds(positions[chunk], atom_types[chunk], node_mask[chunk], tables)
        out.extend(smiles_from_bonds(bonds, atom_types[chunk], node_mask[chunk], tables))
    return out


class BasicMolecularMetrics:
    """EDM's ``BasicMolecularMetrics``: validity, uniqueness and novelty.

    ``dataset_smiles_list``: the training SMILES (``get_training_smiles``); without it
    novelty is reported as 0.0, as in EDM.
    """

    def __init__(self, dataset_info: dict[str, Any], dataset_smiles_list: Iterable[str] | None = None, verbose: bool = True):
        self.dataset_info = dataset_info
        self.atom_decoder = dataset_info["atom_decoder"]
        self.tables = tables_for(dataset_info)
        self.dataset_smiles_list = None if dataset_smiles_list is None else list(dataset_smiles_list)
        self._dataset_smiles_set = None if dataset_smiles_list is None else set(self.dataset_smiles_list)
        self.verbose = verbose

    def smiles_of(self, generated: Sequence[tuple[Any, Any]]) -> list[str | None]:
        """Largest-fragment SMILES of each generated (positions, atom_types); None = invalid."""
        if len(generated) == 0:
            return []
        return batch_smiles(*pad_molecules(generated), self.tables)

    def compute_validity(self, generated: Sequence[tuple[Any, Any]]) -> tuple[list[str], float]:
        valid = [s for s in self.smiles_of(generated) if s is not None]
        return valid, len(valid) / len(generated) if len(generated) else 0.0

    def compute_uniqueness(self, valid: Sequence[str]) -> tuple[list[str], float]:
        unique = list(dict.fromkeys(valid))  # distinct, in first-seen order
        return unique, len(unique) / len(valid) if len(valid) else 0.0

    def compute_novelty(self, unique: Sequence[str]) -> tuple[list[str], float]:
        if self._dataset_smiles_set is None:
            raise ValueError("novelty needs the training SMILES: pass dataset_smiles_list (see get_training_smiles)")
        novel = [s for s in unique if s not in self._dataset_smiles_set]
        return novel, len(novel) / len(unique) if len(unique) else 0.0

    def evaluate_smiles(self, smiles: Sequence[str | None]) -> tuple[list[float], list[str]]:
        """The metrics from per-molecule SMILES (None = invalid): ([validity, uniqueness, novelty], unique)."""
        valid = [s for s in smiles if s is not None]
        validity = len(valid) / len(smiles) if len(smiles) else 0.0
        unique, uniqueness = self.compute_uniqueness(valid)
        novelty = self.compute_novelty(unique)[1] if self._dataset_smiles_set is not None else 0.0
        if self.verbose:
            print(f"Validity over {len(smiles)} molecules: {validity * 100:.2f}%")
            print(f"Uniqueness over {len(valid)} valid molecules: {uniqueness * 100:.2f}%")
            if self._dataset_smiles_set is not None:
                print(f"Novelty over {len(unique)} unique valid molecules: {novelty * 100:.2f}%")
        return [validity, uniqueness, novelty], unique

    def evaluate(self, generated: Sequence[tuple[Any, Any]]) -> tuple[list[float], list[str]]:
        """([validity, uniqueness, novelty], unique SMILES) of EDM-style generated molecules."""
        return self.evaluate_smiles(self.smiles_of(generated))


def _atom_type_indices(train_arrays: dict[str, Any], decoder: Sequence[str]) -> np.ndarray:
    """Atom-decoder indices from 'atom_types', 'one_hot' (argmax) or 'charges' (atomic numbers)."""
    if "atom_types" in train_arrays:
        return to_numpy(train_arrays["atom_types"]).astype(np.int64)
    if "one_hot" in train_arrays:
        one_hot = to_numpy(train_arrays["one_hot"])
        if one_hot.shape[-1] != len(decoder):
            raise ValueError(f"one_hot has {one_hot.shape[-1]} channels but the atom decoder has {len(decoder)} types")
        return one_hot.argmax(-1).astype(np.int64)
    if "charges" in train_arrays:
        table = Chem.GetPeriodicTable()
        lookup = np.full(256, -1, dtype=np.int64)
        lookup[[table.GetAtomicNumber(s) for s in decoder]] = np.arange(len(decoder))
        return lookup[to_numpy(train_arrays["charges"]).astype(np.int64)]
    raise ValueError("training arrays need 'one_hot', 'atom_types' or 'charges' next to 'positions' and 'num_atoms'")


def compute_training_smiles(positions: Any, atom_types: Any, num_atoms: Any, dataset_info: dict[str, Any]) -> list[str]:
    """SMILES of the training molecules (invalid ones dropped), computed exactly as for
    generated molecules.  positions (M, N, 3); atom_types (M, N) indices or (M, N, n_types)
    one-hot; num_atoms (M,) (atoms fill slots 0..n-1)."""
    positions = to_numpy(positions).astype(np.float64, copy=False)
    types = to_numpy(atom_types)
    if types.ndim == 3:
        types = types.argmax(-1)
    num_atoms = to_numpy(num_atoms).astype(np.int64).reshape(-1)
    mask = np.arange(positions.shape[1])[None, :] < num_atoms[:, None]
    smiles = batch_smiles(positions, types.astype(np.int64), mask, tables_for(dataset_info))
    return [s for s in smiles if s is not None]


def _fingerprint(positions: np.ndarray, types: np.ndarray, num_atoms: np.ndarray, dataset_info: dict[str, Any]) -> str:
    """sha1 of everything the SMILES depend on: structures, decoder, bond tables, version."""
    digest = hashlib.sha1()
    digest.update(json.dumps([TRAINING_SMILES_VERSION, list(dataset_info["atom_decoder"])]).encode())
    digest.update(bond_analyze._TABLE_FILE.read_bytes())
    mask = np.arange(positions.shape[1])[None, :] < num_atoms[:, None]
    digest.update(num_atoms.astype(np.int64).tobytes())
    digest.update(np.ascontiguousarray(positions[mask], dtype=np.float64).tobytes())
    digest.update(np.ascontiguousarray(types[mask], dtype=np.int64).tobytes())
    return digest.hexdigest()


def default_training_smiles_path(datadir: str | os.PathLike, dataset_info: dict[str, Any]) -> Path:
    """Where the training SMILES of a dataset are cached under ``datadir``."""
    suffix = "with_h" if dataset_info.get("with_h", True) else "no_h"
    return Path(datadir) / f"{dataset_info['name']}_{suffix}_train_smiles_v{TRAINING_SMILES_VERSION}.json"


def _smiles_digest(smiles: Sequence[str]) -> str:
    """sha1 of the cached SMILES themselves, so an edited or damaged cache is recomputed."""
    return hashlib.sha1("\n".join(smiles).encode()).hexdigest()


def get_training_smiles(
    dataset_info: dict[str, Any], train_arrays: dict[str, Any], cache_path: str | os.PathLike, progress: bool = True
) -> list[str]:
    """The training set's SMILES, computed from its 3D structures once and cached.

    ``train_arrays``: 'positions' (M, N, 3), 'num_atoms' (M,) and one of 'one_hot',
    'atom_types', 'charges' (as returned by ``qm9.data.qm9.load_qm9``).  The cache
    (JSON) is reused only if it was made from the same structures, atom decoder, bond
    tables and version; it is written atomically.
    """
    positions = to_numpy(train_arrays["positions"]).astype(np.float64, copy=False)
    types = _atom_type_indices(train_arrays, dataset_info["atom_decoder"])
    num_atoms = to_numpy(train_arrays["num_atoms"]).astype(np.int64).reshape(-1)
    fingerprint = _fingerprint(positions, types, num_atoms, dataset_info)
    path = Path(cache_path)
    try:
        cached = json.loads(path.read_text())
        if (cached.get("version") == TRAINING_SMILES_VERSION and cached.get("fingerprint") == fingerprint
                and isinstance(cached.get("smiles"), list) and all(isinstance(x, str) for x in cached["smiles"])
                and cached.get("smiles_sha1") == _smiles_digest(cached["smiles"])):
            return list(cached["smiles"])
    except (OSError, ValueError, AttributeError, KeyError, TypeError):
        pass  # missing, unreadable, edited or foreign file: recompute
    if progress:
        print(f"computing the SMILES of {len(num_atoms):,} training molecules for novelty "
              f"(once; cached in {path})", file=sys.stderr, flush=True)
    smiles = compute_training_smiles(positions, types, num_atoms, dataset_info)
    record = {
        "version": TRAINING_SMILES_VERSION,
        "dataset": dataset_info["name"],
        "atom_decoder": list(dataset_info["atom_decoder"]),
        "n_molecules": int(len(num_atoms)),
        "fingerprint": fingerprint,
        "smiles_sha1": _smiles_digest(smiles),
        "smiles": smiles,
    }
    try:
        atomic_write_bytes(path, json.dumps(record).encode())
    except OSError as e:  # a read-only data folder: novelty still works, it is just not cached
        print(f"note: cannot cache the training SMILES in {path} ({e.strerror}); they will be recomputed next time",
              file=sys.stderr)
    return smiles
