"""Specification of EDM's evaluation metrics (qm9/bond_analyze.py, analyze.py, rdkit_functions.py).

Known answers come from real QM9 molecules read from qm9pack's CSV (the first rows of
part 1), so no coordinates are made up.
"""
from __future__ import annotations

import ast
import csv
import importlib.util
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from rdkit import Chem

from configs.datasets_config import get_dataset_info
from qm9 import bond_analyze, rdkit_functions
from qm9.analyze import analyze_stability_for_molecules, batch_stability, check_stability
from qm9.bond_analyze import bond_orders, bond_tables, geom_predictor, get_bond_order, pairwise_distances
from qm9.rdkit_functions import BasicMolecularMetrics, build_molecule, get_training_smiles, mol2smiles

QM9 = get_dataset_info("qm9", remove_h=False)
GEOM = get_dataset_info("geom", remove_h=False)
ENCODER = QM9["atom_encoder"]


def _qm9pack_rows(indices: set[int]) -> dict[int, dict]:
    """Rows of qm9pack's first CSV for the given QM9 indices (read until the last one)."""
    folder = Path(list(importlib.util.find_spec("qm9pack").submodule_search_locations)[0]) / "data"
    rows = {}
    with open(folder / "qm9_part1.csv", newline="") as f:
        for row in csv.DictReader(f):
            index = int(row["Index"])
            if index in indices:
                elements = row["Elements"].strip("[]").replace("'", "").split(",")
                rows[index] = {
                    "smiles": row["SMILES"],
                    "types": np.array([ENCODER[e] for e in elements]),
                    "positions": np.array(ast.literal_eval(row["XYZ_Ang"]), dtype=np.float32),
                }
            if index >= max(indices):
                return rows
    raise AssertionError("qm9pack lacks the expected molecules")


# QM9 index -> (name, dataset SMILES): single, double and triple bonds, and an aromatic ring.
KNOWN = {1: "C", 3: "O", 4: "C#C", 5: "C#N", 6: "C=O", 214: "C1=CC=CC=C1"}
MOLS = {}


@pytest.fixture(scope="module", autouse=True)
def qm9_molecules():
    rows = _qm9pack_rows(set(KNOWN))
    for index, smiles in KNOWN.items():
        assert rows[index]["smiles"] == smiles  # the right molecules
        MOLS[smiles] = (rows[index]["positions"], rows[index]["types"])


def explicit_h_smiles(smiles: str) -> str:
    return Chem.MolToSmiles(Chem.AddHs(Chem.MolFromSmiles(smiles)))


def stretched(name: str, atom: int, anchor: int, new_length: float):
    """Move ``atom`` along the anchor->atom direction to ``new_length`` Angstrom from the anchor."""
    pos, types = MOLS[name]
    pos = pos.astype(np.float64).copy()
    direction = pos[atom] - pos[anchor]
    pos[atom] = pos[anchor] + direction / np.linalg.norm(direction) * new_length
    return pos, types


# --------------------------------------------------------------------------- bond rule
def test_bond_tables_come_from_the_config_file():
    assert (bond_analyze.margin1, bond_analyze.margin2, bond_analyze.margin3) == (10, 5, 3)
    assert bond_analyze.bonds1["C"]["H"] == 109 and bond_analyze.bonds2["C"]["O"] == 120 and bond_analyze.bonds3["C"]["N"] == 116
    for table in (bond_analyze.bonds1, bond_analyze.bonds2, bond_analyze.bonds3):
        for a, row in table.items():
            for b, length in row.items():
                assert table[b][a] == length


def test_scalar_rule_with_margins_and_strict_inequalities():
    # C-C: single 154, double 134, triple 120 -> thresholds 164, 139, 123 pm.
    assert get_bond_order("C", "C", 1.70) == 0
    assert get_bond_order("C", "C", 1.64) == 0  # d_pm == single + 10 is no bond
    assert get_bond_order("C", "C", 1.60) == 1
    assert get_bond_order("C", "C", 1.39) == 1  # d_pm == double + 5 is single
    assert get_bond_order("C", "C", 1.36) == 2
    assert get_bond_order("C", "C", 1.22) == 3
    assert get_bond_order("C", "H", 1.19) == 0  # 109 + 10
    assert get_bond_order("C", "H", 0.50) == 1  # no double C-H length: never above 1
    assert get_bond_order("C", "C", float("nan")) == 0


def test_missing_pairs_raise_for_qm9_and_are_no_bond_for_geom():
    with pytest.raises(KeyError):
        get_bond_order("C", "Hg", 1.0)
    assert get_bond_order("C", "Hg", 1.0, check_exists=True) == 0
    assert geom_predictor(("Hg", "Bi"), 0.5) == 0
    assert geom_predictor(("C", "C"), 1.22) == 3
    assert geom_predictor(("C", "C"), 1.22, limit_bonds_to_one=True) == 1
    # The one pair listed in one direction only (C=S) works in both directions.
    assert get_bond_order("C", "S", 1.60) == get_bond_order("S", "C", 1.60) == 2


@pytest.mark.parametrize("info", [QM9, GEOM], ids=["qm9", "geom"])
def test_vectorised_orders_equal_scalar_rule_for_every_type_pair(info):
    decoder = info["atom_decoder"]
    geom = info["name"] == "geom"
    tables = bond_analyze.tables_for(info)
    rng = np.random.default_rng(0)
    for a, b in itertools.product(range(len(decoder)), repeat=2):
        lengths = [t.get(decoder[a], {}).get(decoder[b]) for t in (bond_analyze.bonds1, bond_analyze.bonds2, bond_analyze.bonds3)]
        thresholds = [l + m for l, m in zip(lengths, (10, 5, 3)) if l is not None]
        exact = [t / 100 for t in thresholds]  # 100 * d may land on, above or below t
        near = [np.nextafter(d, s) for d in exact for s in (0.0, 10.0)]
        distances = np.array(exact + near + list(rng.uniform(0.0, 3.0, 20)) + [0.0, np.nan, np.inf])
        vectorised = bond_orders(distances, np.full(len(distances), a), np.full(len(distances), b), tables)
        scalar = [get_bond_order(decoder[a], decoder[b], d, check_exists=geom) for d in distances]
        assert vectorised.tolist() == scalar, (decoder[a], decoder[b])


def test_pairwise_distances_match_the_scalar_formula_bit_for_bit():
    pos = np.random.default_rng(1).normal(size=(3, 7, 3)).astype(np.float32)
    dist = pairwise_distances(pos)
    p = pos.astype(np.float64)
    for m, i, j in [(0, 1, 2), (1, 6, 0), (2, 3, 5)]:
        assert dist[m, i, j] == np.sqrt(np.sum((p[m, i] - p[m, j]) ** 2))


def test_qm9_tables_cover_every_pair_and_other_decoders_with_gaps_are_rejected():
    assert np.isfinite(bond_tables(tuple(QM9["atom_decoder"]), False).single).all()
    with pytest.raises(ValueError, match="no single-bond length"):
        bond_tables(("C", "Hg"), False)


# --------------------------------------------------------------------------- stability
@pytest.mark.parametrize("name", ["C", "O", "C#C", "C#N", "C=O"])
def test_qm9_molecules_are_stable_and_valid(name):
    pos, types = MOLS[name]
    assert check_stability(torch.tensor(pos), torch.tensor(types), QM9) == (True, len(types), len(types))
    mol = build_molecule(pos, types, QM9)
    assert mol2smiles(mol) == explicit_h_smiles(name)
    assert BasicMolecularMetrics(QM9, verbose=False).compute_validity([(pos, types)]) == ([explicit_h_smiles(name)], 1.0)


def test_benzene_is_valid_but_unstable_under_the_distance_rule():
    # QM9's aromatic C-C bonds are 1.3935 A: 139.35 pm is not below 134 + 5, so every ring
    # bond counts as single, each carbon has 3 bonds, and the six carbons are unstable.
    # This is why about 5% of QM9 itself is "unstable" in EDM's metric.
    pos, types = MOLS["C1=CC=CC=C1"]
    assert check_stability(pos, types, QM9) == (False, 6, 12)
    valid, validity = BasicMolecularMetrics(QM9, verbose=False).compute_validity([(pos, types)])
    assert validity == 1.0 and valid[0] == "[H]C1C([H])C([H])C([H])C([H])C1[H]"


def test_stretching_a_bond_makes_molecules_unstable():
    # Methane with one C-H pulled to 1.5 A: that H and the carbon lose their bond.
    assert check_stability(*stretched("C", atom=1, anchor=0, new_length=1.5), QM9) == (False, 3, 5)
    # Acetylene with C#C at 1.30 A: a double bond, so both carbons have valence 3.
    assert check_stability(*stretched("C#C", atom=1, anchor=0, new_length=1.30), QM9) == (False, 2, 4)
    # Formaldehyde with C=O at 1.30 A: single bond.
    assert check_stability(*stretched("C=O", atom=1, anchor=0, new_length=1.30), QM9) == (False, 2, 4)


def _scalar_stability(pos, types, info):
    """Pairwise reference straight from eval_metrics.md."""
    decoder = info["atom_decoder"]
    counts = np.zeros(len(types), dtype=int)
    for i, j in itertools.combinations(range(len(types)), 2):
        d = np.sqrt(np.sum((pos[i].astype(np.float64) - pos[j]) ** 2))
        order = get_bond_order(decoder[types[i]], decoder[types[j]], d)
        counts[i] += order
        counts[j] += order
    stable = [counts[k] in np.atleast_1d(bond_analyze.allowed_bonds[decoder[t]]) for k, t in enumerate(types)]
    return all(stable) and len(types) > 0, sum(stable), len(types)


def test_dense_batch_equals_pairwise_reference_on_random_molecules(monkeypatch):
    monkeypatch.setattr(bond_analyze, "PAIRS_PER_CHUNK", 100)  # force several chunks
    rng = np.random.default_rng(2)
    n_mol, n_max = 40, 9
    n_atoms = rng.integers(2, n_max + 1, n_mol)
    mask = np.arange(n_max)[None, :] < n_atoms[:, None]
    # Atoms in a small box so distances straddle the bond thresholds; plus real molecules.
    pos = rng.uniform(0, 2.2, (n_mol, n_max, 3))
    types = rng.integers(0, 5, (n_mol, n_max))
    for k, name in enumerate(["C", "O", "C#C", "C=O"]):
        p, t = MOLS[name]
        pos[k], types[k], mask[k] = 0.0, 0, False
        pos[k, : len(t)], types[k, : len(t)], mask[k, : len(t)] = p, t, True
    one_hot = np.eye(5)[types]
    stable, n_stable, n_real = batch_stability(pos, types, mask, QM9)
    reference = [_scalar_stability(pos[m][mask[m]], types[m][mask[m]], QM9) for m in range(n_mol)]
    assert [(bool(a), int(b), int(c)) for a, b, c in zip(stable, n_stable, n_real)] == reference
    assert stable[:4].all() and not stable[4:].all()  # the test covers both outcomes
    validity_dict, _ = analyze_stability_for_molecules(
        {"one_hot": torch.tensor(one_hot), "x": torch.tensor(pos), "node_mask": torch.tensor(mask)[..., None]}, QM9, use_rdkit=False
    )
    assert validity_dict["mol_stable"] == pytest.approx(sum(r[0] for r in reference) / n_mol)
    assert validity_dict["atm_stable"] == pytest.approx(sum(r[1] for r in reference) / sum(r[2] for r in reference))


def _batch(molecules):
    n_max = max(len(t) for _, t in molecules)
    x = torch.zeros(len(molecules), n_max, 3)
    one_hot = torch.zeros(len(molecules), n_max, 5)
    mask = torch.zeros(len(molecules), n_max)
    for k, (p, t) in enumerate(molecules):
        x[k, : len(t)] = torch.as_tensor(np.asarray(p, dtype=np.float32))
        one_hot[k, torch.arange(len(t)), torch.as_tensor(t)] = 1
        mask[k, : len(t)] = 1
    return {"one_hot": one_hot, "x": x, "node_mask": mask[..., None]}


def test_analyze_stability_for_molecules_pools_atoms_and_reports_rdkit_metrics():
    methane, water, benzene = MOLS["C"], MOLS["O"], MOLS["C1=CC=CC=C1"]
    shifted_methane = (methane[0] + 3.0, methane[1])  # same molecule elsewhere
    molecules = [methane, water, benzene, shifted_methane]
    training = [explicit_h_smiles("C")]
    validity_dict, (metrics, unique) = analyze_stability_for_molecules(_batch(molecules), QM9, dataset_smiles_list=training)
    assert validity_dict == {"mol_stable": 3 / 4, "atm_stable": (5 + 3 + 6 + 5) / (5 + 3 + 12 + 5)}
    validity, uniqueness, novelty = metrics
    assert (validity, uniqueness, novelty) == (1.0, 3 / 4, 2 / 3)
    assert sorted(unique) == sorted([explicit_h_smiles("C"), explicit_h_smiles("O"), "[H]C1C([H])C([H])C([H])C([H])C1[H]"])


# --------------------------------------------------------------------------- RDKit metrics
def test_uniqueness_and_novelty_on_hand_made_lists():
    metrics = BasicMolecularMetrics(QM9, dataset_smiles_list=["C", "CC"], verbose=False)
    unique, uniqueness = metrics.compute_uniqueness(["C", "O", "C", "N", "O", "O"])
    assert sorted(unique) == ["C", "N", "O"] and uniqueness == 3 / 6
    novel, novelty = metrics.compute_novelty(["C", "N", "O", "CC"])
    assert novel == ["N", "O"] and novelty == 2 / 4
    with pytest.raises(ValueError, match="training SMILES"):
        BasicMolecularMetrics(QM9, verbose=False).compute_novelty(["C"])


def test_validity_uses_the_largest_fragment():
    # Water and methane 5 A apart: one molecule object, two fragments; methane is larger.
    (pw, tw), (pm, tm) = MOLS["O"], MOLS["C"]
    both = (np.concatenate([pw, pm + 5.0]), np.concatenate([tw, tm]))
    assert "." in mol2smiles(build_molecule(*both, QM9))
    valid, validity = BasicMolecularMetrics(QM9, verbose=False).compute_validity([both])
    assert validity == 1.0 and valid == [explicit_h_smiles("C")]


def test_sanitization_failure_is_invalid():
    # Six hydrogens 1.05 A around a carbon: a carbon with six bonds fails sanitization.
    directions = np.array([[1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1]], dtype=float)
    pos = np.concatenate([np.zeros((1, 3)), directions * 1.05])
    types = np.array([ENCODER["C"]] + [ENCODER["H"]] * 6)
    assert mol2smiles(build_molecule(pos, types, QM9)) is None
    assert BasicMolecularMetrics(QM9, verbose=False).compute_validity([(pos, types)]) == ([], 0.0)
    assert check_stability(pos, types, QM9)[0] is False


def test_bad_molecules_count_as_unstable_and_invalid_without_crashing():
    h2_on_one_point = (np.zeros((2, 3)), np.array([0, 0]))  # would otherwise be a "stable" H2
    nan_methane = (np.where(np.arange(15).reshape(5, 3) == 4, np.nan, MOLS["C"][0]), MOLS["C"][1])
    inf_methane = (np.where(np.arange(15).reshape(5, 3) == 4, np.inf, MOLS["C"][0]), MOLS["C"][1])
    bad = {
        "empty": (np.zeros((0, 3)), np.zeros(0, dtype=int)),
        "one atom": (np.zeros((1, 3)), np.array([ENCODER["C"]])),
        "overlap": h2_on_one_point,
        "nan": nan_methane,
        "inf": inf_methane,
    }
    for name, (pos, types) in bad.items():
        stable, _, n = check_stability(pos, types, QM9)
        assert stable is False and n == len(types), name
    assert check_stability(*bad["overlap"], QM9) == (False, 0, 2)
    assert check_stability(*bad["nan"], QM9) == (False, 0, 5)
    generated = list(bad.values()) + [MOLS["C"]]
    metrics = BasicMolecularMetrics(QM9, verbose=False)
    assert metrics.smiles_of(generated) == [None] * len(bad) + [explicit_h_smiles("C")]
    validity_dict, (rd, _) = analyze_stability_for_molecules(_batch([m for m in generated if len(m[1])]), QM9)
    assert validity_dict["mol_stable"] == 1 / 5 and rd[0] == 1 / 5
    # A batch with no atoms at all.
    empty = {"one_hot": torch.zeros(2, 3, 5), "x": torch.zeros(2, 3, 3), "node_mask": torch.zeros(2, 3)}
    assert analyze_stability_for_molecules(empty, QM9) == ({"mol_stable": 0.0, "atm_stable": 0.0}, ([0.0, 0.0, 0.0], []))


def test_user_mistakes_give_one_line_errors():
    pos, types = MOLS["C"]
    with pytest.raises(ValueError, match="atom types must be indices"):
        check_stability(pos, types + 10, QM9)
    with pytest.raises(ValueError, match="one_hot must have shape"):
        analyze_stability_for_molecules({"one_hot": torch.zeros(1, 5, 4), "x": torch.zeros(1, 5, 3), "node_mask": torch.ones(1, 5)}, QM9)
    with pytest.raises(ValueError, match="lacks"):
        analyze_stability_for_molecules({"x": torch.zeros(1, 5, 3)}, QM9)
    with pytest.raises(ValueError, match="positions"):
        build_molecule(np.zeros((5, 2)), types, QM9)


# --------------------------------------------------------------------------- GEOM variant
def test_geom_adds_single_bonds_for_validity_but_keeps_orders_for_stability():
    pos, qm9_types = MOLS["C#C"]
    types = np.array([GEOM["atom_encoder"][QM9["atom_decoder"][t]] for t in qm9_types])
    assert check_stability(pos, types, GEOM) == (True, 4, 4)  # C#C counts 3 for stability
    mol = build_molecule(pos, types, GEOM)
    assert {b.GetBondType() for b in mol.GetBonds()} == {Chem.BondType.SINGLE}
    assert mol.GetNumBonds() == 3
    # A mercury atom next to carbon: no single-bond length, so no bond and no KeyError.
    hg = (np.array([[0.0, 0, 0], [1.0, 0, 0]]), np.array([GEOM["atom_encoder"]["C"], GEOM["atom_encoder"]["Hg"]]))
    assert build_molecule(*hg, GEOM).GetNumBonds() == 0
    assert check_stability(*hg, GEOM) == (False, 0, 2)


# --------------------------------------------------------------------------- training SMILES cache
def test_training_smiles_are_computed_once_and_cached(tmp_path, monkeypatch):
    names = ["C", "O", "C#N"]
    arrays = _batch([MOLS[n] for n in names])
    train = {"positions": arrays["x"].numpy(), "one_hot": arrays["one_hot"].numpy() > 0,
             "num_atoms": arrays["node_mask"].sum((1, 2)).long().numpy()}
    path = tmp_path / "train_smiles.json"
    expected = [explicit_h_smiles(n) for n in names]
    assert get_training_smiles(QM9, train, path) == expected
    record = json.loads(path.read_text())
    assert record["version"] == rdkit_functions.TRAINING_SMILES_VERSION and record["smiles"] == expected
    assert not list(tmp_path.glob("*.tmp"))  # written atomically, no leftovers

    def must_not_recompute(*args, **kwargs):
        raise AssertionError("recomputed despite a valid cache")

    monkeypatch.setattr(rdkit_functions, "compute_training_smiles", must_not_recompute)
    assert get_training_smiles(QM9, train, path) == expected  # from the cache
    monkeypatch.undo()
    # Different structures (or a corrupt file) invalidate the cache.
    train["num_atoms"] = train["num_atoms"].copy()
    train["num_atoms"][2] = 2  # HCN without its H: "C#N" with implicit H, still valid
    assert get_training_smiles(QM9, train, path)[:2] == expected[:2]
    path.write_text("{not json")
    assert get_training_smiles(QM9, train, path)[:2] == expected[:2]
    # charges (atomic numbers) work as well as one-hot.
    charges = np.where(arrays["node_mask"][..., 0].numpy() > 0, np.array([1, 6, 7, 8, 9])[arrays["one_hot"].argmax(-1).numpy()], 0)
    by_charges = {"positions": train["positions"], "charges": charges, "num_atoms": arrays["node_mask"].sum((1, 2)).long().numpy()}
    assert get_training_smiles(QM9, by_charges, tmp_path / "by_charges.json") == expected
