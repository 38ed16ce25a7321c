"""EDM's learned noise schedule (GammaNetwork) and its non-equivariant baseline (gnn_dynamics)
reproduce the reference fixtures fixture_edm_learned_small.pt and fixture_gnn_small.pt
(/work/shared/reference/FIXTURES_EXTRA.md, edm_learned_schedule_gnn.md).

Tolerances from FIXTURES_EXTRA.md: phi, z, mu, zs atol 1e-5; kl_prior atol 1e-5; eval loss/nll
rtol 1e-5; gradients rtol 1e-4; learned schedule: gamma atol 2e-3, SNR weights rtol 0.1 and the
vlb losses rtol 0.1 unless gamma's evaluation layout is replicated (it is: one (B, 1) chain per
call, as EDM), in which case they are tighter. Gamma-parameter gradients are cancellation-
dominated: compared with atol 1e-3 x the largest gamma gradient.
"""
from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

import edm_fixtures as ef
from equivariant_diffusion.noise_schedule import GammaNetwork, PositiveLinear
from qm9.losses import compute_loss_and_nll

torch.set_num_threads(1)

LEARNED, GNN = "edm_learned", "gnn"
NAMES = (LEARNED, GNN)


def run_loss(model, nodes_dist, args, name, terms_key, dtype=torch.float32):
    """(loss, terms, nll) on the fixture batch with the fixture's fixed t and noise."""
    f = ef.load(name)
    ref = f[terms_key]
    x, h, node_mask, edge_mask = ef.model_inputs(name, dtype)
    eval_mode = terms_key == "loss_eval"
    noises = [ref["eps"].to(dtype)] + ([ref["eps_0"].to(dtype)] if eval_mode else [])
    with ef.fixed_draws(model, ref["t_int"], noises, int(eval_mode), 1001):
        xn, hn, _ = model.normalize(x, h, node_mask)
        loss, terms = model.compute_loss(xn, hn, node_mask, edge_mask.view(x.size(0), -1), None, t0_always=eval_mode)
    with ef.fixed_draws(model, ref["t_int"], noises, int(eval_mode), 1001):
        nll, _, _ = compute_loss_and_nll(args, model, nodes_dist, x, h, node_mask, edge_mask, None)
    return loss, terms, nll


# ---------------------------------------------------------------------------------- learned


def test_gamma_network_has_edms_parameters_and_init():
    torch.manual_seed(0)
    net = GammaNetwork()
    shapes = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert shapes == {"gamma_0": (1,), "gamma_1": (1,), "l1.weight": (1, 1), "l1.bias": (1,),
                      "l2.weight": (1024, 1), "l2.bias": (1024,), "l3.weight": (1, 1024), "l3.bias": (1,)}
    assert [k for k, _ in net.named_parameters()] == list(shapes)  # EDM's optimiser order
    assert net.gamma_0.item() == -5.0 and net.gamma_1.item() == 10.0
    bound = 1 / 1024**0.5  # kaiming-uniform(a=sqrt 5) bound, shifted by -2
    w = net.l3.weight
    assert -2 - bound <= w.min() and w.max() <= -2 + bound and w.std() > bound / 3
    assert isinstance(net.l1, PositiveLinear)
    t = torch.linspace(0, 1, 101).unsqueeze(1)
    g = net(t).detach()
    assert g[0].item() == -5.0 and abs(g[-1].item() - 10.0) < 1e-4
    assert (g[1:] >= g[:-1] - 1e-3).all()  # monotone (up to float32 quantisation, ~3e-4)
    assert abs(net(torch.tensor([[0.5]])).item() - 2.5) < 0.05  # ~ -5 + 15 t at init


def test_learned_gamma_values_match_reference():
    model, _, _ = ef.build(LEARNED)
    ref = ef.load(LEARNED)["gamma_values"]
    net = model.gamma
    with torch.no_grad():
        t = ref["t"]
        assert torch.equal(net.l1(t), ref["l1_t"])
        assert_close(net.l2(net.l1(t)), ref["l2_pre_sigmoid"], atol=1e-6, rtol=0)  # BLAS-dependent last bit
        assert torch.equal(torch.nn.functional.softplus(net.l3.weight), ref["softplus_weights"]["l3"])
        assert_close(net.gamma_tilde(t), ref["gamma_tilde_t"], atol=1e-5, rtol=0)
        # Evaluated as EDM does (one (11, 1) chain per call): bit-identical; the documented
        # cross-implementation tolerance is atol 2e-3.
        assert_close(net(t), ref["gamma"], atol=2e-3, rtol=0)
        grid = torch.arange(1001).float().unsqueeze(1) / 1000
        assert_close(net(grid).squeeze(1), ref["gamma_on_T_grid"], atol=2e-3, rtol=0)
        info = model.log_info()
    assert info["log_SNR_max"] == -ref["log_info"]["gamma_zeros1"].item()
    assert abs(info["log_SNR_min"] + ref["log_info"]["gamma_ones1"].item()) < 2e-3
    exact = torch.equal(net(t), ref["gamma"])
    print(f"gamma on the 11-row batch bit-identical to EDM: {exact}")


def test_gaga_reads_a_learned_schedule_from_the_weights():
    from gaga.schedule import learned_gamma_table

    ref = ef.load(LEARNED)
    table = learned_gamma_table(ref["state_dict"], 1000)
    assert_close(torch.from_numpy(table), ref["gamma_values"]["gamma_on_T_grid"], atol=2e-3, rtol=0)


def test_learned_schedule_needs_the_vlb_loss():
    with pytest.raises(ValueError, match="diffusion_loss_type vlb"):
        ef.build(LEARNED, diffusion_loss_type="l2")


class ReferenceGamma(torch.nn.Module):
    """The model's GammaNetwork, except that at the fixture's time arrays its value is replaced
    by the reference's float32 gamma (gradients still flow through the network). Separates the
    loss/sampling formulas and their gradients (checked tightly) from the network's float32
    quantisation of gamma (~3e-4, layout- and BLAS-dependent, checked at the documented atol 2e-3)."""

    def __init__(self, net: torch.nn.Module, pairs: list[tuple[torch.Tensor, torch.Tensor]]):
        super().__init__()
        self.net = net
        self.pairs = pairs

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        gamma = self.net(t)
        for known_t, known_gamma in self.pairs:
            if t.shape == known_t.shape and torch.equal(t, known_t):
                return gamma + (known_gamma.reshape(t.shape) - gamma).detach()
        return gamma  # zeros / ones: exactly gamma_0 / gamma_1 whatever the weights


def with_reference_gamma(model, terms: dict) -> None:
    t_int = terms["t_int"].float()
    model.gamma = ReferenceGamma(model.gamma, [(t_int / 1000, terms["gamma_t"]), ((t_int - 1) / 1000, terms["gamma_s"])])


@pytest.mark.parametrize("terms_key", ["loss_train", "loss_eval"])
def test_learned_vlb_loss_terms_match_reference_given_its_gamma(terms_key):
    """With gamma at the reference's float32 values, every vlb term matches tightly: the error is
    not divided, the SNR weight is exp(gamma_t - gamma_s) - 1, -log constants are kept, the
    estimator is (T + 1) loss_t in training and T loss_t + L_0 in evaluation."""
    model, nodes_dist, args = ef.build(LEARNED)
    model.train(terms_key == "loss_train")
    ref = ef.load(LEARNED)[terms_key]
    with_reference_gamma(model, ref)
    with torch.no_grad():
        loss, terms, nll = run_loss(model, nodes_dist, args, LEARNED, terms_key)
    assert_close(terms["error"], ref["error"], rtol=1e-5, atol=0)
    assert_close(terms["kl_prior"], ref["kl_prior"], atol=1e-5, rtol=0)
    assert_close(terms["neg_log_constants"], ref["neg_log_constants"], rtol=1e-5, atol=0)
    assert_close(terms["estimator_loss_terms"], ref["estimator_loss_terms"], rtol=1e-4, atol=0)
    assert_close(terms["loss_term_0"], ref["loss_term_0"], rtol=2e-2, atol=1e-5)  # FIXTURES.md: cancellation
    assert_close(loss, ref["loss"], rtol=1e-4, atol=0)
    assert_close(nll, ref["nll"], rtol=1e-4, atol=0)
    assert ref["num_terms"] == (1001 if terms_key == "loss_train" else 1000)


def test_learned_training_gradients_match_reference():
    """Gradients of the training NLL (reference gamma values, see ReferenceGamma): the network's
    tightly; gamma_0 / gamma_1 to 2 %; the GammaNetwork's inner weights are cancellation-dominated
    (gamma.l3.bias is analytically 0, stored 0.25), so they are compared relative to the largest
    gamma gradient (measured here: 3.8e-3 of it)."""
    model, nodes_dist, args = ef.build(LEARNED)
    model.train()
    ref = ef.load(LEARNED)["loss_train"]
    network_names = [k for k, _ in model.named_parameters()]
    with_reference_gamma(model, ref)
    _, _, nll = run_loss(model, nodes_dist, args, LEARNED, "loss_train")
    nll.backward()
    grads = {k.replace("gamma.net.", "gamma."): p.grad for k, p in model.named_parameters()}
    want = ef.load(LEARNED)["grads_train_nll"]
    assert network_names == list(want)  # gamma.* first, as in EDM's parameter list (optim.npy)
    assert network_names[:8] == ["gamma.gamma_0", "gamma.gamma_1", "gamma.l1.weight", "gamma.l1.bias",
                                 "gamma.l2.weight", "gamma.l2.bias", "gamma.l3.weight", "gamma.l3.bias"]
    gamma_scale = max(want[k].abs().max().item() for k in want if k.startswith("gamma."))
    for key, grad in grads.items():
        if key in ("gamma.gamma_0", "gamma.gamma_1"):
            assert_close(grad, want[key], rtol=2e-2, atol=0, msg=key)
        elif key.startswith("gamma."):
            assert_close(grad, want[key], rtol=0, atol=5e-3 * gamma_scale, msg=key)
        else:
            assert_close(grad, want[key], rtol=1e-4, atol=1e-5 * want[key].abs().max().item(), msg=key)
    assert grads["gamma.l2.weight"].abs().max() > 0  # the schedule is trained


def test_learned_training_loss_matches_reference_with_its_own_gamma():
    """The model's own gamma: losses at the documented rtol 0.1 (gamma's float32 quantisation,
    amplified by the SNR weights and the factor T + 1)."""
    model, nodes_dist, args = ef.build(LEARNED)
    model.train()
    ref = ef.load(LEARNED)["loss_train"]
    with torch.no_grad():
        loss, terms, nll = run_loss(model, nodes_dist, args, LEARNED, "loss_train")
    assert_close(terms["error"], ref["error"], rtol=1e-4, atol=0)
    assert_close(terms["kl_prior"], ref["kl_prior"], atol=1e-5, rtol=0)
    assert_close(terms["neg_log_constants"], ref["neg_log_constants"], rtol=1e-5, atol=0)
    assert_close(loss, ref["loss"], rtol=0.1, atol=0)
    assert_close(nll, ref["nll"], rtol=1e-2, atol=0)  # dominated by the t = 0 sample


def test_learned_evaluation_loss_and_nll_match_reference():
    model, nodes_dist, args = ef.build(LEARNED)
    model.eval()
    ref = ef.load(LEARNED)["loss_eval"]
    with torch.no_grad():
        loss, terms, nll = run_loss(model, nodes_dist, args, LEARNED, "loss_eval")
    assert_close(terms["kl_prior"], ref["kl_prior"], atol=1e-5, rtol=0)
    assert_close(terms["estimator_loss_terms"], ref["estimator_loss_terms"], rtol=0.1, atol=0)
    assert_close(loss, ref["loss"], rtol=0.1, atol=0)
    assert_close(nll, ref["nll"], rtol=0.1, atol=0)


# ---------------------------------------------------------------------------------- both


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("step", [0, 1])
def test_sampling_step_matches_reference(name, step):
    model, _, _ = ef.build(name)
    ref = ef.load(name)["sample_steps"][step]
    _, _, node_mask, edge_mask = ef.model_inputs(name)
    with torch.no_grad():
        assert_close(model.gamma(ref["s"]), ref["gamma_s"], atol=2e-3, rtol=0)
        assert_close(model.gamma(ref["t"]), ref["gamma_t"], atol=2e-3, rtol=0)
        eps_t = model.phi(ref["zt"], ref["t"], node_mask, edge_mask, None)
        assert_close(eps_t, ref["eps_t"], atol=1e-5, rtol=0)
        if name == LEARNED:  # the step's formula at the reference's gamma (see ReferenceGamma)
            model.gamma = ReferenceGamma(model.gamma, [(ref["s"], ref["gamma_s"]), (ref["t"], ref["gamma_t"])])
        with ef.fixed_draws(model, None, [ref["noise"]]):
            zs = model.sample_p_zs_given_zt(ref["s"], ref["t"], ref["zt"], node_mask, edge_mask, None)
    assert_close(zs, ref["zs"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_decode_matches_reference(name):
    model, _, _ = ef.build(name)
    ref = ef.load(name)["sample_final"]
    _, _, node_mask, edge_mask = ef.model_inputs(name)
    with ef.fixed_draws(model, None, [ref["noise"]]):
        x, h = model.sample_p_xh_given_z0(ref["z0"], node_mask, edge_mask, None)
    assert_close(x, ref["x"], atol=1e-5, rtol=0)
    assert torch.equal(h["categorical"].float(), ref["one_hot"].float())
    assert torch.equal(h["integer"].float(), ref["charges"].float())


@pytest.mark.parametrize("name", NAMES)
def test_gaussian_start_and_ddim_sampling_run(name):
    """GAGA's Gaussian start (v_t from gamma) and DDIM strides work with both models."""
    model, _, _ = ef.build(name)
    _, _, node_mask, edge_mask = ef.model_inputs(name)
    node_mask, edge_mask = node_mask[:2], edge_mask.view(8, -1)[:2]
    torch.manual_seed(0)
    x, h = model.sample(2, node_mask.shape[1], node_mask, edge_mask, None, start_step=10,
                        dataset_var=0.848, step_size=5, sampler="ddim")
    assert torch.isfinite(x).all() and x.shape == (2, node_mask.shape[1], 3)
    v = model.variance_t(0.848, 10)
    assert v.shape == () and 0.848 < v.item() < 1.0


# ---------------------------------------------------------------------------------- gnn


def test_gnn_state_dict_is_edms():
    model, _, _ = ef.build(GNN)
    want = ef.load(GNN)["state_dict"]
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == {k: tuple(v.shape) for k, v in want.items()}


@pytest.mark.parametrize("impl", ["fast", "reference"])
def test_gnn_network_matches_reference_and_depends_on_padding(impl):
    model, _, _ = ef.build(GNN, egnn_impl=impl)
    f = ef.load(GNN)
    inp = f["inputs"]
    with torch.no_grad():
        phi = model.phi(f["z_t"], f["t_normalized"], inp["node_mask"], inp["edge_mask"], None)
        assert_close(phi, f["phi"], atol=1e-5, rtol=0)
        phi_0 = model.phi(f["loss_eval"]["z_0"], f["loss_eval"]["phi_0_t_input"], inp["node_mask"], inp["edge_mask"], None)
        assert_close(phi_0, f["loss_eval"]["net_out_0"], atol=1e-5, rtol=0)
        pad = f["padding_dependence"]
        phi_pad = model.phi(pad["z_t_pad"], f["t_normalized"], pad["node_mask_pad"], pad["edge_mask_pad"], None)
    assert_close(phi_pad, pad["phi_pad"], atol=1e-5, rtol=0)
    # EDM's GNN has no edge mask: padded slots change real atoms' outputs (reproduced on purpose)
    assert (phi_pad[:, :29] - phi).abs().max() > 0.01


def test_gnn_resets_only_the_molecule_with_a_nan():
    model, _, _ = ef.build(GNN)
    f = ef.load(GNN)
    inp = f["inputs"]
    broken = f["z_t"].clone()
    broken[0, 0, 0] = float("nan")
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="of 1 of"):
        phi = model.phi(broken, f["t_normalized"], inp["node_mask"], inp["edge_mask"], None)
    assert_close(phi[1:], f["phi"][1:], atol=1e-5, rtol=0)
    assert torch.equal(phi[0, :, :3], torch.zeros_like(phi[0, :, :3]))


def test_gnn_training_loss_nll_and_gradients_match_reference():
    model, nodes_dist, args = ef.build(GNN)
    model.train()
    ref = ef.load(GNN)["loss_train"]
    loss, terms, nll = run_loss(model, nodes_dist, args, GNN, "loss_train")
    assert_close(terms["error"], ref["error"], rtol=1e-5, atol=0)
    assert_close(loss, ref["loss"], rtol=1e-4, atol=1e-5)
    assert_close(nll, ref["nll"], rtol=1e-5, atol=1e-5)
    nll.backward()
    want = ef.load(GNN)["grads_train_nll"]
    grads = {k: p.grad for k, p in model.named_parameters() if p.requires_grad}
    assert grads.keys() == want.keys()
    for key, grad in grads.items():
        assert_close(grad, want[key], rtol=1e-4, atol=1e-6, msg=key)
    # the time channel's output row never gets a gradient (its output is discarded)
    assert torch.equal(grads["dynamics.gnn.embedding_out.weight"][-1], torch.zeros(32))


def test_gnn_evaluation_nll_matches_reference():
    model, nodes_dist, args = ef.build(GNN)
    model.eval()
    ref = ef.load(GNN)["loss_eval"]
    loss, terms, nll = run_loss(model, nodes_dist, args, GNN, "loss_eval")
    assert_close(terms["kl_prior"], ref["kl_prior"], atol=1e-5, rtol=0)
    assert_close(loss, ref["loss"], rtol=1e-4, atol=0)
    assert_close(nll, ref["nll"], rtol=1e-5, atol=0)


# ---------------------------------------------------------------------------------- runs


@pytest.mark.parametrize("extra", [
    ["--diffusion_noise_schedule", "learned", "--diffusion_loss_type", "vlb"],  # EDM's parser defaults
    ["--model", "gnn_dynamics", "--diffusion_noise_schedule", "polynomial_2", "--diffusion_loss_type", "l2",
     "--data_augmentation", "True"],
])
def test_tiny_training_run(tmp_path, qm9_datadir, one_thread, extra):
    """One epoch on 32 molecules trains, samples, evaluates and writes a loadable run folder;
    a learned schedule's parameters move (they are trained, in the EMA and in the optimiser)."""
    from configs.datasets_config import get_dataset_info
    from configs.run_args import load_run_args
    from qm9.models import get_model, load_generative_model
    from training.run import main

    argv = ["--exp_name", "tiny", "--output_root", str(tmp_path), "--datadir", str(qm9_datadir),
            "--data_subset", "32", "--nf", "16", "--n_layers", "1", "--diffusion_steps", "10",
            "--batch_size", "16", "--n_epochs", "1", "--test_epochs", "1", "--n_stability_samples", "2",
            "--visualize_every_batch", "0", "--ema_decay", "0.9", *extra]
    summary = main(argv)
    assert summary is not None
    run = tmp_path / "tiny"
    args = load_run_args(run)
    assert args.egnn_impl == "fast"  # recorded in args.pickle
    assert args.model == ("gnn_dynamics" if "gnn_dynamics" in extra else "egnn_dynamics")
    model, _, _ = get_model(args, "cpu", get_dataset_info("qm9", False), None)
    load_generative_model(model, run / "generative_model.npy", args)
    if "learned" in extra:  # the schedule was trained: gamma_0 starts at exactly -5, gamma_1 at 10
        assert model.gamma.gamma_0.item() != -5.0 and model.gamma.gamma_1.item() != 10.0
        assert all(torch.isfinite(p).all() for p in model.gamma.parameters())
        from gaga.schedule import gamma_table_from_run  # GAGA's analysis reads the trained schedule

        ema, _, _ = get_model(args, "cpu", get_dataset_info("qm9", False), None)
        load_generative_model(ema, run / "generative_model_ema.npy", args)
        table = gamma_table_from_run(run)
        assert table.shape == (11,) and table[0] == ema.gamma.gamma_0.item()
        assert abs(table[-1] - ema.gamma.gamma_1.item()) < 1e-4
