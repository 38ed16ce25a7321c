"""QM9 properties in EDM's units, EDM's first/second halves, mean/MAD, the context tensor and
DistributionProperty, checked bit for bit against fixture_edm_conditional_small.pt and
fixture_property_classifier_small.pt (edm_conditional.md §1)."""
from __future__ import annotations

import argparse
import functools

import numpy as np
import pytest
import torch

from configs.datasets_config import get_dataset_info
from equivariant_diffusion.distributions import DistributionNodes
from qm9.data import qm9 as qm9data
from qm9.data.collate import make_dataloader
from qm9.data.halves import QM9_SECOND_HALF_N_NODES, half_dataset_info, half_rows, load_qm9_half
from qm9.utils import DistributionProperty, compute_mean_mad, compute_mean_mad_from_dataloader, prepare_context

from conftest import FIXTURES


@functools.lru_cache(maxsize=None)
def fixture(name: str) -> dict:
    return torch.load(FIXTURES / f"fixture_{name}_small.pt", weights_only=True)


@pytest.fixture(scope="module")
def halves(qm9_datadir):
    return {name: load_qm9_half(qm9_datadir, name, "train", progress=False) for name in ("qm9_first_half", "qm9_second_half")}


@pytest.fixture(scope="module")
def valid(qm9_datadir):
    return qm9data.load_qm9(qm9_datadir, "valid", progress=False)


def histogram(num_atoms: np.ndarray) -> dict[int, int]:
    sizes, counts = np.unique(num_atoms, return_counts=True)
    return dict(zip(sizes.tolist(), counts.tolist()))


def test_halves_partition_the_train_split_in_edm_order(qm9_datadir, halves):
    first, second = halves["qm9_first_half"], halves["qm9_second_half"]
    assert len(first["index"]) == len(second["index"]) == 50000
    assert first["index"][:5].tolist() == [101107, 106967, 26753, 102422, 123941]
    assert second["index"][:5].tolist() == [114342, 63637, 8525, 124478, 26596]
    train = qm9data.load_qm9(qm9_datadir, "train", progress=False)
    both = np.concatenate([first["index"], second["index"]])
    assert np.array_equal(np.sort(both), train["index"])
    # Size histograms: second half = EDM's qm9_second_half, both halves together = EDM's qm9.
    assert histogram(second["num_atoms"]) == QM9_SECOND_HALF_N_NODES
    full = get_dataset_info("qm9", False)["n_nodes"]
    first_hist = histogram(first["num_atoms"])
    assert {n: first_hist.get(n, 0) + QM9_SECOND_HALF_N_NODES.get(n, 0) for n in full} == full
    # Valid and test are not halved.
    assert len(load_qm9_half(qm9_datadir, "qm9_second_half", "valid", progress=False)["index"]) == qm9data.N_VALID


def test_half_permutation_leaves_numpy_global_rng_alone():
    np.random.seed(3)
    expected = np.random.rand()
    np.random.seed(3)
    half_rows("qm9_second_half")
    assert np.random.rand() == expected
    with pytest.raises(ValueError, match="qm9_first_half, qm9_second_half"):
        half_rows("qm9_third_half")


def test_half_dataset_info_keeps_edm_key_order(halves):
    info = half_dataset_info("qm9_second_half")
    assert list(info["n_nodes"]) == fixture("edm_conditional")["config"]["n_nodes_histogram_key_order"]
    assert info["atom_decoder"] == ["H", "C", "N", "O", "F"] and info["max_n_nodes"] == 29
    assert half_dataset_info("qm9_first_half")["n_nodes"] == histogram(halves["qm9_first_half"]["num_atoms"])
    with pytest.raises(ValueError, match="hydrogens only"):
        half_dataset_info("qm9_second_half", remove_h=True)


def test_property_values_are_edm_values(qm9_datadir):
    """The fixture batch's true values (alpha, gap and all six for the classifier), bit for bit."""
    splits = {s: qm9data.load_qm9(qm9_datadir, s, progress=False) for s in qm9data.SPLITS}
    index = np.concatenate([splits[s]["index"] for s in qm9data.SPLITS])
    order = np.argsort(index)
    ref = fixture("property_classifier")
    rows = order[np.searchsorted(index[order], ref["inputs"]["qm9_index"].numpy())]
    for prop in qm9data.PROPERTIES:
        values = np.concatenate([splits[s][prop] for s in qm9data.SPLITS])[rows]
        assert values.dtype == np.float32
        assert torch.equal(torch.from_numpy(values), ref["per_property"][prop]["label"]), prop
    cond = fixture("edm_conditional")["property_values"]
    for prop in ("alpha", "gap"):
        assert torch.equal(torch.from_numpy(np.concatenate([splits[s][prop] for s in qm9data.SPLITS])[rows]), cond[prop])


def test_cv_has_the_per_atom_reference_subtracted(valid):
    # Cv_EDM = Cv_raw - 2.981 n_atoms: for methane-like small molecules this is far below raw Cv.
    assert valid["Cv"].max() < 1.0 and valid["Cv"].mean() < -20


def test_mean_mad_on_valid_equal_the_fixtures(valid):
    loaders = {"valid": make_dataloader(valid, batch_size=64, shuffle=False)}
    norms = compute_mean_mad(loaders, list(qm9data.PROPERTIES), "qm9_second_half")
    ref = fixture("property_classifier")["norms"]
    for prop in qm9data.PROPERTIES:
        assert torch.equal(norms[prop]["mean"], ref[prop]["mean"]), prop
        assert torch.equal(norms[prop]["mad"], ref[prop]["mad"]), prop
    cond = fixture("edm_conditional")["property_norms"]
    for prop in ("alpha", "gap"):
        assert torch.equal(norms[prop]["mean"], cond[prop]["mean"]) and torch.equal(norms[prop]["mad"], cond[prop]["mad"])
    with pytest.raises(ValueError, match="qm9_first_half"):
        compute_mean_mad(loaders, ["alpha"], "qm9_first_half")
    with pytest.raises(ValueError, match="choose from: alpha, gap"):
        compute_mean_mad_from_dataloader(loaders["valid"], ["polarisability"])


def test_batches_carry_the_properties(halves):
    loader = make_dataloader(halves["qm9_second_half"], batch_size=5, shuffle=False)
    batch = next(iter(loader))
    for prop in qm9data.PROPERTIES:
        assert batch[prop].shape == (5,) and batch[prop].dtype == torch.float32
    assert torch.equal(batch["alpha"], torch.from_numpy(halves["qm9_second_half"]["alpha"][:5]))


def test_prepare_context_equals_the_fixture():
    f = fixture("edm_conditional")
    batch = {"atom_mask": f["inputs"]["node_mask"].squeeze(2).bool(), **f["property_values"]}
    context = prepare_context(["alpha", "gap"], batch, f["property_norms"])
    assert torch.equal(context, f["context"])
    swapped = prepare_context(["gap", "alpha"], batch, f["property_norms"])
    assert torch.equal(swapped, f["context"].flip(-1))
    with pytest.raises(ValueError, match="normaliser"):
        prepare_context(["alpha"], batch, None)


def test_distribution_property_histograms_and_seeded_draws_equal_edm(halves, valid):
    f = fixture("edm_conditional")
    norms = compute_mean_mad_from_dataloader(valid, ["alpha", "gap"])
    dist = DistributionProperty(halves["qm9_second_half"], ["alpha", "gap"])
    dist.set_normalizer(norms)
    for prop in ("alpha", "gap"):
        ref = f["prop_dist"][prop]
        sizes = ref["n_nodes"].tolist()
        assert sorted(dist.distributions[prop]) == sizes
        assert torch.equal(torch.stack([dist.distributions[prop][n]["probs"] for n in sizes]), ref["probs"])
        params = torch.stack([dist.distributions[prop][n]["params"] for n in sizes])
        assert torch.equal(params[:, 0], ref["min"]) and torch.equal(params[:, 1], ref["max"])
    draw = f["prop_dist_sample"]
    torch.manual_seed(draw["seed"])
    assert torch.equal(dist.sample_batch(draw["nodesxsample"]), draw["context"])
    # The --task edm draw: sizes from the second half's p(N), then alpha given the size.
    edm = f["eval_edm_draw"]
    alpha_only = DistributionProperty(halves["qm9_second_half"], ["alpha"], normalizer=norms)
    torch.manual_seed(edm["seed"])
    sizes = DistributionNodes(half_dataset_info("qm9_second_half")["n_nodes"]).sample(8)
    assert torch.equal(sizes, edm["nodesxsample"])
    context = alpha_only.sample_batch(sizes)
    assert torch.equal(context, edm["context"])
    assert torch.equal(alpha_only.unnormalize(context.squeeze(1), "alpha"), edm["label"])
    with pytest.raises(ValueError, match="28 atoms"):
        alpha_only.sample(28)


def test_retrieve_dataloaders_serves_the_halves(qm9_datadir):
    from configs.datasets import QM9_SECOND_HALF, find_dataset
    from qm9.dataset import retrieve_dataloaders
    from qm9.models import get_model

    args = argparse.Namespace(dataset="qm9_second_half", datadir=str(qm9_datadir), batch_size=32, num_workers=0,
                              remove_h=False, filter_n_atoms=None)
    assert find_dataset("qm9_second_half") is QM9_SECOND_HALF  # built in
    assert (QM9_SECOND_HALF.family, QM9_SECOND_HALF.published_var, QM9_SECOND_HALF.published_t_star) == ("qm9", 0.848, 550)
    loaders, charge_scale = retrieve_dataloaders(args)
    first, _ = retrieve_dataloaders(argparse.Namespace(**{**vars(args), "dataset": "qm9_first_half"}))
    assert int(charge_scale) == 9 and len(first["train"].dataset) == 50000
    assert len(loaders["train"].dataset) == 50000 and len(loaders["valid"].dataset) == qm9data.N_VALID
    assert "alpha" in next(iter(loaders["train"]))
    norms = compute_mean_mad(loaders, ["alpha"], "qm9_second_half")
    assert torch.equal(norms["alpha"]["mad"], fixture("edm_conditional")["property_norms"]["alpha"]["mad"])
    # get_model builds p(c | N) from the generator's training loader, as EDM does.
    run = argparse.Namespace(**{**fixture("edm_conditional")["config"]["args"], "conditioning": ["alpha"], "context_node_nf": 1})
    _, _, prop_dist = get_model(run, "cpu", half_dataset_info("qm9_second_half"), loaders["train"])
    ref = fixture("edm_conditional")["prop_dist"]["alpha"]
    assert torch.equal(prop_dist.distributions["alpha"][29]["probs"], ref["probs"][-1])
