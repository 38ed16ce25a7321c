"""GEOM-Drugs: the msgpack -> .npy builder, the split, and the batch contract.

A small msgpack file in GEOM's layout (top-level records, each a dict SMILES ->
{'conformers': [{'xyz': [[Z, x, y, z], ...], 'totalenergy': E}, ...]}) is made from RDKit
ETKDG conformers of drug-like molecules, with made-up energies in a shuffled order.
"""
from __future__ import annotations

import argparse
import pickle
import re
import subprocess
import sys
from pathlib import Path

import msgpack
import numpy as np
import pytest
import torch
from rdkit import Chem
from rdkit.Chem import AllChem

from configs.datasets_config import get_dataset_info
from configs.errors import DataError
from qm9.data import geom
from qm9.data.collate import PaddedMoleculeDataset

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFORMATIONS = 4
# (SMILES, conformers embedded). Paracetamol gets fewer conformers than are kept.
MOLECULES = [
    ("CC(=O)Oc1ccccc1C(=O)O", 6),  # aspirin
    ("Cn1cnc2c1c(=O)n(C)c(=O)n2C", 5),  # caffeine
    ("CC(C)Cc1ccc(cc1)C(C)C(=O)O", 7),  # ibuprofen
    ("CC(=O)Nc1ccc(O)cc1", 3),  # paracetamol
    ("CN(C)CCCN1c2ccccc2Sc2ccc(Cl)cc21", 6),  # chlorpromazine (S, Cl)
    ("Brc1ccc(cc1)C(=O)N", 5),  # 4-bromobenzamide (Br)
]
RECORDS = [MOLECULES[:3], MOLECULES[3:]]  # two top-level msgpack records, as GEOM chunks them


def etkdg_molecule(smiles: str, n_conformers: int, seed: int) -> dict:
    mol = Chem.AddHs(Chem.MolFromSmiles(smiles))
    params = AllChem.ETKDGv3()
    params.randomSeed = seed
    ids = list(AllChem.EmbedMultipleConfs(mol, numConfs=n_conformers, params=params))
    assert len(ids) == n_conformers
    z = np.array([a.GetAtomicNum() for a in mol.GetAtoms()], dtype=np.float64)
    # Distinct made-up energies in a shuffled order, so "lowest" is not "first".
    energies = -50.0 - np.random.default_rng(seed).permutation(n_conformers) * 0.37
    conformers = []
    for cid, energy in zip(ids, energies):
        xyz = np.column_stack([z, mol.GetConformer(cid).GetPositions()])
        conformers.append({"xyz": xyz.tolist(), "totalenergy": float(energy), "boltzmannweight": 0.1})
    return {"conformers": conformers, "charge": 0, "uniqueconfs": n_conformers}


@pytest.fixture(scope="module")
def raw_records() -> list[dict]:
    seed = 0
    records = []
    for record in RECORDS:
        chunk = {}
        for smiles, n in record:
            chunk[smiles] = etkdg_molecule(smiles, n, seed)
            seed += 1
        records.append(chunk)
    return records


def write_msgpack(path: Path, records: list[dict]) -> list[bytes]:
    parts = [msgpack.packb(r, use_bin_type=True) for r in records]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(parts))
    return parts


def expected_conformers(records: list[dict], conformations: int, remove_h: bool = False) -> list[np.ndarray]:
    """The kept conformers, written independently of the builder: sort each molecule by energy."""
    out = []
    for record in records:
        for info in record.values():
            ranked = sorted(info["conformers"], key=lambda c: c["totalenergy"])[:conformations]
            for c in ranked:
                xyz = np.array(c["xyz"])
                out.append(xyz[xyz[:, 0] != 1] if remove_h else xyz)
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory, raw_records) -> Path:
    """A data folder with the raw msgpack and both builds (with and without hydrogens)."""
    folder = tmp_path_factory.mktemp("geom")
    write_msgpack(folder / "drugs_crude.msgpack", raw_records)
    geom.build_geom_dataset(folder, conformations=CONFORMATIONS, progress=False)
    geom.build_geom_dataset(folder, conformations=CONFORMATIONS, remove_h=True, progress=False)
    return folder


def n_kept_conformers() -> int:
    return sum(min(n, CONFORMATIONS) for _, n in MOLECULES)


def test_builder_keeps_the_lowest_energy_conformers_as_edm_rows(built, raw_records):
    rows = np.load(built / f"geom_drugs_{CONFORMATIONS}.npy")
    counts = np.load(built / f"geom_drugs_n_{CONFORMATIONS}.npy")
    expected = expected_conformers(raw_records, CONFORMATIONS)

    assert rows.dtype == np.float64 and rows.shape[1] == 5
    assert len(counts) == len(expected) == n_kept_conformers()
    assert counts.tolist() == [len(x) for x in expected]
    # One id per kept conformer, counting up in file order.
    assert np.array_equal(rows[:, 0], np.repeat(np.arange(len(counts)), counts))
    # [Z, x, y, z] of each conformer, in ascending energy order per molecule, bit-exact.
    assert np.array_equal(rows[:, 1:], np.concatenate(expected))
    smiles = (built / "geom_drugs_smiles.txt").read_text().splitlines()
    assert smiles == [s for s, _ in MOLECULES]


def test_remove_h_build_drops_hydrogen_rows(built, raw_records):
    rows = np.load(built / f"geom_drugs_no_h_{CONFORMATIONS}.npy")
    counts = np.load(built / f"geom_drugs_n_no_h_{CONFORMATIONS}.npy")
    expected = expected_conformers(raw_records, CONFORMATIONS, remove_h=True)
    assert not np.any(rows[:, 1] == 1)
    assert counts.tolist() == [len(x) for x in expected]
    assert np.array_equal(rows[:, 0], np.repeat(np.arange(len(counts)), counts))
    assert np.array_equal(rows[:, 1:], np.concatenate(expected))


def test_cli_writes_the_same_files_as_the_python_api(built, tmp_path):
    out = tmp_path / "cli"
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "build_geom_dataset.py"), "--data_dir", str(built),
         "--conformations", str(CONFORMATIONS), "--out_dir", str(out), "--no_progress"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    for name in geom.output_names(CONFORMATIONS).values():
        assert (out / name).read_bytes() == (built / name).read_bytes(), name
    assert sorted(p.name for p in out.iterdir()) == sorted(geom.output_names(CONFORMATIONS).values())  # no temp files left


def test_split_sizes_determinism_and_permutation_reuse(built):
    n = n_kept_conformers()
    datasets = geom.geom_datasets(built, conformations=CONFORMATIONS)
    ids = {k: d.conformer_ids for k, d in datasets.items()}
    n_valid = n_test = int(n * 0.1)
    assert {k: len(v) for k, v in ids.items()} == {"train": n - n_valid - n_test, "valid": n_valid, "test": n_test}
    assert np.array_equal(np.sort(np.concatenate(list(ids.values()))), np.arange(n))

    perm_path = built / geom.PERMUTATION_FILE
    perm = np.load(perm_path)
    assert np.array_equal(np.sort(perm), np.arange(n))
    assert np.array_equal(ids["valid"], np.sort(perm[:n_valid]))
    assert np.array_equal(ids["test"], np.sort(perm[n_valid : n_valid + n_test]))

    # Regenerating from scratch gives the same split (deterministic)...
    perm_path.unlink()
    again = geom.geom_datasets(built, conformations=CONFORMATIONS)
    assert all(np.array_equal(again[k].conformer_ids, ids[k]) for k in ids)
    # ...and a saved permutation is reused as is, whatever it holds.
    custom = np.arange(n)[::-1].copy()
    np.save(perm_path, custom)
    reused = geom.geom_datasets(built, conformations=CONFORMATIONS)
    assert np.array_equal(reused["valid"].conformer_ids, np.sort(custom[:n_valid]))
    assert np.array_equal(reused["train"].conformer_ids, np.sort(custom[n_valid + n_test :]))
    assert np.array_equal(np.load(perm_path), custom)
    perm_path.unlink()


def qm9_style_batch() -> dict[str, torch.Tensor]:
    arrays = {
        "positions": np.zeros((2, 3, 3), np.float32), "charges": np.array([[6, 1, 0], [8, 0, 0]]),
        "one_hot": np.zeros((2, 3, 5), bool), "num_atoms": np.array([2, 1]), "index": np.array([1, 2]),
    }
    return PaddedMoleculeDataset(arrays).__getitems__([0, 1])


@pytest.mark.parametrize("remove_h", [False, True])
def test_batches_have_qm9s_dict_with_geoms_16_types(built, remove_h):
    args = argparse.Namespace(dataset="geom", datadir=str(built), conformations=CONFORMATIONS, remove_h=remove_h,
                              batch_size=5, num_workers=0, filter_n_atoms=None)
    loaders, charge_scale = geom.retrieve_geom_dataloaders(args)
    assert set(loaders) == {"train", "valid", "test"} and int(charge_scale) == 83
    info = get_dataset_info("geom", remove_h)
    atomic_nb = torch.tensor(info["atomic_nb"])
    suffix = "no_h_" if remove_h else ""
    rows = np.load(built / f"geom_drugs_{suffix}{CONFORMATIONS}.npy")
    reference = qm9_style_batch()

    seen = []
    for batch in loaders["train"]:
        assert set(batch) == set(reference)
        assert {k: v.dtype for k, v in batch.items()} == {k: v.dtype for k, v in reference.items()}
        b, n = batch["charges"].shape
        assert n == int(batch["num_atoms"].max())
        assert batch["positions"].shape == (b, n, 3) and batch["one_hot"].shape == (b, n, len(info["atom_decoder"]))
        assert batch["edge_mask"].shape == (b * n * n, 1)
        mask = batch["atom_mask"]
        assert torch.equal(mask.sum(1), batch["num_atoms"])
        # one_hot is one channel per real atom, naming its atomic number; none on padding.
        assert torch.equal(batch["one_hot"].sum(-1), mask.long())
        assert torch.equal(atomic_nb[batch["one_hot"].long().argmax(-1)][mask], batch["charges"][mask])
        assert not torch.any(batch["charges"][~mask])
        edges = batch["edge_mask"].view(b, n, n)
        assert not edges.diagonal(dim1=1, dim2=2).any()
        assert torch.equal(edges, mask[:, :, None] & mask[:, None, :] & ~torch.eye(n, dtype=torch.bool))
        for i, conformer in enumerate(batch["index"].tolist()):
            own = rows[rows[:, 0] == conformer]
            k = int(batch["num_atoms"][i])
            assert torch.equal(batch["charges"][i, :k], torch.as_tensor(own[:, 1]).long())
            assert torch.allclose(batch["positions"][i, :k], torch.as_tensor(own[:, 2:], dtype=torch.float32))
        if remove_h:
            assert not torch.any(batch["charges"] == 1)
        seen.extend(batch["index"].tolist())
    assert sorted(seen) == loaders["train"].dataset.conformer_ids.tolist()
    (built / geom.PERMUTATION_FILE).unlink()


def test_hydrogens_stripped_on_the_fly_match_the_hydrogen_free_build(built, tmp_path):
    only_h = tmp_path / "with_h_only"
    only_h.mkdir()
    for name in geom.output_names(CONFORMATIONS).values():
        (only_h / name).write_bytes((built / name).read_bytes())
    stripped = geom.geom_datasets(only_h, remove_h=True, conformations=CONFORMATIONS)["train"]
    prebuilt = geom.geom_datasets(built, remove_h=True, conformations=CONFORMATIONS)["train"]
    assert stripped.drop_h and not prebuilt.drop_h
    assert np.array_equal(stripped.num_atoms, prebuilt.num_atoms)
    picks = [0, 3, len(stripped) - 1]
    a, b = stripped.__getitems__(picks), prebuilt.__getitems__(picks)
    assert all(torch.equal(a[k], b[k]) for k in a)
    (built / geom.PERMUTATION_FILE).unlink()


def test_size_filters_apply_inside_each_split(built):
    sizes = np.load(built / f"geom_drugs_n_{CONFORMATIONS}.npy")
    aspirin = np.flatnonzero(sizes == sizes[0])  # conformers 0..3, 21 atoms each
    assert aspirin.tolist() == [0, 1, 2, 3]
    # A saved split with aspirin conformers in every part: valid = [0, 4], test = [1, 5].
    rest = np.arange(6, len(sizes))
    np.save(built / geom.PERMUTATION_FILE, np.concatenate([[0, 4, 1, 5, 2, 3], rest]))
    exact = geom.geom_datasets(built, conformations=CONFORMATIONS, filter_n_atoms=int(sizes[0]))
    assert {k: d.conformer_ids.tolist() for k, d in exact.items()} == {"valid": [0], "test": [1], "train": [2, 3]}
    at_most = geom.geom_datasets(built, conformations=CONFORMATIONS, filter_molecule_size=int(sizes[0]))
    kept = np.sort(np.concatenate([d.conformer_ids for d in at_most.values()]))
    assert np.array_equal(kept, np.flatnonzero(sizes <= sizes[0]))
    assert all(np.all(d.num_atoms <= sizes[0]) for d in at_most.values())
    with pytest.raises(ValueError, match="size filter"):
        geom.geom_datasets(built, conformations=CONFORMATIONS, filter_n_atoms=2)
    (built / geom.PERMUTATION_FILE).unlink()


def test_dataset_pickles_without_the_table(built):
    dataset = geom.geom_datasets(built, conformations=CONFORMATIONS)["train"]
    dataset.__getitems__([0])  # opens the memory map
    clone = pickle.loads(pickle.dumps(dataset))
    assert clone._rows is None
    assert torch.equal(clone.__getitems__([1, 2])["positions"], dataset.__getitems__([1, 2])["positions"])
    (built / geom.PERMUTATION_FILE).unlink()


def test_missing_files_give_the_steps_to_obtain_geom(tmp_path):
    with pytest.raises(DataError, match=r"drugs_crude\.msgpack\.tar\.gz.*Harvard Dataverse.*build_geom_dataset\.py --data_dir"):
        geom.build_geom_dataset(tmp_path / "nowhere", progress=False)
    args = argparse.Namespace(dataset="geom", datadir=str(tmp_path), remove_h=False, batch_size=2)
    with pytest.raises(DataError, match=r"geom_drugs_30\.npy.*build_geom_dataset\.py --data_dir"):
        geom.retrieve_geom_dataloaders(args)
    result = subprocess.run([sys.executable, str(REPO_ROOT / "build_geom_dataset.py"), "--data_dir", str(tmp_path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert len(result.stderr.strip().splitlines()) == 1 and "drugs_crude.msgpack" in result.stderr
    assert "Traceback" not in result.stderr


def assert_build_fails_cleanly(folder: Path, pattern: str) -> None:
    before = sorted(p.name for p in folder.iterdir())
    with pytest.raises(geom.GeomFormatError, match=pattern):
        geom.build_geom_dataset(folder, conformations=CONFORMATIONS, progress=False)
    assert sorted(p.name for p in folder.iterdir()) == before  # no partial outputs, no temp files


def test_corrupt_records_are_errors_naming_file_and_record(tmp_path, raw_records):
    source = tmp_path / "drugs_crude.msgpack"
    parts = write_msgpack(source, raw_records)
    # An undecodable byte where record 1 starts, and one inside it (its first key).
    source.write_bytes(parts[0] + b"\xc1" + parts[1][1:])
    assert_build_fails_cleanly(tmp_path, rf"{re.escape(str(source))}: record 1 .*corrupt")
    source.write_bytes(parts[0] + parts[1][:1] + b"\xc1" + parts[1][2:])
    assert_build_fails_cleanly(tmp_path, rf"{re.escape(str(source))}: record 1 cannot be decoded")
    # A truncated file.
    source.write_bytes(parts[0] + parts[1][:-20])
    assert_build_fails_cleanly(tmp_path, rf"{re.escape(str(source))}.*truncated")
    # Decodable but malformed: a conformer without an energy.
    broken = [raw_records[0], {k: dict(v) for k, v in raw_records[1].items()}]
    smiles = next(iter(broken[1]))
    broken[1][smiles]["conformers"] = [{"xyz": broken[1][smiles]["conformers"][0]["xyz"]}]
    write_msgpack(source, broken)
    assert_build_fails_cleanly(tmp_path, rf"record 1, molecule {re.escape(repr(smiles))}.*totalenergy")


def test_inconsistent_processed_files_are_errors(built, tmp_path):
    names = geom.output_names(CONFORMATIONS)
    (tmp_path / names["rows"]).write_bytes((built / names["rows"]).read_bytes())
    counts = np.load(built / names["counts"])
    np.save(tmp_path / names["counts"], counts[::-1])  # same total, wrong boundaries
    with pytest.raises(geom.GeomFormatError, match="disagree"):
        geom.load_geom_conformers(tmp_path, CONFORMATIONS)
    (tmp_path / names["counts"]).write_bytes(b"not an npy file")
    with pytest.raises(geom.GeomFormatError, match=rf"cannot read {re.escape(str(tmp_path / names['counts']))}"):
        geom.load_geom_conformers(tmp_path, CONFORMATIONS)


def test_retrieve_dataloaders_dispatches_geom_and_defaults_to_data_geom(built, tmp_path, monkeypatch):
    from qm9.dataset import retrieve_dataloaders

    args = argparse.Namespace(dataset="geom", datadir=str(built), conformations=CONFORMATIONS, remove_h=False,
                              batch_size=8, num_workers=0, filter_n_atoms=None)
    loaders, _ = retrieve_dataloaders(args)
    assert isinstance(loaders["valid"].dataset, geom.GeomDataset)
    assert next(iter(loaders["valid"]))["one_hot"].shape[-1] == 16
    (built / geom.PERMUTATION_FILE).unlink()
    # The shared CLI's QM9 folder is never searched for GEOM files.
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=r"data/geom/geom_drugs_30\.npy"):
        retrieve_dataloaders(argparse.Namespace(dataset="geom", datadir="qm9/temp", remove_h=False))


def test_location_from_edms_data_file_or_datadir():
    ns = argparse.Namespace
    assert geom.geom_location(ns(datadir="qm9/temp", data_file="./data/geom/geom_drugs_30.npy")) == (Path("data/geom"), 30)
    assert geom.geom_location(ns(datadir="qm9/temp", data_file="/x/geom_drugs_no_h_10.npy", remove_h=True)) == (Path("/x"), 10)
    assert geom.geom_location(ns(datadir="/y", data_file="./data/geom/geom_drugs_5.npy", conformations=None)) == (Path("/y"), 5)
    assert geom.geom_location(ns(datadir="/y", conformations=12)) == (Path("/y"), 12)
    assert geom.geom_location(ns()) == (Path("data/geom"), 30)
    with pytest.raises(ValueError, match="add --remove_h"):
        geom.geom_location(ns(data_file="/x/geom_drugs_no_h_10.npy", remove_h=False))
    with pytest.raises(ValueError, match="geom_drugs_<C>.npy"):
        geom.geom_location(ns(data_file="/x/drugs.npy"))
