"""The reference EGNN path (EDM's equations as written) and the fused fast path compute the same
outputs and gradients; a layer whose modules no longer have the fused structure falls back to
the reference path with a warning (so an edit such as a LayerNorm is used, never ignored)."""
from __future__ import annotations

import argparse
import warnings

import pytest
import torch
from torch import nn
from torch.testing import assert_close

import edm_fixtures as ef
from configs.datasets_config import get_dataset_info
from egnn.egnn_new import FusedLayer, set_impl
from qm9.models import get_model

torch.set_num_threads(1)

FIXTURES = ("edm", "gaga", "gnn")


def fused_layers(model: nn.Module) -> list[FusedLayer]:
    return [m for m in model.modules() if isinstance(m, FusedLayer)]


def pair(name: str, **overrides):
    fast, _, _ = ef.build(name, egnn_impl="fast", **overrides)
    ref, _, _ = ef.build(name, egnn_impl="reference", **overrides)
    assert all(m.impl == "fast" and m.use_fast() for m in fused_layers(fast))
    assert all(m.impl == "reference" and not m.use_fast() for m in fused_layers(ref))
    assert list(fast.state_dict()) == list(ref.state_dict())  # same keys, same checkpoints
    return fast, ref


def outputs_and_grads(model, z, t, node_mask, edge_mask):
    model.zero_grad()
    out = model.phi(z, t, node_mask, edge_mask, None)
    (out.pow(2).sum() + out[..., :3].sum()).backward()
    return out.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def assert_same(fast, ref, z, t, node_mask, edge_mask, tol: float = 1e-4):
    """Outputs to atol 1e-5 (float32); each gradient tensor to ``tol`` of its largest entry
    (float32 sums in a different order), plus 1e-6 of the largest gradient overall (some are
    analytically zero, e.g. the output bias in GAGA mode, and only rounding noise in practice)."""
    out_f, grads_f = outputs_and_grads(fast, z, t, node_mask, edge_mask)
    out_r, grads_r = outputs_and_grads(ref, z, t, node_mask, edge_mask)
    assert_close(out_f, out_r, atol=tol / 10, rtol=tol / 10)
    assert grads_f.keys() == grads_r.keys() and len(grads_f) > 10
    scale = max(g.abs().max().item() for g in grads_r.values())
    for key in grads_f:
        atol = tol * grads_r[key].abs().max().item() + tol / 100 * scale
        assert_close(grads_f[key], grads_r[key], rtol=0, atol=atol, msg=key)
    return out_f


@pytest.mark.parametrize("name", FIXTURES)
def test_fast_equals_reference_on_the_fixtures(name):
    fast, ref = pair(name)
    f = ef.load(name)
    out = assert_same(fast, ref, f["z_t"], f["t_normalized"], f["inputs"]["node_mask"], f["inputs"]["edge_mask"])
    assert_close(out, f["phi"], atol=1e-5, rtol=0)  # and both are EDM's


def random_batch(seed: int, sizes=(7, 3, 5, 7, 2), n_nodes: int = 9, features: int = 6):
    generator = torch.Generator().manual_seed(seed)
    bs = len(sizes)
    node_mask = torch.zeros(bs, n_nodes, 1)
    for b, size in enumerate(sizes):
        node_mask[b, :size] = 1
    x = torch.randn(bs, n_nodes, 3, generator=generator) * node_mask
    x = x - x.sum(1, keepdim=True) / node_mask.sum(1, keepdim=True) * node_mask
    h = torch.randn(bs, n_nodes, features, generator=generator) * node_mask
    pair_mask = node_mask.squeeze(2)
    edge_mask = (pair_mask.unsqueeze(2) * pair_mask.unsqueeze(1) * (1 - torch.eye(n_nodes))).reshape(-1, 1)
    t = torch.rand(bs, 1, generator=generator)
    return torch.cat([x, h], dim=2), t, node_mask, edge_mask


@pytest.mark.parametrize("name, overrides", [
    ("edm", {}),                                            # padded batch as one block
    ("edm", {"group_by_size": True}),                       # several size blocks
    ("gaga", {"aggregation_method": "mean", "tanh": False}),  # the other EDM options
    ("edm", {"sin_embedding": True, "attention": False}),
    ("gnn", {}),
    ("gnn", {"aggregation_method": "mean", "attention": False}),
])
def test_fast_equals_reference_on_random_batches(name, overrides):
    torch.manual_seed(0)
    args = ef.args_of(name, egnn_impl="fast", **overrides)
    info = get_dataset_info("qm9", False)
    fast, _, _ = get_model(args, "cpu", info, None)
    ref, _, _ = get_model(ef.args_of(name, egnn_impl="reference", **overrides), "cpu", info, None)
    ref.load_state_dict(fast.state_dict())
    with torch.no_grad():  # make coordinate heads matter (EDM initialises them near zero)
        for module in fast.modules():
            if hasattr(module, "coord_mlp"):
                module.coord_mlp[4].weight.normal_(0, 0.05)
    ref.load_state_dict(fast.state_dict())
    features = 5 + int(args.include_charges)
    for seed in (1, 2):
        z, t, node_mask, edge_mask = random_batch(seed, features=features)
        assert_same(fast, ref, z, t, node_mask, edge_mask)
    # In float64 the two paths agree to rounding: the same algebra, not just close numbers.
    fast.double(), ref.double()
    z, t, node_mask, edge_mask = random_batch(3, features=features)
    assert_same(fast, ref, z.double(), t.double(), node_mask.double(), edge_mask.double(), tol=1e-10)


def test_changed_module_structure_falls_back_to_the_reference_path_with_a_warning():
    fast, ref = pair("edm")
    f = ef.load("edm")
    inputs = (f["z_t"], f["t_normalized"], f["inputs"]["node_mask"], f["inputs"]["edge_mask"], None)
    with torch.no_grad():
        before = fast.phi(*inputs)
    for model in (fast, ref):  # a researcher's edit: LayerNorm after the first edge layer
        torch.manual_seed(5)
        gcl = model.dynamics.egnn.e_block_0.gcl_0
        gcl.edge_mlp.insert(1, nn.LayerNorm(gcl.edge_mlp[0].out_features))
    gcl = fast.dynamics.egnn.e_block_0.gcl_0
    assert not gcl.fast_path_ok()
    with pytest.warns(UserWarning, match="reference path"):
        with torch.no_grad():
            after = fast.phi(*inputs)
    assert (after - before).abs().max() > 1e-4  # the LayerNorm is used ...
    with torch.no_grad():
        assert_close(after, ref.phi(*inputs), atol=1e-6, rtol=0)  # ... through the reference path
    others = [m for m in fused_layers(fast) if m is not gcl]
    assert all(m.use_fast() for m in others)  # every unchanged layer keeps the fast path
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per layer, not on every call
        with torch.no_grad():
            fast.phi(*inputs)
    with pytest.warns(UserWarning, match="reference path"):  # also when selected at construction
        gcl._warned_fallback = False
        set_impl(fast, "fast")


def test_runs_without_the_flag_load_with_the_fast_path():
    args = ef.args_of("edm")
    assert not hasattr(args, "egnn_impl")  # a legacy args.pickle
    model, _, _ = get_model(args, "cpu", get_dataset_info("qm9", False), None)
    assert all(m.impl == "fast" for m in fused_layers(model))
    with pytest.raises(ValueError, match="fast' or 'reference"):
        get_model(argparse.Namespace(**vars(args), egnn_impl="fused"), "cpu", get_dataset_info("qm9", False), None)
