"""GEOM-Drugs: build EDM's conformer table from GEOM's msgpack, and load it in batches.

GEOM (Axelrod & Gomez-Bombarelli) cannot be shipped (its ``drugs_crude.msgpack`` is about
50 GB), so ``build_geom_dataset.py`` converts the user's copy once into EDM's files:

- ``geom_drugs_{C}.npy``: float64 rows ``[conformer_id, Z, x, y, z]`` for the C
  lowest-energy conformers of every molecule, conformers stored one after another;
  ``conformer_id`` counts conformers (one id per kept conformer, as EDM does);
- ``geom_drugs_n_{C}.npy``: the number of atoms of each conformer;
- ``geom_drugs_smiles.txt``: one SMILES per molecule, in file order.

``--remove_h`` writes ``geom_drugs_no_h_{C}.npy`` / ``geom_drugs_n_no_h_{C}.npy`` instead.

The loader splits conformers into 80% train, 10% valid, 10% test, as EDM does (so the
conformers of one molecule can fall into different splits), with a permutation saved
beside the data (``geom_permutation.npy``) and reused.
The conformer table is memory-mapped; a batch gathers its rows and pads them to the
largest conformer in the batch, giving the same batch dict as QM9 with GEOM's 16 types.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterable

import msgpack
import numpy as np
import torch
from tqdm import tqdm

from configs.datasets_config import get_dataset_info
from configs.atomic_io import atomic_write
from configs.errors import DataError
from qm9.data.collate import make_batch, make_dataloader

DEFAULT_DATADIR = "data/geom"
DEFAULT_DATA_FILE = "drugs_crude.msgpack"
DEFAULT_CONFORMATIONS = 30
VALID_FRACTION = 0.1
TEST_FRACTION = 0.1
PERMUTATION_FILE = "geom_permutation.npy"
PERMUTATION_SEED = 0
SPLITS = ("train", "valid", "test")
ROW_WIDTH = 5  # conformer_id, Z, x, y, z
# The largest single msgpack object (one molecule with all its conformers) accepted;
# msgpack's default limit is 100 MiB.
MAX_OBJECT_BYTES = 2**31 - 1


class GeomFormatError(DataError):
    """A GEOM input or processed file is corrupt or not in the expected format."""


def obtain_steps(datadir: str | os.PathLike, conformations: int | None = None, remove_h: bool = False) -> str:
    """One line telling the user how to get the raw GEOM file and build the processed files."""
    flags = f" --conformations {int(conformations)}" if conformations not in (None, DEFAULT_CONFORMATIONS) else ""
    flags += " --remove_h" if remove_h else ""
    return (
        "to obtain GEOM-Drugs: download drugs_crude.msgpack.tar.gz from the GEOM dataset "
        "(Axelrod & Gomez-Bombarelli, Harvard Dataverse), extract drugs_crude.msgpack from it into "
        f"{datadir}, then run `python build_geom_dataset.py --data_dir {datadir}{flags}`"
    )


def output_names(conformations: int = DEFAULT_CONFORMATIONS, remove_h: bool = False) -> dict[str, str]:
    """File names the builder writes (EDM's names; a ``no_h_`` infix for hydrogen-free builds)."""
    tag = f"{'no_h_' if remove_h else ''}{int(conformations)}"
    return {"rows": f"geom_drugs_{tag}.npy", "counts": f"geom_drugs_n_{tag}.npy", "smiles": "geom_drugs_smiles.txt"}


# ----------------------------------------------------------------------------- builder


class _NpyAppender:
    """Writes a 2-D (or 1-D) .npy to an open file incrementally: header first, rows appended,
    header rewritten with the final row count. The header has a fixed size (numpy pads it
    to 128 bytes for any realistic shape), so it can be rewritten in place."""

    def __init__(self, f: BinaryIO, dtype: np.dtype, row_shape: tuple[int, ...]):
        self.f, self.dtype, self.row_shape, self.n_rows = f, np.dtype(dtype), tuple(row_shape), 0
        self.header_size = self._write_header()

    def _write_header(self) -> int:
        self.f.seek(0)
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": (self.n_rows, *self.row_shape)}
        np.lib.format.write_array_header_1_0(self.f, header)
        return self.f.tell()

    def append(self, rows: np.ndarray) -> None:
        rows = np.ascontiguousarray(rows, dtype=self.dtype)
        if rows.shape[1:] != self.row_shape:
            raise ValueError(f"rows of shape {rows.shape[1:]} appended to a table of rows {self.row_shape}")
        self.f.write(rows.tobytes())
        self.n_rows += len(rows)

    def finish(self) -> None:
        end = self.f.tell()
        if self._write_header() != self.header_size:
            raise RuntimeError("npy header changed size; cannot finalise the streamed array")
        self.f.seek(end)


def _geom_atomic_numbers() -> set[int]:
    return {int(z) for z in get_dataset_info("geom", False)["atomic_nb"]}


def lowest_energy_conformers(info: Any, conformations: int, where: str) -> list[np.ndarray]:
    """The ``xyz`` arrays (n, 4: Z, x, y, z) of the ``conformations`` lowest-energy conformers.

    Ties keep file order. Raises GeomFormatError (naming ``where``) for malformed records.
    """
    if not isinstance(info, dict) or not isinstance(info.get("conformers"), list):
        raise GeomFormatError(f"{where}: expected a dict with a 'conformers' list, got {type(info).__name__}")
    conformers = info["conformers"]
    try:
        energies = np.array([c["totalenergy"] for c in conformers], dtype=np.float64)
    except (KeyError, TypeError, ValueError) as e:
        raise GeomFormatError(f"{where}: a conformer lacks a numeric 'totalenergy' ({type(e).__name__}: {e})") from None
    keep = np.argsort(energies, kind="stable")[:conformations]
    out = []
    for k in keep:
        try:
            xyz = np.asarray(conformers[k]["xyz"], dtype=np.float64)
        except (KeyError, TypeError, ValueError) as e:
            raise GeomFormatError(f"{where}: conformer {k} has no numeric 'xyz' table ({type(e).__name__}: {e})") from None
        if xyz.ndim != 2 or xyz.shape[1] != 4 or len(xyz) == 0:
            raise GeomFormatError(f"{where}: conformer {k} 'xyz' has shape {xyz.shape}, expected (atoms, 4) rows [Z, x, y, z]")
        z = xyz[:, 0]
        if not np.all((z >= 1) & (z == np.rint(z))) or not np.all(np.isfinite(xyz)):
            raise GeomFormatError(f"{where}: conformer {k} has non-integer atomic numbers or non-finite coordinates")
        unknown = sorted(set(np.unique(z).astype(np.int64).tolist()) - _geom_atomic_numbers())
        if unknown:
            raise GeomFormatError(
                f"{where}: conformer {k} has atomic number(s) {unknown}, not among GEOM-Drugs' elements "
                f"{sorted(_geom_atomic_numbers())}; the record is corrupt (or not GEOM-Drugs)"
            )
        out.append(xyz)
    return out


def _molecules(unpacker: msgpack.Unpacker, data_file: Path, size: int) -> Iterable[tuple[int, Any, Any]]:
    """(record number, SMILES, molecule) one molecule at a time.

    GEOM's top-level records are maps of ~1000 molecules; reading each map entry by entry
    keeps memory bounded by one molecule's conformers rather than a whole record.
    Decoding errors (including a file that ends inside a record) name the file and record.
    """
    record = 0
    while unpacker.tell() < size:  # tell() is the exact byte offset between objects
        try:
            n_entries = unpacker.read_map_header()
        except (msgpack.exceptions.UnpackException, ValueError) as e:
            raise GeomFormatError(f"{data_file}: record {record} is not a map SMILES -> molecule ({type(e).__name__}: {e}); "
                                  "the file is corrupt, extract it again") from None
        for _ in range(n_entries):
            try:
                smiles = unpacker.unpack()
                molecule = unpacker.unpack()
            except msgpack.exceptions.OutOfData:
                raise GeomFormatError(f"{data_file}: the file ends inside record {record} (truncated); extract it again") from None
            except (msgpack.exceptions.UnpackException, ValueError, TypeError) as e:
                raise GeomFormatError(f"{data_file}: record {record} cannot be decoded ({type(e).__name__}: {e}); "
                                      "the file is corrupt, extract it again") from None
            yield record, smiles, molecule
        record += 1


def _stream_conversion(
    data_file: Path, conformations: int, remove_h: bool, f_rows: BinaryIO, f_counts: BinaryIO, f_smiles: BinaryIO,
    progress: bool, flush_every: int = 1000,
) -> dict[str, int]:
    """Read the msgpack stream molecule by molecule, appending output rows every ``flush_every`` molecules."""
    rows_out = _NpyAppender(f_rows, np.float64, (ROW_WIDTH,))
    counts_out = _NpyAppender(f_counts, np.int64, ())
    n_molecules = n_conformers = 0
    pending: list[np.ndarray] = []  # kept conformers not yet written

    def flush() -> None:
        nonlocal n_conformers
        if not pending:
            return
        xyz = np.concatenate(pending)
        counts = np.array([len(c) for c in pending], dtype=np.int64)
        ids = n_conformers + np.repeat(np.arange(len(counts)), counts)
        rows_out.append(np.column_stack([ids.astype(np.float64), xyz]))
        counts_out.append(counts)
        n_conformers += len(counts)
        pending.clear()

    size = data_file.stat().st_size
    with open(data_file, "rb") as raw, tqdm.wrapattr(
        raw, "read", total=size, desc=f"reading {data_file.name}", unit="B", unit_scale=True, unit_divisor=1024,
        disable=not progress,
    ) as f:
        unpacker = msgpack.Unpacker(f, raw=False, max_buffer_size=MAX_OBJECT_BYTES, strict_map_key=False)
        for record, smiles, molecule in _molecules(unpacker, data_file, size):
            where = f"{data_file}: record {record}, molecule {smiles!r}"
            if not isinstance(smiles, str) or "\n" in smiles:
                raise GeomFormatError(f"{where}: the key is not a SMILES string")
            for xyz in lowest_energy_conformers(molecule, conformations, where):
                if remove_h:
                    xyz = xyz[xyz[:, 0] != 1]
                    if len(xyz) == 0:
                        raise GeomFormatError(f"{where}: a conformer is made only of hydrogens")
                pending.append(xyz)
            f_smiles.write(smiles.encode() + b"\n")
            n_molecules += 1
            if n_molecules % flush_every == 0:
                flush()
    flush()
    if n_conformers == 0:
        raise GeomFormatError(f"{data_file}: holds no conformers")
    rows_out.finish()
    counts_out.finish()
    return {"molecules": n_molecules, "conformers": n_conformers, "atoms": rows_out.n_rows}


def build_geom_dataset(
    data_dir: str | os.PathLike = DEFAULT_DATADIR,
    data_file: str | os.PathLike = DEFAULT_DATA_FILE,
    conformations: int = DEFAULT_CONFORMATIONS,
    remove_h: bool = False,
    out_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Convert GEOM's ``drugs_crude.msgpack`` into EDM's conformer files (see module docstring).

    ``data_file`` is relative to ``data_dir`` unless absolute; outputs go to ``out_dir``
    (default ``data_dir``). All three files are written to temporary names and renamed only
    when the whole input has been read, so an error never leaves a partial dataset.
    Returns the output paths and counts (molecules, conformers, atoms).
    Raises DataError when the input is missing and GeomFormatError for a corrupt record
    (records are the file's top-level msgpack objects, numbered from 0).
    """
    if int(conformations) < 1:
        raise ValueError(f"--conformations must be at least 1, got {conformations}")
    data_dir = Path(data_dir).expanduser()
    source = data_dir / Path(data_file).expanduser()
    if not source.is_file():
        raise DataError(f"GEOM input {source} not found; {obtain_steps(data_dir, conformations, remove_h)}")
    out = Path(out_dir).expanduser() if out_dir is not None else data_dir
    paths = {k: out / v for k, v in output_names(conformations, remove_h).items()}
    stats: dict[str, Any] = {}

    # Nested atomic writes: each file is renamed into place only after the inner ones succeed.
    def write_rows(f_rows: BinaryIO) -> None:
        def write_counts(f_counts: BinaryIO) -> None:
            def write_smiles(f_smiles: BinaryIO) -> None:
                stats.update(_stream_conversion(source, int(conformations), remove_h, f_rows, f_counts, f_smiles, progress))

            atomic_write(paths["smiles"], write_smiles)

        atomic_write(paths["counts"], write_counts)

    atomic_write(paths["rows"], write_rows)
    return {"paths": paths, **stats}


# ----------------------------------------------------------------------------- loader


@dataclass
class GeomConformers:
    """The processed conformer table: rows on disk (memory-mapped), per-conformer offsets."""

    rows_path: Path
    starts: np.ndarray  # (M,) first row of each conformer
    row_counts: np.ndarray  # (M,) rows of each conformer in the file (hydrogens included if present)
    num_atoms: np.ndarray  # (M,) atoms after optional hydrogen removal
    drop_h: bool  # remove hydrogen rows while batching (file built with hydrogens, remove_h asked)

    def __len__(self) -> int:
        return len(self.starts)


def _load_npy(path: Path, mmap: bool = False) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise GeomFormatError(f"cannot read {path} ({type(e).__name__}: {e}); rebuild it with build_geom_dataset.py") from None


def _heavy_atom_counts(rows: np.ndarray, starts: np.ndarray, chunk_rows: int = 1 << 24) -> np.ndarray:
    """Non-hydrogen atoms per conformer, reading the (memory-mapped) table in bounded chunks."""
    counts = np.zeros(len(starts), dtype=np.int64)
    for a in range(0, len(rows), chunk_rows):
        b = min(a + chunk_rows, len(rows))
        heavy_rows = a + np.flatnonzero(np.asarray(rows[a:b, 1]) != 1)
        counts += np.bincount(np.searchsorted(starts, heavy_rows, side="right") - 1, minlength=len(starts))
    return counts


def load_geom_conformers(
    datadir: str | os.PathLike = DEFAULT_DATADIR, conformations: int = DEFAULT_CONFORMATIONS, remove_h: bool = False
) -> GeomConformers:
    """Open the processed files (a hydrogen-free build when ``remove_h`` and one exists).

    Checks that the atom counts agree with the rows' conformer ids; raises DataError with
    the build steps when the files are missing and GeomFormatError when they disagree.
    """
    datadir = Path(datadir).expanduser()
    names = output_names(conformations, remove_h)
    drop_h = False
    if remove_h and not (datadir / names["rows"]).exists():
        names, drop_h = output_names(conformations, remove_h=False), True  # strip hydrogens on the fly
    rows_path, counts_path = datadir / names["rows"], datadir / names["counts"]
    missing = [str(p) for p in (rows_path, counts_path) if not p.exists()]
    if missing:
        hint = ""
        if not remove_h and (datadir / output_names(conformations, True)["rows"]).exists():
            hint = " (only a hydrogen-free build exists; build again without --remove_h)"
        raise DataError(f"GEOM-Drugs files missing: {', '.join(missing)}{hint}; {obtain_steps(datadir, conformations)}")
    rows = _load_npy(rows_path, mmap=True)
    counts = _load_npy(counts_path).astype(np.int64)
    if rows.ndim != 2 or rows.shape[1] != ROW_WIDTH or not np.issubdtype(rows.dtype, np.floating):
        raise GeomFormatError(f"{rows_path} has shape {rows.shape} ({rows.dtype}); expected float rows [conformer_id, Z, x, y, z]")
    if counts.ndim != 1 or np.any(counts < 1) or counts.sum() != len(rows):
        raise GeomFormatError(f"{counts_path} does not match {rows_path} (atom counts sum to {counts.sum()}, table has "
                              f"{len(rows)} rows); rebuild both with build_geom_dataset.py")
    starts = np.cumsum(counts) - counts
    # The first and last row of every conformer must carry its id; check an even sample so
    # the check does not read the whole (possibly tens of GB) table.
    sample = np.unique(np.linspace(0, len(counts) - 1, min(len(counts), 4096)).astype(np.int64))
    ids_first = np.asarray(rows[starts[sample], 0])
    ids_last = np.asarray(rows[starts[sample] + counts[sample] - 1, 0])
    if not (np.array_equal(ids_first, sample) and np.array_equal(ids_last, sample)):
        raise GeomFormatError(f"conformer ids in {rows_path} disagree with the atom counts in {counts_path}; "
                              "rebuild both with build_geom_dataset.py")
    num_atoms = _heavy_atom_counts(rows, starts) if drop_h else counts
    return GeomConformers(rows_path=rows_path, starts=starts, row_counts=counts, num_atoms=num_atoms, drop_h=drop_h)


def _new_permutation(n: int) -> np.ndarray:
    return np.random.default_rng(PERMUTATION_SEED).permutation(n).astype(np.int64)


def load_or_create_permutation(datadir: str | os.PathLike, n_conformers: int) -> np.ndarray:
    """The conformer permutation saved beside the data; created (deterministically) if absent.

    A saved permutation of the right length is reused as is. One of another length belongs
    to another build and is replaced (with a note on stderr); an unreadable one is an error.
    """
    path = Path(datadir).expanduser() / PERMUTATION_FILE
    if path.exists():
        perm = _load_npy(path)
        if perm.ndim != 1 or not np.issubdtype(perm.dtype, np.integer):
            raise GeomFormatError(f"{path} is not a 1-D integer permutation; delete it to regenerate the split")
        if len(perm) == n_conformers:
            if np.any(perm < 0) or np.any(perm >= n_conformers) or np.any(np.bincount(perm, minlength=n_conformers) != 1):
                raise GeomFormatError(f"{path} is not a permutation of {n_conformers} conformers; delete it to regenerate the split")
            return perm.astype(np.int64)
        print(f"{path} permutes {len(perm)} conformers but the data has {n_conformers}; writing a new split permutation.",
              file=sys.stderr)
    perm = _new_permutation(n_conformers)
    atomic_write(path, lambda f: np.save(f, perm))
    return perm


def geom_split_indices(datadir: str | os.PathLike, n_conformers: int) -> dict[str, np.ndarray]:
    """Conformer ids of each split: EDM's layout, valid = perm[:10%], test = next 10%, train = rest.

    Ids are sorted inside a split so that reads from the memory-mapped table stay local.
    """
    perm = load_or_create_permutation(datadir, n_conformers)
    n_valid = int(n_conformers * VALID_FRACTION)
    n_test = int(n_conformers * TEST_FRACTION)
    return {
        "train": np.sort(perm[n_valid + n_test :]),
        "valid": np.sort(perm[:n_valid]),
        "test": np.sort(perm[n_valid : n_valid + n_test]),
    }


def _concatenated_ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """np.concatenate([arange(s, s + l) for s, l in zip(starts, lengths)]) without a loop."""
    first = np.cumsum(lengths) - lengths
    return np.repeat(starts - first, lengths) + np.arange(int(lengths.sum()))


class GeomDataset(torch.utils.data.Dataset):
    """Conformers of one split; ``__getitems__`` gathers a batch's rows and pads them on the fly."""

    def __init__(self, table: GeomConformers, conformer_ids: np.ndarray, atomic_nb: Iterable[int]):
        ids = np.asarray(conformer_ids, dtype=np.int64)
        self.rows_path = table.rows_path
        self.starts = table.starts[ids]
        self.row_counts = table.row_counts[ids]
        self.num_atoms = table.num_atoms[ids]
        self.conformer_ids = ids
        self.drop_h = table.drop_h
        self.atomic_nb = np.asarray(list(atomic_nb), dtype=np.int64)
        self._rows: np.ndarray | None = None

    def __getstate__(self) -> dict:
        # Worker processes re-open the memory map instead of receiving a copy of the table.
        state = dict(self.__dict__)
        state["_rows"] = None
        return state

    @property
    def rows(self) -> np.ndarray:
        if self._rows is None:
            self._rows = _load_npy(self.rows_path, mmap=True)
        return self._rows

    def __len__(self) -> int:
        return len(self.conformer_ids)

    def subset(self, keep: np.ndarray) -> "GeomDataset":
        """A dataset over the conformers selected by the boolean mask ``keep``."""
        out = object.__new__(GeomDataset)
        out.__dict__.update(self.__getstate__())
        for name in ("starts", "row_counts", "num_atoms", "conformer_ids"):
            setattr(out, name, getattr(self, name)[keep])
        return out

    def padded_arrays(self, indices) -> dict[str, np.ndarray]:
        """The conformers ``indices`` as numpy arrays padded to their largest: positions (B, N, 3)
        float32, charges (B, N) int64 (0 = padding), one_hot (B, N, K) bool, num_atoms (B,), index (B,)."""
        items = np.asarray(indices, dtype=np.int64)
        row_counts = self.row_counts[items]
        block = np.asarray(self.rows[_concatenated_ranges(self.starts[items], row_counts)])
        item_of_row = np.repeat(np.arange(len(items)), row_counts)
        z = np.rint(block[:, 1]).astype(np.int64)
        if self.drop_h:
            heavy = z != 1
            block, z, item_of_row = block[heavy], z[heavy], item_of_row[heavy]
        known = np.isin(z, self.atomic_nb)
        if not known.all():
            bad = int(np.flatnonzero(~known)[0])
            raise GeomFormatError(f"{self.rows_path}: conformer {self.conformer_ids[items[item_of_row[bad]]]} has atomic number "
                                  f"{z[bad]}, not one of GEOM's types {self.atomic_nb.tolist()}")
        num_atoms = np.bincount(item_of_row, minlength=len(items))
        slot = np.arange(len(z)) - (np.cumsum(num_atoms) - num_atoms)[item_of_row]
        n_max = int(num_atoms.max()) if len(items) else 0
        positions = np.zeros((len(items), n_max, 3), dtype=np.float32)
        charges = np.zeros((len(items), n_max), dtype=np.int64)
        positions[item_of_row, slot] = block[:, 2:5]
        charges[item_of_row, slot] = z
        one_hot = charges[..., None] == self.atomic_nb
        return {"positions": positions, "charges": charges, "one_hot": one_hot, "num_atoms": num_atoms,
                "index": self.conformer_ids[items]}

    def __getitems__(self, indices) -> dict[str, torch.Tensor]:
        arrays = self.padded_arrays(indices)
        return make_batch(arrays["positions"], arrays["charges"], arrays["one_hot"], arrays["num_atoms"], arrays["index"])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        batch = self.__getitems__([i])
        return {k: v[0] if k != "edge_mask" else v for k, v in batch.items()}


def geom_datasets(
    datadir: str | os.PathLike = DEFAULT_DATADIR,
    remove_h: bool = False,
    conformations: int = DEFAULT_CONFORMATIONS,
    filter_n_atoms: int | None = None,
    filter_molecule_size: int | None = None,
) -> dict[str, GeomDataset]:
    """The three GEOM-Drugs splits as batching datasets.

    ``filter_n_atoms`` keeps conformers with exactly that many atoms (as for QM9);
    ``filter_molecule_size`` keeps those with at most that many (EDM's GEOM option).
    Filters apply inside each split, so the split itself never depends on them.
    """
    table = load_geom_conformers(datadir, conformations, remove_h)
    split_ids = geom_split_indices(datadir, len(table))
    atomic_nb = get_dataset_info("geom", remove_h)["atomic_nb"]
    datasets = {}
    for split in SPLITS:
        dataset = GeomDataset(table, split_ids[split], atomic_nb)
        keep = np.ones(len(dataset), dtype=bool)
        if filter_n_atoms is not None:
            keep &= dataset.num_atoms == int(filter_n_atoms)
        if filter_molecule_size is not None:
            keep &= dataset.num_atoms <= int(filter_molecule_size)
        if not keep.any():
            raise ValueError(f"no {split} conformer passes the size filter (filter_n_atoms={filter_n_atoms}, "
                             f"filter_molecule_size={filter_molecule_size})")
        datasets[split] = dataset if keep.all() else dataset.subset(keep)
    return datasets


_ROWS_NAME = re.compile(r"geom_drugs_(no_h_)?(\d+)\.npy")


def geom_location(args: argparse.Namespace) -> tuple[Path, int]:
    """(data folder, conformations) from run arguments.

    The folder is ``--datadir`` when given, else the folder of EDM's ``--data_file`` (e.g.
    ./data/geom/geom_drugs_30.npy), else data/geom; ``qm9/temp`` is the shared command
    line's QM9 default, never a GEOM folder. The conformer count is ``--conformations``
    when given, else the one in ``--data_file``'s name, else 30.
    """
    data_file = getattr(args, "data_file", None)
    match = _ROWS_NAME.fullmatch(Path(data_file).name) if data_file else None
    datadir = getattr(args, "datadir", None)
    if not datadir or Path(datadir) == Path("qm9/temp"):
        if data_file and match is None:
            raise ValueError(f"--data_file {data_file}: expected a file named geom_drugs_<C>.npy or geom_drugs_no_h_<C>.npy "
                             "as written by build_geom_dataset.py")
        if match and match.group(1) and not getattr(args, "remove_h", False):
            raise ValueError(f"--data_file {data_file} has no hydrogens; add --remove_h or use geom_drugs_{match.group(2)}.npy")
        datadir = Path(data_file).parent if data_file else DEFAULT_DATADIR
    conformations = getattr(args, "conformations", None) or (match and match.group(2)) or DEFAULT_CONFORMATIONS
    return Path(datadir), int(conformations)


def retrieve_geom_dataloaders(args: argparse.Namespace):
    """GEOM-Drugs loaders 'train', 'valid', 'test' (EDM batch dicts) and the charge scale.

    Uses args.datadir or args.data_file (see geom_location; default data/geom),
    args.conformations (30), args.remove_h,
    args.filter_n_atoms, args.filter_molecule_size, args.batch_size, args.num_workers,
    args.data_seed. The charge scale is the largest atomic number among GEOM's types (Bi, 83).
    """
    datadir, conformations = geom_location(args)
    datasets = geom_datasets(
        datadir,
        remove_h=bool(getattr(args, "remove_h", False)),
        conformations=conformations,
        filter_n_atoms=getattr(args, "filter_n_atoms", None),
        filter_molecule_size=getattr(args, "filter_molecule_size", None),
    )
    batch_size = int(getattr(args, "batch_size", 64))
    num_workers = int(getattr(args, "num_workers", 0))
    seed = getattr(args, "data_seed", None)
    loaders = {
        split: make_dataloader(dataset, batch_size=batch_size, shuffle=(split == "train"), num_workers=num_workers, seed=seed)
        for split, dataset in datasets.items()
    }
    charge_scale = torch.tensor(max(get_dataset_info("geom", False)["atomic_nb"]))
    return loaders, charge_scale
