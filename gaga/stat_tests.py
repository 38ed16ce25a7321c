"""Batched statistical tests: one-sample Kolmogorov-Smirnov against N(0, v) and the KSG
k-nearest-neighbour mutual information estimator. Each call handles a batch of
independent problems of equal sample size in one set of numpy operations.
"""
from __future__ import annotations

import numpy as np
from scipy import special, stats

# Bound the (batch, N, N) distance tensors of the MI estimator to about 64 MB each.
_MI_BLOCK_ELEMENTS = 8_000_000


def ks_normal(samples: np.ndarray, variance: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
    """Two-sided one-sample KS test of each row of ``samples`` (B, n) against N(0, variance).

    Returns the statistic D (B,) and the exact p-value (B,) from the distribution of D for
    n samples (scipy.stats.kstwo), as scipy.stats.kstest(method='exact') gives it.
    """
    x = np.sort(np.asarray(samples, dtype=np.float64), axis=-1)
    n = x.shape[-1]
    scale = np.sqrt(np.asarray(variance, dtype=np.float64))
    cdf = special.ndtr(x / np.expand_dims(scale, -1))
    ranks = np.arange(1, n + 1, dtype=np.float64)
    d_plus = (ranks / n - cdf).max(axis=-1)
    d_minus = (cdf - (ranks - 1) / n).max(axis=-1)
    d = np.maximum(d_plus, d_minus)
    p = np.clip(stats.kstwo.sf(d, n), 0.0, 1.0)
    return d, p


def _standardise(v: np.ndarray) -> np.ndarray:
    """Divide each row by its standard deviation (ddof 0), leaving constant rows alone, as sklearn does."""
    std = v.std(axis=-1, keepdims=True)
    return v / np.where(std > 0, std, 1.0)


def ksg_inputs(x: np.ndarray, y: np.ndarray, k: int, rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The KSG estimators' inputs: float64 (B, N) rows scaled to unit standard deviation and,
    given ``rng``, jittered by 1e-10 relative to max(1, mean |v|) (scikit-learn's tie breaking);
    one-line ValueErrors for mismatched shapes or k outside [1, N)."""
    x = _standardise(np.asarray(x, dtype=np.float64))
    y = _standardise(np.asarray(y, dtype=np.float64))
    if x.shape != y.shape or x.ndim != 2:
        raise ValueError(f"x and y must both have shape (B, N); got {x.shape} and {y.shape}")
    n = x.shape[1]
    if not 1 <= k < n:
        raise ValueError(f"the KSG estimator needs 1 <= k < N samples; got k={k}, N={n}")
    if rng is not None:
        x = x + 1e-10 * np.maximum(1.0, np.abs(x).mean(axis=-1, keepdims=True)) * rng.standard_normal(x.shape)
        y = y + 1e-10 * np.maximum(1.0, np.abs(y).mean(axis=-1, keepdims=True)) * rng.standard_normal(y.shape)
    return x, y


def ksg_mutual_information(
    x: np.ndarray, y: np.ndarray, k: int = 3, rng: np.random.Generator | None = None
) -> np.ndarray:
    """KSG estimate (Kraskov et al. 2004, estimator 1) of I(x; y) for each row pair, in nats.

    x, y: (B, N) -- B independent problems of N paired scalar samples. Per row, each variable
    is scaled to unit standard deviation (as scikit-learn's mutual_info_regression does);
    eps_i is the max-norm distance from sample i to its k-th nearest neighbour in the joint
    space; n_x(i), n_y(i) count the other samples strictly closer than eps_i in each
    marginal; I = psi(N) + psi(k) - mean_i[psi(n_x(i) + 1) + psi(n_y(i) + 1)], clipped at 0.
    ``rng`` adds scikit-learn's 1e-10 jitter (relative to max(1, mean |v|)) to break ties
    of discrete data; without it ties are counted as they are.
    """
    x, y = ksg_inputs(x, y, k, rng)
    batch, n = x.shape
    out = np.empty(batch, dtype=np.float64)
    block = max(1, _MI_BLOCK_ELEMENTS // (n * n))
    diagonal = np.arange(n)
    constant = special.digamma(n) + special.digamma(k)
    for start in range(0, batch, block):
        xb, yb = x[start : start + block], y[start : start + block]
        dx = np.abs(xb[:, :, None] - xb[:, None, :])
        dy = np.abs(yb[:, :, None] - yb[:, None, :])
        dx[:, diagonal, diagonal] = np.inf  # a sample is not its own neighbour
        dy[:, diagonal, diagonal] = np.inf
        joint = np.maximum(dx, dy)
        radius = np.partition(joint, k - 1, axis=-1)[..., k - 1]
        # "strictly closer than eps": compare <= against the next float below eps.
        radius = np.nextafter(radius, 0.0)[..., None]
        n_x = (dx <= radius).sum(axis=-1)
        n_y = (dy <= radius).sum(axis=-1)
        out[start : start + block] = constant - (special.digamma(n_x + 1) + special.digamma(n_y + 1)).mean(axis=-1)
    return np.maximum(out, 0.0)
