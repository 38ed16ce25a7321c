"""The backbone contract (egnn/backbone.py) and registry (egnn/registry.py): every registered
backbone passes the checks that apply to it, the diffusion centres what a backbone does not,
and the README's "Extending" example works as written."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.testing import assert_close

import edm_fixtures as ef
from configs.datasets_config import get_dataset_info
from egnn.backbone import Backbone
from egnn.registry import backbone_names, build_backbone, register_backbone
from equivariant_diffusion.en_diffusion import EnVariationalDiffusion
from qm9.models import get_model

torch.set_num_threads(1)

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_example() -> str:
    section = README.read_text().split("## Extending", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


# Registering the README's example here makes it one of "every registered backbone" below.
exec(compile(readme_example(), str(README), "exec"), {})  # noqa: S102 - our own README


@pytest.fixture(scope="module", autouse=True)
def _forget_the_example_afterwards():
    """The example is registered at collection; other test modules must see the real registry."""
    yield
    import egnn.registry

    egnn.registry._BACKBONES.pop("atom_mlp", None)  # noqa: SLF001 - test cleanup


def build(name: str, zero_center_h: bool = False):
    torch.manual_seed(0)
    args = ef.args_of("edm", model=name, nf=16, n_layers=2, zero_center_h=zero_center_h)
    model, _, _ = get_model(args, "cpu", get_dataset_info("qm9", False), None)
    with torch.no_grad():  # make EGNN coordinate heads matter (EDM initialises them near zero)
        for module in model.modules():
            if hasattr(module, "coord_mlp"):
                module.coord_mlp[4].weight.normal_(0, 0.05)
    return model


def batch(seed: int = 0, sizes=(6, 3, 5), n_nodes: int = 7):
    generator = torch.Generator().manual_seed(seed)
    node_mask = torch.zeros(len(sizes), n_nodes, 1)
    for b, size in enumerate(sizes):
        node_mask[b, :size] = 1
    x = torch.randn(len(sizes), n_nodes, 3, generator=generator) * node_mask
    x = x - x.sum(1, keepdim=True) / node_mask.sum(1, keepdim=True) * node_mask
    h = torch.randn(len(sizes), n_nodes, 6, generator=generator) * node_mask
    return torch.cat([x, h], dim=2), torch.rand(len(sizes), 1, generator=generator), node_mask


def edges(node_mask: torch.Tensor) -> torch.Tensor:
    m = node_mask.squeeze(2)
    return (m.unsqueeze(2) * m.unsqueeze(1) * (1 - torch.eye(m.shape[1]))).reshape(-1, 1)


def test_registry_holds_edms_backbones_and_the_readme_example():
    assert {"egnn_dynamics", "gnn_dynamics", "atom_mlp"} <= set(backbone_names())
    with pytest.raises(ValueError, match="unknown --model 'transformer'; choose one of egnn_dynamics"):
        build_backbone("transformer", None, None)
    with pytest.raises(ValueError, match="already registered"):
        register_backbone("egnn_dynamics")(lambda args, spec: None)


@pytest.mark.parametrize("name", backbone_names())
def test_backbone_contract_shape_masking_and_centring(name):
    model = build(name)
    net = model.dynamics
    assert isinstance(net, Backbone) and net.n_dims == 3
    z, t, node_mask = batch()
    with torch.no_grad():
        out = net(t, z, node_mask, edges(node_mask), None)
        eps = model.phi(z, t, node_mask, edges(node_mask), None)
    assert out.shape == z.shape and eps.shape == z.shape
    assert torch.equal(eps * (1 - node_mask), torch.zeros_like(eps))
    if net.centres_positions:
        assert out[..., :3].sum(1).abs().max() < 1e-5
        assert torch.equal(eps, out)  # nothing left for the diffusion to do
    assert eps[..., :3].sum(1).abs().max() < 1e-5  # phi's positions are always centred
    assert eps[..., 3:].sum(1).abs().max() > 1e-3  # features only in GAGA mode (below)
    gaga = build(name, zero_center_h=True)
    with torch.no_grad():
        eps_gaga = gaga.phi(z, t, node_mask, edges(node_mask), None)
    assert eps_gaga.sum(1).abs().max() < 1e-5


@pytest.mark.parametrize("name", backbone_names())
def test_backbone_is_permutation_equivariant(name):
    net = build(name).dynamics
    z, t, node_mask = batch(1)
    generator = torch.Generator().manual_seed(2)
    perm = torch.stack([torch.randperm(z.shape[1], generator=generator) for _ in range(z.shape[0])])
    rows = torch.arange(z.shape[0]).unsqueeze(1)
    with torch.no_grad():
        out = net(t, z, node_mask, edges(node_mask), None)
        out_p = net(t, z[rows, perm], node_mask[rows, perm], edges(node_mask[rows, perm]), None)
    assert_close(out_p, out[rows, perm], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", backbone_names())
def test_backbone_rotation_behaviour_is_as_declared(name):
    net = build(name).dynamics
    z, t, node_mask = batch(2)
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(4)))
    z_rot = torch.cat([z[..., :3] @ q.T, z[..., 3:]], dim=2)
    with torch.no_grad():
        out = net(t, z, node_mask, edges(node_mask), None)
        out_rot = net(t, z_rot, node_mask, edges(node_mask), None)
    expected = torch.cat([out[..., :3] @ q.T, out[..., 3:]], dim=2)
    assert out[..., :3].abs().max() > 1e-2
    if net.rotation_equivariant:
        assert_close(out_rot, expected, atol=1e-5, rtol=1e-5)
    else:  # the declaration is honest: a non-equivariant network does change
        assert (out_rot - expected).abs().max() > 1e-4


def test_readme_backbone_trains_through_the_diffusion():
    model = build("atom_mlp")
    z, t, node_mask = batch(3)
    x, one_hot = z[..., :3], (z[..., 3:8] > 0).float() * node_mask
    h = {"categorical": one_hot, "integer": torch.ones_like(one_hot[..., :1]) * node_mask}
    model.train()
    loss = model(x, h, node_mask, edges(node_mask).view(x.shape[0], -1)).mean()
    loss.backward()
    assert torch.isfinite(loss) and model.dynamics.mlp[0].weight.grad.abs().sum() > 0


def test_a_module_without_the_contract_is_refused_with_one_line():
    with pytest.raises(TypeError, match="missing attribute.*centres_positions.*egnn/backbone.py"):
        EnVariationalDiffusion(dynamics=nn.Linear(3, 3), in_node_nf=6)
