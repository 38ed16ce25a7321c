"""GeoLDM's command-line flags on main_qm9.py / main_geom_drugs.py, and what kind of run they ask for.

GeoLDM (Xu et al., ICML 2023) adds five flags to EDM's scripts: ``--train_diffusion``,
``--ae_path``, ``--trainable_ae``, ``--latent_nf`` (default 4) and ``--kl_weight`` (default
0.01). In GeoLDM's scripts a run *without* ``--train_diffusion`` trains the autoencoder alone
(the "first stage"). Here the same scripts must keep training EDM when none of these flags is
given, so the flags default to None ("not a GeoLDM run") and a run is:

* ``edm``: none of the five flags given (``args.train_diffusion`` is None; also every EDM or
  GAGA-fork ``args.pickle``, which lacks the field);
* ``geoldm``: ``--train_diffusion`` (GeoLDM's README commands): ``EnLatentDiffusion``;
* ``vae``: ``--train_diffusion False``, or ``--latent_nf`` / ``--kl_weight`` without
  ``--train_diffusion``: GeoLDM's first stage ``EnHierarchicalVAE`` alone.

A GeoLDM run records the resolved values (GeoLDM's defaults filled in) in ``args.pickle``;
GeoLDM's own pickles always carry ``train_diffusion`` as a bool, so they load as what they are.
Nothing here imports torch or builds a model: the checks run before any data is read.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from configs.errors import RunFolderError, UserInputError
from configs.flags import str2bool

# GeoLDM's parser defaults, applied once a run is a GeoLDM (or VAE-only) run.
GEOLDM_DEFAULTS: dict[str, Any] = dict(train_diffusion=False, trainable_ae=False, latent_nf=4, kl_weight=0.01, ae_path=None)
GEOLDM_FLAGS = tuple(GEOLDM_DEFAULTS)
MAX_LATENT_NF = 256  # published runs: 1 or 2; bounded like --nf (training/args_check.py SIZE_RULES holds the same bound)

__all__ = ["GEOLDM_DEFAULTS", "GEOLDM_FLAGS", "add_latent_flags", "check_samplable", "first_stage_weights", "latent_kind",
           "resolve_latent_args"]


def add_latent_flags(p: argparse.ArgumentParser) -> None:
    """GeoLDM's five flags (defaults None: an EDM run unless one is given)."""
    a = p.add_argument
    a("--train_diffusion", type=str2bool, nargs="?", const=True, default=None,
      help="GeoLDM: train the latent diffusion (EnLatentDiffusion); --train_diffusion False trains the "
           "autoencoder alone (GeoLDM's first stage). Without any GeoLDM flag the run is EDM")
    a("--ae_path", type=str, default=None,
      help="GeoLDM: a VAE-only run folder whose autoencoder (architecture and weights) starts the latent diffusion")
    a("--trainable_ae", type=str2bool, nargs="?", const=True, default=None,
      help="GeoLDM: train the decoder jointly with the latent diffusion (the encoder stays at its init, as released)")
    a("--latent_nf", type=int, default=None, help="GeoLDM: latent channels per atom (GeoLDM's default 4; README 1 QM9, 2 GEOM)")
    a("--kl_weight", type=float, default=None, help="GeoLDM: weight of the VAE-only run's KL term (default 0.01)")


def latent_kind(args: argparse.Namespace | Any) -> str:
    """'edm', 'vae' (GeoLDM's first stage alone) or 'geoldm' (latent diffusion) for a run's args."""
    value = getattr(args, "train_diffusion", None)
    if value is None:
        return "edm"
    return "geoldm" if bool(value) else "vae"


def check_samplable(args: argparse.Namespace, where: str | Path) -> None:
    """A VAE-only run has no generative model to sample: one line saying what to do."""
    if latent_kind(args) == "vae":
        raise RunFolderError(
            f"{where} is a VAE-only GeoLDM run (the first stage: an autoencoder, nothing to sample); "
            f"train a latent diffusion on it with --train_diffusion --ae_path {where}"
        )


def first_stage_weights(ae_args: argparse.Namespace, ae_path: str | Path) -> Path:
    """The file GeoLDM loads the first stage from: the EMA weights if the VAE run kept an EMA."""
    ema = float(getattr(ae_args, "ema_decay", 0) or 0) > 0
    return Path(ae_path) / ("generative_model_ema.npy" if ema else "generative_model.npy")


def _check_ae_path(args: argparse.Namespace) -> None:
    """--ae_path names a readable VAE-only run of the same data whose layout fits this run."""
    from configs.run_args import load_run_args
    from training.args_check import check_run_sizes

    flag = f"--ae_path {args.ae_path}"
    try:
        ae_args = load_run_args(args.ae_path)
    except RunFolderError as e:
        raise RunFolderError(f"{flag}: {e}") from None
    check_run_sizes(ae_args, f"{flag}/args.pickle")
    kind = latent_kind(ae_args)
    if kind != "vae":
        what = "an EDM run" if kind == "edm" else "a latent diffusion run"
        raise RunFolderError(
            f"{flag} is {what}, not a VAE-only run; train the first stage with --train_diffusion False "
            "(or --latent_nf K) and pass that run folder"
        )
    for field in ("dataset", "remove_h", "include_charges"):
        mine, theirs = getattr(args, field, None), getattr(ae_args, field, None)
        if theirs is not None and mine != theirs:
            raise UserInputError(
                f"{flag} was trained with {field}={theirs!r} but this run has {field}={mine!r}; "
                f"use the same --{field} (the encoder reads the data as its run did)"
            )
    theirs_nf = getattr(ae_args, "latent_nf", GEOLDM_DEFAULTS["latent_nf"])
    if args.latent_nf is not None and int(args.latent_nf) != int(theirs_nf):
        raise UserInputError(
            f"--latent_nf {args.latent_nf} differs from the first stage's latent_nf {theirs_nf} ({flag}); "
            "drop --latent_nf (it is taken from the VAE run)"
        )
    args.latent_nf = int(theirs_nf)  # GeoLDM: the latent width is the first stage's
    weights = first_stage_weights(ae_args, args.ae_path)
    if not weights.is_file():
        raise RunFolderError(f"{flag} has no {weights.name} (the VAE run never saved a best model); train it for at least one test epoch")


def resolve_latent_args(args: argparse.Namespace) -> argparse.Namespace:
    """Decide edm / vae / geoldm, check GeoLDM's flags, fill GeoLDM's defaults (one-line errors).

    Call before ``zero_center_h`` is resolved: GeoLDM runs never centre the features
    (``auto`` becomes ``false``; ``true`` is refused).
    """
    given = [f for f in GEOLDM_FLAGS if getattr(args, f, None) is not None]
    if not given or getattr(args, "resume", None):
        return args  # --resume: the run's args.pickle decides; flags given again are compared with it
    td = args.train_diffusion
    if not td:
        if args.ae_path is not None:
            raise UserInputError(
                "--ae_path initialises the first stage of a latent diffusion run: add --train_diffusion"
            )
        if args.trainable_ae:
            raise UserInputError(
                "--trainable_ae trains the decoder jointly with the latent diffusion: add --train_diffusion "
                "(a VAE-only run trains the autoencoder anyway; drop the flag)"
            )
    if args.latent_nf is not None and not 1 <= args.latent_nf <= MAX_LATENT_NF:
        raise UserInputError(f"--latent_nf must be an integer >= 1 and <= {MAX_LATENT_NF}, got {args.latent_nf}")
    if args.kl_weight is not None and not (math.isfinite(args.kl_weight) and args.kl_weight >= 0):
        raise UserInputError(f"--kl_weight must be a finite number >= 0, got {args.kl_weight}")
    if getattr(args, "model", "egnn_dynamics") != "egnn_dynamics" and (not td or args.ae_path is None):
        raise UserInputError(f"GeoLDM's autoencoder is an EGNN: use --model egnn_dynamics, not {args.model!r}")
    if getattr(args, "conditioning", None):
        raise UserInputError("GeoLDM runs are unconditional here: drop --conditioning")
    choice = getattr(args, "zero_center_h", "auto")
    if choice is True or choice == "true":
        raise UserInputError(
            "--zero_center_h true: GeoLDM's latent diffusion does not centre features (its latent h is not a one-hot); "
            "drop the flag"
        )
    args.zero_center_h = "false" if isinstance(choice, str) else False
    if td and args.ae_path is not None:
        _check_ae_path(args)
    for field, default in GEOLDM_DEFAULTS.items():
        if getattr(args, field, None) is None:
            setattr(args, field, default)
    return args
