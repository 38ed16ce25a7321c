"""GAGA's Gaussianity evaluator: is a noised molecule z_t an independent Gaussian N(0, v_t I)?

For a molecule z_0 (n atoms x F centred, normalised channels) and a timestep t:
    z_t = alpha_t z_0 + sigma_t eps,  eps ~ N(0, I) centred per molecule like the data.
Tests, each per modality m in {positions, atom_types} (atom_types = every h channel: the
one-hot and, if the run has them, the charges):
  * KS (distribution similarity): the n * F_m flattened entries vs N(0, v_t^m) with
    v_t^m = alpha_t^2 v^m + sigma_t^2; passes if p > alpha.
  * MI between features (independence of channels): KSG mutual information between random
    pairs of the modality's channels (columns, n samples each); passes if the mean < mi_threshold.
and one joint test:
  * MI between atoms (independence of atoms): KSG MI between random pairs of atoms (rows),
    each row holding all F channels as its samples; passes if the mean < mi_threshold.
    (Rows of a single modality hold only 3 position samples, too few for k = 3 neighbours,
    so atom rows are tested on all channels together.)
A modality passes when its KS and feature-MI tests pass; the molecule passes at t when
both modalities and the atom-MI test pass.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from gaga.stat_tests import ks_normal, ksg_mutual_information

TEST_MODALITIES = ("positions", "atom_types")
DEFAULT_TIMESTEPS = tuple(range(300, 801, 50))


@dataclass(frozen=True)
class GaussianityConfig:
    timesteps: tuple[int, ...] = DEFAULT_TIMESTEPS
    alpha: float = 0.05
    mi_threshold: float = 0.1
    mi_neighbors: int = 3
    mi_pairs: int = 10
    min_atoms: int = 4
    seed: int = 0
    # v^m per test modality (the scalar dataset_var for both in 'scalar' mode).
    variances: dict[str, float] = field(default_factory=lambda: {"positions": 0.848, "atom_types": 0.848})

    def validate(self) -> None:
        if not 0.0 < self.alpha < 1.0:
            raise ValueError(f"--alpha must lie in (0, 1), got {self.alpha}")
        if not self.mi_threshold > 0.0:
            raise ValueError(f"--mi_threshold must be positive, got {self.mi_threshold}")
        if self.mi_neighbors < 1:
            raise ValueError(f"--mi_neighbors must be >= 1, got {self.mi_neighbors}")
        if self.min_atoms <= self.mi_neighbors:
            raise ValueError(f"molecules need more than k = {self.mi_neighbors} atoms for the k-NN MI test (min_atoms = {self.min_atoms})")
        if self.mi_pairs < 1:
            raise ValueError(f"--mi_pairs must be >= 1, got {self.mi_pairs}")
        missing = [m for m in TEST_MODALITIES if m not in self.variances]
        if missing or any(not (v > 0 and np.isfinite(v)) for v in self.variances.values()):
            raise ValueError(f"need a positive variance for each of {TEST_MODALITIES}, got {self.variances}")


def test_channels(channels: dict[str, slice], n_channels: int) -> dict[str, slice]:
    """Channel ranges of the tested modalities: positions, and every h channel as atom_types."""
    positions = channels["positions"]
    return {"positions": positions, "atom_types": slice(positions.stop, n_channels)}


def _random_pairs(n_items: int, n_pairs: int, n_draws: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """For each of n_draws draws, min(n_pairs, all) distinct unordered pairs of n_items items: (n_draws, P) each."""
    first, second = np.triu_indices(n_items, k=1)
    take = min(n_pairs, first.size)
    choice = np.argsort(rng.random((n_draws, first.size)), axis=1)[:, :take]
    return first[choice], second[choice]


def _pair_mi(values: np.ndarray, a: np.ndarray, b: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Mean KSG MI over pairs: values (C, T, I, S) items x samples, pairs a, b (C, P) -> (C, T)."""
    c, t, _, s = values.shape
    xa = np.take_along_axis(values, a[:, None, :, None], axis=2)
    xb = np.take_along_axis(values, b[:, None, :, None], axis=2)
    mi = ksg_mutual_information(xa.reshape(-1, s), xb.reshape(-1, s), k=k, rng=rng)
    return mi.reshape(c, t, -1).mean(axis=-1)


def evaluate_molecules(
    z0: np.ndarray,
    alpha2: np.ndarray,
    sigma2: np.ndarray,
    channels: dict[str, slice],
    config: GaussianityConfig,
    rng: np.random.Generator,
) -> dict[str, np.ndarray]:
    """Run every test on C molecules of equal size at every timestep of the grid.

    z0: (C, n, F) centred, normalised features of molecules with exactly n atoms (no padding);
    alpha2, sigma2: (T,) at the grid. Returns arrays of shape (C, T): statistics and pass flags.
    """
    n_mol, n_atoms, n_channels = z0.shape
    if n_atoms < config.min_atoms:
        raise ValueError(f"molecules with {n_atoms} atoms are below the minimum of {config.min_atoms}")
    alpha = np.sqrt(alpha2)[None, :, None, None]
    sigma = np.sqrt(sigma2)[None, :, None, None]
    eps = rng.standard_normal((n_mol, alpha2.size, n_atoms, n_channels))
    eps -= eps.mean(axis=2, keepdims=True)  # centred per molecule, like the data
    z = alpha * z0[:, None] + sigma * eps  # (C, T, n, F)

    out: dict[str, np.ndarray] = {}
    passes = np.ones((n_mol, alpha2.size), dtype=bool)
    for name, sl in test_channels(channels, n_channels).items():
        zm = z[..., sl]
        v_t = alpha2 * config.variances[name] + sigma2  # GAGA's closed form, (T,)
        d, p = ks_normal(zm.reshape(n_mol * alpha2.size, -1), np.tile(v_t, n_mol))
        out[f"ks_stat_{name}"] = d.reshape(n_mol, -1)
        out[f"ks_p_{name}"] = p.reshape(n_mol, -1)
        if zm.shape[-1] >= 2:
            a, b = _random_pairs(zm.shape[-1], config.mi_pairs, n_mol, rng)
            out[f"mi_features_{name}"] = _pair_mi(np.swapaxes(zm, 2, 3), a, b, config.mi_neighbors, rng)
        else:  # one channel (GeoLDM's latent h with latent_nf 1): no pair of features to be dependent
            out[f"mi_features_{name}"] = np.zeros((n_mol, alpha2.size))
        out[f"pass_ks_{name}"] = out[f"ks_p_{name}"] > config.alpha
        out[f"pass_mi_features_{name}"] = out[f"mi_features_{name}"] < config.mi_threshold
        out[f"pass_{name}"] = out[f"pass_ks_{name}"] & out[f"pass_mi_features_{name}"]
        passes &= out[f"pass_{name}"]
    a, b = _random_pairs(n_atoms, config.mi_pairs, n_mol, rng)
    out["mi_atoms"] = _pair_mi(z, a, b, config.mi_neighbors, rng)
    out["pass_mi_atoms"] = out["mi_atoms"] < config.mi_threshold
    out["pass"] = passes & out["pass_mi_atoms"]
    return out
