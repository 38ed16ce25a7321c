"""Synthetic data sets with known Gaussianity, for the paper evaluator's checks and comparisons.

* ``gaussian_control``: non-molecular, every entry i.i.d. N(0, 1), not centred. Every noised
  marginal x_t = alpha_t x_0 + sigma_t eps is exactly N(0, 1) with independent entries, so
  H = 0 at every t and T* is the first grid point (up to the tests' false-rejection rate).
* ``non_gaussian_control``: non-molecular and strongly non-Gaussian: every channel of an atom
  is 2 s + 0.1 n (s = +-1 shared by the atom's channels, and by 90% of the atoms of a
  "molecule"; n Gaussian), scaled to unit variance: bimodal marginals, near-deterministic
  dependence between channels and between atoms.
* ``geom_shaped_features``: GEOM-Drugs-*shaped* molecules (there is no real GEOM here): atom
  counts drawn from GEOM's histogram (configs/datasets_info.json, mean 44, up to 181 atoms),
  atom types from GEOM's type frequencies (44.6% H), heavy atoms on a chain with 1.5 A steps
  whose directions are moving averages of random unit vectors (a persistent random walk, so a
  drug-sized radius of gyration), hydrogens 1.09 A from a random heavy atom. The features
  are built by the same code as real data (positions/1, 16 one-hot types/4, centred per
  molecule: gaga.data.centred_features). Chemistry is not realistic; sizes, type
  frequencies, the one-hot layout and the length scale are.
Everything is generated with array operations over molecules and atoms at once.
"""
from __future__ import annotations

import numpy as np

from configs.datasets_config import get_dataset_info
from gaga.data import DataSpec, Features, centred_features
from gaga.evaluator_paper import FlatSample

QM9_LIKE_CHANNELS = {"positions": slice(0, 3), "atom_types": slice(3, 8)}


def _uniform_sizes(n_molecules: int, n_atoms: int) -> np.ndarray:
    return np.full(n_molecules, int(n_atoms), dtype=np.int64)


def gaussian_control(n_molecules: int, n_atoms: int = 18, seed: int = 0) -> FlatSample:
    """i.i.d. N(0, 1) entries in QM9's layout (3 + 5 channels), not centred."""
    sizes = _uniform_sizes(n_molecules, n_atoms)
    values = np.random.default_rng([seed, 11]).standard_normal((int(sizes.sum()), 8))
    return FlatSample(values, sizes, dict(QM9_LIKE_CHANNELS), centred=False)


def non_gaussian_control(n_molecules: int, n_atoms: int = 18, seed: int = 0) -> FlatSample:
    """Bimodal, strongly dependent entries with unit variance, in QM9's layout, not centred."""
    rng = np.random.default_rng([seed, 12])
    sizes = _uniform_sizes(n_molecules, n_atoms)
    n = int(sizes.sum())
    molecule_sign = np.repeat(rng.choice([-1.0, 1.0], size=n_molecules), sizes)
    flip = np.where(rng.random(n) < 0.9, 1.0, -1.0)
    s = (molecule_sign * flip)[:, None]
    values = (2.0 * s + 0.1 * rng.standard_normal((n, 8))) / np.sqrt(4.01)
    return FlatSample(values, sizes, dict(QM9_LIKE_CHANNELS), centred=False)


def geom_shaped_features(n_molecules: int, seed: int = 0, max_atoms: int | None = None) -> Features:
    """GEOM-Drugs-shaped molecules (with hydrogens) as centred, normalised Features (dense)."""
    info = get_dataset_info("geom", False)
    rng = np.random.default_rng([seed, 13])
    counts = np.array(sorted(info["n_nodes"].items()), dtype=np.int64)
    if max_atoms is not None:
        counts = counts[counts[:, 0] <= max_atoms]
    sizes = rng.choice(counts[:, 0], size=n_molecules, p=counts[:, 1] / counts[:, 1].sum())
    type_counts = np.array([info["atom_types"][i] for i in range(len(info["atom_decoder"]))], dtype=np.float64)
    h_fraction = type_counts[0] / type_counts.sum()
    n_max = int(sizes.max())
    slot = np.arange(n_max)[None, :]
    mask = slot < sizes[:, None]
    # Hydrogens: a binomial share of each molecule, at least one heavy atom; they fill the last slots.
    n_h = np.minimum(rng.binomial(sizes, h_fraction), sizes - 1)
    n_heavy = sizes - n_h
    heavy = slot < n_heavy[:, None]
    heavy_types = rng.choice(np.arange(1, type_counts.size), size=(n_molecules, n_max), p=type_counts[1:] / type_counts[1:].sum())
    types = np.where(heavy, heavy_types, 0)

    def unit(shape: tuple[int, ...]) -> np.ndarray:
        v = rng.standard_normal(shape + (3,))
        return v / np.linalg.norm(v, axis=-1, keepdims=True)

    u = unit((n_molecules, n_max + 2))
    direction = u[:, 2:] + u[:, 1:-1]  # moving average of two: persistent steps
    direction /= np.linalg.norm(direction, axis=-1, keepdims=True)
    steps = 1.5 * direction * (heavy & (slot > 0))[..., None]
    chain = np.cumsum(steps, axis=1)
    parent = np.floor(rng.random((n_molecules, n_max)) * n_heavy[:, None]).astype(np.int64)
    hydrogen_pos = np.take_along_axis(chain, parent[..., None], axis=1) + 1.09 * unit((n_molecules, n_max))
    positions = np.where(heavy[..., None], chain, hydrogen_pos) * mask[..., None]
    one_hot = (types[..., None] == np.arange(type_counts.size)) & mask[..., None]
    atomic = np.asarray(info["atomic_nb"])[types] * mask
    arrays = {"positions": positions.astype(np.float32), "one_hot": one_hot, "charges": atomic.astype(np.int64),
              "index": np.arange(n_molecules)}
    return centred_features(arrays, DataSpec(dataset="geom"))
