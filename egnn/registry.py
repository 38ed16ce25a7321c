"""Backbones by ``--model`` name: ``qm9.models.get_model`` builds the one a run names.

A builder takes the run's args (an argparse.Namespace, possibly from an old args.pickle, so
read optional fields with getattr and a default) and a ``BackboneSpec``, and returns a module
satisfying ``egnn.backbone.Backbone``. To add one::

    from egnn.registry import register_backbone

    @register_backbone("my_dynamics")
    def build_my_dynamics(args, spec):
        return MyDynamics(spec.in_node_nf + int(spec.condition_time), spec.n_dims, args.nf)

and import the module that registers it before parsing flags (``--model my_dynamics``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from egnn.backbone import check_backbone
from egnn.device_policy import normalise_group_by_size
from egnn.egnn_new import set_impl
from egnn.gnn import GNN_dynamics_QM9
from egnn.models import EGNN_dynamics_QM9


@dataclass(frozen=True)
class BackboneSpec:
    """What the diffusion model needs from a backbone, decided by the dataset and the run."""

    in_node_nf: int  # feature channels F of z = [x | h] (atom types + charge), without time
    context_node_nf: int  # conditioning channels (0 without conditioning)
    n_dims: int  # position channels (3)
    condition_time: bool  # the network gets t as an extra feature channel
    device: str | torch.device


BackboneBuilder = Callable[[Any, BackboneSpec], nn.Module]
_BACKBONES: dict[str, BackboneBuilder] = {}


def register_backbone(name: str) -> Callable[[BackboneBuilder], BackboneBuilder]:
    """Decorator: make ``builder`` the backbone of ``--model name``."""

    def decorate(builder: BackboneBuilder) -> BackboneBuilder:
        if name in _BACKBONES and _BACKBONES[name] is not builder:
            raise ValueError(f"a backbone named {name!r} is already registered")
        _BACKBONES[name] = builder
        return builder

    return decorate


def backbone_names() -> tuple[str, ...]:
    return tuple(_BACKBONES)


def build_backbone(name: str, args: Any, spec: BackboneSpec) -> nn.Module:
    """The registered backbone ``name`` built for ``args``; one-line ValueError for unknown names."""
    if name not in _BACKBONES:
        raise ValueError(f"unknown --model {name!r}; choose one of {', '.join(_BACKBONES)}")
    return check_backbone(_BACKBONES[name](args, spec))


def _dynamics_in_node_nf(spec: BackboneSpec) -> int:
    return spec.in_node_nf + int(spec.condition_time)


@register_backbone("egnn_dynamics")
def build_egnn_dynamics(args: Any, spec: BackboneSpec) -> nn.Module:
    """EDM's EGNN_dynamics_QM9 (E(3)-equivariant); ``--egnn_impl`` picks the fast or reference path."""
    dynamics = EGNN_dynamics_QM9(
        in_node_nf=_dynamics_in_node_nf(spec),
        context_node_nf=spec.context_node_nf,
        n_dims=spec.n_dims,
        device=spec.device,
        hidden_nf=args.nf,
        act_fn=torch.nn.SiLU(),
        n_layers=args.n_layers,
        attention=getattr(args, "attention", True),
        condition_time=spec.condition_time,
        tanh=getattr(args, "tanh", True),
        norm_constant=getattr(args, "norm_constant", 1),
        inv_sublayers=getattr(args, "inv_sublayers", 1),
        sin_embedding=getattr(args, "sin_embedding", False),
        normalization_factor=getattr(args, "normalization_factor", 1),
        aggregation_method=getattr(args, "aggregation_method", "sum"),
        group_by_size=normalise_group_by_size(getattr(args, "group_by_size", "auto")),
        compile_backend=(getattr(args, "compile_backend", None) or "inductor") if getattr(args, "compile", False) else None,
    )
    set_impl(dynamics, getattr(args, "egnn_impl", "fast"))  # runs saved before the flag: fast
    return dynamics


@register_backbone("gnn_dynamics")
def build_gnn_dynamics(args: Any, spec: BackboneSpec) -> nn.Module:
    """EDM's non-equivariant baseline (mode 'gnn_dynamics')."""
    return GNN_dynamics_QM9(
        in_node_nf=_dynamics_in_node_nf(spec),
        context_node_nf=spec.context_node_nf,
        n_dims=spec.n_dims,
        device=spec.device,
        hidden_nf=args.nf,
        act_fn=torch.nn.SiLU(),
        n_layers=args.n_layers,
        attention=getattr(args, "attention", True),
        condition_time=spec.condition_time,
        normalization_factor=getattr(args, "normalization_factor", 1),
        aggregation_method=getattr(args, "aggregation_method", "sum"),
        impl=getattr(args, "egnn_impl", "fast"),
    )
