"""Training and loading GeoLDM runs (``--train_diffusion`` / VAE-only) with EDM's training loop.

``build_run_model`` is the one dispatch from a run's args to its model (EDM's ``get_model``,
GeoLDM's ``get_latent_diffusion`` or ``get_autoencoder``, see ``training.latent_args``);
``LatentTrainer`` is ``training.trainer.Trainer`` with that builder, so a GeoLDM run gets the
EDM run's EMA, adaptive clipping, NaN guard, device policy, atomic checkpoints with GeoLDM's
key names (``generative_model[_ema].npy`` = the model's flat state_dict: ``vae.*``,
``dynamics.*``, ``gamma.gamma``, ``buffer``; a VAE-only run ``encoder.*``, ``decoder.*``,
``buffer``) and the bit-identical ``--resume``.

The objective is GeoLDM's released one (``EnLatentDiffusion.forward``, ``EnHierarchicalVAE.forward``):
``qm9.losses.compute_loss_and_nll`` subtracts log p(N) and averages over the batch, as GeoLDM.

Deliberate differences from GeoLDM's scripts (none changes trained weights):
* a VAE-only run never samples (no stability check, no pictures), on GEOM too (GeoLDM's
  main_geom_drugs.py crashes there);
* the validation/test "NLL" counts k (latent_nf) degrees of freedom per atom in the constant
  of -log p(z_h | z_0) instead of 3 (``fix_eval_constants``); it shifts every evaluation by the
  same n_b * (k - 3) * (-log sigma_0 - log(2 pi)/2), so the best-model choice is unchanged;
* the encoder of a latent diffusion is marked not trainable (``freeze_encoder``): the same
  training (it never gets a gradient), but DDP works and the EMA does not drift it;
* the device is the run's (``--no-cuda`` / the device policy), never the first stage's pickled
  ``cuda`` flag; ``--resume`` reads ``resume_state.pt`` (or a published folder's best-model
  files), not GeoLDM's never-written ``flow.npy``.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from configs.datasets_config import get_dataset_info
from configs.errors import DataError, RunFolderError
from egnn.device_policy import configure_matmul
from equivariant_diffusion.latent_diffusion import EnLatentDiffusion
from training.data import build_loaders
from training.distributed import DistContext
from training.latent_args import check_samplable, latent_kind  # noqa: F401 - check_samplable: public here too
from training.trainer import Trainer, seed_everything

__all__ = ["LatentTrainer", "build_run_model", "check_samplable", "fix_eval_constants", "freeze_encoder", "trainer_class"]


def fix_eval_constants(model: torch.nn.Module) -> torch.nn.Module:
    """Count k (not GeoLDM's 3) dof per atom in the eval-mode constant of the latent h (see module doc)."""
    if hasattr(model, "vae") and hasattr(model, "h_constants_dof"):
        model.h_constants_dof = int(model.vae.latent_node_nf)
    return model


def build_run_model(args: argparse.Namespace, device: torch.device | str, dataset_info: dict, dataloader_train=None):
    """(model, nodes_dist, prop_dist) of a run: EDM's get_model, GeoLDM's latent diffusion or its VAE.

    The builders are looked up on ``qm9.models`` at call time (one patch point for tests).
    """
    import qm9.models as models

    kind = latent_kind(args)
    if kind == "edm":
        return models.get_model(args, device, dataset_info, dataloader_train)
    if kind == "vae":
        return models.get_autoencoder(args, device, dataset_info, dataloader_train)
    try:
        model, nodes_dist, prop_dist = models.get_latent_diffusion(args, device, dataset_info, dataloader_train)
    except RunFolderError as e:
        if not getattr(args, "ae_path", None):
            raise
        # The first stage's architecture is read from --ae_path even when the run's own weights follow.
        raise RunFolderError(f"the run's first stage (ae_path {args.ae_path}) cannot be read: {e}") from None
    return fix_eval_constants(model), nodes_dist, prop_dist


def freeze_encoder(model: torch.nn.Module) -> torch.nn.Module:
    """Mark the latent diffusion's encoder as not trainable (it never gets a gradient: z_0 is detached).

    Training is unchanged (GeoLDM's AdamW skips parameters without a gradient); but DDP needs
    every trainable parameter in the graph (else it stops at the second step), and the EMA then
    copies the encoder instead of averaging it with itself (GeoLDM's EMA drifts it by float32
    rounding, geoldm_architecture.md section 8; the raw weights are identical)."""
    if isinstance(model, EnLatentDiffusion):
        model.vae.encoder.requires_grad_(False)
    return model


def trainer_class(args: argparse.Namespace, default: type[Trainer] = Trainer) -> type[Trainer]:
    """LatentTrainer for GeoLDM runs when the caller did not choose its own Trainer subclass."""
    return LatentTrainer if default is Trainer and latent_kind(args) != "edm" else default


class LatentTrainer(Trainer):
    """EDM's Trainer on GeoLDM's models (latent diffusion or VAE-only)."""

    @property
    def vae_only(self) -> bool:
        return latent_kind(self.args) == "vae"

    @classmethod
    def build(cls, args: argparse.Namespace, ctx: DistContext, run_dir: Path) -> "LatentTrainer":
        """Trainer.build with ``build_run_model`` (one-line DataError for a bad dataset or size)."""
        from qm9.dataset import retrieve_dataloaders

        args.cuda = ctx.device.type == "cuda"
        configure_matmul(ctx.device, bool(getattr(args, "tf32", False)))
        args.context_node_nf = 0
        seed_everything(args.seed)
        try:
            dataset_info = get_dataset_info(args.dataset, args.remove_h)
            dataloaders, _charge_scale = retrieve_dataloaders(args)
            loaders = build_loaders(dataloaders, args, ctx.rank, ctx.world_size)
            model, nodes_dist, prop_dist = build_run_model(args, ctx.device, dataset_info, loaders["train"])
        except (DataError, RunFolderError):
            raise
        except ValueError as e:
            raise DataError(" ".join(str(e).split())) from None
        freeze_encoder(model)
        return cls(args, ctx, model.to(ctx.device), nodes_dist, run_dir=run_dir, loaders=loaders,
                   dataset_info=dataset_info, prop_dist=prop_dist)

    def start(self) -> None:
        super().start()
        if self.vae_only:
            self.visualize_fn = None  # GeoLDM: pictures only when train_diffusion

    def validate(self, epoch: int, train_nll: float, epoch_seconds: float) -> None:
        """EDM's validation; a VAE-only run skips the stability check (it cannot sample)."""
        if not self.vae_only:
            return super().validate(epoch, train_nll, epoch_seconds)
        kept = self.args.n_stability_samples
        self.args.n_stability_samples = 0  # analyze_and_save returns None for 0 samples
        try:
            super().validate(epoch, train_nll, epoch_seconds)
        finally:
            self.args.n_stability_samples = kept
        self.stability = None

    def summary(self) -> dict[str, Any]:
        out = super().summary()
        out["kind"] = latent_kind(self.args)
        return out


def latent_report(args: argparse.Namespace) -> str:
    """One line naming the kind of GeoLDM run (for logs)."""
    kind = latent_kind(args)
    if kind == "edm":
        return "EDM"
    parts = [f"latent_nf={args.latent_nf}"]
    if kind == "geoldm":
        parts += [f"trainable_ae={bool(args.trainable_ae)}", f"ae_path={args.ae_path}"]
    else:
        parts += [f"kl_weight={args.kl_weight}"]
    return ("GeoLDM latent diffusion" if kind == "geoldm" else "GeoLDM VAE-only") + " (" + ", ".join(parts) + ")"
