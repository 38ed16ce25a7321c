"""The dataset registry (configs/datasets.py): every spelling resolves to one entry, every
consumer (training flags, data loading, sampling, evaluation, bond rules, GAGA's tools) asks
it instead of testing the name, and the README's "Extending" example works as written."""
from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from configs.datasets import (
    GEOM,
    QM9,
    DatasetEntry,
    dataset_entry,
    dataset_names,
    register_dataset,
    unregister_dataset,
)
from configs.datasets_config import GAGA_PUBLISHED, dataset_choices, get_dataset_info, published_dataset_var
from configs.errors import UserInputError
from configs.run_args import safe_datadir

README = Path(__file__).resolve().parent.parent / "README.md"
UNKNOWN = "unknown dataset 'zinc'; choose one of: drugs, geom, geom_drugs, qm9, qm9_first_half, qm9_second_half"


def readme_dataset_example() -> str:
    section = README.read_text().split("## Extending", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    (example,) = [b for b in blocks if "register_dataset" in b]
    return example


@pytest.fixture(scope="module")
def example(qm9_datadir):
    """The README's dataset registered as written (reading the tests' QM9 cache), forgotten afterwards."""
    code = readme_dataset_example().replace('"qm9/temp"', repr(str(qm9_datadir)))
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)  # noqa: S102 - our own README
    yield namespace
    unregister_dataset("qm9_no_f")


@pytest.fixture
def tiny_entry():
    """A dataset whose every fact differs from QM9's and GEOM's, so a consumer that guesses is caught."""
    info = {**get_dataset_info("qm9", False), "n_nodes": {5: 3, 7: 1}, "max_n_nodes": 9}
    entry = register_dataset(DatasetEntry(
        name="tiny_set", aliases=("tiny",), family="geom", info={True: info}, chain_n_nodes=7,
        loader="qm9.data.geom:retrieve_geom_dataloaders", default_datadir="data/tiny", published_var=0.5,
    ))
    yield entry
    unregister_dataset("tiny_set")


# ------------------------------------------------------------------ the registry itself


def test_every_spelling_resolves_to_one_entry_with_one_set_of_facts():
    assert dataset_names() == dataset_choices() == ["drugs", "geom", "geom_drugs", "qm9", "qm9_first_half", "qm9_second_half"]
    for spelling in ("geom", "geom_drugs", "drugs", "GEOM", "Drugs", "GEOM_DRUGS"):
        assert dataset_entry(spelling) is GEOM
    assert dataset_entry("qm9") is dataset_entry("QM9") is QM9
    for spelling in dataset_names():
        entry = dataset_entry(spelling)
        assert published_dataset_var(spelling) == entry.published_var
        for remove_h in entry.info:  # the QM9 halves exist with hydrogens only
            assert get_dataset_info(spelling, remove_h) == get_dataset_info(entry.name, remove_h)
            assert get_dataset_info(spelling, remove_h)["name"] == entry.name


def test_builtin_entries_hold_edms_and_gagas_facts():
    assert (QM9.family, QM9.chain_n_nodes, QM9.default_datadir) == ("qm9", 19, "qm9/temp")
    assert (GEOM.family, GEOM.chain_n_nodes, GEOM.default_datadir) == ("geom", 44, "data/geom")
    assert (QM9.published_var, QM9.published_t_star, GEOM.published_var, GEOM.published_t_star) == (0.848, 550, 0.952, 650)
    assert GAGA_PUBLISHED == {"qm9": {"dataset_var": 0.848, "t_star": 550}, "geom": {"dataset_var": 0.952, "t_star": 650}}
    assert get_dataset_info("qm9", False)["atom_decoder"] == ["H", "C", "N", "O", "F"]
    assert get_dataset_info("qm9", True)["atom_decoder"] == ["C", "N", "O", "F"]
    assert len(get_dataset_info("drugs", False)["atom_decoder"]) == 16 and get_dataset_info("drugs", False)["max_n_nodes"] == 181
    assert len(get_dataset_info("drugs", True)["atom_decoder"]) == 15
    info = get_dataset_info("qm9", False)
    info["atom_decoder"].append("X")  # a caller's edit never reaches the registry
    assert get_dataset_info("qm9", False)["atom_decoder"] == ["H", "C", "N", "O", "F"]


def test_unknown_names_give_one_line_listing_the_known_ones():
    for ask in (dataset_entry, lambda n: get_dataset_info(n, False), published_dataset_var):
        with pytest.raises(UserInputError) as error:
            ask("zinc")
        assert str(error.value) == UNKNOWN
    from training.args import parse_args

    with pytest.raises(UserInputError, match=re.escape(f"--dataset: {UNKNOWN}")):
        parse_args(["--dataset", "zinc"])


def test_registration_refuses_clashes_and_incomplete_entries():
    info = {False: "qm9_with_h"}
    with pytest.raises(ValueError, match="drugs already belong to another dataset"):
        register_dataset(DatasetEntry(name="zinc", aliases=("drugs",), family="qm9", info=info, chain_n_nodes=9,
                                      split_arrays="qm9.data.qm9:load_qm9"))
    with pytest.raises(ValueError, match="already registered"):
        register_dataset(DatasetEntry(name="qm9", family="qm9", info=info, chain_n_nodes=9, split_arrays="x:y"))
    assert register_dataset(QM9) is QM9  # the same entry again is harmless
    bad = [
        (dict(family="zinc"), "family must be one of qm9, geom"),
        (dict(split_arrays=None), "give split_arrays"),
        (dict(chain_n_nodes=0), "chain_n_nodes must be >= 1"),
        (dict(name="Zinc"), "lower-case"),
        (dict(info={False: {"atom_decoder": ["C"]}}), "lacks atom_encoder, n_nodes, max_n_nodes"),
        (dict(info={"yes": "qm9_with_h"}), "info maps remove_h"),
        (dict(published_var=0.0), "published_var must be > 0"),
    ]
    for change, message in bad:
        fields = dict(name="zinc", family="qm9", info=info, chain_n_nodes=9, split_arrays="qm9.data.qm9:load_qm9")
        with pytest.raises(ValueError, match=message):
            DatasetEntry(**{**fields, **change})
    assert "zinc" not in dataset_names()


# ------------------------------------------------------------------ every consumer asks it


def test_training_flags_take_defaults_variance_and_help_from_the_registry(tiny_entry):
    from training.args import build_parser, fill_legacy_defaults, parse_args

    for spelling in ("geom", "geom_drugs", "drugs"):
        legacy = fill_legacy_defaults(argparse.Namespace(dataset=spelling, max_t=650))
        assert (legacy.nf, legacy.include_charges, legacy.dataset_var) == (192, False, 0.952)  # main_geom_drugs.py's
        assert parse_args(["--dataset", spelling, "--max_t", "100"], script="geom").dataset_var == 0.952
    legacy = fill_legacy_defaults(argparse.Namespace(dataset="qm9", max_t=550))
    assert (legacy.nf, legacy.include_charges, legacy.dataset_var) == (128, True, 0.848)
    # A registered dataset: its family's defaults, its own variance, its only variant (with --remove_h).
    legacy = fill_legacy_defaults(argparse.Namespace(dataset="TINY", max_t=5, remove_h=True))
    assert (legacy.nf, legacy.dataset_var) == (192, 0.5)
    assert parse_args(["--dataset", "tiny", "--remove_h", "--max_t", "100"]).dataset_var == 0.5
    with pytest.raises(UserInputError, match=r"dataset 'tiny_set' has no variant with hydrogens \(without --remove_h\)"):
        parse_args(["--dataset", "tiny"])
    assert "tiny" in build_parser().format_help()


def test_a_dataset_without_published_variance_asks_for_dataset_var(example, tmp_path, monkeypatch):
    import Gaussianity_test
    from training.args import parse_args

    with pytest.raises(UserInputError, match="no published GAGA variance; pass --dataset_var"):
        parse_args(["--dataset", "qm9_no_f", "--max_t", "100"])
    assert parse_args(["--dataset", "qm9_nof", "--max_t", "100", "--dataset_var", "0.9"]).dataset_var == 0.9
    # GAGA's Gaussianity test takes the dataset's own published v (never its family's): none here.
    monkeypatch.setattr(Gaussianity_test, "load_features", lambda *a, **k: pytest.fail("data read before the check"))
    with pytest.raises(UserInputError, match="'qm9_no_f' has no published GAGA variance"):
        Gaussianity_test.main.__wrapped__(["--dataset", "qm9_nof", "--out_dir", str(tmp_path / "g")])


def test_default_data_folders_come_from_the_registry(tiny_entry):
    assert safe_datadir(None, None, "drugs") == safe_datadir(None, None, "geom_drugs") == "data/geom"
    assert safe_datadir(None, None, "qm9") == "qm9/temp"
    assert safe_datadir(None, None, "tiny") == "data/tiny"
    assert safe_datadir(None, None, "zinc") == "qm9/temp"  # unknown: the caller reports the name, naming the run


class ChainRecorder:
    """A stand-in diffusion model: records the molecule size sample_chain asks for."""

    T = 4

    def __init__(self, n_channels: int):
        self.n_channels, self.sizes = n_channels, []

    def sample_chain(self, n_samples, n_nodes, node_mask, edge_mask, context, keep_frames, **options):
        self.sizes.append(n_nodes)
        return torch.zeros(keep_frames, n_nodes, self.n_channels)


@pytest.mark.parametrize("spelling, size", [("qm9", 19), ("geom", 44), ("geom_drugs", 44), ("drugs", 44), ("tiny", 7)])
def test_chains_draw_the_registered_size(spelling, size, tiny_entry):
    from qm9.sampling import sample_chain

    info = get_dataset_info(spelling, remove_h=(spelling == "tiny"))
    flow = ChainRecorder(3 + len(info["atom_decoder"]) + 1)
    args = argparse.Namespace(dataset=spelling, context_node_nf=0)
    one_hot, charges, x = sample_chain(args, "cpu", flow, 1, info, keep_frames=3)
    assert flow.sizes == [size] and x.shape == (3 + 10, size, 3)


def test_eval_sample_draws_chains_of_the_runs_dataset_size(monkeypatch, tmp_path):
    import eval_sample
    import qm9.sampling
    import training.evaluate

    sizes = []

    def stop(args, device, flow, n_tries, info, prop_dist=None, n_nodes=None, **options):
        sizes.append(n_nodes)
        raise KeyboardInterrupt  # enough: the size was chosen

    def fake_run_args(path, datadir=None):
        return argparse.Namespace(dataset="drugs", remove_h=False, diffusion_steps=10, max_t=None,
                                  dataset_var=1.0, sampling_step_size=1, sampler="ddpm")

    monkeypatch.setattr(training.evaluate, "read_run_args", fake_run_args)
    monkeypatch.setattr(training.evaluate, "load_run", lambda *a, **k: argparse.Namespace(model=None, prop_dist=None))
    monkeypatch.setattr(qm9.sampling, "sample_chain", stop)
    for argv, size in ((["--n_samples", "0"], 44), (["--n_samples", "0", "--n_nodes", "12"], 12)):
        with pytest.raises(KeyboardInterrupt):
            eval_sample.main(["--model_path", str(tmp_path), *argv])
        assert sizes.pop() == size


def test_bond_rules_follow_the_dataset_family(tiny_entry):
    from qm9.bond_analyze import tables_for

    assert tables_for(get_dataset_info("drugs", False)).geom and tables_for(get_dataset_info("geom", True)).geom
    assert not tables_for(get_dataset_info("qm9", False)).geom
    assert tables_for(get_dataset_info("tiny", True)).geom  # family 'geom', QM9's atom types
    unnamed = {k: v for k, v in get_dataset_info("qm9", False).items() if k != "name"}
    assert not tables_for(unnamed).geom
    # (other tests' datasets may be registered meanwhile: only the built-in start of the list is pinned)
    with pytest.raises(UserInputError, match=re.escape(UNKNOWN.split(", qm9_first_half")[0])):
        tables_for({**unnamed, "name": "zinc"})


def test_dataloaders_come_from_the_registered_loader(example, qm9_datadir, monkeypatch, tiny_entry):
    import qm9.data.geom
    from qm9.dataset import retrieve_dataloaders

    args = argparse.Namespace(dataset="qm9_nof", datadir=str(qm9_datadir), batch_size=64, remove_h=False)
    loaders, charge_scale = retrieve_dataloaders(args)
    assert int(charge_scale) == 9  # fluorine stays a type of the decoder
    for split in ("train", "valid", "test"):
        charges = loaders[split].dataset.arrays["charges"]
        assert not (charges == 9).any()
    full = retrieve_dataloaders(argparse.Namespace(**{**vars(args), "dataset": "qm9"}))[0]
    assert len(loaders["train"].dataset) == int(np.sum(~(full["train"].dataset.arrays["charges"] == 9).any(1)))
    assert sum(example["info"]["n_nodes"].values()) == len(loaders["train"].dataset)

    seen = []
    monkeypatch.setattr(qm9.data.geom, "retrieve_geom_dataloaders", lambda a: seen.append(a.dataset) or ({}, None))
    for spelling in ("drugs", "geom_drugs", "tiny"):
        retrieve_dataloaders(argparse.Namespace(dataset=spelling, remove_h=True))
    assert seen == ["drugs", "geom_drugs", "tiny"]


def test_novelty_and_gaga_read_the_registered_arrays(example, qm9_datadir, monkeypatch):
    import qm9.rdkit_functions
    from gaga.data import DataSpec, dataset_kind, load_features
    from training.evaluate import training_smiles

    assert [dataset_kind(s) for s in ("qm9", "qm9_nof", "geom", "geom_drugs", "drugs")] == ["qm9", "qm9", "geom", "geom", "geom"]
    with pytest.raises(UserInputError, match=re.escape(UNKNOWN.split(", qm9_first_half")[0])):
        dataset_kind("zinc")

    received = {}
    monkeypatch.setattr(qm9.rdkit_functions, "get_training_smiles",
                        lambda info, arrays, path, progress=True: received.update(info=info, arrays=arrays) or [])
    args = argparse.Namespace(dataset="qm9_no_f", datadir=str(qm9_datadir), remove_h=False)
    training_smiles(args, get_dataset_info("qm9_no_f", False), progress=False)
    assert received["info"]["name"] == "qm9_no_f"
    assert len(received["arrays"]["num_atoms"]) == sum(example["info"]["n_nodes"].values())

    features = load_features(DataSpec(dataset="qm9_nof", datadir=str(qm9_datadir), filter_n_atoms=9), split="valid",
                             progress=False)
    valid = example["load_qm9_no_f"](str(qm9_datadir), "valid", filter_n_atoms=9, progress=False)
    assert len(features) == len(valid["num_atoms"]) > 0
    assert np.array_equal(features.index, valid["index"])

    only_loader = register_dataset(DatasetEntry(name="streamed", family="qm9", info={False: "qm9_with_h"},
                                                chain_n_nodes=19, loader="qm9.data.geom:retrieve_geom_dataloaders"))
    try:
        with pytest.raises(UserInputError, match="'streamed' has no padded-array loader"):
            load_features(DataSpec(dataset="streamed", datadir=str(qm9_datadir)), progress=False)
    finally:
        unregister_dataset(only_loader.name)


def test_the_readme_dataset_trains_end_to_end(example, qm9_datadir, tmp_path, one_thread):
    from configs.run_args import load_run_args
    from training.run import main

    summary = main([
        "--dataset", "qm9_no_f", "--exp_name", "nof", "--output_root", str(tmp_path), "--datadir", str(qm9_datadir),
        "--data_subset", "32", "--nf", "16", "--n_layers", "2", "--diffusion_steps", "10",
        "--diffusion_noise_schedule", "polynomial_2", "--diffusion_loss_type", "l2", "--batch_size", "16",
        "--n_epochs", "1", "--test_epochs", "1", "--n_stability_samples", "4", "--visualize_every_batch", "0",
    ])
    assert load_run_args(tmp_path / "nof").dataset == "qm9_no_f"
    assert np.isfinite(summary["best_nll_val"])
