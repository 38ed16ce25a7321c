"""QM9 data: EDM's exact split, the cache, and the batch contract."""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from configs.datasets_config import get_dataset_info
from configs.errors import EnvironmentProblem
from qm9.data import qm9 as qm9data
from qm9.data.collate import make_batch
from qm9.dataset import retrieve_dataloaders

REFERENCE_INFO = Path(__file__).resolve().parents[2] / "shared" / "reference" / "datasets_info.json"


def reference_info(key: str) -> dict:
    """EDM's dataset facts: the shared reference file when present, else our verbatim copy."""
    path = REFERENCE_INFO if REFERENCE_INFO.exists() else Path(qm9data.__file__).parents[2] / "configs" / "datasets_info.json"
    return json.loads(path.read_text())[key]


def test_split_sizes_and_partition():
    split = qm9data.edm_split_indices()
    assert {k: len(v) for k, v in split.items()} == {"train": 100000, "valid": 17748, "test": 13083}
    everything = np.concatenate(list(split.values()))
    assert np.array_equal(np.sort(everything), np.arange(130831))


def test_split_is_deterministic_and_leaves_global_rng_alone():
    np.random.seed(123)
    before = np.random.random()
    np.random.seed(123)
    a = qm9data.edm_split_indices()
    after = np.random.random()
    b = qm9data.edm_split_indices()
    assert before == after
    for k in a:
        assert np.array_equal(a[k], b[k])


@pytest.mark.parametrize("remove_h,key", [(False, "qm9_with_h"), (True, "qm9_without_h")])
def test_train_split_statistics_equal_edm(qm9_datadir, remove_h, key):
    """EDM computed these histograms from its train split: equality shows our split is EDM's."""
    ref = reference_info(key)
    train = qm9data.load_qm9(qm9_datadir, "train", remove_h=remove_h, progress=False)
    counts = np.bincount(train["num_atoms"])
    ours = {int(n): int(c) for n, c in enumerate(counts) if c > 0}
    assert ours == {int(k): int(v) for k, v in ref["n_nodes"].items()}
    type_counts = train["one_hot"].sum((0, 1))
    assert {i: int(c) for i, c in enumerate(type_counts)} == {int(k): int(v) for k, v in ref["atom_types"].items()}


def test_loaded_arrays_follow_the_contract(qm9_datadir):
    test = qm9data.load_qm9(qm9_datadir, "test", progress=False)
    assert len(test["num_atoms"]) == 13083
    assert test["positions"].shape == (13083, 29, 3) and test["positions"].dtype == np.float32
    assert test["one_hot"].shape == (13083, 29, 5) and test["one_hot"].dtype == bool
    real = np.arange(29)[None, :] < test["num_atoms"][:, None]
    assert np.array_equal(test["charges"] > 0, real)
    assert np.all(test["positions"][~real] == 0)
    assert np.array_equal(test["one_hot"].sum(-1), real.astype(int))
    assert np.all(np.diff(test["index"]) > 0)  # QM9 index order inside a split


def test_fixture_molecules_are_bit_identical_to_edm(qm9_datadir):
    """The shared fixtures hold raw EDM positions of 8 QM9 molecules."""
    fixture = torch.load(Path(__file__).parent / "fixtures" / "fixture_edm_small.pt", weights_only=True)["inputs"]
    splits = {s: qm9data.load_qm9(qm9_datadir, s, progress=False) for s in qm9data.SPLITS}
    for row, qm9_index in enumerate(fixture["qm9_index"].tolist()):
        found = [(a, np.flatnonzero(a["index"] == qm9_index)) for a in splits.values()]
        (arrays, rows), = [(a, r) for a, r in found if len(r)]
        n = int(arrays["num_atoms"][rows[0]])
        assert n == int(fixture["n_nodes"][row])
        assert np.array_equal(arrays["positions"][rows[0], :n], fixture["x_raw"][row, :n].numpy())
        assert np.array_equal(arrays["charges"][rows[0], :n], fixture["charges"][row, :n, 0].numpy().astype(int))


def test_remove_h_keeps_heavy_atoms_in_order(qm9_datadir):
    full = qm9data.load_qm9(qm9_datadir, "valid", progress=False)
    heavy = qm9data.load_qm9(qm9_datadir, "valid", remove_h=True, progress=False)
    assert heavy["positions"].shape[1] == 9 and heavy["one_hot"].shape[-1] == 4
    for i in [0, 17, 4242]:
        keep = full["charges"][i] > 1
        n = keep.sum()
        assert heavy["num_atoms"][i] == n
        assert np.array_equal(heavy["positions"][i, :n], full["positions"][i][keep])
        assert np.array_equal(heavy["charges"][i, :n], full["charges"][i][keep])


def test_filter_n_atoms(qm9_datadir):
    nine = qm9data.load_qm9(qm9_datadir, "valid", filter_n_atoms=9, progress=False)
    assert len(nine["num_atoms"]) > 0 and np.all(nine["num_atoms"] == 9)
    with pytest.raises(ValueError, match="exactly 2 atoms"):
        qm9data.load_qm9(qm9_datadir, "valid", filter_n_atoms=2, progress=False)


def test_make_batch_trims_to_the_largest_molecule_and_builds_masks():
    positions = np.random.default_rng(0).normal(size=(2, 29, 3)).astype(np.float32)
    charges = np.zeros((2, 29), dtype=np.int64)
    charges[0, :3] = [6, 1, 1]
    charges[1, :2] = [8, 1]
    positions[charges == 0] = 0
    one_hot = charges[..., None] == np.array([1, 6, 7, 8, 9])
    batch = make_batch(positions, charges, one_hot, np.array([3, 2]), np.array([10, 11]))
    assert batch["positions"].shape == (2, 3, 3)
    assert batch["atom_mask"].tolist() == [[True, True, True], [True, True, False]]
    edges = batch["edge_mask"].view(2, 3, 3)
    assert batch["edge_mask"].shape == (18, 1)
    assert not edges[:, range(3), range(3)].any()  # no self-edges
    assert edges[0].sum() == 6 and edges[1].sum() == 2
    assert edges[1, 0, 1] and not edges[1, 0, 2]


def test_retrieve_dataloaders_yields_edm_batches(qm9_datadir):
    args = argparse.Namespace(dataset="qm9", datadir=str(qm9_datadir), batch_size=16, num_workers=0,
                              remove_h=False, filter_n_atoms=None)
    loaders, charge_scale = retrieve_dataloaders(args)
    assert set(loaders) == {"train", "valid", "test"} and int(charge_scale) == 9
    assert len(loaders["test"].dataset) == 13083
    batch = next(iter(loaders["valid"]))
    n = int(batch["num_atoms"].max())
    assert batch["positions"].shape == (16, n, 3) and batch["positions"].dtype == torch.float32
    assert batch["one_hot"].shape == (16, n, 5) and batch["one_hot"].dtype == torch.bool
    assert batch["charges"].shape == (16, n) and batch["atom_mask"].shape == (16, n)
    assert batch["edge_mask"].shape == (16 * n * n, 1)
    assert torch.equal(batch["atom_mask"].sum(1), batch["num_atoms"])


def test_unknown_dataset_lists_choices():
    with pytest.raises(ValueError, match="choose one of: .*geom.*qm9"):
        get_dataset_info("zinc", False)


def _copy_cache(src: Path, dst: Path) -> Path:
    shutil.copytree(src / "qm9", dst / "qm9")
    return dst


def test_partial_cache_is_rebuilt(qm9_datadir, tmp_path):
    datadir = _copy_cache(qm9_datadir, tmp_path)
    (datadir / "qm9" / "valid.npz").unlink()
    valid = qm9data.load_qm9(datadir, "valid", progress=False)
    assert len(valid["num_atoms"]) == 17748


def test_stale_or_corrupt_cache_is_rebuilt_with_a_message(qm9_datadir, tmp_path, capsys):
    datadir = _copy_cache(qm9_datadir, tmp_path)
    path = datadir / "qm9" / "test.npz"
    path.write_bytes(path.read_bytes()[:1000])  # truncated file
    test = qm9data.load_qm9(datadir, "test", progress=False)
    assert len(test["num_atoms"]) == 13083
    assert "rebuilding" in capsys.readouterr().err
    manifest = json.loads((datadir / "qm9" / "manifest.json").read_text())
    manifest["version"] = -1
    (datadir / "qm9" / "manifest.json").write_text(json.dumps(manifest))
    qm9data.load_qm9(datadir, "test", progress=False)
    assert json.loads((datadir / "qm9" / "manifest.json").read_text())["version"] == qm9data.CACHE_VERSION


def test_missing_qm9pack_names_the_install_command(monkeypatch):
    monkeypatch.setattr(qm9data.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(EnvironmentProblem, match="pip install"):
        qm9data.qm9pack_data_dir()


def test_unknown_split_is_a_clear_error(qm9_datadir):
    with pytest.raises(ValueError, match="choose one of train, valid, test"):
        qm9data.load_qm9(qm9_datadir, "training", progress=False)
