"""The sampler registry and options (equivariant_diffusion/samplers.py).

Known answer: for Gaussian data N(0, v I) the exact noise predictor is
E[eps | z_t] = sigma_t z_t / v_t with v_t = alpha_t^2 v + sigma_t^2, and the probability-flow
ODE maps z_t to z_s = z_t sqrt(v_s / v_t) exactly. Deterministic solvers of that ODE must
converge to it, DPM-Solver++(2M) at second order (far closer than DDIM at equal steps).
"""
from __future__ import annotations

import pytest
import torch

from equivariant_diffusion.en_diffusion import EnVariationalDiffusion
from equivariant_diffusion.samplers import SamplingOptions, get_sampler, sampler_names

V = 0.5


class NoNetwork(torch.nn.Module):
    """A backbone that is never called (GaussianDataDiffusion.phi is exact)."""

    n_dims, centres_positions, rotation_equivariant = 3, True, True


class GaussianDataDiffusion(EnVariationalDiffusion):
    """EDM's diffusion whose network is the exact noise predictor of N(0, V I) data."""

    def phi(self, z, t, node_mask, edge_mask, context):
        gamma = self.gamma(t).view(-1, 1, 1)
        alpha2, sigma2 = torch.sigmoid(-gamma), torch.sigmoid(gamma)
        return torch.sqrt(sigma2) * z / (alpha2 * V + sigma2) * node_mask


def make_model(zero_center_h: bool = False) -> GaussianDataDiffusion:
    return GaussianDataDiffusion(NoNetwork(), in_node_nf=5, timesteps=1000, include_charges=False,
                                 norm_values=(1.0, 4.0, 10.0), zero_center_h=zero_center_h).double()


def exact_and_solved(sampler: str, step_size: int, start_step: int = 1000):
    torch.manual_seed(0)
    model = make_model()
    node_mask = torch.ones(16, 9, 1, dtype=torch.float64)
    node_mask[:, 7:] = 0
    z = model.sample_combined_position_feature_noise(16, 9, node_mask).double()
    schedule = SamplingOptions(sampler, start_step, step_size).schedule(model.T)
    solved = get_sampler(sampler).run(model, z.clone(), schedule, node_mask, None, None)
    v = lambda t: model.variance_t(V, t).double()  # noqa: E731
    exact = z * torch.sqrt(v(0) / v(start_step))
    return (solved - exact).norm() / exact.norm()


def test_registry_lists_the_three_samplers_and_rejects_unknown_names():
    assert set(sampler_names()) >= {"ddpm", "ddim", "dpm_solver_2m"}
    with pytest.raises(ValueError, match="unknown sampler 'euler'; choose one of ddpm, ddim, dpm_solver_2m"):
        get_sampler("euler")


@pytest.mark.parametrize("sampler", ["ddim", "dpm_solver_2m"])
def test_deterministic_solvers_converge_to_the_exact_flow(sampler):
    errors = [float(exact_and_solved(sampler, k)) for k in (50, 10)]  # 20 and 100 steps
    assert errors[1] < errors[0] and errors[1] < 0.05


def test_dpm_solver_2m_is_far_closer_than_ddim_at_equal_steps():
    for stride in (50, 25, 10):  # 20, 40, 100 steps
        ddim, dpm = float(exact_and_solved("ddim", stride)), float(exact_and_solved("dpm_solver_2m", stride))
        assert dpm < ddim / 10, (stride, ddim, dpm)
    ddim_100, ddim_200 = float(exact_and_solved("ddim", 10)), float(exact_and_solved("ddim", 5))
    assert 1.8 < ddim_100 / ddim_200 < 2.2  # DDIM is first order: half the step, half the error
    assert float(exact_and_solved("dpm_solver_2m", 5)) < float(exact_and_solved("dpm_solver_2m", 25)) / 5


def test_dpm_solver_composes_with_the_gaussian_start_and_keeps_centring():
    err = exact_and_solved("dpm_solver_2m", 11, start_step=550)
    assert err < 0.01
    torch.manual_seed(1)
    model = make_model(zero_center_h=True)
    node_mask = torch.ones(4, 6, 1, dtype=torch.float64)
    node_mask[0, 3:] = 0
    z = model.gaussian_start(4, 6, node_mask, 550, V).double()
    out = get_sampler("dpm_solver_2m").run(model, z, SamplingOptions("dpm_solver_2m", 550, 55).schedule(1000),
                                           node_mask, None, None)
    means = (out * node_mask).sum(1) / node_mask.sum(1)
    assert means.abs().max() < 1e-10 and (out * (1 - node_mask)).abs().max() == 0


@pytest.mark.parametrize("options, message", [
    (SamplingOptions("ddpm", None, 3), "the chain length T = 1000 is not a multiple of the sampling step size 3"),
    (SamplingOptions("ddim", 550, 4), r"start step \(T\*\) 550 is not a multiple of the sampling step size 4"),
    (SamplingOptions("ddpm", 1200, 1), r"start step \(T\*\) must be an integer in \[1, 1000\] \(the model's diffusion steps\), got 1200"),
    (SamplingOptions("ddpm", None, 0), "step size must be a positive integer, got 0"),
    (SamplingOptions("ddpm", 550, 1, float("nan")), "dataset variance .* finite positive number, got nan"),
    (SamplingOptions("ddpm", 550, 1, 0.0), "dataset variance .* positive number, got 0.0"),
    (SamplingOptions("heun"), "unknown sampler 'heun'"),
])
def test_options_are_validated_in_one_place(options, message):
    with pytest.raises(ValueError, match=message):
        options.validated(1000)


def test_schedule_runs_from_the_start_to_zero_with_the_stride():
    assert SamplingOptions("ddim", 550, 275).schedule(1000) == [(275, 550), (0, 275)]
    assert SamplingOptions().n_steps(1000) == 1000 and SamplingOptions("ddim", 550, 2).n_steps(1000) == 275


def readme_sampler_example() -> str:
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("**A new sampler**", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_sampler_example_registers_and_equals_ddim():
    import equivariant_diffusion.samplers as samplers

    from test_diffusion import chain_batch, small_chain_model

    exec(compile(readme_sampler_example(), "README.md", "exec"), {})  # noqa: S102 - our own README
    try:
        assert "my_ddim" in sampler_names()
        model = small_chain_model(zero_center_h=True)
        node_mask, edge_mask = chain_batch()
        outputs = []
        for name in ("ddim", "my_ddim"):
            torch.manual_seed(3)
            x, h = model.sample(node_mask.size(0), node_mask.size(1), node_mask, edge_mask, None,
                                start_step=10, dataset_var=0.848, step_size=2, sampler=name)
            outputs.append((x, h["categorical"]))
        assert torch.equal(outputs[0][0], outputs[1][0]) and torch.equal(outputs[0][1], outputs[1][1])
    finally:
        samplers._REGISTRY.pop("my_ddim", None)  # noqa: SLF001 - test cleanup
