"""Molecule features as GAGA sees them: normalised and zero-centred per molecule.

Layout of the feature channels (EDM's z layout):
    positions / normalize_factors[0]           3 channels  (modality "positions")
    one_hot / normalize_factors[1]             K channels  (modality "atom_types"; QM9: K = 5, or 4 without H;
                                                            GEOM-Drugs: 16, or 15 without H)
    charges / normalize_factors[2]             1 channel   (modality "charges"; only if include_charges)

Every channel, the charges included, is centred per molecule over its real atoms (GAGA
mode). Why the charges too: GAGA's fork does not centre h['integer'] in its training
preprocessing, but its noise and its sampler re-centre *every* channel of z, so the
distribution GAGA's Gaussian start approximates is the centred one. GAGA's QM9 config has
include_charges=False, so the README's numbers do not depend on this choice.
Padding entries stay exactly 0.

QM9 is loaded whole as dense padded arrays (``Features``). GEOM-Drugs (millions of
conformers of up to 181 atoms) is never densified whole: ``load_features`` returns a
``gaga.geom_features.GeomFeatures`` that knows every conformer's atom count and builds dense
``Features`` only for the rows asked for (``molecules``, ``blocks``). Both satisfy
``MoleculeFeatures``, which is all the analysis code uses.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Iterator, Protocol

import numpy as np

from configs.flags import parse_bool, parse_normalize_factors  # noqa: F401 - re-exported: gaga's names for the shared parsers
from configs.run_args import load_run_args, safe_datadir

POSITION_CHANNELS = 3
MODALITIES = ("positions", "atom_types", "charges")
QM9_DATADIR = "qm9/temp"


@dataclass(frozen=True)
class DataSpec:
    """Which molecules, and how they are normalised (from a run's args or from flags)."""

    dataset: str = "qm9"
    datadir: str = "qm9/temp"
    remove_h: bool = False
    include_charges: bool = False
    normalize_factors: tuple[float, float, float] = (1.0, 4.0, 10.0)
    filter_n_atoms: int | None = None
    # GEOM-Drugs only (None for QM9): conformers kept per molecule, EDM's --filter_molecule_size.
    conformations: int | None = None
    filter_molecule_size: int | None = None


GEOM_ONLY_FIELDS = ("conformations", "filter_molecule_size")


def dataset_kind(dataset: str) -> str:
    """The dataset's family, 'qm9' or 'geom', for any spelling the registry accepts (geom_drugs, drugs, ...)."""
    from configs.datasets import dataset_entry

    return dataset_entry(dataset).family


def _optional_int(value: object) -> int | None:
    return None if value is None else int(value)  # type: ignore[arg-type]


def geom_data_location(
    datadir: str | None, data_file: str | None, conformations: int | None, remove_h: bool
) -> tuple[str, int]:
    """(data folder, conformations) of GEOM-Drugs as training resolves them (qm9.data.geom.geom_location):
    ``datadir`` unless it is missing or QM9's default, else the folder of EDM's ``data_file``, else data/geom."""
    from qm9.data.geom import geom_location  # imports torch: only for GEOM

    folder, count = geom_location(
        argparse.Namespace(datadir=datadir, data_file=data_file, conformations=conformations, remove_h=remove_h)
    )
    return str(folder), count


def data_spec_from_run_args(args: argparse.Namespace, datadir: str | None = None) -> DataSpec:
    """The DataSpec of a training run (args.pickle); ``datadir`` overrides the run's."""
    filter_n_atoms = getattr(args, "filter_n_atoms", None)
    dataset = str(getattr(args, "dataset", "qm9"))
    remove_h = parse_bool(getattr(args, "remove_h", False))
    # An untrusted args.pickle does not choose where caches are written (configs.run_args.safe_datadir).
    run_datadir = safe_datadir(getattr(args, "datadir", QM9_DATADIR), datadir, dataset)
    geom_fields: dict = {}
    if dataset_kind(dataset) == "geom":
        run_datadir, conformations = geom_data_location(
            run_datadir if (datadir is not None or getattr(args, "datadir", None)) else None,
            getattr(args, "data_file", None), _optional_int(getattr(args, "conformations", None)), remove_h,
        )
        geom_fields = dict(conformations=conformations,
                           filter_molecule_size=_optional_int(getattr(args, "filter_molecule_size", None)))
    return DataSpec(
        dataset=dataset,
        datadir=str(run_datadir),
        remove_h=remove_h,
        include_charges=parse_bool(getattr(args, "include_charges", True)),
        normalize_factors=parse_normalize_factors(getattr(args, "normalize_factors", [1, 4, 10])),
        filter_n_atoms=None if filter_n_atoms is None else int(filter_n_atoms),
        **geom_fields,
    )


def data_spec_from_run(run_dir: str, datadir: str | None = None) -> DataSpec:
    return data_spec_from_run_args(load_run_args(run_dir), datadir=datadir)


@dataclass
class Features:
    """Dense per-molecule features: values (M, N, F) float64 with padding 0, mask (M, N) bool."""

    values: np.ndarray
    mask: np.ndarray
    num_atoms: np.ndarray
    index: np.ndarray
    channels: dict[str, slice] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.values.shape[0])

    @property
    def n_channels(self) -> int:
        return int(self.values.shape[-1])

    def subset(self, rows: np.ndarray) -> "Features":
        return Features(self.values[rows], self.mask[rows], self.num_atoms[rows], self.index[rows], dict(self.channels))

    def molecules(self, rows: np.ndarray, n_atoms: int) -> np.ndarray:
        """(C, n_atoms, F) features of the rows, all molecules of exactly n_atoms atoms."""
        return self.values[rows, :n_atoms]

    def blocks(self) -> Iterator[tuple[np.ndarray, "Features"]]:
        """(rows, dense features of those rows) pieces covering every molecule once: already dense, so itself."""
        yield np.arange(len(self)), self


class MoleculeFeatures(Protocol):
    """What the GAGA analysis needs of a dataset's features (Features, or GEOM's on-demand ones)."""

    num_atoms: np.ndarray  # (M,)
    index: np.ndarray  # (M,) dataset index (QM9 index, GEOM conformer id)
    channels: dict[str, slice]

    def __len__(self) -> int: ...

    @property
    def n_channels(self) -> int: ...

    def subset(self, rows: np.ndarray) -> "MoleculeFeatures": ...

    def molecules(self, rows: np.ndarray, n_atoms: int) -> np.ndarray: ...

    def blocks(self) -> Iterator[tuple[np.ndarray, Features]]: ...


def feature_channels(n_types: int, include_charges: bool) -> dict[str, slice]:
    """Channel ranges of each modality for K = n_types atom types."""
    channels = {
        "positions": slice(0, POSITION_CHANNELS),
        "atom_types": slice(POSITION_CHANNELS, POSITION_CHANNELS + n_types),
    }
    if include_charges:
        channels["charges"] = slice(POSITION_CHANNELS + n_types, POSITION_CHANNELS + n_types + 1)
    return channels


def centre_per_molecule(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Subtract each molecule's per-channel mean over its real atoms; padding stays 0."""
    m = mask[..., None].astype(values.dtype)
    n = np.maximum(m.sum(axis=1, keepdims=True), 1.0)
    mean = (values * m).sum(axis=1, keepdims=True) / n
    return (values - mean) * m


def centred_features(arrays: dict[str, np.ndarray], spec: DataSpec) -> Features:
    """Normalised, per-molecule zero-centred features from load_qm9-style arrays."""
    mask = arrays["charges"] > 0
    nf_x, nf_h, nf_int = spec.normalize_factors
    parts = [arrays["positions"].astype(np.float64) / nf_x, arrays["one_hot"].astype(np.float64) / nf_h]
    channels = feature_channels(arrays["one_hot"].shape[-1], spec.include_charges)
    if spec.include_charges:
        parts.append(arrays["charges"][..., None].astype(np.float64) / nf_int)
    values = np.concatenate(parts, axis=-1) * mask[..., None]
    return Features(
        values=centre_per_molecule(values, mask),
        mask=mask,
        num_atoms=mask.sum(axis=1).astype(np.int64),
        index=np.asarray(arrays["index"], dtype=np.int64),
        channels=channels,
    )


def random_subset_rows(num_atoms: np.ndarray, n_molecules: int | None, seed: int, min_atoms: int = 1) -> np.ndarray:
    """Sorted rows of a seeded random subset of n_molecules among the molecules with >= min_atoms atoms
    (all of them when n_molecules is None or not smaller)."""
    eligible = np.nonzero(num_atoms >= min_atoms)[0]
    if eligible.size == 0:
        raise ValueError(
            f"no molecule has at least {min_atoms} atoms (the k-NN MI test needs them); "
            "choose a dataset/filter with larger molecules"
        )
    if n_molecules is not None:
        if n_molecules < 1:
            raise ValueError(f"--n_molecules must be >= 1, got {n_molecules}")
        if n_molecules < eligible.size:
            eligible = np.sort(np.random.default_rng(seed).choice(eligible, size=n_molecules, replace=False))
    return eligible


def load_features(spec: DataSpec, split: str = "train", progress: bool = True) -> MoleculeFeatures:
    """A split of the dataset as centred, normalised features: dense for QM9, on demand for GEOM."""
    if dataset_kind(spec.dataset) == "geom":
        from gaga.geom_features import load_geom_features

        return load_geom_features(spec, split=split, progress=progress)
    from configs.datasets import dataset_entry, resolve_hook
    from configs.errors import UserInputError

    entry = dataset_entry(spec.dataset)
    if entry.split_arrays is None:
        raise UserInputError(f"dataset {entry.name!r} has no padded-array loader (split_arrays), which GAGA's tools need")
    load_split = resolve_hook(entry.split_arrays)  # QM9: qm9.data.qm9.load_qm9
    arrays = load_split(spec.datadir, split, remove_h=spec.remove_h, filter_n_atoms=spec.filter_n_atoms, progress=progress)
    return centred_features(arrays, spec)
