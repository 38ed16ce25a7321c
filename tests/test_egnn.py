"""The EGNN dynamics network: equals EDM's output, is E(3)- and permutation-equivariant,
centres its outputs, and ignores padding."""
from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

import edm_fixtures as ef
from egnn.models import EGNN_dynamics_QM9, plan_size_groups

torch.set_num_threads(1)


@pytest.mark.parametrize("name", ef.NAMES)
@pytest.mark.parametrize("group_by_size, chunk_pairs", [(False, 0), (True, 0), (True, 1)])
def test_network_output_matches_reference(name, group_by_size, chunk_pairs):
    """Padded batch, size groups, and one molecule per network call all give EDM's output."""
    model, _, _ = ef.build(name)
    model.dynamics.group_by_size = group_by_size
    model.dynamics.chunk_pairs = chunk_pairs
    f = ef.load(name)
    inp = f["inputs"]
    for z, t, phi in [(f["z_t"], f["t_normalized"], f["phi"]),
                      (f["loss_eval"]["z_0"], f["loss_eval"]["phi_0_t_input"], f["loss_eval"]["net_out_0"])]:
        # phi = the backbone's forward, centred by the diffusion (features too in GAGA mode)
        out = model.phi(z, t, inp["node_mask"], inp["edge_mask"], None)
        assert_close(out, phi, atol=1e-5, rtol=0)


def test_network_in_float64_matches_reference_float64():
    model, _, _ = ef.build("gaga")
    model.double()
    f = ef.load("gaga")
    inp = f["inputs"]
    out = model.phi(f["float64"]["loss_train"]["z_t"], f["loss_train"]["t"], inp["node_mask"].double(),
                    inp["edge_mask"].double(), None)
    assert_close(out, f["float64"]["loss_train"]["net_out"], atol=1e-12, rtol=1e-9)


def lively_network(name: str, seed: int = 0) -> EGNN_dynamics_QM9:
    """The fixture network with coordinate heads scaled up (EDM initialises them near zero),
    so coordinate updates are large enough for equivariance tests to have teeth."""
    model, _, _ = ef.build(name)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.dynamics.egnn.modules():
            if hasattr(module, "coord_mlp"):
                last = module.coord_mlp[4].weight
                last.copy_(torch.randn(last.shape, generator=generator) * 0.02)
    return model.dynamics


def random_orthogonal(reflect: bool, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=generator, dtype=torch.float64))
    if (torch.linalg.det(q) < 0) != reflect:
        q[:, 0] = -q[:, 0]
    return q.float()


def batch(name: str):
    f = ef.load(name)
    return f["z_t"], f["t_normalized"], f["inputs"]["node_mask"], f["inputs"]["edge_mask"]


def network_and_batch(name: str, group_by_size: bool):
    net = lively_network(name)
    net.group_by_size = group_by_size
    return net, batch(name)


@pytest.mark.parametrize("name", ef.NAMES)
@pytest.mark.parametrize("reflect", [False, True])
def test_rotation_reflection_and_translation_equivariance(name, reflect):
    net = lively_network(name)
    z, t, node_mask, edge_mask = batch(name)
    out = net(t, z, node_mask, edge_mask, None)
    assert out[..., :3].abs().max() > 1e-2  # the coordinate output is not trivially small
    q = random_orthogonal(reflect)
    shift = torch.tensor([1.5, -2.0, 0.7])
    z_moved = z.clone()
    z_moved[..., :3] = (z[..., :3] @ q.T + shift) * node_mask
    out_moved = net(t, z_moved, node_mask, edge_mask, None)
    tol = 1e-6 * out.abs().max().item()  # float32 rounding relative to the output scale
    assert_close(out_moved[..., :3], out[..., :3] @ q.T, atol=tol, rtol=0)
    assert_close(out_moved[..., 3:], out[..., 3:], atol=tol, rtol=0)


@pytest.mark.parametrize("name", ef.NAMES)
def test_permutation_equivariance(name):
    net = lively_network(name)
    z, t, node_mask, edge_mask = batch(name)
    out = net(t, z, node_mask, edge_mask, None)
    bs, n, _ = z.shape
    generator = torch.Generator().manual_seed(3)
    perm = torch.stack([torch.randperm(n, generator=generator) for _ in range(bs)])  # moves padding too
    rows = torch.arange(bs).unsqueeze(1)
    mask_p = node_mask[rows, perm]
    pair = mask_p.squeeze(2)
    edge_p = (pair.unsqueeze(2) * pair.unsqueeze(1) * (1 - torch.eye(n))).reshape(-1, 1)
    out_p = net(t, z[rows, perm], mask_p, edge_p, None)
    assert_close(out_p, out[rows, perm], atol=1e-6 * out.abs().max().item(), rtol=0)


@pytest.mark.parametrize("name", ef.NAMES)
def test_outputs_are_centred_and_masked(name):
    """The backbone centres positions; the diffusion's phi adds the features in GAGA mode."""
    net = lively_network(name)
    z, t, node_mask, edge_mask = batch(name)
    raw = net(t, z, node_mask, edge_mask, None)
    assert raw[..., :3].sum(1).abs().max() < 1e-5 * raw.abs().max().item()
    model, _, _ = ef.build(name)
    model.dynamics = net
    out = model.phi(z, t, node_mask, edge_mask, None)
    assert torch.equal(out * (1 - node_mask), torch.zeros_like(out))
    scale = out.abs().max().item()
    assert out[..., :3].sum(1).abs().max() < 1e-5 * scale
    h_means = out[..., 3:].sum(1).abs().max()
    assert (h_means < 1e-5 * scale) == (name == "gaga")  # features centred only in GAGA mode


@pytest.mark.parametrize("name", ef.NAMES)
@pytest.mark.parametrize("group_by_size", [False, True])
def test_extra_padding_changes_nothing(name, group_by_size):
    net, (z, t, node_mask, edge_mask) = network_and_batch(name, group_by_size)
    out = net(t, z, node_mask, edge_mask, None)
    bs, n, d = z.shape
    extra = 4
    z_pad = torch.cat([z, torch.zeros(bs, extra, d)], dim=1)
    mask_pad = torch.cat([node_mask, torch.zeros(bs, extra, 1)], dim=1)
    pair = mask_pad.squeeze(2)
    edge_pad = (pair.unsqueeze(2) * pair.unsqueeze(1) * (1 - torch.eye(n + extra))).reshape(-1, 1)
    out_pad = net(t, z_pad, mask_pad, edge_pad, None)
    assert_close(out_pad[:, :n], out, atol=1e-6 * out.abs().max().item(), rtol=0)
    assert torch.equal(out_pad[:, n:], torch.zeros(bs, extra, d))


def test_one_time_value_is_broadcast_to_the_batch():
    net = lively_network("edm")
    z, t, node_mask, edge_mask = batch("edm")
    one = torch.tensor([[0.25]])
    assert_close(net(one, z, node_mask, edge_mask, None),
                 net(one.expand(z.size(0), 1), z, node_mask, edge_mask, None), atol=0, rtol=0)


def test_mean_aggregation_uses_the_padded_batch():
    """'mean' divides by the padded node count (EDM), so grouping by size must not kick in."""
    torch.manual_seed(0)
    net = EGNN_dynamics_QM9(6, 0, 3, hidden_nf=16, n_layers=1, attention=True, tanh=True, norm_constant=1,
                            inv_sublayers=1, aggregation_method="mean", group_by_size=True)
    z, t, node_mask, edge_mask = batch("gaga")
    grouped = net(t, z, node_mask, edge_mask, None)
    net.group_by_size = False
    assert torch.equal(grouped, net(t, z, node_mask, edge_mask, None))


def test_nan_outputs_are_reset_counted_and_warned():
    net = lively_network("gaga")
    z, t, node_mask, edge_mask = batch("gaga")
    with torch.no_grad():
        net.egnn.e_block_1.gcl_equiv.coord_mlp[4].weight[0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="NaN"):
        out = net(t, z, node_mask, edge_mask, None)
    assert net.nan_resets == 1
    assert torch.equal(out[..., :3], torch.zeros_like(out[..., :3]))
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ef.NAMES)
@pytest.mark.parametrize("group_by_size", [False, True])
def test_a_nan_molecule_is_reset_alone_and_leaves_the_batch_unchanged(name, group_by_size):
    """EDM zeroes the whole batch on any NaN; here only the diverged molecule is reset."""
    net, (z, t, node_mask, edge_mask) = network_and_batch(name, group_by_size)
    clean = net(t, z, node_mask, edge_mask, None)
    broken = z.clone()
    broken[0, 0, 0] = float("nan")  # atom 0 of molecule 0 is real in every fixture
    assert node_mask[0, 0] == 1
    with pytest.warns(RuntimeWarning, match="of 1 of"):
        out = net(t, broken, node_mask, edge_mask, None)
    assert torch.equal(out[1:], clean[1:])
    assert torch.equal(out[0, :, :3], torch.zeros_like(out[0, :, :3]))
    assert torch.isfinite(out).all()


def test_size_groups_trade_padding_against_overhead():
    sizes = [29] + [9] * 10 + [8] * 5
    assert plan_size_groups(sizes, overhead_pairs=0.0) == [8, 9, 29]
    assert plan_size_groups(sizes, overhead_pairs=1e9) == [29]
    # one group costs 16*29^2; splitting off the 29 saves 15*(29^2 - 9^2) - overhead
    assert plan_size_groups(sizes, overhead_pairs=5000.0) == [9, 29]
    assert plan_size_groups([5, 5, 5], overhead_pairs=0.0) == [5]


def test_factorised_pair_preactivation_has_exact_gradients():
    """Linear on [h_i, h_j, e_ij] for every pair, its one-piece backward checked by gradcheck on two
    blocks of different padded sizes, with and without a bias, and without edge features."""
    from egnn.dense_ops import factorised_pair_preactivation
    from egnn.layout import PairLayout

    layout = PairLayout(((2, 4), (1, 3)))
    generator = torch.Generator().manual_seed(1)
    nf, hidden = 3, 4

    def rand(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64, requires_grad=True)

    for k, with_bias in ((2, True), (2, False), (0, True)):
        h, edge_attr = rand(layout.n_nodes, nf), rand(layout.n_pairs, k)
        weight, bias = rand(hidden, 2 * nf + k), (rand(hidden) if with_bias else None)
        args = (h, weight, edge_attr) + ((bias,) if with_bias else ())
        assert torch.autograd.gradcheck(
            lambda h, w, e, *b: factorised_pair_preactivation(h, w, b[0] if b else None, e, layout), args)
        pairs = []
        for hb, eb in zip(layout.node_blocks(h), layout.pair_blocks(edge_attr)):
            b, m = hb.shape[0], hb.shape[1]
            cat = torch.cat([hb.unsqueeze(2).expand(b, m, m, nf), hb.unsqueeze(1).expand(b, m, m, nf), eb], dim=-1)
            pairs.append(torch.nn.functional.linear(cat, weight, bias).reshape(-1, hidden))
        assert_close(factorised_pair_preactivation(h, weight, bias, edge_attr, layout), torch.cat(pairs))


def test_fused_pair_preactivation_and_gated_sum_have_exact_gradients():
    """On two blocks of different padded sizes (flat rows, see egnn.layout)."""
    from egnn.dense_ops import gated_sum, masked_sum, pair_preactivation
    from egnn.layout import PairLayout

    layout = PairLayout(((2, 4), (1, 3)))
    generator = torch.Generator().manual_seed(0)
    hidden, k = 3, 2

    def rand(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64, requires_grad=True)

    receiver, sender = rand(layout.n_nodes, hidden), rand(layout.n_nodes, hidden)
    edge_attr, w_edge = rand(layout.n_pairs, k), rand(hidden, k)
    assert torch.autograd.gradcheck(lambda r, s, e, w: pair_preactivation(r, s, e, w, layout),
                                    (receiver, sender, edge_attr, w_edge))
    expected = torch.cat([(r.unsqueeze(2) + s.unsqueeze(1) + e @ w_edge.T).reshape(-1, hidden) for r, s, e in zip(
        layout.node_blocks(receiver), layout.node_blocks(sender), layout.pair_blocks(edge_attr))])
    assert_close(pair_preactivation(receiver, sender, edge_attr, w_edge, layout), expected)

    m, weight, bias = rand(layout.n_pairs, hidden), rand(1, hidden), rand(1)
    mask = (torch.rand(layout.n_pairs, 1, generator=generator) > 0.3).double()
    assert torch.autograd.gradcheck(lambda m, w, b: gated_sum(m, w, b, mask, layout), (m, weight, bias))
    expected = torch.cat([(torch.sigmoid(mb @ weight.T + bias) * wb * mb).sum(2).reshape(-1, hidden) for mb, wb in zip(
        layout.pair_blocks(m), layout.pair_blocks(mask))])
    assert_close(gated_sum(m, weight, bias, mask, layout), expected)
    assert torch.autograd.gradcheck(lambda m: masked_sum(m, mask, layout), (m,))
    assert_close(masked_sum(m, mask, layout), torch.cat([(wb * mb).sum(2).reshape(-1, hidden) for mb, wb in zip(
        layout.pair_blocks(m), layout.pair_blocks(mask))]))
    gate = rand(layout.n_pairs, 1)  # a gate that needs a gradient too (the coordinate update's)
    assert torch.autograd.gradcheck(lambda m, g: masked_sum(m, g, layout), (m, gate))


def test_pair_differences_and_their_gradient():
    """diff[(b,i,j)] = x_i - x_j per block; one autograd node whose backward is exact."""
    from egnn.dense_ops import pair_differences
    from egnn.layout import PairLayout

    layout = PairLayout(((2, 4), (1, 3), (3, 1)))
    x = torch.randn(layout.n_nodes, 3, dtype=torch.float64, requires_grad=True)
    expected = torch.cat([(xb.unsqueeze(2) - xb.unsqueeze(1)).reshape(-1, 3) for xb in layout.node_blocks(x)])
    assert torch.equal(pair_differences(x, layout), expected)
    assert torch.autograd.gradcheck(lambda x: pair_differences(x, layout), (x,))
    with torch.no_grad():
        assert torch.equal(pair_differences(x, layout), expected)


def test_fast_linear_matches_torch_linear_with_gradients():
    from egnn.dense_ops import linear

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(6, 7, 300, 64, generator=generator, requires_grad=True)  # big enough for oneDNN
    weight = torch.randn(48, 64, generator=generator, requires_grad=True)
    bias = torch.randn(48, generator=generator, requires_grad=True)
    grad_out = torch.randn(6, 7, 300, 48, generator=generator)
    for silu in (False, True):
        got = linear(x, weight, bias, silu=silu)
        grads = torch.autograd.grad(got, (x, weight, bias), grad_out)
        ref = torch.nn.functional.linear(x, weight, bias)
        ref = torch.nn.functional.silu(ref) if silu else ref
        ref_grads = torch.autograd.grad(ref, (x, weight, bias), grad_out)
        assert_close(got, ref, rtol=1e-4, atol=1e-4)
        for g, r in zip(grads, ref_grads):
            assert_close(g, r, rtol=1e-4, atol=1e-3 * r.abs().max().item())
