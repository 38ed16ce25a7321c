"""Per-molecule and dataset variance statistics of the centred, normalised features.

For molecule i with d_i = n_i * F' entries x_ij (its real atoms, the F' channels of a
modality) and mean mu_i = (1/d_i) sum_j x_ij (0 after centring):

    rms_i           = sqrt((1/d_i) sum_j x_ij^2)          root-mean-square feature value
    mean_square_i   = (1/d_i) sum_j x_ij^2                 the variance proper about 0
    unbiased_var_i  = 1/(d_i - 1) sum_j (x_ij - mu_i)^2    the GAGA paper's formula

Dataset values are plain means over molecules. The README's "QM9: 0.848" is the mean of
rms_i over all features (a standard deviation, not a variance); GAGA nevertheless passes it
as ``--dataset_var`` into v_t = alpha_t^2 v + sigma_t^2, where a variance belongs.

Statistics are per molecule, so they are computed over ``features.blocks()`` (QM9: one
dense block; GEOM-Drugs: bounded pieces built on demand) and concatenated; pass the table
to dataset_statistics / statistics_by_atom_count to avoid computing it again.
"""
from __future__ import annotations

import numpy as np

from gaga.data import Features, MoleculeFeatures

STATISTICS = ("rms", "mean_square", "unbiased_var")
README_STATISTIC = "rms"


def modality_channels(features: MoleculeFeatures) -> dict[str, slice]:
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


def _dense_table(features: Features) -> dict[str, np.ndarray]:
    table: dict[str, np.ndarray] = {"index": features.index, "n_atoms": features.num_atoms}
    for name, channels in modality_channels(features).items():
        stats = molecule_statistics(features.values, features.mask, channels)
        for stat in STATISTICS:
            table[f"{stat}_{name}"] = stats[stat]
    return table


def per_molecule_table(features: MoleculeFeatures) -> dict[str, np.ndarray]:
    """Columns of the per-molecule table, in the features' row order: index, n_atoms, then {statistic}_{modality}."""
    if isinstance(features, Features):
        return _dense_table(features)
    pieces = [(rows, _dense_table(block)) for rows, block in features.blocks()]
    if not pieces:
        raise ValueError("no molecules to compute statistics of")
    order = np.concatenate([rows for rows, _ in pieces])
    table = {}
    for key in pieces[0][1]:
        column = np.concatenate([t[key] for _, t in pieces])
        table[key] = np.empty_like(column)
        table[key][order] = column  # blocks come in their own order; put rows back in place
    return table


def modality_mean_squares(features: MoleculeFeatures, channels: dict[str, slice]) -> dict[str, float]:
    """The variance proper of each channel range: the mean over molecules of the per-molecule mean square."""
    per_molecule: dict[str, list[np.ndarray]] = {name: [] for name in channels}
    for _rows, block in features.blocks():
        for name, sl in channels.items():
            per_molecule[name].append(molecule_statistics(block.values, block.mask, sl)["mean_square"])
    return {name: float(np.concatenate(parts).mean()) for name, parts in per_molecule.items()}


def dataset_statistics(features: MoleculeFeatures, table: dict[str, np.ndarray] | None = None) -> dict[str, dict[str, float]]:
    """{modality: {rms, mean_square, unbiased_var}}: means over molecules."""
    table = per_molecule_table(features) if table is None else table
    return {
        name: {stat: float(np.nanmean(table[f"{stat}_{name}"])) for stat in STATISTICS}
        for name in modality_channels(features)
    }


def statistics_by_atom_count(features: MoleculeFeatures, table: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Means of every per-molecule column per atom count (vectorised with bincount)."""
    table = per_molecule_table(features) if table is None else table
    counts = np.bincount(table["n_atoms"])
    present = np.nonzero(counts)[0]
    out: dict[str, np.ndarray] = {"n_atoms": present, "n_molecules": counts[present]}
    for key, column in table.items():
        if key in ("index", "n_atoms"):
            continue
        sums = np.bincount(table["n_atoms"], weights=np.nan_to_num(column))
        out[key] = sums[present] / counts[present]
    return out
