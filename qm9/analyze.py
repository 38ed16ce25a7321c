"""Atom and molecule stability (EDM's definitions), dense over a padded batch.

Every unordered pair of real atoms adds its distance-rule bond order
(``qm9.bond_analyze``) to the bond count of both atoms.  An atom is stable when its bond
count is an allowed valence of its element; a molecule is stable when all its atoms are.

* atom stability     = stable atoms / all atoms, pooled over the molecules
* molecule stability = stable molecules / molecules

Atoms of a molecule with non-finite coordinates, and atoms with another atom on top of
them, are unstable; a molecule without atoms is unstable.

``analyze_stability_for_molecules`` also returns the RDKit metrics (validity, uniqueness,
novelty) of ``qm9.rdkit_functions``, reusing the same bond orders.
"""
from __future__ import annotations

from typing import Any, Iterable

import numpy as np

from qm9.bond_analyze import BatchBonds, BondTables, batch_bonds, check_atom_types, chunk_slices, tables_for
from qm9.rdkit_functions import BasicMolecularMetrics, pad_molecules, smiles_from_bonds, to_numpy


def stability_from_bonds(bonds: BatchBonds, atom_types: np.ndarray, node_mask: np.ndarray, tables: BondTables) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(molecule_stable (B,) bool, stable atoms (B,) int, atoms (B,) int) of a bonded batch."""
    bond_count = bonds.orders.sum(-1, dtype=np.int64)
    types = np.where(node_mask, atom_types, 0)
    # Bond counts above the largest allowed valence land in the all-False last column.
    atom_stable = tables.allowed[types, np.minimum(bond_count, tables.max_valence_index)]
    atom_stable &= bonds.atom_ok & node_mask
    n_stable = atom_stable.sum(-1)
    n_atoms = node_mask.sum(-1)
    return (n_stable == n_atoms) & (n_atoms > 0), n_stable, n_atoms


def batch_stability(positions: Any, atom_types: Any, node_mask: Any, dataset_info: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stability of a padded batch: positions (B, N, 3), atom_types (B, N) decoder indices,
    node_mask (B, N).  Returns (molecule_stable (B,), stable atoms (B,), atoms (B,))."""
    tables = tables_for(dataset_info)
    positions, atom_types, node_mask = _as_batch(positions, atom_types, node_mask, tables)
    parts = []
    for chunk in chunk_slices(len(node_mask), node_mask.shape[1]):
        bonds = batch_bonds(positions[chunk], atom_types[chunk], node_mask[chunk], tables)
        parts.append(stability_from_bonds(bonds, atom_types[chunk], node_mask[chunk], tables))
    if not parts:
        return np.zeros(0, dtype=bool), np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    return tuple(np.concatenate(p) for p in zip(*parts))  # type: ignore[return-value]


def _as_batch(positions: Any, atom_types: Any, node_mask: Any, tables: BondTables) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    positions = to_numpy(positions).astype(np.float64, copy=False)
    atom_types = to_numpy(atom_types).astype(np.int64, copy=False)
    node_mask = to_numpy(node_mask).astype(bool, copy=False)
    if node_mask.ndim == 3 and node_mask.shape[-1] == 1:
        node_mask = node_mask[..., 0]
    if positions.ndim != 3 or positions.shape[-1] != 3:
        raise ValueError(f"positions must have shape (batch, n_nodes, 3), got {positions.shape}")
    if atom_types.shape != positions.shape[:2] or node_mask.shape != positions.shape[:2]:
        raise ValueError(
            f"atom types {atom_types.shape} and node mask {node_mask.shape} must match positions {positions.shape[:2]}"
        )
    check_atom_types(atom_types, node_mask, len(tables.atom_decoder))
    return positions, atom_types, node_mask


def check_stability(positions: Any, atom_type: Any, dataset_info: dict[str, Any], debug: bool = False) -> tuple[bool, int, int]:
    """EDM's ``check_stability`` for one molecule: positions (n, 3), atom_type (n,) decoder
    indices.  Returns (molecule_stable, stable atoms, atoms)."""
    tables = tables_for(dataset_info)
    positions, types, mask = pad_molecules([(positions, atom_type)])
    check_atom_types(types, mask, len(tables.atom_decoder))
    bonds = batch_bonds(positions, types, mask, tables)
    molecule_stable, n_stable, n_atoms = stability_from_bonds(bonds, types, mask, tables)
    if debug and not molecule_stable[0]:
        counts = bonds.orders[0].sum(-1)
        for i in range(int(n_atoms[0])):  # debug output only
            print(f"atom {i} {tables.atom_decoder[types[0, i]]}: {counts[i]} bonds"
                  + ("" if bonds.atom_ok[0, i] else " (non-finite or overlapping position)"))
    return bool(molecule_stable[0]), int(n_stable[0]), int(n_atoms[0])


def analyze_stability_for_molecules(
    molecule_list: dict[str, Any],
    dataset_info: dict[str, Any],
    dataset_smiles_list: Iterable[str] | None = None,
    use_rdkit: bool = True,
) -> tuple[dict[str, float], tuple[list[float], list[str]] | None]:
    """EDM's ``analyze_stability_for_molecules``.

    ``molecule_list``: {'one_hot': (B, N, n_types), 'x': (B, N, 3), 'node_mask': (B, N) or
    (B, N, 1)} (tensors or arrays; atom types are the one-hot argmax).  Returns
    ({'mol_stable', 'atm_stable'}, ([validity, uniqueness, novelty], unique SMILES)); the
    second item is None without ``use_rdkit``.  Novelty needs ``dataset_smiles_list`` (the
    training SMILES, see ``rdkit_functions.get_training_smiles``), else it is 0.0.
    """
    tables = tables_for(dataset_info)
    missing = {"one_hot", "x", "node_mask"} - set(molecule_list)
    if missing:
        raise ValueError(f"molecule_list lacks {sorted(missing)}; expected keys 'one_hot', 'x', 'node_mask'")
    one_hot = to_numpy(molecule_list["one_hot"])
    if one_hot.ndim != 3 or one_hot.shape[-1] != len(tables.atom_decoder):
        raise ValueError(f"one_hot must have shape (batch, n_nodes, {len(tables.atom_decoder)}), got {one_hot.shape}")
    positions, atom_types, node_mask = _as_batch(molecule_list["x"], one_hot.argmax(-1), molecule_list["node_mask"], tables)

    n_mol_stable = n_atom_stable = n_atoms = 0
    smiles: list[str | None] = []
    for chunk in chunk_slices(len(node_mask), node_mask.shape[1]):
        bonds = batch_bonds(positions[chunk], atom_types[chunk], node_mask[chunk], tables)
        mol_stable, stable, atoms = stability_from_bonds(bonds, atom_types[chunk], node_mask[chunk], tables)
        n_mol_stable += int(mol_stable.sum())
        n_atom_stable += int(stable.sum())
        n_atoms += int(atoms.sum())
        if use_rdkit:
            smiles.extend(smiles_from_bonds(bonds, atom_types[chunk], node_mask[chunk], tables))

    n_molecules = len(node_mask)
    validity_dict = {
        "mol_stable": n_mol_stable / n_molecules if n_molecules else 0.0,
        "atm_stable": n_atom_stable / n_atoms if n_atoms else 0.0,
    }
    if not use_rdkit:
        return validity_dict, None
    metrics = BasicMolecularMetrics(dataset_info, dataset_smiles_list)
    return validity_dict, metrics.evaluate_smiles(smiles)
