"""E(3)-equivariant variational diffusion (EDM's ``EnVariationalDiffusion``) with GAGA options.

z = [x | h] with x (B, N, 3) positions (zero centre of mass per molecule) and h (B, N, F)
atom-type one-hot (+ charge) in normalised units. The network predicts the noise eps.

GAGA is a set of switches on the same class, not a second class:

* ``max_t``: training draws t uniformly from {0..max_t} (eval: {1..max_t}) and the evaluation
  estimator multiplies by max_t; the schedule keeps T steps and t is still t_int / T.
  (A baseline replaces the training draw with ``train_t_sampler``, see ``__init__``.)
* ``zero_center_h``: the feature noise, the network's feature output and every sampling step
  are centred per molecule like the positions (the data's one-hot must be centred by the
  caller, see ``qm9.losses.preprocess_batch``).
* ``sample(start_step=T*, dataset_var=v, step_size=k, sampler='ddpm'|'ddim')``: Gaussian start
  z_T* ~ N(0, v_T* I) with the closed form v_t = alpha_t^2 v + sigma_t^2 (zero-centred like the
  noise), then the reverse chain T* -> 0 with stride k; the sampler ('ddpm', 'ddim',
  'dpm_solver_2m', see ``equivariant_diffusion.samplers``) makes each step.

Oddities of the training objective that published checkpoints were trained with, and which
are therefore reproduced on purpose:

* In training with loss_type 'l2' the squared error is divided by (3 + F) * N where N is the
  *padded* node count of the batch (the batch's largest molecule), not the molecule's size.
* A training draw of t = 0 uses the t = 0 likelihood term -log p(x, h | z_0) evaluated at z_t,
  which mixes the normalised x error with unnormalised discrete log-likelihoods; with GAGA's
  centred one-hot its class weights can be negative (t = 0 losses of about -100 to -240).
* The non-l2 training estimator multiplies by T + 1 even when max_t < T (both references).
* kl_prior and -log p(N) are part of the training loss (constants without gradient).

Bugs of the references that are NOT reproduced: the decode slices the one-hot channels by
the number of classes (the GAGA fork's ``z0[..., 3:-1]`` dropped fluorine when charges are
off); batch size 1 works; the evaluation NLL sees the same centred one-hot as training (done
by ``preprocess_batch``, checked here in GAGA mode).
"""
from __future__ import annotations

import math
import warnings
from typing import Callable

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from egnn.backbone import check_backbone
from equivariant_diffusion import utils as diffusion_utils
from equivariant_diffusion.noise_schedule import make_noise_schedule
from equivariant_diffusion.noise_schedule import variance_t as closed_form_variance_t
from equivariant_diffusion.samplers import SamplingOptions, get_sampler
from equivariant_diffusion.utils import remove_mean_with_mask, sum_except_batch



def cdf_standard_gaussian(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.erf(x / math.sqrt(2)))


def gaussian_kl(q_mu, q_sigma, p_mu, p_sigma, node_mask):
    """KL(q || p) of diagonal Gaussians, summed over real atoms and channels -> (B,)."""
    kl = torch.log(p_sigma / q_sigma) + 0.5 * (q_sigma**2 + (q_mu - p_mu) ** 2) / (p_sigma**2) - 0.5
    return sum_except_batch(kl * node_mask)


def gaussian_kl_for_dimension(q_mu, q_sigma, p_mu, p_sigma, d):
    """KL(q || p) of isotropic Gaussians on a d-dimensional subspace; sigmas are (B,)."""
    mu_norm2 = sum_except_batch((q_mu - p_mu) ** 2)
    return d * torch.log(p_sigma / q_sigma) + 0.5 * (d * q_sigma**2 + mu_norm2) / (p_sigma**2) - 0.5 * d


class EnVariationalDiffusion(nn.Module):
    """EDM's E(n) diffusion model around a noise-prediction network ``dynamics``."""

    def __init__(
        self,
        dynamics: nn.Module,
        in_node_nf: int,
        n_dims: int = 3,
        timesteps: int = 1000,
        parametrization: str = "eps",
        noise_schedule: str = "polynomial_2",
        noise_precision: float = 1e-5,
        loss_type: str = "l2",
        norm_values: tuple[float, float, float] = (1.0, 4.0, 10.0),
        norm_biases: tuple[float | None, float, float] = (None, 0.0, 0.0),
        include_charges: bool = True,
        max_t: int | None = None,
        zero_center_h: bool = False,
    ):
        super().__init__()
        if loss_type not in ("vlb", "l2"):
            raise ValueError(f"unknown loss_type {loss_type!r}; choose 'l2' or 'vlb'")
        if noise_schedule == "learned" and loss_type != "vlb":
            raise ValueError(
                "a learned noise schedule is trained through the VLB: use --diffusion_loss_type vlb "
                "(or a predefined schedule such as --diffusion_noise_schedule polynomial_2 with l2)"
            )
        if parametrization != "eps":
            raise ValueError(f"unsupported parametrization {parametrization!r}; only 'eps' exists")
        if max_t is not None and not (1 <= int(max_t) <= timesteps):
            raise ValueError(f"max_t must be in [1, {timesteps}] (the number of diffusion steps), got {max_t}")
        self.loss_type = loss_type
        self.include_charges = include_charges
        # Registered before the dynamics, as in EDM: a learned schedule's parameters come first
        # in parameters() and hence in the optimiser state (optim.npy).
        self.gamma = make_noise_schedule(noise_schedule, timesteps=timesteps, precision=noise_precision)
        self.dynamics = check_backbone(dynamics)
        self.in_node_nf = in_node_nf
        self.n_dims = n_dims
        self.num_classes = self.in_node_nf - int(include_charges)
        self.T = timesteps
        self.parametrization = parametrization
        self.norm_values = norm_values
        self.norm_biases = norm_biases
        self.max_t = int(max_t) if max_t is not None else timesteps
        self.zero_center_h = bool(zero_center_h)
        self.register_buffer("buffer", torch.zeros(1))
        # A baseline's training t-schedule: fn(n, max_t, device) -> (n, 1) integer steps in {0..max_t};
        # None is EDM's uniform draw. Evaluation always draws uniformly (the NLL estimator assumes it).
        self.train_t_sampler: Callable[[int, int, torch.device], torch.Tensor] | None = None
        if noise_schedule != "learned":  # EDM skips it: sigma_0 of the initial learned schedule fails it
            self.check_issues_norm_values()

    # ------------------------------------------------------------------ schedule helpers
    def check_issues_norm_values(self, num_stdevs: int = 8) -> None:
        zeros = torch.zeros((1, 1))
        gamma_0 = self.gamma(zeros)
        sigma_0 = self.sigma(gamma_0, target_tensor=zeros).item()
        max_norm_value = max(self.norm_values[1], self.norm_values[2])
        if sigma_0 * num_stdevs > 1.0 / max_norm_value:
            raise ValueError(
                f"value for normalization {max_norm_value} too large with sigma_0 {sigma_0:.5f} "
                f"and 1/norm_value {1.0 / max_norm_value}"
            )

    def phi(self, x, t, node_mask, edge_mask, context):
        """eps_hat = dynamics(z_t, t), centred as the diffusion needs it (see egnn.backbone)."""
        eps_hat = self.dynamics(t, x, node_mask, edge_mask, context)
        return self._centre_prediction(eps_hat, node_mask)

    def _centre_prediction(self, eps_hat: torch.Tensor, node_mask: torch.Tensor) -> torch.Tensor:
        """The position part lives on the zero centre-of-mass subspace; in GAGA mode the feature
        part does too. Centre what the backbone does not declare centred (egnn.backbone.Backbone)."""
        centre_x = not self.dynamics.centres_positions
        if not (centre_x or self.zero_center_h):
            return eps_hat
        nd = self.n_dims
        eps_x, eps_h = eps_hat[:, :, :nd], eps_hat[:, :, nd:]
        if centre_x:
            eps_x = remove_mean_with_mask(eps_x, node_mask, check_padding=False)
        if self.zero_center_h:
            eps_h = remove_mean_with_mask(eps_h, node_mask, check_padding=False)
        return torch.cat([eps_x, eps_h], dim=2)

    @staticmethod
    def inflate_batch_array(array: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """(B,) or (B, 1) -> (B, 1, ..., 1) with target's number of dimensions."""
        target_shape = (array.size(0),) + (1,) * (len(target.size()) - 1)
        return array.view(target_shape)

    def sigma(self, gamma, target_tensor):
        return self.inflate_batch_array(torch.sqrt(torch.sigmoid(gamma)), target_tensor)

    def alpha(self, gamma, target_tensor):
        return self.inflate_batch_array(torch.sqrt(torch.sigmoid(-gamma)), target_tensor)

    @staticmethod
    def SNR(gamma):
        return torch.exp(-gamma)

    def subspace_dimensionality(self, node_mask):
        """(N_b - 1) * n_dims: the x part lives on the zero-centre-of-mass subspace."""
        number_of_nodes = torch.sum(node_mask.squeeze(2), dim=1)
        return (number_of_nodes - 1) * self.n_dims

    def sigma_and_alpha_t_given_s(self, gamma_t, gamma_s, target_tensor):
        """sigma^2_{t|s}, sigma_{t|s}, alpha_{t|s} for any s < t (numerically stable forms)."""
        sigma2_t_given_s = self.inflate_batch_array(
            -torch.expm1(F.softplus(gamma_s) - F.softplus(gamma_t)), target_tensor
        )
        log_alpha2_t_given_s = F.logsigmoid(-gamma_t) - F.logsigmoid(-gamma_s)
        alpha_t_given_s = self.inflate_batch_array(torch.exp(0.5 * log_alpha2_t_given_s), target_tensor)
        sigma_t_given_s = torch.sqrt(sigma2_t_given_s)
        return sigma2_t_given_s, sigma_t_given_s, alpha_t_given_s

    def _time(self, t_int, n_samples: int, device) -> torch.Tensor:
        """Normalised time t_int / T as a (n_samples, 1) float tensor (EDM's computation)."""
        return torch.full((n_samples, 1), fill_value=int(t_int), device=device) / self.T

    def variance_t(self, dataset_var: float | torch.Tensor, t_int: int | torch.Tensor) -> torch.Tensor:
        """GAGA's closed form Var(z_t) = alpha_t^2 * dataset_var + sigma_t^2 at integer time(s) t_int."""
        t_int = torch.as_tensor(t_int, device=self.buffer.device)
        # gamma takes (..., 1) time arrays (a learned schedule is a network on the last axis).
        gamma_t = self.gamma(t_int.float().reshape(-1, 1) / self.T).reshape(t_int.shape)
        return closed_form_variance_t(dataset_var, gamma_t)

    # ------------------------------------------------------------------ normalisation
    def normalize(self, x, h, node_mask):
        x = x / self.norm_values[0]
        delta_log_px = -self.subspace_dimensionality(node_mask) * np.log(self.norm_values[0])
        h_cat = (h["categorical"].float() - self.norm_biases[1]) / self.norm_values[1] * node_mask
        h_int = (h["integer"].float() - self.norm_biases[2]) / self.norm_values[2]
        if self.include_charges:
            h_int = h_int * node_mask
        return x, {"categorical": h_cat, "integer": h_int}, delta_log_px

    def unnormalize(self, x, h_cat, h_int, node_mask):
        x = x * self.norm_values[0]
        h_cat = h_cat * self.norm_values[1] + self.norm_biases[1]
        h_cat = h_cat * node_mask
        h_int = h_int * self.norm_values[2] + self.norm_biases[2]
        if self.include_charges:
            h_int = h_int * node_mask
        return x, h_cat, h_int

    def unnormalize_z(self, z, node_mask):
        x = z[:, :, 0 : self.n_dims]
        h_cat = z[:, :, self.n_dims : self.n_dims + self.num_classes]
        h_int = z[:, :, self.n_dims + self.num_classes : self.n_dims + self.num_classes + 1]
        assert h_int.size(2) == int(self.include_charges)
        x, h_cat, h_int = self.unnormalize(x, h_cat, h_int, node_mask)
        return torch.cat([x, h_cat, h_int], dim=2)

    def _xh(self, x, h) -> torch.Tensor:
        parts = [x, h["categorical"]]
        if self.include_charges:
            parts.append(h["integer"])
        return torch.cat(parts, dim=2)

    # ------------------------------------------------------------------ noise and centring
    def sample_combined_position_feature_noise(self, n_samples, n_nodes, node_mask):
        """Standard normal noise of z: x part centred per molecule; h part centred in GAGA mode."""
        z_x = diffusion_utils.sample_center_gravity_zero_gaussian_with_mask(
            size=(n_samples, n_nodes, self.n_dims), device=node_mask.device, node_mask=node_mask
        )
        if self.zero_center_h:
            z_h = diffusion_utils.sample_center_gravity_zero_gaussian_with_mask(
                size=(n_samples, n_nodes, self.in_node_nf), device=node_mask.device, node_mask=node_mask
            )
        else:
            z_h = diffusion_utils.sample_gaussian_with_mask(
                size=(n_samples, n_nodes, self.in_node_nf), device=node_mask.device, node_mask=node_mask
            )
        return torch.cat([z_x, z_h], dim=2)

    def sample_normal(self, mu, sigma, node_mask, fix_noise=False):
        """mu + sigma * noise (one noise row broadcast over the batch if fix_noise)."""
        bs = 1 if fix_noise else mu.size(0)
        eps = self.sample_combined_position_feature_noise(bs, mu.size(1), node_mask)
        return mu + sigma * eps

    def _recenter(self, z, node_mask):
        """Re-centre a sampling state: positions always, features too in GAGA mode."""
        if self.zero_center_h:
            return remove_mean_with_mask(z, node_mask, check_padding=False)
        return torch.cat(
            [remove_mean_with_mask(z[:, :, : self.n_dims], node_mask, check_padding=False), z[:, :, self.n_dims :]],
            dim=2,
        )

    def _assert_centred(self, z, node_mask):
        channels = z if self.zero_center_h else z[:, :, : self.n_dims]
        diffusion_utils.assert_mean_zero_with_mask(channels, node_mask)

    # ------------------------------------------------------------------ loss
    def kl_prior(self, xh, node_mask):
        """KL(q(z_T | x, h) || N(0, I)) per molecule; the x part on its (N-1)*3-dim subspace."""
        ones = torch.ones((xh.size(0), 1), device=xh.device)
        gamma_T = self.gamma(ones)
        alpha_T = self.alpha(gamma_T, xh)
        mu_T = alpha_T * xh
        mu_T_x, mu_T_h = mu_T[:, :, : self.n_dims], mu_T[:, :, self.n_dims :]
        sigma_T_x = self.sigma(gamma_T, mu_T_x).reshape(xh.size(0))
        sigma_T_h = self.sigma(gamma_T, mu_T_h)
        kl_distance_h = gaussian_kl(mu_T_h, sigma_T_h, torch.zeros_like(mu_T_h), torch.ones_like(sigma_T_h), node_mask)
        subspace_d = self.subspace_dimensionality(node_mask)
        kl_distance_x = gaussian_kl_for_dimension(
            mu_T_x, sigma_T_x, torch.zeros_like(mu_T_x), torch.ones_like(sigma_T_x), d=subspace_d
        )
        return kl_distance_x + kl_distance_h

    def compute_x_pred(self, net_out, zt, gamma_t):
        sigma_t = self.sigma(gamma_t, target_tensor=net_out)
        alpha_t = self.alpha(gamma_t, target_tensor=net_out)
        return 1.0 / alpha_t * (zt - sigma_t * net_out)

    def compute_error(self, net_out, gamma_t, eps):
        """sum (eps - eps_hat)^2 per molecule; in l2 training divided by (3 + F) * N_padded."""
        error = sum_except_batch((eps - net_out) ** 2)
        if self.training and self.loss_type == "l2":
            denom = (self.n_dims + self.in_node_nf) * net_out.shape[1]
            error = error / denom
        return error

    def log_constants_p_x_given_z0(self, x, node_mask):
        batch_size = x.size(0)
        degrees_of_freedom_x = self.subspace_dimensionality(node_mask)
        gamma_0 = self.gamma(torch.zeros((batch_size, 1), device=x.device))
        log_sigma_x = 0.5 * gamma_0.view(batch_size)
        return degrees_of_freedom_x * (-log_sigma_x - 0.5 * np.log(2 * np.pi))

    def log_pxh_given_z0_without_constants(self, x, h, z_t, gamma_0, eps, net_out, node_mask, epsilon=1e-10):
        """log p(x, h | z_0) up to constants: Gaussian x term + discretised Gaussians for h."""
        nd, nc = self.n_dims, self.num_classes
        z_h_cat = z_t[:, :, nd : nd + nc]
        eps_x, net_x = eps[:, :, :nd], net_out[:, :, :nd]
        log_p_x_given_z_without_constants = -0.5 * self.compute_error(net_x, gamma_0, eps_x)

        sigma_0 = self.sigma(gamma_0, target_tensor=z_t)
        sigma_0_cat = sigma_0 * self.norm_values[1]
        sigma_0_int = sigma_0 * self.norm_values[2]

        if self.include_charges:
            z_h_int = z_t[:, :, nd + nc : nd + nc + 1]
            h_integer = torch.round(h["integer"] * self.norm_values[2] + self.norm_biases[2]).long()
            estimated_h_integer = z_h_int * self.norm_values[2] + self.norm_biases[2]
            h_integer_centered = h_integer - estimated_h_integer
            log_ph_integer = torch.log(
                cdf_standard_gaussian((h_integer_centered + 0.5) / sigma_0_int)
                - cdf_standard_gaussian((h_integer_centered - 0.5) / sigma_0_int)
                + epsilon
            )
            log_ph_integer = sum_except_batch(log_ph_integer * node_mask)
        else:
            log_ph_integer = 0.0

        # The class weights are the (possibly centred, in GAGA mode) one-hot of the data.
        h_cat = h["categorical"] * self.norm_values[1] + self.norm_biases[1]
        estimated_h_cat = z_h_cat * self.norm_values[1] + self.norm_biases[1]
        centered_h_cat = estimated_h_cat - 1
        log_ph_cat_proportional = torch.log(
            cdf_standard_gaussian((centered_h_cat + 0.5) / sigma_0_cat)
            - cdf_standard_gaussian((centered_h_cat - 0.5) / sigma_0_cat)
            + epsilon
        )
        log_z = torch.logsumexp(log_ph_cat_proportional, dim=2, keepdim=True)
        log_probabilities = log_ph_cat_proportional - log_z
        log_ph_cat = sum_except_batch(log_probabilities * h_cat * node_mask)

        return log_p_x_given_z_without_constants + log_ph_integer + log_ph_cat

    def compute_loss(self, x, h, node_mask, edge_mask, context, t0_always):
        """Per-molecule loss (B,) and a dict of its terms (x, h normalised).

        t0_always=False (training): one draw t ~ U{0..max_t}; t = 0 uses the t = 0 term.
        t0_always=True (evaluation): t ~ U{1..max_t} scaled by max_t, plus the t = 0 term
        from a second noise draw (the VLB estimator).
        """
        lowest_t = 1 if t0_always else 0
        if t0_always or self.train_t_sampler is None:
            t_int = torch.randint(lowest_t, self.max_t + 1, size=(x.size(0), 1), device=x.device).float()
        else:
            t_int = self.train_t_sampler(x.size(0), self.max_t, x.device).reshape(x.size(0), 1).float()
        s_int = t_int - 1
        t_is_zero = t_int == 0
        s = s_int / self.T
        t = t_int / self.T

        gamma_s = self.inflate_batch_array(self.gamma(s), x)
        gamma_t = self.inflate_batch_array(self.gamma(t), x)
        alpha_t = self.alpha(gamma_t, x)
        sigma_t = self.sigma(gamma_t, x)

        eps = self.sample_combined_position_feature_noise(n_samples=x.size(0), n_nodes=x.size(1), node_mask=node_mask)
        xh = self._xh(x, h)
        if self.zero_center_h:
            self._check_features_centred(h["categorical"], node_mask)
        z_t = alpha_t * xh + sigma_t * eps
        diffusion_utils.assert_mean_zero_with_mask(z_t[:, :, : self.n_dims], node_mask)

        net_out = self.phi(z_t, t, node_mask, edge_mask, context)
        error = self.compute_error(net_out, gamma_t, eps)
        if self.training and self.loss_type == "l2":
            snr_weight = torch.ones_like(error)
        else:
            snr_weight = (self.SNR(gamma_s - gamma_t) - 1).squeeze(1).squeeze(1)
        loss_t_larger_than_zero = 0.5 * snr_weight * error

        neg_log_constants = -self.log_constants_p_x_given_z0(x, node_mask)
        if self.training and self.loss_type == "l2":
            neg_log_constants = torch.zeros_like(neg_log_constants)
        kl_prior = self.kl_prior(xh, node_mask)

        if t0_always:
            estimator_loss_terms = self.max_t * loss_t_larger_than_zero
            t_zeros = torch.zeros_like(s)
            gamma_0 = self.inflate_batch_array(self.gamma(t_zeros), x)
            alpha_0 = self.alpha(gamma_0, x)
            sigma_0 = self.sigma(gamma_0, x)
            eps_0 = self.sample_combined_position_feature_noise(
                n_samples=x.size(0), n_nodes=x.size(1), node_mask=node_mask
            )
            z_0 = alpha_0 * xh + sigma_0 * eps_0
            net_out_0 = self.phi(z_0, t_zeros, node_mask, edge_mask, context)
            loss_term_0 = -self.log_pxh_given_z0_without_constants(x, h, z_0, gamma_0, eps_0, net_out_0, node_mask)
            loss = kl_prior + estimator_loss_terms + neg_log_constants + loss_term_0
        else:
            loss_term_0 = -self.log_pxh_given_z0_without_constants(x, h, z_t, gamma_t, eps, net_out, node_mask)
            loss_t = torch.where(t_is_zero.view(-1), loss_term_0, loss_t_larger_than_zero)
            if self.training and self.loss_type == "l2":
                estimator_loss_terms = loss_t
            else:
                estimator_loss_terms = (self.T + 1) * loss_t
            loss = kl_prior + estimator_loss_terms + neg_log_constants

        terms = {
            "t": t_int.squeeze(),
            "loss_t": loss.squeeze(),
            "error": error.squeeze(),
            "kl_prior": kl_prior,
            "loss_term_0": loss_term_0,
            "neg_log_constants": neg_log_constants,
            "estimator_loss_terms": estimator_loss_terms,
        }
        return loss, terms

    def _check_features_centred(self, h_cat, node_mask):
        n = node_mask.sum(1)
        mean = (h_cat.sum(1) / n).abs().max().item()
        if mean > 1e-4:
            raise ValueError(
                "this model zero-centres atom types (GAGA mode) but got an uncentred one-hot "
                f"(largest per-molecule mean {mean:.3g}); prepare batches with qm9.losses.preprocess_batch"
            )

    def forward(self, x, h, node_mask=None, edge_mask=None, context=None):
        """-log p(x, h) per molecule (B,): the training loss in train mode, the VLB in eval mode."""
        x, h, delta_log_px = self.normalize(x, h, node_mask)
        if self.training and self.loss_type == "l2":
            delta_log_px = torch.zeros_like(delta_log_px)
        loss, _ = self.compute_loss(x, h, node_mask, edge_mask, context, t0_always=not self.training)
        return loss - delta_log_px

    # ------------------------------------------------------------------ sampling
    def sample_p_zs_given_zt(self, s, t, zt, node_mask, edge_mask, context, fix_noise=False):
        """One ancestral step z_t -> z_s (any s < t)."""
        gamma_s = self.gamma(s)
        gamma_t = self.gamma(t)
        sigma2_t_given_s, sigma_t_given_s, alpha_t_given_s = self.sigma_and_alpha_t_given_s(gamma_t, gamma_s, zt)
        sigma_s = self.sigma(gamma_s, target_tensor=zt)
        sigma_t = self.sigma(gamma_t, target_tensor=zt)

        eps_t = self.phi(zt, t, node_mask, edge_mask, context)
        diffusion_utils.assert_mean_zero_with_mask(zt[:, :, : self.n_dims], node_mask)
        diffusion_utils.assert_mean_zero_with_mask(eps_t[:, :, : self.n_dims], node_mask)
        mu = zt / alpha_t_given_s - (sigma2_t_given_s / alpha_t_given_s / sigma_t) * eps_t
        sigma = sigma_t_given_s * sigma_s / sigma_t
        zs = self.sample_normal(mu, sigma, node_mask, fix_noise)
        return self._recenter(zs, node_mask)

    def sample_p_zs_given_zt_ddim(self, s, t, zt, node_mask, edge_mask, context):
        """One deterministic DDIM step: x0 = (z_t - sigma_t eps)/alpha_t, z_s = alpha_s x0 + sigma_s eps."""
        gamma_s = self.gamma(s)
        gamma_t = self.gamma(t)
        eps_t = self.phi(zt, t, node_mask, edge_mask, context)
        x0 = (zt - self.sigma(gamma_t, zt) * eps_t) / self.alpha(gamma_t, zt)
        zs = self.alpha(gamma_s, zt) * x0 + self.sigma(gamma_s, zt) * eps_t
        return self._recenter(zs * node_mask, node_mask)

    def sample_p_xh_given_z0(self, z0, node_mask, edge_mask, context, fix_noise=False, deterministic=False):
        """Decode z_0: x ~ N(x_pred, sigma_0^2) (mean only if deterministic); atom types from z_0."""
        zeros = torch.zeros(size=(z0.size(0), 1), device=z0.device)
        gamma_0 = self.gamma(zeros)
        sigma_x = self.SNR(-0.5 * gamma_0).unsqueeze(1)
        net_out = self.phi(z0, zeros, node_mask, edge_mask, context)
        mu_x = self.compute_x_pred(net_out, z0, gamma_0)
        xh = mu_x if deterministic else self.sample_normal(mu=mu_x, sigma=sigma_x, node_mask=node_mask, fix_noise=fix_noise)
        nd, nc = self.n_dims, self.num_classes
        x = xh[:, :, :nd]
        h_cat = z0[:, :, nd : nd + nc]  # by class count: keeps fluorine when charges are off
        h_int = z0[:, :, nd + nc : nd + nc + int(self.include_charges)]
        x, h_cat, h_int = self.unnormalize(x, h_cat, h_int, node_mask)
        h_cat = F.one_hot(torch.argmax(h_cat, dim=2), self.num_classes) * node_mask
        h_int = torch.round(h_int).long() * node_mask
        return x, {"integer": h_int, "categorical": h_cat}

    def gaussian_start(self, n_samples, n_nodes, node_mask, start_step: int, dataset_var: float = 1.0,
                       fix_noise: bool = False) -> torch.Tensor:
        """GAGA's start z_T* ~ N(0, v_T* I), v_t = alpha_t^2 dataset_var + sigma_t^2, centred like the noise
        (positions always, features too in GAGA mode), masked."""
        z = self.sample_combined_position_feature_noise(1 if fix_noise else n_samples, n_nodes, node_mask)
        return z * torch.sqrt(self.variance_t(dataset_var, int(start_step))).to(z.dtype)

    def _initial_z(self, n_samples, n_nodes, node_mask, fix_noise, start_step, dataset_var):
        """z_T ~ N(0, I) (EDM) or the Gaussian start at start_step (GAGA)."""
        if start_step is None:
            z = self.sample_combined_position_feature_noise(1 if fix_noise else n_samples, n_nodes, node_mask)
        else:
            z = self.gaussian_start(n_samples, n_nodes, node_mask, start_step, dataset_var, fix_noise)
        self._assert_centred(z, node_mask)
        return z

    @torch.no_grad()
    def sample(
        self,
        n_samples,
        n_nodes,
        node_mask,
        edge_mask,
        context,
        fix_noise=False,
        start_step: int | None = None,
        dataset_var: float = 1.0,
        step_size: int = 1,
        sampler: str = "ddpm",
    ):
        """Draw molecules: returns x (B, N, 3) and h = {'categorical': one-hot, 'integer': charges}.

        Default: EDM's full ancestral chain from z_T ~ N(0, I). start_step=T* starts from
        GAGA's Gaussian approximation N(0, v_T* I) with v_t = alpha_t^2 dataset_var + sigma_t^2;
        step_size=k takes steps t -> t - k; sampler='ddim' makes the steps deterministic.
        """
        options = SamplingOptions(sampler, start_step, step_size, dataset_var).validated(self.T)
        solver = get_sampler(options.sampler)
        z = self._initial_z(n_samples, n_nodes, node_mask, fix_noise, options.start_step, options.dataset_var)
        z = solver.run(self, z, options.schedule(self.T), node_mask, edge_mask, context, fix_noise=fix_noise)
        x, h = self.sample_p_xh_given_z0(
            z, node_mask, edge_mask, context, fix_noise=fix_noise, deterministic=solver.deterministic
        )
        diffusion_utils.assert_mean_zero_with_mask(x, node_mask)
        max_cog = torch.sum(x, dim=1, keepdim=True).abs().max().item()
        if max_cog > 5e-2:
            warnings.warn(f"centre of gravity of the samples is {max_cog:.3f}; projecting it to zero", RuntimeWarning)
            x = remove_mean_with_mask(x, node_mask)
        return x, h

    @torch.no_grad()
    def sample_chain(
        self,
        n_samples,
        n_nodes,
        node_mask,
        edge_mask,
        context,
        keep_frames=None,
        start_step: int | None = None,
        dataset_var: float = 1.0,
        step_size: int = 1,
        sampler: str = "ddpm",
    ):
        """The reverse chain as keep_frames unnormalised frames, (keep_frames * B, N, 3 + F).

        Frame 0 is the decoded molecule (x, one-hot, charges), the last frame the noisiest.
        """
        options = SamplingOptions(sampler, start_step, step_size, dataset_var).validated(self.T)
        solver = get_sampler(options.sampler)
        schedule = options.schedule(self.T)
        n_steps = len(schedule)
        if keep_frames is None:
            keep_frames = n_steps
        elif not 1 <= keep_frames <= n_steps:
            raise ValueError(f"keep_frames must be in [1, {n_steps}] (the number of sampling steps), got {keep_frames}")
        z = self._initial_z(n_samples, n_nodes, node_mask, False, options.start_step, options.dataset_var)
        chain = torch.zeros((keep_frames,) + z.size(), device=z.device)

        def keep_frame(s_int: int, t_int: int, z_s: torch.Tensor) -> None:
            diffusion_utils.assert_mean_zero_with_mask(z_s[:, :, : self.n_dims], node_mask)
            chain[((s_int // options.step_size) * keep_frames) // n_steps] = self.unnormalize_z(z_s, node_mask)

        z = solver.run(self, z, schedule, node_mask, edge_mask, context, on_step=keep_frame)
        x, h = self.sample_p_xh_given_z0(z, node_mask, edge_mask, context, deterministic=solver.deterministic)
        diffusion_utils.assert_mean_zero_with_mask(x[:, :, : self.n_dims], node_mask)
        chain[0] = torch.cat([x, h["categorical"], h["integer"]], dim=2)
        return chain.view(n_samples * keep_frames, *z.size()[1:])

    def log_info(self) -> dict[str, float]:
        """The schedule's log-SNR range, as EDM logs it."""
        gamma_0 = self.gamma(torch.zeros(1, device=self.buffer.device))
        gamma_1 = self.gamma(torch.ones(1, device=self.buffer.device))
        return {"log_SNR_max": -gamma_0.item(), "log_SNR_min": -gamma_1.item()}
