"""The GAGA paper's dataset-level Gaussianity evaluator: T* = max(T_ID, T_DS).

The published scripts (gaga/gaussianity.py) test each molecule on its own and average
first-pass times. The paper (Key Designs 1 and 3) instead looks at the noised *dataset*:

  Dep(x_t)  k-NN (KSG) mutual information, averaged over pairs of components;
            T_ID = min{t : Dep(x_t) <= eps_dep}
  D_t       (1/d) sum_j sup_x |F_{t,j}(x) - Phi_{v~_t}(x)|, the KS distance of each
            dimension's empirical CDF over samples from N(0, v~_t);
            T_DS = min{t : D_t <= eps_DS}
  T* = max(T_ID, T_DS),  v~_t = 1 - abar_t (1 - v^).

In our VP schedule abar_t = alpha_t^2 and sigma_t^2 = 1 - alpha_t^2, so the paper's
v~_t = alpha_t^2 v^ + sigma_t^2 is the scripts' v_t (``gaga.schedule.variance_at``).

**The dimension set.** Molecules have different sizes, so "dimension j" needs a meaning.
We use *each feature channel over all atoms* (d = F channels: 3 positions + the one-hot
[+ charge]): F_{t,c} is the empirical CDF of channel c pooled over every atom of every
sampled molecule. Why: the models are permutation-equivariant and the order of atoms in
the files is arbitrary (QM9 lists heavy atoms first), so a per-slot marginal would measure
the file order, not the distribution the model sees; pooling uses every molecule size at
its dataset frequency (no small atom-count groups with a handful of samples); and it is
exactly the per-entry law the Gaussian start N(0, v~ I) has to match. Atoms of one molecule
are not independent (centring ties them), so confidence bands resample whole molecules and
the thresholds are calibrated on Gaussian data with the same molecule sizes and centring.
Dependence is measured on one random atom a_i and a second random atom b_i of each molecule
(fixed across t): MI between every pair of channels of atom a (within-atom, "features";
at most ``mi_feature_pairs`` random pairs) and between the same channel of atoms a and b
(between atoms, "atoms"); Dep is the mean over all these pairs, samples = molecules.

**Thresholds.** ``eps_dep`` / ``eps_ds`` as given, else null-calibrated: the (1 - alpha)
quantile of the statistic over ``null_replicates`` exactly Gaussian data sets of the same
shape (same molecule sizes, same centring, same sample sizes and pairs). Both statistics are
scale-free, so one null serves every t and every variance convention. A threshold then means
"indistinguishable from the Gaussian start at this sample size".

**Confidence bands.** ``bootstrap`` replicates resample whole molecules (multinomial
multiplicities, shared by D and Dep so that T* gets a joint interval). D_t of a replicate is
the weighted-ECDF KS distance; Dep of a replicate reweights the KSG per-sample terms with
the neighbour counts held fixed. The resampled KS distance is inflated by duplicated atoms,
so replicates are re-centred on the estimate: bands show the bootstrap spread around D_t.

**Variance conventions** (v^ in v~_t): ``rms`` (GAGA README's 0.848 on QM9, a standard
deviation), ``variance`` (the mean square, 0.727), ``unbiased`` (the paper's formula, 0.732;
the default), ``per_modality`` (each modality's mean square: positions 1.93, types 0.0074).
D_t is computed for all of them at once (one sort per channel and t); Dep does not depend
on v^.

**Gaussianity functional** H^(K) (Proposition 3.1, ``gaga.paper_stats.gaussianity_functional``)
of the vector (atom a, atom b) = 2F coordinates, standardised, for K = 2 and K = 4
(beta = 1, w_3 = 1/3!, w_4 = 1/4!: the weights of the cumulants in an Edgeworth expansion).

Everything is vectorised over atoms and molecules; Python loops run over timesteps,
channels, channel pairs and replicates only.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import special

from gaga.paper_stats import gaussianity_functional, ks_distance_sorted, ksg_terms

CONVENTIONS = ("rms", "variance", "unbiased", "per_modality")
CONVENTION_ALIASES = {"rms": "rms", "readme": "rms", "variance": "variance", "mean_square": "variance",
                      "unbiased": "unbiased", "paper": "unbiased", "per_modality": "per_modality",
                      "per-modality": "per_modality", "given": "given"}
DEFAULT_PAPER_TIMESTEPS = tuple(range(0, 1001, 50))
RESULT_FILE = "paper_evaluator.json"
CURVES_FILE = "paper_curves.csv"
EPS_FILE = "paper_t_star_vs_eps.csv"


# --- the data: atoms of sampled molecules, flat ---------------------------------------------

@dataclass
class FlatSample:
    """Atoms of M molecules, molecule after molecule: values (A, F), sizes (M,) with sum = A.

    ``centred``: molecules are zero-centred per channel (GAGA's molecules; the noise is then
    centred too). Non-molecular controls set it False (plain i.i.d. VP noise).
    """

    values: np.ndarray
    sizes: np.ndarray
    channels: dict[str, slice]
    centred: bool = True
    index: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.values = np.asarray(self.values, dtype=np.float64)
        self.sizes = np.asarray(self.sizes, dtype=np.int64)
        if self.values.ndim != 2 or int(self.sizes.sum()) != self.values.shape[0] or (self.sizes < 1).any():
            raise ValueError(f"a FlatSample needs values (A, F) and molecule sizes >= 1 summing to A; got {self.values.shape}, sum {int(self.sizes.sum())}")
        if self.index is None:
            self.index = np.arange(self.sizes.size)

    @property
    def n_molecules(self) -> int:
        return int(self.sizes.size)

    @property
    def n_channels(self) -> int:
        return int(self.values.shape[1])

    @property
    def offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.sizes)[:-1]])

    @property
    def molecule(self) -> np.ndarray:
        """(A,) molecule number of each atom."""
        return np.repeat(np.arange(self.n_molecules), self.sizes)

    def subset(self, molecules: np.ndarray) -> "FlatSample":
        molecules = np.asarray(molecules, dtype=np.int64)
        sizes = self.sizes[molecules]
        # atom rows of the chosen molecules, in their order: offset of the molecule + 0..size-1
        starts = np.repeat(self.offsets[molecules], sizes)
        within = np.arange(int(sizes.sum())) - np.repeat(np.cumsum(sizes) - sizes, sizes)
        return FlatSample(self.values[starts + within], sizes, dict(self.channels), self.centred, self.index[molecules])


def flat_from_features(features, rows: np.ndarray | None = None) -> FlatSample:
    """The real atoms of the given rows of a MoleculeFeatures (QM9 Features or GEOM's on-demand ones)."""
    selected = features if rows is None else features.subset(np.asarray(rows))
    values, sizes, index = [], [], []
    for _block_rows, block in selected.blocks():
        values.append(block.values[block.mask])  # row-major: molecule by molecule
        sizes.append(block.num_atoms)
        index.append(block.index)
    return FlatSample(np.concatenate(values), np.concatenate(sizes), dict(features.channels), True, np.concatenate(index))


def centre_flat(values: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Subtract each molecule's per-channel mean (segments of ``sizes`` rows)."""
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    means = np.add.reduceat(values, offsets, axis=0) / sizes[:, None]
    return values - np.repeat(means, sizes, axis=0)


# --- variance conventions --------------------------------------------------------------------

def _modality_channels(channels: dict[str, slice], n_channels: int) -> dict[str, slice]:
    return {"all": slice(0, n_channels), **channels}


def variance_conventions_flat(sample: FlatSample) -> dict[str, np.ndarray]:
    """v^ per channel (F,) for each convention, from per-molecule statistics averaged over molecules
    (the definitions of gaga/variance.py: rms, mean square, unbiased 1/(d-1) sum (x - mu)^2)."""
    f = sample.n_channels
    out: dict[str, np.ndarray] = {}
    stats = {}
    for name, sl in _modality_channels(sample.channels, f).items():
        x = sample.values[:, sl]
        d = sample.sizes * x.shape[1]
        offsets = sample.offsets
        total = np.add.reduceat(x.sum(axis=1), offsets)
        sum_sq = np.add.reduceat((x * x).sum(axis=1), offsets)
        mean_square = sum_sq / d
        with np.errstate(divide="ignore", invalid="ignore"):
            unbiased = np.where(d > 1, np.maximum(sum_sq - total * total / d, 0.0) / (d - 1), np.nan)
        stats[name] = {"rms": float(np.sqrt(mean_square).mean()), "variance": float(mean_square.mean()),
                       "unbiased": float(np.nanmean(unbiased))}
    return _conventions_from_stats(stats, sample.channels, f)


def variance_conventions_from_table(table: dict[str, np.ndarray], channels: dict[str, slice], n_channels: int) -> dict[str, np.ndarray]:
    """The same conventions from gaga.variance.per_molecule_table (a whole split, streamed for GEOM)."""
    stats = {}
    for name in _modality_channels(channels, n_channels):
        stats[name] = {"rms": float(np.mean(table[f"rms_{name}"])), "variance": float(np.mean(table[f"mean_square_{name}"])),
                       "unbiased": float(np.nanmean(table[f"unbiased_var_{name}"]))}
    return _conventions_from_stats(stats, channels, n_channels)


def _conventions_from_stats(stats: dict, channels: dict[str, slice], n_channels: int) -> dict[str, np.ndarray]:
    out = {c: np.full(n_channels, stats["all"][c]) for c in ("rms", "variance", "unbiased")}
    per = np.full(n_channels, np.nan)
    for name, sl in channels.items():
        per[sl] = stats[name]["variance"]
    out["per_modality"] = per
    return out


def resolve_convention(name: str) -> str:
    key = CONVENTION_ALIASES.get(str(name).lower())
    if key is None:
        raise ValueError(f"unknown variance convention {name!r}; choose one of {', '.join(CONVENTIONS)}")
    return key


# --- configuration ---------------------------------------------------------------------------

@dataclass(frozen=True)
class PaperConfig:
    timesteps: tuple[int, ...] = DEFAULT_PAPER_TIMESTEPS
    convention: str = "unbiased"  # the primary v^ convention (bootstrap bands, headline T*)
    eps_dep: float | None = None  # None: null-calibrated
    eps_ds: float | None = None
    null_alpha: float = 0.05
    null_replicates: int = 50
    bootstrap: int = 50
    mi_neighbors: int = 3
    mi_samples: int = 4000  # molecules used by the MI estimates (a random subset if more)
    mi_feature_pairs: int = 32
    h_samples: int = 2000
    h_beta: float = 1.0
    h_w3: float = 1.0 / 6.0
    h_w4: float = 1.0 / 24.0
    seed: int = 0
    workers: int = 1  # threads of the k-d tree queries (results do not depend on it)

    def validate(self) -> None:
        resolve_convention(self.convention)  # "given" (--dataset_var) is accepted too
        if not 0.0 < self.null_alpha < 1.0:
            raise ValueError(f"--null_alpha must lie in (0, 1), got {self.null_alpha}")
        for name in ("eps_dep", "eps_ds"):
            value = getattr(self, name)
            if value is not None and not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"--{name} must be a non-negative number, got {value}")
        if self.null_replicates < 1 and (self.eps_dep is None or self.eps_ds is None):
            raise ValueError("--null_replicates must be >= 1 unless both --eps_dep and --eps_ds are given")
        if self.bootstrap < 0:
            raise ValueError(f"--bootstrap must be >= 0, got {self.bootstrap}")
        if self.mi_neighbors < 1:
            raise ValueError(f"--mi_neighbors must be >= 1, got {self.mi_neighbors}")
        if self.mi_samples <= self.mi_neighbors + 1:
            raise ValueError(f"--mi_samples must exceed k + 1 = {self.mi_neighbors + 1}, got {self.mi_samples}")
        if self.mi_feature_pairs < 0 or self.h_samples < 2:
            raise ValueError("--mi_feature_pairs must be >= 0 and --h_samples >= 2")


# --- one evaluation --------------------------------------------------------------------------

@dataclass
class _Design:
    """Random choices fixed across t: MI molecules, their atoms a and b, channel pairs."""

    mi_rows: np.ndarray  # (N,) molecules used by MI and H
    atom_a: np.ndarray  # (N,) flat atom rows
    atom_b: np.ndarray
    feature_pairs: np.ndarray  # (P_f, 2) channels
    h_rows: np.ndarray  # (N_H,) positions into mi_rows


def _design(sample: FlatSample, config: PaperConfig, rng: np.random.Generator) -> _Design:
    two_or_more = np.flatnonzero(sample.sizes >= 2)
    if two_or_more.size <= config.mi_neighbors + 1:
        raise ValueError(f"the MI estimate needs more than {config.mi_neighbors + 1} molecules with >= 2 atoms; got {two_or_more.size}")
    take = min(config.mi_samples, two_or_more.size)
    mi_rows = np.sort(rng.choice(two_or_more, size=take, replace=False))
    sizes = sample.sizes[mi_rows]
    first = np.floor(rng.random(take) * sizes).astype(np.int64)
    second = (first + 1 + np.floor(rng.random(take) * (sizes - 1)).astype(np.int64)) % sizes  # distinct from first
    offsets = sample.offsets[mi_rows]
    f = sample.n_channels
    pairs = np.array([(i, j) for i in range(f) for j in range(i + 1, f)], dtype=np.int64).reshape(-1, 2)
    if pairs.shape[0] > config.mi_feature_pairs:
        pairs = pairs[np.sort(rng.choice(pairs.shape[0], size=config.mi_feature_pairs, replace=False))]
    h_rows = np.arange(min(config.h_samples, take))
    return _Design(mi_rows, offsets + first, offsets + second, pairs, h_rows)


def _noise(sample: FlatSample, rng: np.random.Generator) -> np.ndarray:
    eps = rng.standard_normal(sample.values.shape)
    return centre_flat(eps, sample.sizes) if sample.centred else eps


def _dependence(z: np.ndarray, design: _Design, k: int, rng: np.random.Generator, workers: int = 1) -> tuple[np.ndarray, np.ndarray, int]:
    """MI per pair (P,) and per-sample terms (P, N); the first n_features pairs are within-atom."""
    a, b = z[design.atom_a], z[design.atom_b]
    x = np.concatenate([a[:, design.feature_pairs[:, 0]].T, a.T])
    y = np.concatenate([a[:, design.feature_pairs[:, 1]].T, b.T])
    mi, terms = ksg_terms(x, y, k=k, rng=rng, workers=workers)
    return mi, terms, design.feature_pairs.shape[0]


def _h_values(z: np.ndarray, design: _Design, config: PaperConfig) -> dict[str, float]:
    rows = design.h_rows
    vector = np.concatenate([z[design.atom_a[rows]], z[design.atom_b[rows]]], axis=1)
    h = gaussianity_functional(vector, beta=config.h_beta, weights={3: config.h_w3, 4: config.h_w4}, max_order=4)
    return {"H2": h["H2"], "H4": h["H4"]}


def first_below(curve: np.ndarray, grid: np.ndarray, eps: float) -> int | None:
    """The paper's rule min{t : curve_t <= eps} over the grid; None if never."""
    hits = np.flatnonzero(np.asarray(curve) <= eps)
    return int(grid[hits[0]]) if hits.size else None


def first_staying_below(curve: np.ndarray, grid: np.ndarray, eps: float) -> int | None:
    """The first grid t from which the curve stays <= eps to the end of the grid (a stricter reading)."""
    ok = np.asarray(curve) <= eps
    if not ok[-1]:
        return None
    fails = np.flatnonzero(~ok)
    return int(grid[fails[-1] + 1]) if fails.size else int(grid[0])


def t_star(t_id: int | None, t_ds: int | None) -> int | None:
    return None if t_id is None or t_ds is None else max(t_id, t_ds)


def evaluate_paper(
    sample: FlatSample,
    alpha2: np.ndarray,
    sigma2: np.ndarray,
    conventions: dict[str, np.ndarray],
    config: PaperConfig,
    grid: np.ndarray | None = None,
    progress: bool = False,
) -> dict:
    """D_t (every convention), Dep_t and H along the grid, the null, thresholds, T's and bootstrap bands.

    alpha2, sigma2: (T,) at the grid; conventions: name -> v^ per channel (F,).
    """
    config.validate()
    primary = config.convention if config.convention in conventions else resolve_convention(config.convention)
    if primary not in conventions:
        raise ValueError(f"no variance given for the convention {primary!r}")
    grid = np.asarray(config.timesteps if grid is None else grid)
    rng = np.random.default_rng([config.seed, 0])
    design = _design(sample, config, rng)
    n_t, f = grid.size, sample.n_channels
    molecule = sample.molecule
    n_boot = config.bootstrap
    # Molecule multiplicities of each bootstrap replicate (shared by D and Dep: a joint band for T*).
    boot_counts = rng.multinomial(sample.n_molecules, np.full(sample.n_molecules, 1.0 / sample.n_molecules), size=n_boot).astype(np.float32) if n_boot else None

    d = {c: np.zeros((n_t, f)) for c in conventions}
    d_boot = np.zeros((n_t, f, n_boot))
    dep = np.zeros(n_t)
    dep_features = np.zeros(n_t)
    dep_atoms = np.zeros(n_t)
    dep_boot = np.zeros((n_t, n_boot))
    h = {"H2": np.zeros(n_t), "H4": np.zeros(n_t)}
    vt = {c: alpha2[:, None] * v[None, :] + sigma2[:, None] for c, v in conventions.items()}  # (T, F): v~_t
    steps = range(n_t)
    if progress:
        from tqdm import tqdm

        steps = tqdm(steps, desc="paper evaluator", unit="t")
    for i in steps:
        step_rng = np.random.default_rng([config.seed, 1, int(grid[i])])
        z = np.sqrt(alpha2[i]) * sample.values + np.sqrt(sigma2[i]) * _noise(sample, step_rng)
        for c in range(f):
            order = np.argsort(z[:, c], kind="stable")
            sz = z[order, c]
            for name in conventions:
                d[name][i, c] = ks_distance_sorted(sz, special.ndtr(sz / np.sqrt(vt[name][i, c])))
            if n_boot:
                cdf = special.ndtr(sz / np.sqrt(vt[primary][i, c])).astype(np.float32)
                d_boot[i, c] = ks_distance_sorted(sz, cdf, boot_counts[:, molecule[order]])
        mi, terms, n_feat = _dependence(z, design, config.mi_neighbors, step_rng, config.workers)
        dep[i] = mi.mean()
        dep_features[i] = mi[:n_feat].mean() if n_feat else np.nan
        dep_atoms[i] = mi[n_feat:].mean()
        if n_boot:
            w = boot_counts[:, design.mi_rows].astype(np.float64)  # (B, N)
            n_mi = terms.shape[1]
            mi_b = special.digamma(n_mi) + special.digamma(config.mi_neighbors) - terms @ w.T / w.sum(axis=1)
            dep_boot[i] = np.maximum(mi_b, 0.0).mean(axis=0)
        for key, value in _h_values(z, design, config).items():
            h[key][i] = value

    null = null_distribution(sample, design, config)
    eps_ds = config.eps_ds if config.eps_ds is not None else float(np.quantile(null["D"], 1 - config.null_alpha))
    eps_dep = config.eps_dep if config.eps_dep is not None else float(np.quantile(null["Dep"], 1 - config.null_alpha))
    d_mean = {name: v.mean(axis=1) for name, v in d.items()}
    t_id = first_below(dep, grid, eps_dep)
    per_convention = {}
    for name in conventions:
        t_ds = first_below(d_mean[name], grid, eps_ds)
        per_convention[name] = {
            "v_hat": [float(x) for x in conventions[name]],
            "T_DS": t_ds, "T_ID": t_id, "T_star": t_star(t_id, t_ds),
            "T_DS_staying": first_staying_below(d_mean[name], grid, eps_ds),
            "T_star_staying": t_star(first_staying_below(dep, grid, eps_dep), first_staying_below(d_mean[name], grid, eps_ds)),
        }
    result = {
        "grid": [int(t) for t in grid],
        "n_molecules": sample.n_molecules,
        "n_atoms": int(sample.sizes.sum()),
        "n_mi_samples": int(design.mi_rows.size),
        "n_mi_pairs": {"features": int(design.feature_pairs.shape[0]), "atoms": f},
        "n_h_samples": int(design.h_rows.size),
        "convention": primary,
        "eps_ds": eps_ds, "eps_dep": eps_dep,
        "eps_source": {"ds": "given" if config.eps_ds is not None else f"null q{1 - config.null_alpha:g}",
                       "dep": "given" if config.eps_dep is not None else f"null q{1 - config.null_alpha:g}"},
        "null": {k: _summary(v) for k, v in null.items()},
        "T_ID": t_id,
        "T_DS": per_convention[primary]["T_DS"],
        "T_star": per_convention[primary]["T_star"],
        "per_convention": per_convention,
        "curves": {
            "t": grid, "Dep": dep, "Dep_features": dep_features, "Dep_atoms": dep_atoms,
            **{f"D_{name}": v for name, v in d_mean.items()},
            **{f"D_{name}_{ch}": d[name][:, sl].mean(axis=1) for name in conventions for ch, sl in sample.channels.items()},
            "H2": h["H2"], "H4": h["H4"],
            "H2_null": np.full(n_t, null["H2"].mean()), "H4_null": np.full(n_t, null["H4"].mean()),
        },
    }
    if n_boot:
        # Resampling molecules with replacement inflates a KS distance (duplicated atoms make the
        # empirical CDF jumpier), so the bootstrap replicates are re-centred on the estimate: the
        # bands and the T* interval show the bootstrap spread around D_t and Dep_t, not that bias.
        d_b = d_boot.mean(axis=1)  # (T, B)
        d_b = d_b - (d_b.mean(axis=1) - d_mean[primary])[:, None]
        dep_boot = dep_boot - (dep_boot.mean(axis=1) - dep)[:, None]
        result["curves"].update({
            f"D_{primary}_lo": np.quantile(d_b, 0.025, axis=1), f"D_{primary}_hi": np.quantile(d_b, 0.975, axis=1),
            "Dep_lo": np.quantile(dep_boot, 0.025, axis=1), "Dep_hi": np.quantile(dep_boot, 0.975, axis=1),
        })
        stars = []
        for b in range(n_boot):
            ts = t_star(first_below(dep_boot[:, b], grid, eps_dep), first_below(d_b[:, b], grid, eps_ds))
            stars.append(np.inf if ts is None else ts)
        stars = np.asarray(stars, dtype=np.float64)
        lo, hi = (np.quantile(stars, q, method="inverted_cdf") for q in (0.025, 0.975))
        result["T_star_bootstrap"] = {
            "replicates": n_boot, "ci95": [None if not np.isfinite(lo) else int(lo), None if not np.isfinite(hi) else int(hi)],
            "never": int(np.isinf(stars).sum()),
        }
    return result


def _summary(values: np.ndarray) -> dict:
    values = np.asarray(values, dtype=np.float64)
    return {"mean": float(values.mean()), "q50": float(np.quantile(values, 0.5)), "q95": float(np.quantile(values, 0.95)),
            "q99": float(np.quantile(values, 0.99)), "replicates": int(values.size)}


def null_distribution(sample: FlatSample, design: _Design, config: PaperConfig) -> dict[str, np.ndarray]:
    """D, Dep (and H) on exactly Gaussian data of the sample's shape: same molecule sizes, centring,
    MI molecules, atoms and pairs. Scale-free statistics, so the reference variance is 1 and one
    null serves every t and convention."""
    reps = max(1, config.null_replicates)
    out = {"D": np.zeros(reps), "Dep": np.zeros(reps), "H2": np.zeros(reps), "H4": np.zeros(reps)}
    for r in range(reps):
        rng = np.random.default_rng([config.seed, 2, r])
        z = _noise(sample, rng)
        out["D"][r] = np.mean([ks_distance_sorted(None, special.ndtr(np.sort(z[:, c]))) for c in range(sample.n_channels)])
        out["Dep"][r] = _dependence(z, design, config.mi_neighbors, rng, config.workers)[0].mean()
        if r < 5:  # H's null floor: a few replicates are enough for the plotted mean
            hv = _h_values(z, design, config)
            out["H2"][r], out["H4"][r] = hv["H2"], hv["H4"]
    out["H2"], out["H4"] = out["H2"][: min(reps, 5)], out["H4"][: min(reps, 5)]
    return out


# --- T* as a function of eps and of the sample size -------------------------------------------

def t_star_vs_eps(result: dict, n_points: int = 40) -> pd.DataFrame:
    """T_DS (each convention) against eps_ds, T_ID against eps_dep, on log-spaced eps grids spanning
    the curves; T* columns take the other threshold at its chosen value."""
    curves = result["curves"]
    grid = np.asarray(result["grid"])
    rows = []
    d_values = np.concatenate([np.asarray(curves[f"D_{c}"]) for c in result["per_convention"]])
    for eps in _log_range(d_values, n_points):
        row = {"kind": "ds", "eps": eps}
        for c in result["per_convention"]:
            t_ds = first_below(curves[f"D_{c}"], grid, eps)
            row[f"T_DS_{c}"] = t_ds
            row[f"T_star_{c}"] = t_star(result["T_ID"], t_ds)
        rows.append(row)
    for eps in _log_range(np.asarray(curves["Dep"]), n_points):
        t_id = first_below(curves["Dep"], grid, eps)
        row = {"kind": "dep", "eps": eps, "T_ID": t_id}
        for c, record in result["per_convention"].items():
            row[f"T_star_{c}"] = t_star(t_id, record["T_DS"])
        rows.append(row)
    return pd.DataFrame(rows)


def _log_range(values: np.ndarray, n: int) -> np.ndarray:
    positive = values[values > 0]
    lo = max(positive.min() if positive.size else 1e-4, 1e-5)
    hi = max(values.max(), lo * 10)
    return np.geomspace(lo * 0.5, hi * 1.05, n)


def size_sweep(
    sample: FlatSample, alpha2: np.ndarray, sigma2: np.ndarray, conventions: dict[str, np.ndarray],
    config: PaperConfig, sizes: list[int], grid: np.ndarray | None = None,
) -> list[dict]:
    """T_ID, T_DS, T* (every convention) on nested random subsets of the sample, thresholds recalibrated
    at each size (no bootstrap)."""
    order = np.random.default_rng([config.seed, 3]).permutation(sample.n_molecules)
    out = []
    for n in sorted(set(int(s) for s in sizes)):
        if not 2 <= n <= sample.n_molecules:
            raise ValueError(f"--size_sweep sizes must lie in [2, {sample.n_molecules}] (the sample), got {n}")
        sub = sample.subset(np.sort(order[:n]))
        res = evaluate_paper(sub, alpha2, sigma2, conventions, replace(config, bootstrap=0), grid)
        out.append({"n_molecules": n, "eps_ds": res["eps_ds"], "eps_dep": res["eps_dep"], "T_ID": res["T_ID"],
                    **{f"T_DS_{c}": r["T_DS"] for c, r in res["per_convention"].items()},
                    **{f"T_star_{c}": r["T_star"] for c, r in res["per_convention"].items()}})
    return out


# --- files -----------------------------------------------------------------------------------

def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        return None if not math.isfinite(float(value)) else float(value)
    return value


def write_paper_results(out_dir: str | Path, result: dict, config: PaperConfig, extra: dict | None = None) -> dict[str, Path]:
    """paper_evaluator.json (settings, thresholds, null, T's), paper_curves.csv, paper_t_star_vs_eps.csv."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    curves = pd.DataFrame({k: np.asarray(v) for k, v in result["curves"].items()})
    paths = {"curves": out_dir / CURVES_FILE, "eps": out_dir / EPS_FILE, "json": out_dir / RESULT_FILE}
    curves.to_csv(paths["curves"], index=False, float_format="%.6g")
    t_star_vs_eps(result).to_csv(paths["eps"], index=False, float_format="%.6g")
    record = {k: v for k, v in result.items() if k != "curves"}
    record["config"] = {**asdict(config), "timesteps": list(config.timesteps)}
    record.update(extra or {})
    tmp = paths["json"].with_suffix(".json.tmp")
    tmp.write_text(json.dumps(_jsonable(record), indent=2) + "\n")
    tmp.replace(paths["json"])
    return paths


def has_paper_results(data_root: str | Path) -> bool:
    return (Path(data_root) / RESULT_FILE).is_file()


def read_paper_results(data_root: str | Path, eps_dep: float | None = None, eps_ds: float | None = None) -> dict:
    """T_ID, T_DS, T* per convention from a results folder, with the saved thresholds or new ones
    (recomputed from paper_curves.csv, so a threshold can be changed without rerunning)."""
    data_root = Path(data_root)
    try:
        record = json.loads((data_root / RESULT_FILE).read_text())
        curves = pd.read_csv(data_root / CURVES_FILE)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{data_root} lacks {Path(e.filename).name}; rerun Gaussianity_test.py --evaluator paper") from None
    except (json.JSONDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError):
        raise ValueError(f"{data_root}/{RESULT_FILE} or {CURVES_FILE} is damaged; rerun Gaussianity_test.py --evaluator paper") from None
    needed = {"t", "Dep"} | {f"D_{c}" for c in record.get("per_convention", {})}
    if not needed <= set(curves.columns) or "per_convention" not in record:
        raise ValueError(f"{data_root}/{CURVES_FILE} is not a paper-evaluator curves file (needs columns {sorted(needed)})")
    grid = curves["t"].to_numpy()
    e_dep = record["eps_dep"] if eps_dep is None else float(eps_dep)
    e_ds = record["eps_ds"] if eps_ds is None else float(eps_ds)
    t_id = first_below(curves["Dep"].to_numpy(), grid, e_dep)
    table = {}
    for c in record["per_convention"]:
        t_ds = first_below(curves[f"D_{c}"].to_numpy(), grid, e_ds)
        table[c] = {"T_ID": t_id, "T_DS": t_ds, "T_star": t_star(t_id, t_ds)}
    primary = record["convention"]
    source = dict(record.get("eps_source") or {})
    if eps_dep is not None:
        source["dep"] = "given"
    if eps_ds is not None:
        source["ds"] = "given"
    return {"convention": primary, "eps_dep": e_dep, "eps_ds": e_ds, "eps_source": source,
            "n_molecules": record.get("n_molecules"), "per_convention": table, "T_star": table[primary]["T_star"],
            "T_star_bootstrap": record.get("T_star_bootstrap") if eps_dep is None and eps_ds is None else None,
            "size_sweep": record.get("size_sweep")}


def format_paper_report(report: dict) -> str:
    """A few lines: thresholds, then T_ID / T_DS / T* per variance convention."""
    lines = [f"paper evaluator ({report.get('n_molecules')} molecules): eps_dep = {report['eps_dep']:.4g}, "
             f"eps_DS = {report['eps_ds']:.4g}" + (f" ({report['eps_source']['dep']}, {report['eps_source']['ds']})" if report.get("eps_source") else "")]
    lines.append(f"{'v^ convention':<14} {'T_ID':>6} {'T_DS':>6} {'T*':>6}")
    fmt = lambda v: "-" if v is None else str(v)  # noqa: E731
    for c, r in report["per_convention"].items():
        mark = " <- primary" if c == report["convention"] else ""
        lines.append(f"{c:<14} {fmt(r['T_ID']):>6} {fmt(r['T_DS']):>6} {fmt(r['T_star']):>6}{mark}")
    boot = report.get("T_star_bootstrap")
    if boot:
        lines.append(f"T* bootstrap 95% interval ({boot['replicates']} replicates): {boot['ci95']}"
                     + (f", {boot['never']} never reach the thresholds" if boot["never"] else ""))
    return "\n".join(lines)


# --- a whole run: the dataset's features -> files ------------------------------------------------

PAPER_DEFAULT_MOLECULES = 10_000


def run_paper_evaluator(
    features,
    gamma: np.ndarray,
    config: PaperConfig,
    out_dir: str | Path,
    n_molecules: int | None = PAPER_DEFAULT_MOLECULES,
    dataset_var: float | None = None,
    size_sweep_sizes: list[int] | None = None,
    plot: bool = True,
    progress: bool = True,
    title: str = "",
    extra_record: dict | None = None,
) -> dict:
    """Sample molecules, measure v^ (every convention, over the whole split), evaluate along the grid,
    optionally sweep the sample size, write the files (and plots) into out_dir. Returns the result
    with 'report' (read back as GAGA_step_estimation.py reads it) and 'paths'."""
    from gaga.data import random_subset_rows
    from gaga.schedule import alpha2_sigma2, check_timesteps
    from gaga.variance import per_molecule_table

    config.validate()
    grid = np.asarray(check_timesteps(config.timesteps, len(gamma) - 1))
    rows = random_subset_rows(features.num_atoms, n_molecules, config.seed, min_atoms=2)
    sample = flat_from_features(features, rows)
    # v^ from the whole split, as Variance_Estimate.py measures it (GEOM: streamed in blocks).
    conventions = variance_conventions_from_table(per_molecule_table(features), features.channels, features.n_channels)
    if dataset_var is not None:
        if not dataset_var > 0:
            raise ValueError(f"--dataset_var must be positive, got {dataset_var}")
        conventions["given"] = np.full(features.n_channels, float(dataset_var))
        config = replace(config, convention="given")
    alpha2, sigma2 = alpha2_sigma2(gamma, grid)
    result = evaluate_paper(sample, alpha2, sigma2, conventions, config, grid, progress=progress)
    extra = dict(extra_record or {})
    if size_sweep_sizes:
        sizes = [s for s in size_sweep_sizes if s < sample.n_molecules] + [sample.n_molecules]
        result["size_sweep"] = size_sweep(sample, alpha2, sigma2, conventions, config, sizes, grid)
        extra["size_sweep"] = result["size_sweep"]
    paths = write_paper_results(out_dir, result, config, extra)
    if plot:
        from gaga.plots_paper import plot_paper_evaluator, plot_t_star_vs_eps, plot_t_star_vs_size

        paths["plot"] = plot_paper_evaluator(result, Path(out_dir) / "paper_evaluator.png", title=title)
        paths["plot_eps"] = plot_t_star_vs_eps(t_star_vs_eps(result), result, Path(out_dir) / "paper_t_star_vs_eps.png", title=title)
        if size_sweep_sizes:
            paths["plot_size"] = plot_t_star_vs_size(result["size_sweep"], Path(out_dir) / "paper_t_star_vs_n.png", title=title)
    result["paths"] = {k: str(v) for k, v in paths.items()}
    result["report"] = read_paper_results(out_dir)
    return result
