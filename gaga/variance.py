"""Per-molecule and dataset variance statistics of the centred, normalised features.

For molecule i with d_i = n_i * F' entries x_ij (its real atoms, the F' channels of a
modality) and mean mu_i = (1/d_i) sum_j x_ij (0 after centring):

    rms_i           = sqrt((1/d_i) sum_j x_ij^2)          root-mean-square feature value
    mean_square_i   = (1/d_i) sum_j x_ij^2                 the variance proper about 0
    unbiased_var_i  = 1/(d_i - 1) sum_j (x_ij - mu_i)^2    the GAGA paper's formula

Dataset values are plain means over molecules. The README's "QM9: 0.848" is the mean of
rms_i over all features (a standard deviation, not a variance); GAGA nevertheless passes it
as ``--dataset_var`` into v_t = alpha_t^2 v + sigma_t^2, where a variance belongs.
"""
from __future__ import annotations

import numpy as np

from gaga.data import Features

STATISTICS = ("rms", "mean_square", "unbiased_var")
README_STATISTIC = "rms"


def modality_channels(features: Features) -> dict[str, slice]:
    """'all' plus each modality present in the features."""
    return {"all": slice(0, features.n_channels), **features.channels}


def molecule_statistics(values: np.ndarray, mask: np.ndarray, channels: slice) -> dict[str, np.ndarray]:
    """rms, mean_square, unbiased_var and the entry count d per molecule, for one channel range."""
    x = values[..., channels]
    m = mask[..., None].astype(x.dtype)
    d = m.sum(axis=(1, 2)) * x.shape[-1]
    total = (x * m).sum(axis=(1, 2))
    sum_sq = (x * x * m).sum(axis=(1, 2))
    mean = total / d
    mean_square = sum_sq / d
    # sum (x - mu)^2 = sum x^2 - d mu^2; d >= 2 for every molecule with more than one entry.
    centred_sq = np.maximum(sum_sq - d * mean * mean, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        unbiased = np.where(d > 1, centred_sq / (d - 1), np.nan)
    return {"d": d, "mean": mean, "rms": np.sqrt(mean_square), "mean_square": mean_square, "unbiased_var": unbiased}


def per_molecule_table(features: Features) -> dict[str, np.ndarray]:
    """Columns of the per-molecule table: index, n_atoms, then {statistic}_{modality}."""
    table: dict[str, np.ndarray] = {"index": features.index, "n_atoms": features.num_atoms}
    for name, channels in modality_channels(features).items():
        stats = molecule_statistics(features.values, features.mask, channels)
        for stat in STATISTICS:
            table[f"{stat}_{name}"] = stats[stat]
    return table


def dataset_statistics(features: Features) -> dict[str, dict[str, float]]:
    """{modality: {rms, mean_square, unbiased_var}}: means over molecules."""
    table = per_molecule_table(features)
    return {
        name: {stat: float(np.nanmean(table[f"{stat}_{name}"])) for stat in STATISTICS}
        for name in modality_channels(features)
    }


def statistics_by_atom_count(features: Features) -> dict[str, np.ndarray]:
    """Means of every per-molecule column per atom count (vectorised with bincount)."""
    table = per_molecule_table(features)
    counts = np.bincount(table["n_atoms"])
    present = np.nonzero(counts)[0]
    out: dict[str, np.ndarray] = {"n_atoms": present, "n_molecules": counts[present]}
    for key, column in table.items():
        if key in ("index", "n_atoms"):
            continue
        sums = np.bincount(table["n_atoms"], weights=np.nan_to_num(column))
        out[key] = sums[present] / counts[present]
    return out


def measured_modality_variances(features: Features) -> dict[str, float]:
    """The variance proper (mean over molecules of the mean square) of each modality."""
    stats = dataset_statistics(features)
    return {name: stats[name]["mean_square"] for name in features.channels}
