"""The conditional EDM network (get_model with context channels) reproduces EDM's conditional
fixture (fixture_edm_conditional_small.pt: conditioning alpha + gap, no charges, one-hot/8) and
builds exactly the key list of EDM's published conditional alpha model.

Tolerances (FIXTURES_EXTRA.md): phi, z, mu, zs atol 1e-5; kl_prior atol 1e-5; eval loss/nll
rtol 1e-5; gradients rtol 1e-4.
"""
from __future__ import annotations

import argparse
import functools
import re
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

import edm_fixtures as ef
from qm9.data.halves import half_dataset_info
from qm9.losses import compute_loss_and_nll
from qm9.models import get_model, load_generative_model
from qm9.utils import prepare_context

FIXTURES = Path(__file__).resolve().parent / "fixtures"
COND_KEYS = FIXTURES / "edm_cond_alpha_state_dict.txt"


@functools.lru_cache(maxsize=None)
def fixture() -> dict:
    return torch.load(FIXTURES / "fixture_edm_conditional_small.pt", weights_only=True)


def build(**overrides):
    f = fixture()
    args = argparse.Namespace(**f["config"]["args"])
    for key, value in overrides.items():
        setattr(args, key, value)
    model, nodes_dist, prop_dist = get_model(args, "cpu", half_dataset_info("qm9_second_half"), None)
    model.load_state_dict(f["state_dict"], strict=True)
    return model, nodes_dist, args


def inputs(dtype=torch.float32):
    inp = fixture()["inputs"]
    h = {"categorical": inp["one_hot"].to(dtype), "integer": inp["h_integer_passed"].to(dtype)}
    return inp["x"].to(dtype), h, inp["node_mask"].to(dtype), inp["edge_mask"].to(dtype), fixture()["context"].to(dtype)


def run_nll(model, nodes_dist, args, terms_key, dtype=torch.float32):
    ref = fixture()[terms_key]
    x, h, node_mask, edge_mask, context = inputs(dtype)
    eval_mode = terms_key == "loss_eval"
    noises = [ref["eps"].to(dtype)] + ([ref["eps_0"].to(dtype)] if eval_mode else [])
    with ef.fixed_draws(model, ref["t_int"], noises, int(eval_mode), 1001):
        nll, _, _ = compute_loss_and_nll(args, model, nodes_dist, x, h, node_mask, edge_mask, context)
    return nll


def run_loss(model, terms_key):
    ref = fixture()[terms_key]
    x, h, node_mask, edge_mask, context = inputs()
    eval_mode = terms_key == "loss_eval"
    noises = [ref["eps"]] + ([ref["eps_0"]] if eval_mode else [])
    with ef.fixed_draws(model, ref["t_int"], noises, int(eval_mode), 1001):
        xn, hn, _ = model.normalize(x, h, node_mask)
        return model.compute_loss(xn, hn, node_mask, edge_mask.view(x.size(0), -1), context, t0_always=eval_mode)


def listed_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for line in path.read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        key, shape = line.split("\t")[:2]
        shapes[key] = tuple(int(n) for n in re.findall(r"\d+", shape))
    return shapes


def published_alpha_args() -> argparse.Namespace:
    """EDM's exp_35_conditional_nf192_9l_alpha run (edm_conditional.md §1.8)."""
    return argparse.Namespace(
        model="egnn_dynamics", probabilistic_model="diffusion", nf=192, n_layers=9, inv_sublayers=1,
        attention=True, tanh=True, norm_constant=1, sin_embedding=False, normalization_factor=1,
        aggregation_method="sum", condition_time=True, context_node_nf=1, conditioning=["alpha"],
        diffusion_steps=1000, diffusion_noise_schedule="polynomial_2", diffusion_noise_precision=1e-5,
        diffusion_loss_type="l2", normalize_factors=[1, 8, 1], include_charges=False,
        dataset="qm9_second_half", remove_h=False, ema_decay=0.999,
    )


def test_published_conditional_model_has_exactly_edm_keys_and_loads_strictly(tmp_path):
    model, _, prop_dist = get_model(published_alpha_args(), "cpu", half_dataset_info("qm9_second_half"), None)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes == listed_shapes(COND_KEYS)
    assert len(shapes) == 141
    assert sum(p.numel() for p in model.parameters()) == 3010617
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 3009616
    assert prop_dist is None  # no training loader given: contexts must be supplied
    # A file with exactly EDM's keys and shapes (as generative_model_ema.npy) loads strictly.
    torch.manual_seed(0)
    state = {k: torch.randn(s) for k, s in listed_shapes(COND_KEYS).items()}
    state["gamma.gamma"] = model.gamma.gamma.detach().clone()
    torch.save(state, tmp_path / "generative_model_ema.npy")
    load_generative_model(model, tmp_path / "generative_model_ema.npy", published_alpha_args())
    assert torch.equal(model.dynamics.egnn.embedding.weight, state["dynamics.egnn.embedding.weight"])
    # The same file does not fit an unconditional model, and the error says why.
    plain, _, _ = get_model(published_alpha_args(), "cpu", half_dataset_info("qm9_second_half"), None,
                            conditioning=[], context_node_nf=0)
    with pytest.raises(Exception, match=r"embedding.weight has shape \(192, 7\), the model expects \(192, 6\)"):
        load_generative_model(plain, tmp_path / "generative_model_ema.npy", published_alpha_args())


def test_fixture_state_dict_loads_strictly_with_the_fixture_widths():
    model, _, _ = build()
    assert model.dynamics.egnn.embedding.weight.shape == (32, 8)
    assert model.dynamics.context_node_nf == 2 and model.in_node_nf == 5


def test_egnn_input_and_output_rows_equal_the_fixture():
    """The EGNN sees [z_h | t | c_alpha | c_gap] and its raw output matches, padding included."""
    model, _, _ = build(group_by_size=False)
    ref = fixture()
    seen = {}
    hook = model.dynamics.egnn.register_forward_hook(
        lambda module, args, output: seen.update(h=args[0].detach(), out_h=output[0].detach(), out_x=output[1].detach())
    )
    _, _, node_mask, edge_mask, context = inputs()
    t = ref["loss_train"]["t"]
    phi = model.phi(ref["z_t"], t, node_mask, edge_mask.view(8, -1), context)
    hook.remove()
    assert_close(seen["h"], ref["inner_net_io"]["input_h"], atol=1e-6, rtol=0)
    assert_close(seen["out_h"], ref["inner_net_io"]["output_h"], atol=1e-5, rtol=0)
    assert_close(seen["out_x"], ref["inner_net_io"]["output_x"], atol=1e-5, rtol=0)
    assert_close(phi, ref["phi"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("group_by_size", [False, True])
def test_phi_with_context_equals_the_fixture(group_by_size):
    model, _, _ = build(group_by_size=group_by_size)
    ref = fixture()
    _, _, node_mask, edge_mask, context = inputs()
    phi = model.phi(ref["z_t"], ref["loss_train"]["t"], node_mask, edge_mask.view(8, -1), context)
    assert_close(phi, ref["phi"], atol=1e-5, rtol=0)
    # The context matters: a different property value changes the prediction.
    other = model.phi(ref["z_t"], ref["loss_train"]["t"], node_mask, edge_mask.view(8, -1), context + node_mask)
    assert (other - phi).abs().max() > 1e-3


def test_context_from_a_batch_dict_is_the_fixture_context():
    f = fixture()
    batch = {"atom_mask": f["inputs"]["node_mask"].squeeze(2).bool(), **f["property_values"]}
    assert torch.equal(prepare_context(f["config"]["conditioning"], batch, f["property_norms"]), f["context"])


def test_training_loss_terms_nll_and_gradients_equal_the_fixture():
    model, nodes_dist, args = build()
    model.train()
    ref = fixture()["loss_train"]
    loss, terms = run_loss(model, "loss_train")
    assert_close(terms["error"], ref["error"], rtol=1e-5, atol=0)
    assert_close(terms["kl_prior"], ref["kl_prior"], atol=1e-5, rtol=0)
    assert_close(loss, ref["loss"], rtol=1e-4, atol=1e-5)
    nll = run_nll(model, nodes_dist, args, "loss_train")
    assert_close(nll, ref["nll"], rtol=1e-5, atol=1e-5)
    nll.backward()
    grads = {k: p.grad for k, p in model.named_parameters() if p.requires_grad}
    expected = fixture()["grads_train_nll"]
    assert grads.keys() == expected.keys()
    for key, grad in grads.items():
        assert_close(grad, expected[key], rtol=1e-4, atol=1e-6, msg=key)
    # The time row and the two context rows of embedding_out are sliced off: no gradient.
    assert torch.equal(grads["dynamics.egnn.embedding_out.weight"][5:], torch.zeros(3, 32))


def test_evaluation_loss_terms_and_nll_equal_the_fixture():
    model, nodes_dist, args = build()
    model.eval()
    ref = fixture()["loss_eval"]
    loss, terms = run_loss(model, "loss_eval")
    assert_close(terms["error"], ref["error"], rtol=1e-5, atol=0)
    assert_close(terms["kl_prior"], ref["kl_prior"], atol=1e-5, rtol=0)
    assert_close(terms["neg_log_constants"], ref["neg_log_constants"], rtol=1e-5, atol=0)
    assert_close(loss, ref["loss"], rtol=1e-5, atol=0)
    # log p(N) comes from the second half's size histogram.
    assert torch.equal(nodes_dist.log_prob(fixture()["inputs"]["n_nodes"]), ref["log_pN"])
    assert_close(run_nll(model, nodes_dist, args, "loss_eval"), ref["nll"], rtol=1e-5, atol=0)


def test_float64_nll_equals_the_fixture_float64():
    model, nodes_dist, args = build()
    model.double()
    model.eval()
    nll = run_nll(model, nodes_dist, args, "loss_eval", torch.float64)
    assert_close(nll, fixture()["float64"]["loss_eval"]["nll"], rtol=1e-9, atol=0)


@pytest.mark.parametrize("step", [0, 1])
def test_sampling_steps_with_context_equal_the_fixture(step):
    model, _, _ = build()
    ref = fixture()["sample_steps"][step]
    _, _, node_mask, edge_mask, context = inputs()
    eps_t = model.phi(ref["zt"], ref["t"], node_mask, edge_mask, context)
    assert_close(eps_t, ref["eps_t"], atol=1e-5, rtol=0)
    with ef.fixed_draws(model, None, [ref["noise"]]):
        zs = model.sample_p_zs_given_zt(ref["s"], ref["t"], ref["zt"], node_mask, edge_mask, context)
    assert_close(zs, ref["zs"], atol=1e-5, rtol=0)


def test_decode_with_context_equals_the_fixture_except_edm_fluorine_bug():
    """EDM's conditional config (no charges) can never decode F (z0[..., 3:-1]); we decode all five
    types, so atoms differ exactly where F has the largest logit."""
    model, _, _ = build()
    ref = fixture()["sample_final"]
    _, _, node_mask, edge_mask, context = inputs()
    with ef.fixed_draws(model, None, [ref["noise"]]):
        x, h = model.sample_p_xh_given_z0(ref["z0"], node_mask, edge_mask, context)
    assert_close(x, ref["x"], atol=1e-5, rtol=0)
    assert h["integer"].numel() == 0
    same = (h["categorical"] == ref["one_hot"]).all(-1)
    is_f = h["categorical"][..., 4] == 1
    assert torch.equal(~same, is_f)
    assert ref["one_hot"][..., 4].sum() == 0


def test_preprocess_batch_builds_the_context_and_the_training_nll():
    """The training path: batch dict -> (x, h, masks, context) -> the fixture's training NLL."""
    from qm9.losses import preprocess_batch

    f = fixture()
    inp = f["inputs"]
    batch = {
        "positions": inp["x_raw"], "one_hot": inp["one_hot_raw"].bool(), "charges": inp["charges"].squeeze(2).long(),
        "atom_mask": inp["node_mask"].squeeze(2).bool(), "edge_mask": inp["edge_mask"].bool(), **f["property_values"],
    }
    x, h, node_mask, edge_mask, context = preprocess_batch(
        batch, "cpu", torch.float32, False, False, conditioning=["alpha", "gap"], property_norms=f["property_norms"]
    )
    assert torch.equal(context, f["context"])
    assert_close(x, inp["x"], atol=1e-6, rtol=0)
    model, nodes_dist, args = build()
    model.train()
    ref = f["loss_train"]
    with ef.fixed_draws(model, ref["t_int"], [ref["eps"]], 0, 1001):
        nll, _, _ = compute_loss_and_nll(args, model, nodes_dist, x, h, node_mask, edge_mask, context)
    assert_close(nll, ref["nll"], rtol=1e-5, atol=1e-5)
    *_, no_context = preprocess_batch(batch, "cpu", torch.float32, False, False)
    assert no_context is None


def test_gaga_truncated_training_works_with_conditioning():
    """GAGA's --max_t and centred one-hot are orthogonal to the context: the same network trains on [0, T*]."""
    model, nodes_dist, args = build(max_t=550, zero_center_h=True)
    assert model.max_t == 550 and model.zero_center_h
    x, h, node_mask, edge_mask, context = inputs()
    h = {"categorical": h["categorical"] - (h["categorical"] * node_mask).sum(1, keepdim=True)
         / node_mask.sum(1, keepdim=True) * node_mask, "integer": h["integer"]}
    model.train()
    torch.manual_seed(0)
    nll, _, _ = compute_loss_and_nll(args, model, nodes_dist, x, h, node_mask, edge_mask, context)
    assert torch.isfinite(nll)
    nll.backward()
    assert model.dynamics.egnn.embedding.weight.grad[:, 6:].abs().sum() > 0  # the context columns learn
