"""GeoLDM (Xu et al., ICML 2023): EDM's diffusion in the latent space of an equivariant autoencoder.

``EnHierarchicalVAE`` maps every atom (x in R^3, one-hot type, charge) to a latent point
(z_x in R^3, z_h in R^k) with ``egnn.latent.EGNN_encoder_QM9`` and back with
``EGNN_decoder_QM9``. ``EnLatentDiffusion`` is ``EnVariationalDiffusion`` on z = [z_x | z_h]
(F replaced by k): the loss estimator (``compute_loss``), the noise, the reverse steps and the
sampler registry (ddpm / ddim / dpm_solver_2m, GAGA's Gaussian start and ``max_t``) are the
parent's; this module only supplies the latent data, the t = 0 term and the decode.

The training objective is GeoLDM's released one, reproduced because published checkpoints were
trained with it (names as in ``geoldm_architecture.md``):

* the encoder is never trained: z_0 = [mu_x | mu_h] + sigma_0 * eps (sigma_0 the diffusion's
  sigma at t = 0) is detached before both losses, so the latent space is the encoder's
  initialisation stored in the checkpoint; the encoder's std heads are unused (sigma is the
  constant 0.0032 in ``encode``);
* no input normalisation on this path (raw one-hot and atomic numbers in, raw targets out);
  ``norm_values`` only feed the parent's construction check;
* the reconstruction error sums the cross-entropy over *all* B*N slots (each padded slot adds
  the constant log(num_classes)) and in training divides by (3 + F) * N with the padded N;
* the t = 0 term of the latent is a plain squared error of the noise over all 3 + k channels
  (no discretised likelihood), so the l2 training loss is the same expression for t in {0..T};
* the eval-mode constant -log p(h|z_0) counts 3 (= n_dims) degrees of freedom per atom, not k;
* the VAE-only loss (a run without ``--train_diffusion``) uses GeoLDM's "KL" with q_sigma = 1,
  i.e. 0.5 * ||mu||^2 over real atoms, weighted by ``kl_weight`` and not divided.

Deliberate differences from GeoLDM's code, none of which changes trained weights:

* ``decode`` without charges keeps every atom class (GeoLDM slices ``3:-1`` and can never
  decode the last class, Bi on GEOM-Drugs or F on a charge-free QM9 model);
* batch size 1 works (the parent's ``kl_prior`` does not squeeze the batch axis away);
* a frozen first stage (``trainable_ae=False``) stays in eval mode through ``train()`` by an
  override, not by replacing ``vae.train`` on the instance (so ``model.vae.train()`` works).
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from equivariant_diffusion import utils as diffusion_utils
from equivariant_diffusion.en_diffusion import EnVariationalDiffusion, gaussian_kl, gaussian_kl_for_dimension
from equivariant_diffusion.utils import sum_except_batch

# GeoLDM's encode() replaces the encoder's std heads by this constant.
ENCODER_FIXED_SIGMA = 0.0032


class EnHierarchicalVAE(nn.Module):
    """GeoLDM's E(n)-equivariant autoencoder (the "first stage").

    in_node_nf = F data channels (atom classes + charge), latent_node_nf = k.
    ``forward`` is the VAE-only training loss (B,), GeoLDM's first-stage objective.
    """

    def __init__(
        self,
        encoder: nn.Module,
        decoder: nn.Module,
        in_node_nf: int,
        n_dims: int = 3,
        latent_node_nf: int = 4,
        kl_weight: float = 0.01,
        norm_values: tuple[float, float, float] = (1.0, 4.0, 10.0),
        include_charges: bool = True,
    ):
        super().__init__()
        self.include_charges = bool(include_charges)
        self.encoder = encoder
        self.decoder = decoder
        self.in_node_nf = in_node_nf
        self.n_dims = n_dims
        self.latent_node_nf = latent_node_nf
        self.num_classes = in_node_nf - int(self.include_charges)
        self.kl_weight = kl_weight
        self.norm_values = norm_values  # stored like GeoLDM; never applied on this path
        self.register_buffer("buffer", torch.zeros(1))

    def _xh(self, x: torch.Tensor, h: dict) -> torch.Tensor:
        """[x | one-hot | charge (if include_charges)], raw scales."""
        parts = [x, h["categorical"]]
        if self.include_charges:
            parts.append(h["integer"])
        return torch.cat(parts, dim=2)

    def sample_combined_position_feature_noise(self, n_samples: int, n_nodes: int, node_mask: torch.Tensor) -> torch.Tensor:
        """Latent noise (B, N, 3 + k): x part centred per molecule, h part masked."""
        z_x = diffusion_utils.sample_center_gravity_zero_gaussian_with_mask(
            size=(n_samples, n_nodes, self.n_dims), device=node_mask.device, node_mask=node_mask
        )
        z_h = diffusion_utils.sample_gaussian_with_mask(
            size=(n_samples, n_nodes, self.latent_node_nf), device=node_mask.device, node_mask=node_mask
        )
        return torch.cat([z_x, z_h], dim=2)

    def encode(self, x, h, node_mask=None, edge_mask=None, context=None):
        """(mu_x (B,N,3), sigma_x (B,1,1), mu_h (B,N,k), sigma_h (B,1,k)); sigma = 0.0032 (GeoLDM)."""
        diffusion_utils.assert_mean_zero_with_mask(x, node_mask)
        mu_x, _, mu_h, _ = self.encoder(self._xh(x, h), node_mask, edge_mask, context)
        bs = x.size(0)
        sigma_x = torch.full((bs, 1, 1), ENCODER_FIXED_SIGMA, dtype=mu_x.dtype, device=mu_x.device)
        sigma_h = torch.full((bs, 1, self.latent_node_nf), ENCODER_FIXED_SIGMA, dtype=mu_x.dtype, device=mu_x.device)
        return mu_x, sigma_x, mu_h, sigma_h

    def decode(self, z_xh: torch.Tensor, node_mask=None, edge_mask=None, context=None):
        """Latent points -> (x (B,N,3) centred, {'categorical': one-hot, 'integer': charges}).

        One-hot = argmax over the class logits (all classes, also without charges);
        charges = rounded charge channel (B,N,1), or (B,N,0) without charges."""
        x, h_rec = self.decoder(z_xh, node_mask, edge_mask, context)
        diffusion_utils.assert_mean_zero_with_mask(x, node_mask)
        nc = self.num_classes
        one_hot = F.one_hot(torch.argmax(h_rec[:, :, :nc], dim=2), nc) * node_mask
        charges = torch.round(h_rec[:, :, nc : nc + int(self.include_charges)]).long() * node_mask
        return x, {"categorical": one_hot, "integer": charges}

    def compute_reconstruction_error(self, xh_rec: torch.Tensor, xh: torch.Tensor) -> torch.Tensor:
        """Per-molecule squared position error + cross-entropy over all B*N slots + squared
        charge error; in training divided by (3 + F) * N_padded (GeoLDM's objective)."""
        bs, n_nodes, dims = xh.shape
        nd, nc = self.n_dims, self.num_classes
        error_x = sum_except_batch((xh_rec[:, :, :nd] - xh[:, :, :nd]) ** 2)
        logits = xh_rec[:, :, nd : nd + nc].reshape(bs * n_nodes, nc)
        target = torch.argmax(xh[:, :, nd : nd + nc], dim=2).reshape(bs * n_nodes)
        error_h_cat = F.cross_entropy(logits, target, reduction="none").view(bs, n_nodes).sum(1)
        error = error_x + error_h_cat
        if self.include_charges:
            error = error + sum_except_batch((xh_rec[:, :, -1] - xh[:, :, -1]) ** 2)
        if self.training:
            error = error / ((self.n_dims + self.in_node_nf) * n_nodes)
        return error

    def compute_loss(self, x, h, node_mask, edge_mask, context):
        """VAE-only loss (B,) and its terms: recon + kl_weight * (KL_h + KL_x), GeoLDM's KL with q_sigma = 1."""
        bs, n_nodes = x.size(0), x.size(1)
        xh = self._xh(x, h)
        mu_x, sigma_x, mu_h, sigma_h = self.encode(x, h, node_mask, edge_mask, context)
        ones_h = torch.ones_like(mu_h)
        kl_h = gaussian_kl(mu_h, ones_h, torch.zeros_like(mu_h), ones_h, node_mask)
        ones_b = torch.ones(bs, dtype=mu_x.dtype, device=mu_x.device)
        subspace_d = (node_mask.squeeze(2).sum(1) - 1) * self.n_dims
        kl_x = gaussian_kl_for_dimension(mu_x, ones_b, torch.zeros_like(mu_x), ones_b, d=subspace_d)
        loss_kl = kl_h + kl_x

        z_mean = torch.cat([mu_x, mu_h], dim=2)
        sigma = torch.cat([sigma_x.expand(bs, 1, self.n_dims), sigma_h], dim=2)
        eps = self.sample_combined_position_feature_noise(bs, n_nodes, node_mask)
        z = z_mean + sigma * eps
        x_rec, h_rec = self.decoder(z, node_mask, edge_mask, context)
        xh_rec = torch.cat([x_rec, h_rec], dim=2)
        loss_recon = self.compute_reconstruction_error(xh_rec, xh)
        loss = loss_recon + self.kl_weight * loss_kl
        terms = {"loss_kl_h": kl_h, "loss_kl_x": kl_x, "loss_kl": loss_kl, "z_xh_mean": z_mean, "z_xh": z,
                 "xh_rec": xh_rec, "loss_recon": loss_recon}
        return loss, terms

    def forward(self, x, h, node_mask=None, edge_mask=None, context=None) -> torch.Tensor:
        return self.compute_loss(x, h, node_mask, edge_mask, context)[0]


class EnLatentDiffusion(EnVariationalDiffusion):
    """EDM's diffusion on GeoLDM's latent points z = [z_x (3) | z_h (k)], with the autoencoder ``vae``.

    ``in_node_nf`` is k. ``include_charges`` describes the data (the VAE's), not the latent.
    ``trainable_ae``: train the decoder jointly (GeoLDM's README recipe); False freezes the
    whole first stage (eval mode, no gradients, no reconstruction term).
    """

    def __init__(self, vae: EnHierarchicalVAE, trainable_ae: bool = False, **kwargs):
        if kwargs.get("zero_center_h"):
            raise ValueError("zero_center_h (GAGA's centred features) is not supported for GeoLDM's latent diffusion")
        super().__init__(**kwargs)
        self.vae = vae
        self.trainable_ae = bool(trainable_ae)
        # Degrees of freedom per atom in the eval constant of the latent h: None = GeoLDM's n_dims (3);
        # training.latent_training sets k (a constant shift of the eval "NLL", no effect on training).
        self.h_constants_dof: int | None = None
        self.vae.train(self.trainable_ae)
        for param in self.vae.parameters():
            param.requires_grad_(self.trainable_ae)

    def train(self, mode: bool = True) -> "EnLatentDiffusion":
        super().train(mode)
        if not self.trainable_ae:
            self.vae.eval()  # a frozen first stage keeps its eval-mode recon (unused) and stays put
        return self

    # ---------------------------------------------------------------- parent hooks, latent layout
    def _xh(self, x, h) -> torch.Tensor:
        """The diffused state: [z_x | z_h] (the latent h is passed as h['integer'])."""
        return torch.cat([x, h["integer"]], dim=2)

    def unnormalize_z(self, z, node_mask):
        return z  # latents are never normalised

    def log_pxh_given_z0_without_constants(self, x, h, z_t, gamma_0, eps, net_out, node_mask, epsilon=1e-10):
        """GeoLDM's t = 0 term: a Gaussian on all 3 + k latent channels, -0.5 * compute_error."""
        return -0.5 * self.compute_error(net_out, gamma_0, eps)

    def log_constants_p_h_given_z0(self, x: torch.Tensor, node_mask: torch.Tensor) -> torch.Tensor:
        """n_b * 3 * (-log sigma_0 - 0.5 log 2 pi): GeoLDM counts n_dims (not k) dof per atom
        (``h_constants_dof`` = k counts the latent's own channels)."""
        bs = x.size(0)
        n_nodes = node_mask.squeeze(2).sum(1)
        gamma_0 = self.gamma(torch.zeros((bs, 1), device=x.device, dtype=x.dtype))
        log_sigma = 0.5 * gamma_0.view(bs)
        dof = self.n_dims if self.h_constants_dof is None else self.h_constants_dof
        return n_nodes * dof * (-log_sigma - 0.5 * math.log(2 * math.pi))

    # ---------------------------------------------------------------- objective
    def compute_latent_loss(self, x, h, node_mask, edge_mask, context):
        """-log p(x, h) per molecule (B,) as GeoLDM computes it, and its terms."""
        # "Always keep the encoder fixed": z_0 below is detached, so no gradient ever reaches the
        # encoder; running it without autograd gives the same values and skips its graph.
        with torch.no_grad():
            mu_x, _, mu_h, _ = self.vae.encode(x, h, node_mask, edge_mask, context)
        z_mean = torch.cat([mu_x, mu_h], dim=2)
        bs, n_nodes = x.size(0), x.size(1)
        gamma_0 = self.inflate_batch_array(self.gamma(torch.zeros((bs, 1), device=x.device, dtype=x.dtype)), z_mean)
        sigma_0 = self.sigma(gamma_0, z_mean)
        eps_latent = self.vae.sample_combined_position_feature_noise(bs, n_nodes, node_mask)
        # "Always keep the encoder fixed": no gradient reaches the encoder from either loss.
        z_0 = (z_mean + sigma_0 * eps_latent).detach()

        if self.trainable_ae:
            x_rec, h_rec = self.vae.decoder(z_0, node_mask, edge_mask, context)
            loss_recon = self.vae.compute_reconstruction_error(torch.cat([x_rec, h_rec], dim=2), self.vae._xh(x, h))
        else:
            loss_recon = torch.zeros(bs, device=x.device, dtype=x.dtype)

        nd = self.n_dims
        z_x, z_h = z_0[:, :, :nd], z_0[:, :, nd:]
        latent_h = {"categorical": z_h[:, :, :0], "integer": z_h}
        loss_ld, terms = self.compute_loss(z_x, latent_h, node_mask, edge_mask, context, t0_always=not self.training)

        neg_log_constants_h = -self.log_constants_p_h_given_z0(z_x, node_mask)
        if self.training and self.loss_type == "l2":
            neg_log_constants_h = torch.zeros_like(neg_log_constants_h)
        neg_log_pxh = loss_ld + loss_recon + neg_log_constants_h
        terms.update(z_xh_mean=z_mean, z_xh=z_0, loss_recon=loss_recon, loss_ld=loss_ld,
                     neg_log_constants_h=neg_log_constants_h)
        return neg_log_pxh, terms

    def forward(self, x, h, node_mask=None, edge_mask=None, context=None) -> torch.Tensor:
        """The training loss (train mode) / GeoLDM's validation "NLL" (eval mode) per molecule."""
        return self.compute_latent_loss(x, h, node_mask, edge_mask, context)[0]

    # ---------------------------------------------------------------- sampling
    def sample_p_xh_given_z0(self, z0, node_mask, edge_mask, context, fix_noise=False, deterministic=False):
        """Latent z_0 -> the latent sample: denoised mean of all 3 + k channels (+ sigma_0 noise).

        Returns x (B,N,3) and {'categorical': (B,N,0), 'integer': latent h (B,N,k)}."""
        zeros = torch.zeros(size=(z0.size(0), 1), device=z0.device, dtype=z0.dtype)
        gamma_0 = self.gamma(zeros)
        sigma_x = self.SNR(-0.5 * gamma_0).unsqueeze(1)
        net_out = self.phi(z0, zeros, node_mask, edge_mask, context)
        mu = self.compute_x_pred(net_out, z0, gamma_0)
        xh = mu if deterministic else self.sample_normal(mu=mu, sigma=sigma_x, node_mask=node_mask, fix_noise=fix_noise)
        nd = self.n_dims
        return xh[:, :, :nd], {"categorical": xh[:, :, nd:nd], "integer": xh[:, :, nd:]}

    @torch.no_grad()
    def sample(self, n_samples, n_nodes, node_mask, edge_mask, context, fix_noise=False, start_step=None,
               dataset_var: float = 1.0, step_size: int = 1, sampler: str = "ddpm"):
        """The parent's latent chain (any registered sampler, GAGA's Gaussian start), then ``vae.decode``:
        x (B,N,3) in Angstrom, h = {'categorical': one-hot, 'integer': charges}."""
        x, h = super().sample(n_samples, n_nodes, node_mask, edge_mask, context, fix_noise=fix_noise,
                              start_step=start_step, dataset_var=dataset_var, step_size=step_size, sampler=sampler)
        return self.vae.decode(torch.cat([x, h["integer"]], dim=2), node_mask, edge_mask, context)

    @torch.no_grad()
    def sample_chain(self, n_samples, n_nodes, node_mask, edge_mask, context, keep_frames=None, start_step=None,
                     dataset_var: float = 1.0, step_size: int = 1, sampler: str = "ddpm"):
        """The latent chain with every kept frame decoded: (keep_frames * B, N, 3 + F) =
        [x | one-hot | charge]; frame 0 is the decoded sample, the last the noisiest."""
        latent = super().sample_chain(n_samples, n_nodes, node_mask, edge_mask, context, keep_frames=keep_frames,
                                      start_step=start_step, dataset_var=dataset_var, step_size=step_size,
                                      sampler=sampler)
        frames = latent.size(0) // n_samples
        frame_node_mask = node_mask.repeat(frames, 1, 1)
        frame_edge_mask = edge_mask.reshape(n_samples, -1).repeat(frames, 1).reshape(-1, 1)
        frame_context = None if context is None else context.repeat(frames, 1, 1)
        x, h = self.vae.decode(latent, frame_node_mask, frame_edge_mask, frame_context)
        return torch.cat([x, h["categorical"].to(x.dtype), h["integer"].to(x.dtype)], dim=2)
