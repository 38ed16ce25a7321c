"""Sampling a conditional model for given property values (qm9.sampling with a context), from
p(c | N), EDM's qualitative sweep and chains; on the conditional fixture's small network with a
2-step chain (fast)."""
from __future__ import annotations

import argparse
import functools

import pytest
import torch
from torch.testing import assert_close

from qm9.data.halves import half_dataset_info, load_qm9_half
from qm9.data.qm9 import load_qm9
from qm9.models import get_model
from qm9.sampling import sample, sample_chain, sample_sweep_conditional
from qm9.utils import DistributionProperty, compute_mean_mad_from_dataloader, sweep_context

from conftest import FIXTURES

FAST = dict(step_size=500)  # 1000 -> 500 -> 0: two network calls per chain


@functools.lru_cache(maxsize=None)
def fixture() -> dict:
    return torch.load(FIXTURES / "fixture_edm_conditional_small.pt", weights_only=True)


@pytest.fixture(scope="module")
def conditional(qm9_datadir):
    f = fixture()
    args = argparse.Namespace(**f["config"]["args"])
    train = load_qm9_half(qm9_datadir, "qm9_second_half", "train", progress=False)
    model, nodes_dist, prop_dist = get_model(args, "cpu", half_dataset_info("qm9_second_half"), train)
    model.load_state_dict(f["state_dict"], strict=True)
    model.eval()
    prop_dist.set_normalizer(compute_mean_mad_from_dataloader(load_qm9(qm9_datadir, "valid", progress=False), args.conditioning))
    yield model, nodes_dist, prop_dist, args


def test_get_model_builds_p_c_given_n_from_the_training_half(conditional):
    _, _, prop_dist, _ = conditional
    assert isinstance(prop_dist, DistributionProperty) and prop_dist.properties == ["alpha", "gap"]
    ref = fixture()["prop_dist"]["alpha"]
    assert torch.equal(prop_dist.distributions["alpha"][19]["probs"], ref["probs"][ref["n_nodes"].tolist().index(19)])


def test_given_values_condition_the_molecules(conditional):
    model, _, prop_dist, args = conditional
    info = half_dataset_info("qm9_second_half")
    sizes = torch.tensor([9, 12, 19])
    context = torch.tensor([[-1.0, 0.5], [0.0, 0.0], [2.0, -1.0]])
    torch.manual_seed(5)
    one_hot, charges, x, node_mask = sample(args, "cpu", model, info, prop_dist, sizes, context=context, **FAST)
    assert one_hot.shape == (3, 29, 5) and x.shape == (3, 29, 3) and charges.shape == (3, 29, 0)
    assert torch.equal(node_mask.squeeze(2).sum(1), sizes.float())
    # Per-molecule values and the same values per node give the same chain.
    torch.manual_seed(5)
    per_node = context.unsqueeze(1).expand(3, 29, 2)
    _, _, x_node, _ = sample(args, "cpu", model, info, prop_dist, sizes, context=per_node, **FAST)
    assert torch.equal(x, x_node)
    # Other property values, same noise: other molecules.
    torch.manual_seed(5)
    _, _, x_other, _ = sample(args, "cpu", model, info, prop_dist, sizes, context=context + 1.0, **FAST)
    assert (x_other - x).abs().max() > 1e-4


def test_values_are_drawn_from_p_c_given_n_when_not_given(conditional):
    model, _, prop_dist, args = conditional
    info = half_dataset_info("qm9_second_half")
    sizes = torch.tensor([19, 19])
    torch.manual_seed(3)
    drawn = prop_dist.sample_batch(sizes)
    torch.manual_seed(3)
    _, _, x_drawn, _ = sample(args, "cpu", model, info, prop_dist, sizes, **FAST)
    torch.manual_seed(3)
    prop_dist.sample_batch(sizes)  # consume the same draws, then pass them explicitly
    _, _, x_given, _ = sample(args, "cpu", model, info, prop_dist, sizes, context=drawn, **FAST)
    assert torch.equal(x_drawn, x_given)


def test_sweep_shares_the_noise_and_follows_edm_context(conditional):
    model, _, prop_dist, args = conditional
    info = half_dataset_info("qm9_second_half")
    assert torch.equal(sweep_context(prop_dist, 19, 100), fixture()["sweep"]["context"])
    torch.manual_seed(0)
    one_hot, _, x, node_mask = sample_sweep_conditional(args, "cpu", model, info, prop_dist, n_nodes=19, n_frames=4, **FAST)
    assert x.shape == (4, 29, 3) and torch.equal(node_mask.squeeze(2).sum(1), torch.full((4,), 19.0))
    # With one shared noise draw, equal contexts give equal molecules (up to GEMM rounding by row).
    same = sweep_context(prop_dist, 19, 4)[:1].repeat(3, 1)
    torch.manual_seed(0)
    _, _, x_same, _ = sample(args, "cpu", model, info, prop_dist, torch.full((3,), 19), context=same, fix_noise=True, **FAST)
    assert_close(x_same[1], x_same[0], rtol=1e-5, atol=1e-4)
    assert_close(x_same[2], x_same[0], rtol=1e-5, atol=1e-4)
    torch.manual_seed(0)
    _, _, x_free, _ = sample(args, "cpu", model, info, prop_dist, torch.full((3,), 19), context=same, **FAST)
    assert (x_free[1] - x_free[0]).abs().max() > 1e-2  # without fix_noise they differ


def test_conditional_chain_runs(conditional):
    model, _, prop_dist, args = conditional
    torch.manual_seed(0)
    one_hot, charges, x = sample_chain(args, "cpu", model, 1, half_dataset_info("qm9_second_half"), prop_dist,
                                       n_nodes=9, keep_frames=2, **FAST)
    assert x.shape == (12, 9, 3) and one_hot.shape == (12, 9, 5)


def test_context_errors_are_one_line(conditional):
    model, _, prop_dist, args = conditional
    info = half_dataset_info("qm9_second_half")
    with pytest.raises(ValueError, match="pass a context or the run's DistributionProperty"):
        sample(args, "cpu", model, info, None, torch.tensor([9]), **FAST)
    with pytest.raises(ValueError, match=r"expected \(1, 2\) normalised property values"):
        sample(args, "cpu", model, info, prop_dist, torch.tensor([9]), context=torch.zeros(1, 3), **FAST)
    plain = argparse.Namespace(**{**vars(args), "context_node_nf": 0, "conditioning": []})
    with pytest.raises(ValueError, match="not conditional"):
        sample(plain, "cpu", model, info, None, torch.tensor([9]), context=torch.zeros(1, 2), **FAST)
