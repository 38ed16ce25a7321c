"""Build the generative model from a run's args (EDM's ``get_model``) and load its weights.

``args`` may be a legacy EDM or GAGA ``args.pickle`` namespace: every field this module reads
beyond EDM's has a default. The GAGA mode (``zero_center_h``) is read from the run when it
records it; legacy runs do not, and are told apart by the ``max_t`` option that only the
GAGA fork's command line has.
"""
from __future__ import annotations

import argparse
import copy
import os
from typing import Any

import torch

from configs.errors import CheckpointError, safe_load_reason
from configs.run_args import infer_zero_center_h, load_run_args
from egnn.latent import EGNN_decoder_QM9, EGNN_encoder_QM9, select_impl
from egnn.registry import BackboneSpec, build_backbone
from equivariant_diffusion.distributions import DistributionNodes
from equivariant_diffusion.en_diffusion import EnVariationalDiffusion
from equivariant_diffusion.latent_diffusion import EnHierarchicalVAE, EnLatentDiffusion
from qm9.utils import DistributionProperty


def _with_overrides(args: Any, overrides: dict[str, Any]) -> Any:
    if not overrides:
        return args
    merged = copy.copy(args) if not isinstance(args, dict) else argparse.Namespace(**args)
    for key, value in overrides.items():
        setattr(merged, key, value)
    return merged


def diffusion_kwargs(args: Any) -> dict[str, Any]:
    """The diffusion process's settings from a run's args (EDM's defaults for missing fields),
    shared by EDM's and GeoLDM's builders."""
    return dict(
        timesteps=getattr(args, "diffusion_steps", 1000),
        noise_schedule=getattr(args, "diffusion_noise_schedule", "polynomial_2"),
        noise_precision=getattr(args, "diffusion_noise_precision", 1e-5),
        loss_type=getattr(args, "diffusion_loss_type", "l2"),
        norm_values=getattr(args, "normalize_factors", [1, 4, 10]),
        include_charges=bool(getattr(args, "include_charges", True)),
        max_t=getattr(args, "max_t", None),
    )


def get_model(args: Any, device: str | torch.device, dataset_info: dict, dataloader_train=None, **overrides):
    """(model, nodes_dist, prop_dist) as in EDM; ``overrides`` replace fields of ``args``.

    The network is the backbone registered under ``args.model`` (``egnn.registry``).
    Extra fields understood (all optional): ``max_t`` (None -> T), ``zero_center_h``
    (None -> inferred, see ``infer_zero_center_h``), ``group_by_size`` ('auto' (default, also for
    runs from before the flag), 'true', 'false' or a bool; see ``egnn.device_policy``),
    ``compile`` (True: torch.compile the network with ``compile_backend``, default 'inductor') and
    ``egnn_impl`` ('fast' default, or 'reference').
    With ``args.conditioning`` (property names), the network gets one context channel per
    property and ``prop_dist`` is a ``DistributionProperty`` built from ``dataloader_train``
    (None without a loader: the model then trains and scores given contexts but cannot draw them).
    """
    if isinstance(args, dict):
        args = argparse.Namespace(**args)
    args = _with_overrides(args, overrides)
    conditioning = list(getattr(args, "conditioning", None) or [])
    context_node_nf = int(getattr(args, "context_node_nf", 0) or 0)
    if conditioning and not context_node_nf:
        context_node_nf = len(conditioning)  # EDM stores it in args; older namespaces may lack it
    if context_node_nf != len(conditioning):
        raise ValueError(
            f"context_node_nf = {context_node_nf} does not match the {len(conditioning)} conditioning "
            f"propert{'y' if len(conditioning) == 1 else 'ies'} {conditioning}; one context channel per property"
        )
    probabilistic_model = getattr(args, "probabilistic_model", "diffusion")
    if probabilistic_model != "diffusion":
        raise ValueError(f"unsupported probabilistic_model {probabilistic_model!r}; only 'diffusion' exists")

    include_charges = bool(getattr(args, "include_charges", True))
    histogram = dataset_info["n_nodes"]
    in_node_nf = len(dataset_info["atom_decoder"]) + int(include_charges)
    nodes_dist = DistributionNodes(histogram)
    prop_dist = None
    if conditioning and dataloader_train is not None:
        # p(c | N) from the generator's training split; the caller attaches mean/MAD (set_normalizer).
        prop_dist = DistributionProperty(dataloader_train, conditioning)

    spec = BackboneSpec(
        in_node_nf=in_node_nf,
        context_node_nf=context_node_nf,
        n_dims=3,
        condition_time=bool(getattr(args, "condition_time", True)),
        device=device,
    )
    net_dynamics = build_backbone(getattr(args, "model", "egnn_dynamics"), args, spec)
    zero_center_h = infer_zero_center_h(args)
    vdm = EnVariationalDiffusion(
        dynamics=net_dynamics,
        in_node_nf=in_node_nf,
        n_dims=3,
        zero_center_h=zero_center_h,
        **diffusion_kwargs(args),
    )
    return vdm.to(device), nodes_dist, prop_dist


def _check_geoldm_args(args: Any) -> None:
    if getattr(args, "conditioning", None):
        raise ValueError(
            f"conditioning on properties {list(args.conditioning)} is not supported by this re-implementation; "
            "train and sample GeoLDM without --conditioning"
        )
    model_name = getattr(args, "model", "egnn_dynamics")
    if model_name != "egnn_dynamics":
        raise ValueError(f"GeoLDM's autoencoder needs --model egnn_dynamics, got {model_name!r}")
    latent_nf = getattr(args, "latent_nf", 4)
    if isinstance(latent_nf, bool) or int(latent_nf) != latent_nf or latent_nf < 1:
        raise ValueError(f"--latent_nf must be a positive integer (GeoLDM: 1 on QM9, 2 on GEOM), got {latent_nf!r}")


def get_autoencoder(args: Any, device: str | torch.device, dataset_info: dict, dataloader_train=None, **overrides):
    """(EnHierarchicalVAE, nodes_dist, prop_dist): GeoLDM's first stage built from a run's args.

    The encoder has one EquivariantBlock whatever ``n_layers`` is (as in GeoLDM), the decoder
    ``n_layers``; both use the run's EGNN settings and ``latent_nf`` (GeoLDM's default 4).
    """
    if isinstance(args, dict):
        args = argparse.Namespace(**args)
    args = _with_overrides(args, overrides)
    _check_geoldm_args(args)
    include_charges = bool(getattr(args, "include_charges", True))
    in_node_nf = len(dataset_info["atom_decoder"]) + int(include_charges)
    latent_nf = int(getattr(args, "latent_nf", 4))
    nodes_dist = DistributionNodes(dataset_info["n_nodes"])
    prop_dist = None
    context_node_nf = int(getattr(args, "context_node_nf", 0) or 0)
    common = dict(
        context_node_nf=context_node_nf, n_dims=3, hidden_nf=args.nf, device=device, act_fn=torch.nn.SiLU(),
        attention=getattr(args, "attention", True), tanh=getattr(args, "tanh", True),
        mode=getattr(args, "model", "egnn_dynamics"), norm_constant=getattr(args, "norm_constant", 1),
        inv_sublayers=getattr(args, "inv_sublayers", 1), sin_embedding=getattr(args, "sin_embedding", False),
        normalization_factor=getattr(args, "normalization_factor", 1),
        aggregation_method=getattr(args, "aggregation_method", "sum"), include_charges=include_charges,
        group_by_size=getattr(args, "group_by_size", "auto"),  # the device policy, as for the dynamics
    )
    # Construction order = GeoLDM's (encoder, then decoder): same init for the same seed.
    encoder = EGNN_encoder_QM9(in_node_nf=in_node_nf, out_node_nf=latent_nf, n_layers=1, **common)
    decoder = EGNN_decoder_QM9(in_node_nf=latent_nf, out_node_nf=in_node_nf, n_layers=args.n_layers, **common)
    impl = getattr(args, "egnn_impl", "fast")
    vae = EnHierarchicalVAE(
        encoder=select_impl(encoder, impl), decoder=select_impl(decoder, impl), in_node_nf=in_node_nf, n_dims=3,
        latent_node_nf=latent_nf, kl_weight=getattr(args, "kl_weight", 0.01),
        norm_values=getattr(args, "normalize_factors", [1, 4, 10]), include_charges=include_charges,
    )
    return vae.to(device), nodes_dist, prop_dist


def get_latent_diffusion(args: Any, device: str | torch.device, dataset_info: dict, dataloader_train=None):
    """(EnLatentDiffusion, nodes_dist, prop_dist): GeoLDM's model built from a run's args.

    With ``args.ae_path`` the first stage's architecture comes from ``<ae_path>/args.pickle`` and
    its weights from ``generative_model_ema.npy`` (``generative_model.npy`` without EMA), loaded
    strictly; ``args.latent_nf`` is then set to the first stage's (as GeoLDM does). Unlike
    GeoLDM, ``device`` is never overridden by the pickled ``cuda`` flag of the first stage.
    The dynamics is the backbone registered under ``args.model`` on k latent channels.
    """
    if isinstance(args, dict):
        args = argparse.Namespace(**args)
    ae_path = getattr(args, "ae_path", None)
    first_stage_args = load_run_args(ae_path) if ae_path else args
    for field, default in (("normalization_factor", 1), ("aggregation_method", "sum")):
        if not hasattr(first_stage_args, field):
            setattr(first_stage_args, field, default)
    vae, nodes_dist, prop_dist = get_autoencoder(first_stage_args, device, dataset_info, dataloader_train)
    if ae_path:
        ema = float(getattr(first_stage_args, "ema_decay", 0) or 0) > 0
        weights = os.path.join(ae_path, "generative_model_ema.npy" if ema else "generative_model.npy")
        load_generative_model(vae, weights, first_stage_args)
    args.latent_nf = vae.latent_node_nf

    spec = BackboneSpec(
        in_node_nf=vae.latent_node_nf,
        context_node_nf=int(getattr(args, "context_node_nf", 0) or 0),
        n_dims=3,
        condition_time=bool(getattr(args, "condition_time", True)),
        device=device,
    )
    dynamics = build_backbone(getattr(args, "model", "egnn_dynamics"), args, spec)
    model = EnLatentDiffusion(
        vae=vae,
        trainable_ae=bool(getattr(args, "trainable_ae", False)),
        dynamics=dynamics,
        in_node_nf=vae.latent_node_nf,
        n_dims=3,
        **diffusion_kwargs(args),
    )
    return model.to(device), nodes_dist, prop_dist


def describe_run(args: Any) -> str:
    """One-line summary of the fields that decide the parameter shapes."""
    fields = ("model", "diffusion_noise_schedule", "nf", "n_layers", "inv_sublayers", "include_charges", "sin_embedding", "context_node_nf",
              "condition_time", "remove_h", "dataset", "max_t", "latent_nf")
    parts = [f"{f}={getattr(args, f)!r}" for f in fields if hasattr(args, f)]
    parts.append(f"zero_center_h={infer_zero_center_h(args)!r}")
    return ", ".join(parts)


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """torch.load(weights_only=True) of a state dict, with one-line errors naming the file."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {os.fspath(path)} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # any unpickling/zip/format failure means the file is unusable
        raise CheckpointError(
            f"cannot read checkpoint {os.fspath(path)} ({type(error).__name__}: {safe_load_reason(error)})"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"checkpoint {os.fspath(path)} does not hold a state dict of tensors")
    # Weights saved from an nn.DataParallel wrapper carry a 'module.' prefix.
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def check_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor], where: str, run_description: str) -> None:
    """Raise a one-line CheckpointError at the first missing, unexpected or mis-shaped key."""
    expected = model.state_dict()
    problems = []
    for key, tensor in expected.items():
        if key not in state:
            problems.append(f"missing key {key} (shape {tuple(tensor.shape)})")
        elif tuple(state[key].shape) != tuple(tensor.shape):
            problems.append(
                f"key {key} has shape {tuple(state[key].shape)}, the model expects {tuple(tensor.shape)}"
            )
    problems += [f"unexpected key {key}" for key in state if key not in expected]
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise CheckpointError(
            f"checkpoint {where} does not fit the model built from the run config ({run_description}): "
            f"{problems[0]}{more}"
        )


def load_generative_model(model: torch.nn.Module, path: str | os.PathLike, run_description: Any = "") -> torch.nn.Module:
    """Load weights strictly into ``model``; ``run_description`` is a string or the run's args."""
    if not isinstance(run_description, str):
        run_description = describe_run(run_description)
    state = read_state_dict(path)
    check_state_dict(model, state, os.fspath(path), run_description)
    model.load_state_dict(state, strict=True)
    return model
