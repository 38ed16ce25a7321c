"""GAGA's analysis chain on GEOM-Drugs: features built on demand from the conformer table,
Variance_Estimate.py and Gaussianity_test.py from dataset flags and from a GEOM run folder.

A tiny GEOM-Drugs build is made from RDKit ETKDG conformers (as tests/test_geom.py does):
5 drug-like molecules x 3 kept conformers = 15 conformers, 13 of them in the train split,
with 15 to 40 atoms and C, N, O, S, Cl, Br among GEOM's 16 atom types.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import msgpack
import numpy as np
import pandas as pd
import pytest
from rdkit import Chem
from rdkit.Chem import AllChem

from configs.datasets_config import get_dataset_info
from configs.run_args import save_run_args
from gaga.data import DataSpec, Features, load_features, random_subset_rows
from gaga.gaussianity import GaussianityConfig
from gaga.gaussianity_run import run_gaussianity_test
from gaga.geom_features import GeomFeatures
from gaga.schedule import gamma_table_from_flags
from gaga.step_estimation import load_results
from gaga.variance import per_molecule_table
from qm9.data import geom

CONFORMATIONS = 3
MOLECULES = [
    "CC(=O)Oc1ccccc1C(=O)O",  # aspirin, 21 atoms
    "Cn1cnc2c1c(=O)n(C)c(=O)n2C",  # caffeine, 24
    "CC(=O)Nc1ccc(O)cc1",  # paracetamol, 20
    "CN(C)CCCN1c2ccccc2Sc2ccc(Cl)cc21",  # chlorpromazine, 40 (S, Cl)
    "Brc1ccc(cc1)C(=O)N",  # 4-bromobenzamide, 15 (Br)
]
SCHEDULE = ["--diffusion_noise_schedule", "polynomial_2", "--diffusion_steps", "1000", "--diffusion_noise_precision", "1e-5"]


def etkdg_record(smiles: str, seed: int, n_conformers: int = 4) -> dict:
    mol = Chem.AddHs(Chem.MolFromSmiles(smiles))
    params = AllChem.ETKDGv3()
    params.randomSeed = seed
    ids = list(AllChem.EmbedMultipleConfs(mol, numConfs=n_conformers, params=params))
    z = np.array([a.GetAtomicNum() for a in mol.GetAtoms()], dtype=np.float64)
    energies = -40.0 - np.random.default_rng(seed).permutation(len(ids)) * 0.5
    return {"conformers": [{"xyz": np.column_stack([z, mol.GetConformer(c).GetPositions()]).tolist(), "totalenergy": float(e)}
                           for c, e in zip(ids, energies)]}


@pytest.fixture(scope="module")
def geom_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("geom_gaga")
    records = {smiles: etkdg_record(smiles, seed) for seed, smiles in enumerate(MOLECULES)}
    (folder / "drugs_crude.msgpack").write_bytes(msgpack.packb(records, use_bin_type=True))
    geom.build_geom_dataset(folder, conformations=CONFORMATIONS, progress=False)
    return folder


def train_ids(folder: Path) -> np.ndarray:
    return geom.geom_datasets(folder, conformations=CONFORMATIONS)["train"].conformer_ids


def conformer_rows(folder: Path, conformer: int) -> np.ndarray:
    """[Z, x, y, z] rows of one conformer, straight from the built table."""
    rows = np.load(folder / f"geom_drugs_{CONFORMATIONS}.npy")
    return rows[rows[:, 0] == conformer, 1:]


def features_by_hand(rows: np.ndarray, remove_h: bool = False, include_charges: bool = False) -> np.ndarray:
    """(n, F): positions/1, one-hot over GEOM's types/4 (and Z/10), each channel minus its mean over the atoms."""
    if remove_h:
        rows = rows[rows[:, 0] != 1]
    atomic_nb = get_dataset_info("geom", remove_h)["atomic_nb"]
    z = rows[:, 0].astype(int)
    parts = [rows[:, 1:].astype(np.float32).astype(np.float64), np.array([[float(zi == a) / 4 for a in atomic_nb] for zi in z])]
    if include_charges:
        parts.append(z[:, None] / 10.0)
    x = np.concatenate(parts, axis=1)
    return x - x.mean(axis=0)


def rms(x: np.ndarray) -> float:
    return float(np.sqrt((x**2).mean()))


# --- features on demand ---------------------------------------------------------------

def test_geom_features_know_every_split_conformer_and_build_only_the_rows_asked_for(geom_dir):
    features = load_features(DataSpec(dataset="geom", datadir=str(geom_dir), conformations=CONFORMATIONS), progress=False)
    assert isinstance(features, GeomFeatures)
    counts = np.load(geom_dir / f"geom_drugs_n_{CONFORMATIONS}.npy")
    ids = train_ids(geom_dir)
    assert len(features) == len(ids) == 13
    assert np.array_equal(features.index, ids) and np.array_equal(features.num_atoms, counts[ids])
    assert features.channels == {"positions": slice(0, 3), "atom_types": slice(3, 19)} and features.n_channels == 19

    rows = np.array([0, 5, 9])
    dense = features.dense(rows)
    assert dense.values.shape == (3, features.num_atoms[rows].max(), 19), "padded to the selection's largest conformer only"
    for i, row in enumerate(rows):
        n = features.num_atoms[row]
        np.testing.assert_allclose(dense.values[i, :n], features_by_hand(conformer_rows(geom_dir, ids[row])), atol=1e-12)
        assert not dense.values[i, n:].any()
    same_size = np.flatnonzero(features.num_atoms == features.num_atoms[0])
    n0 = int(features.num_atoms[0])
    np.testing.assert_array_equal(features.molecules(same_size, n0), features.dense(same_size).values)

    # A random subset is lazy; statistics streamed in blocks of a few conformers equal one dense pass.
    sample = features.subset(random_subset_rows(features.num_atoms, 7, seed=3))
    sample.block_atoms = 50  # a 40-atom conformer alone, two of 20, ...
    blocks = sample.block_rows()
    assert len(blocks) > 1 and np.array_equal(np.sort(np.concatenate(blocks)), np.arange(7)), "every row once"
    assert all(len(rows) * sample.num_atoms[rows].max() <= 50 for rows in blocks)
    whole = per_molecule_table(sample.dense(np.arange(len(sample))))
    streamed = per_molecule_table(sample)
    assert streamed.keys() == whole.keys()
    for key in whole:
        np.testing.assert_allclose(streamed[key], whole[key], rtol=1e-12)


# --- Variance_Estimate.py ---------------------------------------------------------------

def test_variance_estimate_on_geom_flags_matches_a_conformer_by_hand(geom_dir, tmp_path, capsys):
    import Variance_Estimate

    out = tmp_path / "var"
    Variance_Estimate.main(["--dataset", "geom", "--datadir", str(geom_dir), "--conformations", str(CONFORMATIONS),
                            "--test_name", "GEOM", "--out_dir", str(out), "--no_progress"])
    assert "GEOM: 13 molecules of the train split" in capsys.readouterr().out
    table = pd.read_csv(out / "per_molecule.csv")
    ids = train_ids(geom_dir)
    assert sorted(table["index"]) == sorted(ids) and table["n_atoms"].is_monotonic_increasing
    conformer = int(ids[4])
    x = features_by_hand(conformer_rows(geom_dir, conformer))
    row = table.set_index("index").loc[conformer]
    assert row["n_atoms"] == len(x)
    assert row["rms_all"] == pytest.approx(rms(x), rel=1e-7)
    assert row["mean_square_positions"] == pytest.approx((x[:, :3] ** 2).mean(), rel=1e-7)
    assert row["unbiased_var_atom_types"] == pytest.approx((x[:, 3:] ** 2).sum() / (x[:, 3:].size - 1), rel=1e-7)
    summary = json.loads((out / "variance.json").read_text())
    assert summary["n_molecules"] == 13 and summary["dataset_var"] == pytest.approx(table["rms_all"].mean(), rel=1e-7)
    assert summary["source"]["dataset"] == "geom" and summary["source"]["conformations"] == CONFORMATIONS
    assert summary["features"] == {"positions": [0, 3], "atom_types": [3, 19]}
    by_size = pd.read_csv(out / "by_atom_count.csv")
    assert by_size["n_molecules"].sum() == 13 and set(by_size["n_atoms"]) == set(table["n_atoms"])

    # --n_molecules: a seeded sample with the same per-molecule values; --data_file locates the build too.
    sample_out = tmp_path / "sample"
    Variance_Estimate.main(["--dataset", "geom", "--data_file", str(geom_dir / f"geom_drugs_{CONFORMATIONS}.npy"),
                            "--n_molecules", "5", "--seed", "1", "--out_dir", str(sample_out), "--no_progress"])
    sample = pd.read_csv(sample_out / "per_molecule.csv").set_index("index")
    counts = np.load(geom_dir / f"geom_drugs_n_{CONFORMATIONS}.npy")
    assert sorted(sample.index) == sorted(ids[random_subset_rows(counts[ids], 5, 1)])
    pd.testing.assert_frame_equal(sample, table.set_index("index").loc[sample.index])
    assert json.loads((sample_out / "variance.json").read_text())["source"]["n_molecules"] == 5


# --- Gaussianity_test.py ----------------------------------------------------------------

def test_gaussianity_on_geom_writes_one_csv_per_size_and_equals_the_dense_evaluation(geom_dir, tmp_path):
    import Gaussianity_test

    out = tmp_path / "identity_to_gaussian_GEOM"
    Gaussianity_test.main(["--dataset", "geom", "--datadir", str(geom_dir), "--conformations", str(CONFORMATIONS),
                           "--timesteps", "400,700", "--workers", "2", "--chunk_size", "2", "--out_dir", str(out),
                           "--no_progress", "--no_plot", *SCHEDULE])
    files = sorted(out.glob("results_atoms_*.csv"))
    counts = np.load(geom_dir / f"geom_drugs_n_{CONFORMATIONS}.npy")
    ids = train_ids(geom_dir)
    assert sorted(int(f.stem.split("_")[-1]) for f in files) == sorted(set(counts[ids]))
    for f in files:
        part = pd.read_csv(f)
        assert (part["n_atoms"] == int(f.stem.split("_")[-1])).all()
        assert (counts[part["index"]] == part["n_atoms"]).all(), "index is the GEOM conformer id"
    results = load_results(out)
    assert len(results) == 13 * 2 and sorted(results["index"].unique()) == sorted(ids)
    config = json.loads((out / "config.json").read_text())
    assert config["variances"] == {"positions": 0.952, "atom_types": 0.952}  # GAGA's README value for GEOM
    assert config["source"]["dataset"] == "geom"

    # The same molecules densified at once, one worker: the same numbers.
    features = load_features(DataSpec(dataset="geom", datadir=str(geom_dir), conformations=CONFORMATIONS), progress=False)
    dense = features.dense(np.arange(len(features)))
    assert isinstance(dense, Features) and np.array_equal(dense.index, features.index)
    config_obj = GaussianityConfig(timesteps=(400, 700), variances={"positions": 0.952, "atom_types": 0.952})
    run_gaussianity_test(dense, gamma_table_from_flags("polynomial_2", 1000, 1e-5), config_obj, tmp_path / "dense",
                         workers=1, chunk_size=2, progress=False)

    def table(folder):
        return load_results(folder).sort_values(["index", "t"]).reset_index(drop=True)

    pd.testing.assert_frame_equal(table(out), table(tmp_path / "dense"))


# --- a GEOM run folder ------------------------------------------------------------------

def test_a_geom_run_folder_decides_the_data_hydrogens_and_charges(geom_dir, tmp_path):
    import Gaussianity_test
    import Variance_Estimate

    run = tmp_path / "edm_geom_drugs_GA_650"
    # EDM's GEOM arguments: --datadir stays the shared CLI's QM9 default, the data come from --data_file.
    save_run_args(run, argparse.Namespace(
        dataset="geom", datadir="qm9/temp", data_file=str(geom_dir / f"geom_drugs_{CONFORMATIONS}.npy"), conformations=None,
        remove_h=True, include_charges=True, normalize_factors=[1, 4, 10], filter_molecule_size=None, filter_n_atoms=None,
        diffusion_noise_schedule="polynomial_2", diffusion_steps=1000, diffusion_noise_precision=1e-5, max_t=650,
    ))
    var_out = tmp_path / "var"
    Variance_Estimate.main(["--model_path", str(run), "--test_name", "GEOM", "--out_dir", str(var_out), "--no_progress"])
    summary = json.loads((var_out / "variance.json").read_text())
    assert summary["source"]["datadir"] == str(geom_dir) and summary["source"]["remove_h"] is True
    # 15 heavy-atom types without H, then the charges channel.
    assert summary["features"] == {"positions": [0, 3], "atom_types": [3, 18], "charges": [18, 19]}
    table = pd.read_csv(var_out / "per_molecule.csv").set_index("index")
    conformer = int(table.index[0])
    x = features_by_hand(conformer_rows(geom_dir, conformer), remove_h=True, include_charges=True)
    assert table.loc[conformer, "n_atoms"] == len(x)
    assert table.loc[conformer, "rms_all"] == pytest.approx(rms(x), rel=1e-7)
    assert table.loc[conformer, "mean_square_charges"] == pytest.approx((x[:, 18] ** 2).mean(), rel=1e-7)

    # Measured per-modality variances: atom_types are every h channel (15 one-hot + charges).
    gauss_out = tmp_path / "identity_to_gaussian_GEOM"
    Gaussianity_test.main(["--model_path", str(run), "--test_name", "GEOM", "--variance_mode", "per-modality",
                           "--timesteps", "500,650", "--workers", "1", "--out_dir", str(gauss_out), "--no_progress", "--no_plot"])
    variances = json.loads((gauss_out / "config.json").read_text())["variances"]
    h_mean_square = (15 * table["mean_square_atom_types"] + table["mean_square_charges"]) / 16
    assert variances["positions"] == pytest.approx(table["mean_square_positions"].mean(), rel=1e-6)
    assert variances["atom_types"] == pytest.approx(h_mean_square.mean(), rel=1e-6)
    results = load_results(gauss_out)
    rows = np.load(geom_dir / f"geom_drugs_{CONFORMATIONS}.npy")
    heavy_atoms = np.bincount(rows[rows[:, 1] != 1, 0].astype(int))
    assert len(results) == 2 * len(table)
    assert (results["n_atoms"] == heavy_atoms[results["index"]]).all(), "hydrogens removed on the fly"


@pytest.mark.parametrize("argv,message", [
    (["--dataset", "geom", "--datadir", "{empty}"], "build_geom_dataset.py --data_dir"),
    (["--dataset", "geom", "--data_file", "{empty}/drugs.npy"], "geom_drugs_<C>.npy"),
    (["--dataset", "zinc"], "unknown dataset 'zinc'"),
])
def test_geom_bad_input_gives_one_line_errors(tmp_path, capsys, argv, message):
    import Variance_Estimate

    argv = [a.replace("{empty}", str(tmp_path)) for a in argv]
    with pytest.raises(SystemExit) as exit_info:
        Variance_Estimate.main([*argv, "--out_dir", str(tmp_path / "out"), "--no_progress"])
    code = exit_info.value.code  # 2 after a printed 'error: ...', else the exit message itself
    text = capsys.readouterr().err if code == 2 else str(code)
    assert message in text and "\n" not in text.strip()
