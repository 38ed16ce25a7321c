"""QM9 (130,831 molecules with DFT 3D coordinates) from the ``qm9pack`` package, offline.

Molecules are stored as arrays padded to 29 atoms, in QM9 index order, and split exactly
as EDM splits them: ``np.random.seed(0); perm = np.random.permutation(130831)``; train =
perm[:100000], valid = perm[100000:117748], test = perm[117748:].  The processed splits are
cached under ``datadir`` (see ``qm9.data.cache``); the first build takes a few seconds.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from configs.errors import DataError, EnvironmentProblem
from qm9.data.cache import CacheError, load_arrays, file_sha1, manifest_matches, save_arrays, write_manifest

# Version 2 adds the property columns (alpha, gap, homo, lumo, mu, Cv in EDM's units).
CACHE_VERSION = 2
N_MOLECULES = 130831
N_TRAIN, N_VALID, N_TEST = 100000, 17748, 13083
MAX_ATOMS = 29
SPLITS = ("train", "valid", "test")
# Atomic numbers of the one-hot channels (EDM's order H, C, N, O, F).
CHARGES_WITH_H = np.array([1, 6, 7, 8, 9])
CHARGES_WITHOUT_H = np.array([6, 7, 8, 9])
_SYMBOL_TO_Z = {"H": 1, "C": 6, "N": 7, "O": 8, "F": 9}
_CSV_PARTS = ("qm9_part1.csv", "qm9_part2.csv", "qm9_part3.csv")

# The conditioning properties, in EDM's units (edm_conditional.md §1.1): qm9pack column,
# float32 unit factor (Hartree -> eV) or None, and whether QM9's per-element reference
# (atomref; 2.981 cal/(mol K) per atom for Cv) is subtracted (EDM's subtract_thermo).
PROPERTIES = ("alpha", "gap", "homo", "lumo", "mu", "Cv")
HARTREE_TO_EV = 27.2114
CV_ATOMREF = 2.981
_PROPERTY_COLUMNS = {
    "alpha": ("Polarizability_bohr3", None, False),
    "gap": ("HOMO_LUMO_gap_au", HARTREE_TO_EV, False),
    "homo": ("HOMO_au", HARTREE_TO_EV, False),
    "lumo": ("LUMO_au", HARTREE_TO_EV, False),
    "mu": ("Dipole_debye", None, False),
    "Cv": ("Heatcapacity_Cv_cal_mol_K", None, True),
}
PROPERTY_UNITS = {
    "alpha": "Bohr^3", "gap": "eV", "homo": "eV", "lumo": "eV", "mu": "Debye",
    "Cv": "cal/(mol K) minus 2.981 per atom",
}


def edm_split_indices() -> dict[str, np.ndarray]:
    """Row numbers (into the QM9-index-ordered table) of EDM's train/valid/test split."""
    state = np.random.get_state()
    try:
        np.random.seed(0)
        perm = np.random.permutation(N_MOLECULES)
    finally:
        np.random.set_state(state)
    return {
        "train": perm[:N_TRAIN],
        "valid": perm[N_TRAIN : N_TRAIN + N_VALID],
        "test": perm[N_TRAIN + N_VALID :],
    }


def qm9pack_data_dir() -> Path:
    """Folder of qm9pack's CSV files (found without importing qm9pack, which needs setuptools)."""
    spec = importlib.util.find_spec("qm9pack")
    if spec is None or not spec.submodule_search_locations:
        raise EnvironmentProblem("QM9 needs the package qm9pack: run `pip install -r requirements.txt` (or `pip install qm9pack`).")
    folder = Path(list(spec.submodule_search_locations)[0]) / "data"
    missing = [p for p in _CSV_PARTS if not (folder / p).exists()]
    if missing:
        raise EnvironmentProblem(f"qm9pack at {folder} lacks {', '.join(missing)}: reinstall it with `pip install --force-reinstall qm9pack`.")
    return folder


def _source_description(folder: Path) -> dict:
    return {p: (folder / p).stat().st_size for p in _CSV_PARTS}


def _correctly_rounded_floats(pd) -> dict:
    """read_csv options for the correctly rounded parse (as EDM's Python float()): pandas < 3
    needs float_precision="round_trip"; pandas 3 deprecates the option, and its default parse
    gives the same values on every cell of qm9pack (checked with pandas 3.1.1)."""
    return {"float_precision": "round_trip"} if int(pd.__version__.split(".")[0]) < 3 else {}


def parse_qm9pack(folder: Path | None = None, progress: bool = True) -> dict[str, np.ndarray]:
    """All 130,831 molecules in QM9 index order as padded arrays (positions, charges, num_atoms,
    index) and the properties of ``PROPERTIES`` (float32, EDM's units)."""
    import pandas as pd

    folder = folder or qm9pack_data_dir()
    frames = []
    for part in tqdm(_CSV_PARTS, desc="reading qm9pack CSVs", disable=not progress, leave=False):
        path = folder / part
        try:
            frames.append(pd.read_csv(
                path, usecols=["Index", "N_atoms", "Elements", "XYZ_Ang"] + [c for c, _, _ in _PROPERTY_COLUMNS.values()],
                **_correctly_rounded_floats(pd),
            ))
        except Exception as e:  # noqa: BLE001 - any parse failure means a broken install
            raise DataError(f"cannot read {path} ({e}); reinstall qm9pack with `pip install --force-reinstall qm9pack`.") from None
    table = pd.concat(frames, ignore_index=True).sort_values("Index", kind="stable")
    if len(table) != N_MOLECULES:
        raise DataError(f"qm9pack holds {len(table)} molecules, expected {N_MOLECULES}; reinstall qm9pack==1.0.3.")

    num_atoms = table["N_atoms"].to_numpy(np.int64)
    # Parse all element lists and coordinates in one pass each (strings like "['C','H']").
    symbols = ",".join(table["Elements"].str.slice(1, -1)).replace("'", "").replace(" ", "").split(",")
    flat_z = np.array([_SYMBOL_TO_Z[s] for s in symbols], dtype=np.int64) if len(set(symbols) - _SYMBOL_TO_Z.keys()) == 0 else None
    if flat_z is None:
        raise DataError(f"unexpected element symbols {set(symbols) - _SYMBOL_TO_Z.keys()} in qm9pack data")
    coords_text = ",".join(table["XYZ_Ang"].str.slice(1, -1)).replace("[", "").replace("]", "")
    flat_xyz = np.array(coords_text.split(","), dtype=np.float64).reshape(-1, 3)
    if len(flat_z) != num_atoms.sum() or len(flat_xyz) != num_atoms.sum():
        raise DataError("qm9pack data is inconsistent (atom counts do not match coordinates); reinstall qm9pack.")

    # Scatter the flat atom rows into (molecule, slot) positions.
    mol_of_atom = np.repeat(np.arange(N_MOLECULES), num_atoms)
    starts = np.cumsum(num_atoms) - num_atoms
    slot = np.arange(len(flat_z)) - np.repeat(starts, num_atoms)
    positions = np.zeros((N_MOLECULES, MAX_ATOMS, 3), dtype=np.float32)
    charges = np.zeros((N_MOLECULES, MAX_ATOMS), dtype=np.uint8)
    positions[mol_of_atom, slot] = flat_xyz.astype(np.float32)
    charges[mol_of_atom, slot] = flat_z
    out = {
        "positions": positions,
        "charges": charges,
        "num_atoms": num_atoms.astype(np.int16),
        "index": table["Index"].to_numpy(np.int32),
    }
    out.update(edm_properties(table, charges))
    return out


def edm_properties(table, charges: np.ndarray) -> dict[str, np.ndarray]:
    """The properties as EDM holds them: float32 parse, float32 minus float32(thermo), float32 unit factor.

    thermo is accumulated in float64 over the elements in QM9's atomref order (H, C, N, O, F),
    starting from 0.0, as EDM's npz builder does; for Cv every element's reference is 2.981.
    """
    counts = np.stack([(charges == z).sum(1) for z in CHARGES_WITH_H], axis=1)
    thermo = np.zeros(len(charges), dtype=np.float64)
    for k in range(counts.shape[1]):
        thermo = thermo + CV_ATOMREF * counts[:, k]
    out = {}
    for name, (column, factor, subtract_thermo) in _PROPERTY_COLUMNS.items():
        values = table[column].to_numpy(np.float64).astype(np.float32)
        if np.isnan(values).any():
            raise DataError(f"qm9pack column {column} has missing values; reinstall qm9pack with `pip install --force-reinstall qm9pack`.")
        if subtract_thermo:
            values = values - thermo.astype(np.float32)
        if factor is not None:
            values = values * np.float32(factor)
        out[name] = values.astype(np.float32)
    return out


def _cache_dir(datadir: str | os.PathLike) -> Path:
    return Path(datadir) / "qm9"


def build_cache(datadir: str | os.PathLike, progress: bool = True) -> None:
    """Parse qm9pack, split as EDM, write one .npz per split and the manifest (atomically)."""
    folder = _cache_dir(datadir)
    source = qm9pack_data_dir()
    steps = tqdm(total=2 + len(SPLITS), desc="building QM9 cache", disable=not progress)
    table = parse_qm9pack(source, progress=progress)
    steps.update(1)
    splits = edm_split_indices()
    steps.update(1)
    sums = {}
    for name in SPLITS:
        rows = np.sort(splits[name])  # keep QM9 index order inside a split
        path = folder / f"{name}.npz"
        save_arrays(path, {k: v[rows] for k, v in table.items()})
        sums[path.name] = file_sha1(path)
        steps.update(1)
    steps.close()
    write_manifest(folder, {"version": CACHE_VERSION, "source": _source_description(source), "sha1": sums})


def _expected_manifest() -> dict:
    return {"version": CACHE_VERSION, "source": _source_description(qm9pack_data_dir())}


def ensure_cache(datadir: str | os.PathLike, progress: bool = True) -> Path:
    """Build the cache if missing, partial, stale or corrupt; return its folder."""
    folder = _cache_dir(datadir)
    files = [f"{s}.npz" for s in SPLITS]
    if not manifest_matches(folder, _expected_manifest(), files, verify_checksums=True):
        if (folder / "manifest.json").exists():
            print(f"QM9 cache in {folder} is stale or damaged; rebuilding it.", file=sys.stderr)
        build_cache(datadir, progress=progress)
    return folder


def remove_hydrogens(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Drop hydrogen atoms, keeping the heavy atoms in file order at slots 0..n-1."""
    charges = arrays["charges"]
    heavy = charges > 1
    # Stable argsort moving heavy atoms to the front without reordering them.
    order = np.argsort(~heavy, axis=1, kind="stable")
    positions = np.take_along_axis(arrays["positions"], order[..., None], axis=1)
    charges = np.take_along_axis(charges, order, axis=1)
    heavy_sorted = np.take_along_axis(heavy, order, axis=1)
    positions = positions * heavy_sorted[..., None]
    charges = charges * heavy_sorted
    n_max = 9
    out = dict(arrays)
    out["positions"] = np.ascontiguousarray(positions[:, :n_max])
    out["charges"] = np.ascontiguousarray(charges[:, :n_max])
    out["num_atoms"] = heavy.sum(1).astype(arrays["num_atoms"].dtype)
    return out


def one_hot_from_charges(charges: np.ndarray, remove_h: bool) -> np.ndarray:
    table = CHARGES_WITHOUT_H if remove_h else CHARGES_WITH_H
    return charges[..., None] == table


def load_qm9(
    datadir: str | os.PathLike = "qm9/temp",
    split: str = "train",
    remove_h: bool = False,
    filter_n_atoms: int | None = None,
    progress: bool = True,
) -> dict[str, np.ndarray]:
    """One QM9 split as padded numpy arrays.

    Returns positions (M, 29, 3) float32 (Angstrom, file atom order; 9 slots without H),
    charges (M, 29) int64 (atomic numbers, 0 = padding), one_hot (M, 29, 5) bool over
    [H, C, N, O, F] ([C, N, O, F] with ``remove_h``), num_atoms (M,) int64, index (M,) int64
    (the QM9 index), and one float32 (M,) array per property of ``PROPERTIES`` (EDM's units).
    ``filter_n_atoms`` keeps only molecules with exactly that many atoms.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    folder = ensure_cache(datadir, progress=progress)
    try:
        arrays = load_arrays(folder / f"{split}.npz")
    except CacheError:
        print(f"QM9 cache file {folder / f'{split}.npz'} is unreadable; rebuilding the cache.", file=sys.stderr)
        build_cache(datadir, progress=progress)
        arrays = load_arrays(folder / f"{split}.npz")
    if remove_h:
        arrays = remove_hydrogens(arrays)
    out = {
        "positions": arrays["positions"].astype(np.float32, copy=False),
        "charges": arrays["charges"].astype(np.int64),
        "num_atoms": arrays["num_atoms"].astype(np.int64),
        "index": arrays["index"].astype(np.int64),
    }
    out.update({name: arrays[name].astype(np.float32, copy=False) for name in PROPERTIES})
    out["one_hot"] = one_hot_from_charges(out["charges"], remove_h)
    if filter_n_atoms is not None:
        keep = out["num_atoms"] == int(filter_n_atoms)
        if not keep.any():
            raise ValueError(f"no {split} molecule has exactly {filter_n_atoms} atoms (--filter_n_atoms)")
        out = {k: v[keep] for k, v in out.items()}
    return out
