"""Statistics of the paper's dataset-level Gaussianity evaluator (gaga/evaluator_paper.py).

* ``ksg_terms``: the KSG mutual-information estimator (the same estimator as
  ``gaga.stat_tests.ksg_mutual_information``) for large samples. The joint k-th neighbour
  distance comes from a max-norm k-d tree and the marginal counts from binary search in the
  sorted marginals, so one problem of N samples costs O(N log N) instead of the
  (N x N) distance matrices of the per-molecule tests (fine there: N <= 29 atoms; here N is
  the number of molecules, 10,000). It also returns the per-sample terms
  psi(n_x + 1) + psi(n_y + 1), whose mean the estimate subtracts: reweighting them is the
  bootstrap of the estimate with the neighbour counts held fixed (resampling the points
  themselves would create exact duplicates, which the k-NN estimator reads as dependence).
* ``ks_distance_sorted``: sup |F_n - Phi_v| of sorted samples, optionally with per-sample
  weights (a bootstrap replicate = molecule multiplicities).
* ``gaussianity_functional``: H^(K) of Proposition 3.1 from samples, through Gram-matrix
  identities for the Frobenius norms of the cumulant tensors (no d^4 tensor is formed).
"""
from __future__ import annotations

import numpy as np
from scipy import special
from scipy.spatial import cKDTree

from gaga.stat_tests import ksg_inputs

# Relative shrink of the k-th neighbour distance: "strictly closer than eps" in the marginals,
# robust to the rounding of x_i +- eps (the neighbour that sets eps lies exactly at eps in one marginal).
_STRICT = 1.0 - 1e-12


def ksg_terms(
    x: np.ndarray, y: np.ndarray, k: int = 3, rng: np.random.Generator | None = None, workers: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """KSG estimate of I(x; y) per row pair (nats, clipped at 0) and the per-sample terms.

    x, y: (B, N). Returns (mi (B,), terms (B, N)) with mi = max(0, psi(N) + psi(k) - mean(terms)).
    Each variable is scaled to unit standard deviation and, given ``rng``, jittered by 1e-10
    (scikit-learn's tie breaking), exactly as ``ksg_mutual_information``. ``workers``: threads
    of the k-d tree queries.
    """
    x, y = ksg_inputs(np.atleast_2d(x), np.atleast_2d(y), k, rng)
    batch, n = x.shape
    terms = np.empty((batch, n), dtype=np.float64)
    for b in range(batch):  # one tree per problem (pairs x timesteps), never per sample
        points = np.column_stack([x[b], y[b]])
        radius = cKDTree(points).query(points, k=k + 1, p=np.inf, workers=workers)[0][:, k] * _STRICT
        counts = []
        for v in (x[b], y[b]):
            s = np.sort(v)
            # samples with |v_j - v_i| < radius, minus the sample itself
            counts.append(np.searchsorted(s, v + radius, side="left") - np.searchsorted(s, v - radius, side="right") - 1)
        terms[b] = special.digamma(counts[0] + 1) + special.digamma(counts[1] + 1)
    mi = special.digamma(n) + special.digamma(k) - terms.mean(axis=-1)
    return np.maximum(mi, 0.0), terms


def ks_distance_sorted(sorted_x: np.ndarray, cdf: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """sup_x |F_n(x) - Phi(x)| along the last axis.

    sorted_x is only implied: ``cdf`` (..., N) holds Phi at the sorted samples. ``weights``
    (R, N), in the same sorted order, gives R weighted empirical CDFs (bootstrap
    multiplicities); returns (...,) without weights, (R,) with them (cdf then 1-D).
    """
    del sorted_x  # the CDF values at the sorted points are all the statistic needs
    n = cdf.shape[-1]
    if weights is None:
        ranks = np.arange(1, n + 1, dtype=cdf.dtype)
        return np.maximum((ranks / n - cdf).max(axis=-1), (cdf - (ranks - 1) / n).max(axis=-1))
    cum = np.cumsum(weights, axis=-1)
    total = cum[:, -1:]
    upper = cum / total
    lower = (cum - weights) / total
    return np.maximum((upper - cdf).max(axis=-1), (cdf - lower).max(axis=-1))


def gaussianity_functional(
    samples: np.ndarray, beta: float = 1.0, weights: dict[int, float] | None = None, max_order: int = 4
) -> dict[str, float]:
    """H^(K) of Proposition 3.1 on samples (N, d), each coordinate standardised first.

    H^(K) = beta ||offdiag Cov||_F + sum_{3 <= k <= K} w_k ||C^(k)||_F, with the coordinates
    centred and scaled to unit variance (so H measures shape and dependence, not scale; Cov
    is then the correlation matrix). Returns the parts and H for K = 2 .. max_order (<= 4).
    Frobenius norms by Gram-matrix identities (G = Y Y^T, Sigma = Y^T Y / N):
        ||offdiag Cov||^2 = mean(G^2) - sum_i mean(y_ni^2 y_mi^2),
        ||C3||^2 = mean(G^3),  ||C4||^2 = mean(G^4) - 6 mean_n (y_n' Sigma y_n)^2
                                          + 3 tr(Sigma^2)^2 + 6 tr(Sigma^4)
    where the means of powers of G run over pairs n != m (U-statistics: the squared norms of
    the moment tensors are estimated without the n = m terms, whose positive bias of order
    d^k / N would otherwise dominate the cumulants of near-Gaussian data); Sigma is plugged in.
    A squared norm estimated below 0 counts as 0.
    """
    if max_order not in (2, 3, 4):
        raise ValueError(f"the functional is implemented for K = 2, 3 or 4, got {max_order}")
    weights = {3: 1.0 / 6.0, 4: 1.0 / 24.0} if weights is None else weights
    y = np.asarray(samples, dtype=np.float64)
    if y.ndim != 2 or y.shape[0] < 2:
        raise ValueError(f"samples must have shape (N >= 2, d); got {y.shape}")
    y = y - y.mean(axis=0)
    std = y.std(axis=0)
    y = y / np.where(std > 0, std, 1.0)
    n = y.shape[0]
    sigma = y.T @ y / n
    gram = y @ y.T
    g2 = gram * gram
    diag = np.diag(gram)

    def offdiag_mean(power: np.ndarray, diagonal: np.ndarray) -> float:
        return float((power.sum() - diagonal.sum()) / (n * (n - 1)))

    # ||offdiag E[y y']||^2 over pairs n != m: sum_{i != j} y_ni y_nj y_mi y_mj = G_nm^2 - sum_i y_ni^2 y_mi^2.
    sq = y * y
    same_coordinate = float(((sq.sum(axis=0) ** 2).sum() - (sq * sq).sum()) / (n * (n - 1)))
    parts = {"cov_offdiag": float(np.sqrt(max(0.0, offdiag_mean(g2, diag**2) - same_coordinate)))}
    if max_order >= 3:
        parts["c3"] = float(np.sqrt(max(0.0, offdiag_mean(g2 * gram, diag**3))))
        if max_order >= 4:
            q = np.einsum("ni,ij,nj->n", y, sigma, y)
            s2 = sigma @ sigma
            c4_sq = offdiag_mean(g2 * g2, diag**4) - 6.0 * (q * q).mean() + 3.0 * np.trace(s2) ** 2 + 6.0 * np.trace(s2 @ s2)
            parts["c4"] = float(np.sqrt(max(0.0, c4_sq)))
    out = dict(parts)
    h = beta * parts["cov_offdiag"]
    out["H2"] = h
    for order in range(3, max_order + 1):
        h += weights[order] * parts[f"c{order}"]
        out[f"H{order}"] = h
    return out
