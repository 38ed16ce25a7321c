"""Range checks of every training flag (main_qm9.py / main_geom_drugs.py), before any data or model.

Each failure is one ``UserInputError`` line naming the flag. The bounds on sizes (``--nf``,
``--n_layers``, ...) are far above any published run and keep a typo (or a hostile
``args.pickle``, see ``check_run_sizes``) from allocating without bound.
"""
from __future__ import annotations

import argparse

from configs.errors import RunFolderError, UserInputError
from configs.flags import Rule, at_least, check_choice, check_flags, check_plain_name, finite, parse_normalize_factors, positive

# Sizes that decide how much memory the model takes: bounded for safety (published runs: nf 256,
# 9 layers, 1000 steps).
MAX_NF = 4096
MAX_LAYERS = 64
MAX_SUBLAYERS = 16
MAX_DIFFUSION_STEPS = 100_000

SIZE_RULES: dict[str, Rule] = {
    "nf": at_least(1, high=MAX_NF),
    "n_layers": at_least(1, high=MAX_LAYERS),
    "inv_sublayers": at_least(1, high=MAX_SUBLAYERS),
    "diffusion_steps": at_least(1, high=MAX_DIFFUSION_STEPS),
    "latent_nf": at_least(1, optional=True, high=256),  # GeoLDM (training/latent_args.py); None = not GeoLDM
}

TRAINING_RULES: dict[str, Rule] = {
    **SIZE_RULES,
    "diffusion_noise_precision": Rule(float, 0, 1, low_open=True, high_open=True),
    "n_epochs": at_least(0),
    "batch_size": at_least(1, high=1_000_000),
    "lr": positive(),
    "norm_constant": at_least(0, float),
    "ode_regularization": at_least(0, float),
    "n_report_steps": at_least(1),
    "generate_epochs": at_least(1),
    "num_workers": at_least(0, high=256),
    "test_epochs": at_least(1),
    "start_epoch": at_least(0),
    "ema_decay": Rule(float, 0, 1, high_open=True),
    "augment_noise": at_least(0, float),
    "n_stability_samples": at_least(0, high=10_000_000),
    "visualize_every_batch": at_least(0),
    "normalization_factor": positive(),
    "filter_n_atoms": at_least(1, optional=True),
    "filter_molecule_size": at_least(1, optional=True),
    "conformations": at_least(1, optional=True),
    "max_t": at_least(1, optional=True),
    "dataset_var": positive(optional=True),
    "sampling_step_size": at_least(1),
    "seed": at_least(0, high=2**32 - 1),  # numpy's seed range
    "data_subset": at_least(1, optional=True),
    "checkpoint_every_steps": at_least(0),
    "nan_patience": at_least(1),
    "stop_after_steps": at_least(1, optional=True),
}


def known_noise_schedules_ok(name: str, precision: float, loss_type: str = "vlb") -> None:
    """One line unless ``name`` is a schedule the diffusion can build (cosine, polynomial_<p>, learned)."""
    from equivariant_diffusion import noise_schedule

    if name == "learned":
        if loss_type != "vlb":
            raise UserInputError(
                "--diffusion_noise_schedule learned is trained through the VLB: add --diffusion_loss_type vlb "
                "(or use --diffusion_noise_schedule polynomial_2 with l2, as every published run does)"
            )
        return
    try:
        noise_schedule.alphas2_for(str(name), 4, float(precision))
    except (ValueError, TypeError) as e:
        raise UserInputError(f"--diffusion_noise_schedule {name!r}: {e}; use polynomial_2 or cosine") from None


def known_models() -> tuple[str, ...]:
    """The --model names get_model can build (the backbone registry)."""
    from egnn.registry import backbone_names

    return backbone_names()


def check_training_flags(args: argparse.Namespace) -> None:
    """Every training flag on its own (types were checked by argparse): ranges, names, files."""
    check_flags(args, TRAINING_RULES)
    if not args.resume:
        check_plain_name("--exp_name", args.exp_name)
    if getattr(args, "overwrite", False) and args.resume:
        raise UserInputError("--overwrite and --resume contradict each other: --resume continues the run, --overwrite replaces it")
    parse_normalize_factors(args.normalize_factors)
    check_choice("diffusion_loss_type", args.diffusion_loss_type, ("l2", "vlb"))
    check_choice("aggregation_method", args.aggregation_method, ("sum", "mean"))
    check_choice("model", args.model, known_models())
    from configs.datasets_config import get_dataset_info

    try:
        get_dataset_info(args.dataset, args.remove_h)
    except ValueError as e:
        raise UserInputError(f"--dataset: {e}") from None
    for name in ("datadir", "output_root"):
        if not str(getattr(args, name, "x")).strip():
            raise UserInputError(f"--{name} must not be empty")


def check_buildable(args: argparse.Namespace) -> None:
    """What only matters once a model is built (so parse_args alone accepts EDM's defaults): the schedule."""
    known_noise_schedules_ok(args.diffusion_noise_schedule, args.diffusion_noise_precision, args.diffusion_loss_type)


def check_run_sizes(args: argparse.Namespace, source: str) -> None:
    """The sizes a run folder's args.pickle asks for, bounded before a model is built from them."""
    for name, rule in SIZE_RULES.items():
        value = getattr(args, name, None)
        if value is not None and not rule.accepts(value):
            raise RunFolderError(f"{source}: {name}={value!r} is out of range ({rule.describe()}); refusing to build that model")
