"""Molecule features as GAGA sees them: normalised and zero-centred per molecule.

Layout of the feature channels (EDM's z layout):
    positions / normalize_factors[0]           3 channels  (modality "positions")
    one_hot / normalize_factors[1]             K channels  (modality "atom_types"; K = 5, or 4 without H)
    charges / normalize_factors[2]             1 channel   (modality "charges"; only if include_charges)

Every channel, the charges included, is centred per molecule over its real atoms (GAGA
mode). Why the charges too: GAGA's fork does not centre h['integer'] in its training
preprocessing, but its noise and its sampler re-centre *every* channel of z, so the
distribution GAGA's Gaussian start approximates is the centred one. GAGA's QM9 config has
include_charges=False, so the README's numbers do not depend on this choice.
Padding entries stay exactly 0.
"""
from __future__ import annotations

import argparse
import ast
from dataclasses import dataclass, field

import numpy as np

from configs.run_args import load_run_args

POSITION_CHANNELS = 3
MODALITIES = ("positions", "atom_types", "charges")


def parse_normalize_factors(value: object) -> tuple[float, float, float]:
    """normalize_factors from a list or a string such as "[1,4,10]" (parsed safely, never eval)."""
    parsed = value
    if isinstance(value, str):
        try:
            parsed = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            raise ValueError(f"normalize_factors {value!r} is not a list of three numbers such as [1,4,10]") from None
    try:
        factors = tuple(float(f) for f in parsed)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise ValueError(f"normalize_factors {value!r} is not a list of three numbers such as [1,4,10]") from None
    if len(factors) != 3 or not all(np.isfinite(f) and f > 0 for f in factors):
        raise ValueError(f"normalize_factors {value!r} must be three positive numbers (positions, one-hot, charges), e.g. [1,4,10]")
    return factors  # type: ignore[return-value]


def parse_bool(value: object) -> bool:
    """EDM stores booleans as bools or as the strings 'True'/'False'."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "y"):
        return True
    if text in ("0", "false", "no", "n"):
        return False
    raise ValueError(f"expected a boolean (True/False), got {value!r}")


@dataclass(frozen=True)
class DataSpec:
    """Which molecules, and how they are normalised (from a run's args or from flags)."""

    dataset: str = "qm9"
    datadir: str = "qm9/temp"
    remove_h: bool = False
    include_charges: bool = False
    normalize_factors: tuple[float, float, float] = (1.0, 4.0, 10.0)
    filter_n_atoms: int | None = None


def data_spec_from_run_args(args: argparse.Namespace, datadir: str | None = None) -> DataSpec:
    """The DataSpec of a training run (args.pickle); ``datadir`` overrides the run's."""
    filter_n_atoms = getattr(args, "filter_n_atoms", None)
    return DataSpec(
        dataset=str(getattr(args, "dataset", "qm9")),
        datadir=str(datadir if datadir is not None else getattr(args, "datadir", "qm9/temp")),
        remove_h=parse_bool(getattr(args, "remove_h", False)),
        include_charges=parse_bool(getattr(args, "include_charges", True)),
        normalize_factors=parse_normalize_factors(getattr(args, "normalize_factors", [1, 4, 10])),
        filter_n_atoms=None if filter_n_atoms is None else int(filter_n_atoms),
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
    n_types = arrays["one_hot"].shape[-1]
    channels = {
        "positions": slice(0, POSITION_CHANNELS),
        "atom_types": slice(POSITION_CHANNELS, POSITION_CHANNELS + n_types),
    }
    if spec.include_charges:
        parts.append(arrays["charges"][..., None].astype(np.float64) / nf_int)
        channels["charges"] = slice(POSITION_CHANNELS + n_types, POSITION_CHANNELS + n_types + 1)
    values = np.concatenate(parts, axis=-1) * mask[..., None]
    return Features(
        values=centre_per_molecule(values, mask),
        mask=mask,
        num_atoms=mask.sum(axis=1).astype(np.int64),
        index=np.asarray(arrays["index"], dtype=np.int64),
        channels=channels,
    )


def load_features(spec: DataSpec, split: str = "train", progress: bool = True) -> Features:
    """Load a split of the dataset and return its centred, normalised features."""
    name = spec.dataset.lower()
    if name != "qm9":
        raise ValueError(
            f"dataset {spec.dataset!r} is not supported by the GAGA analysis scripts yet (only qm9); "
            "pass --dataset qm9 or a QM9 run"
        )
    from qm9.data.qm9 import load_qm9

    arrays = load_qm9(spec.datadir, split=split, remove_h=spec.remove_h, filter_n_atoms=spec.filter_n_atoms, progress=progress)
    return centred_features(arrays, spec)
