"""Run the Gaussianity evaluator over a dataset: molecule selection, chunks, worker
processes, and the per-atom-count CSVs ``results_atoms_{n}.csv`` written as chunks finish.

Molecules are grouped by atom count and cut into chunks of ``chunk_size``; every chunk
draws its noise from its own generator seeded by (seed, n_atoms, chunk number), so the
results do not depend on the number of workers, on the order chunks finish in, or on
whether the run was interrupted and resumed. A chunk's rows are appended to its CSV in
one write and flushed, so an interrupted run keeps every finished chunk; ``resume`` drops
any partly written chunk and computes only what is missing.

Only the molecules of the chunk being handed to a worker are materialised
(``features.molecules``), so GEOM-Drugs' on-demand features are read chunk by chunk.
"""
from __future__ import annotations

import io
import json
import multiprocessing
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pandas as pd

from configs.errors import DataError, TrainingStopped
from gaga.data import MoleculeFeatures, random_subset_rows
from gaga.gaussianity import GaussianityConfig, evaluate_molecules
from gaga.results_files import CONFIG_FILE, RESULTS_PATTERN, results_path

def select_molecules(features: MoleculeFeatures, n_molecules: int | None, seed: int, min_atoms: int) -> np.ndarray:
    """Rows of the molecules to test: a seeded random subset of those with >= min_atoms atoms."""
    return random_subset_rows(features.num_atoms, n_molecules, seed, min_atoms)


@dataclass(frozen=True)
class Chunk:
    n_atoms: int
    number: int
    rows: np.ndarray  # rows into the Features


def make_chunks(features: MoleculeFeatures, rows: np.ndarray, chunk_size: int) -> list[Chunk]:
    """Chunks of equal-size molecules, numbered per atom count in the order of the selection."""
    if chunk_size < 1:
        raise ValueError(f"--chunk_size must be >= 1, got {chunk_size}")
    counts = features.num_atoms[rows]
    chunks = []
    for n in np.unique(counts):
        group = rows[counts == n]
        for number, start in enumerate(range(0, group.size, chunk_size)):
            chunks.append(Chunk(int(n), number, group[start : start + chunk_size]))
    return chunks


def _chunk_task(task: tuple) -> tuple[int, int, dict[str, np.ndarray]]:
    """Worker entry point: evaluate one chunk; returns the rows of its CSV as columns."""
    n_atoms, number, z0, index, split_row, alpha2, sigma2, grid, channels, config = task
    rng = np.random.default_rng([config.seed, n_atoms, number])
    out = evaluate_molecules(z0, alpha2, sigma2, channels, config, rng)
    n_mol, n_t = z0.shape[0], len(grid)
    columns: dict[str, np.ndarray] = {
        "index": np.repeat(index, n_t),
        "split_row": np.repeat(split_row, n_t),
        "n_atoms": np.full(n_mol * n_t, n_atoms),
        "chunk": np.full(n_mol * n_t, number),
        "t": np.tile(np.asarray(grid), n_mol),
    }
    for key, value in out.items():
        columns[key] = value.reshape(-1).astype(np.int8) if value.dtype == bool else value.reshape(-1)
    return n_atoms, number, columns


def append_rows(path: Path, columns: dict[str, np.ndarray]) -> None:
    """Append a chunk's rows to a CSV in one write (header if the file is new), then flush to disk."""
    text = pd.DataFrame(columns).to_csv(index=False, header=not path.exists(), float_format="%.6g")
    with open(path, "a") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _read_complete_lines(path: Path) -> tuple[str, list[str]]:
    """(header, data lines) of a results CSV, without a cut last line and without malformed rows
    (wrong field count or non-numeric fields, e.g. rows glued by an earlier interrupted write)."""
    text = path.read_text(errors="replace")
    if not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]  # a write cut mid-line: drop the partial line
    lines = text.splitlines()
    if not lines:
        return "", []
    header, n_fields = lines[0], lines[0].count(",") + 1
    good = []
    for line in lines[1:]:
        fields = line.split(",")
        if len(fields) != n_fields:
            continue
        try:
            [float(f) for f in fields]
        except ValueError:
            continue
        good.append(line)
    return header, good


def _completed_chunks(out_dir: Path, chunks: list[Chunk], n_t: int) -> set[tuple[int, int]]:
    """Chunks fully present in the existing CSVs. Rows of partly written chunks (and a cut or
    malformed tail) are dropped from the files, which are rewritten atomically; a file without
    one complete row is moved aside to ``<name>.partial``, never deleted."""
    from configs.atomic_io import atomic_write_bytes

    expected = {(c.n_atoms, c.number): c.rows.size * n_t for c in chunks}
    done: set[tuple[int, int]] = set()
    for path in sorted(Path(out_dir).glob(RESULTS_PATTERN)):
        header, lines = _read_complete_lines(path)
        columns = header.split(",")
        if not lines or "n_atoms" not in columns or "chunk" not in columns:
            aside = path.with_name(path.name + ".partial")
            os.replace(path, aside)
            print(f"note: {path} holds no complete row; moved to {aside}", file=sys.stderr)
            continue
        table = pd.read_csv(io.StringIO(header + "\n" + "\n".join(lines) + "\n"))
        sizes = table.groupby(["n_atoms", "chunk"]).size()
        complete = {key for key, size in sizes.items() if expected.get(tuple(int(k) for k in key)) == size}
        keep = np.asarray(pd.MultiIndex.from_arrays([table["n_atoms"], table["chunk"]]).isin(list(complete)), dtype=bool)
        original = path.read_bytes()
        kept = (header + "\n" + "".join(line + "\n" for line, k in zip(lines, keep) if k)).encode()
        if kept != original:
            dropped = int((~keep).sum())
            print(f"note: {path}: kept {int(keep.sum())} rows of complete chunks, dropped {dropped} row(s) of unfinished ones"
                  + (" and a cut or malformed tail" if len(original) > len(kept) and not dropped else ""), file=sys.stderr)
            atomic_write_bytes(path, kept)
        done |= {(int(a), int(c)) for a, c in complete}
    return done


def prepare_out_dir(out_dir: Path, config_record: dict, resume: bool) -> None:
    """Create the folder; without resume, clear earlier results; with resume, insist on the same settings."""
    out_dir.mkdir(parents=True, exist_ok=True)
    config_path = out_dir / CONFIG_FILE
    if resume and config_path.exists():
        try:
            previous = json.loads(config_path.read_text())
        except (ValueError, OSError) as e:
            raise DataError(f"{config_path} is unreadable ({type(e).__name__}: {e}); rerun without --resume to start over") from None
        if previous != config_record:
            changed = sorted(k for k in set(previous) | set(config_record) if previous.get(k) != config_record.get(k))
            raise ValueError(f"--resume: the settings differ from the interrupted run in {out_dir} ({', '.join(changed)}); rerun without --resume")
    elif not resume:
        old = sorted(out_dir.glob(RESULTS_PATTERN))
        if old:
            print(f"note: replacing {len(old)} earlier results file(s) in {out_dir}", file=sys.stderr)
            for path in old:
                path.unlink()
    config_path.write_text(json.dumps(config_record, indent=2) + "\n")


def config_record(config: GaussianityConfig, extra: dict) -> dict:
    record = asdict(config)
    record["timesteps"] = list(config.timesteps)
    return {**record, **extra}


def run_gaussianity_test(
    features: MoleculeFeatures,
    gamma: np.ndarray,
    config: GaussianityConfig,
    out_dir: str | Path,
    n_molecules: int | None = None,
    workers: int = 1,
    chunk_size: int = 32,
    resume: bool = False,
    progress: bool = True,
    extra_record: dict | None = None,
    on_chunk: Callable[[int], None] | None = None,
) -> dict:
    """Test the selected molecules at every grid timestep and write results_atoms_{n}.csv files.

    Returns a summary: molecules selected / computed now / already done, files written.
    """
    from tqdm import tqdm

    from gaga.schedule import alpha2_sigma2, check_timesteps

    config.validate()
    grid = check_timesteps(config.timesteps, len(gamma) - 1)
    if workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    out_dir = Path(out_dir)
    rows = select_molecules(features, n_molecules, config.seed, config.min_atoms)
    chunks = make_chunks(features, rows, chunk_size)
    record = config_record(config, {"n_molecules": int(rows.size), "chunk_size": chunk_size, **(extra_record or {})})
    prepare_out_dir(out_dir, record, resume)
    done = _completed_chunks(out_dir, chunks, len(grid)) if resume else set()
    todo = [c for c in chunks if (c.n_atoms, c.number) not in done]
    alpha2, sigma2 = alpha2_sigma2(gamma, grid)

    def tasks() -> Iterator[tuple]:
        for c in todo:
            yield (
                c.n_atoms, c.number, features.molecules(c.rows, c.n_atoms), features.index[c.rows], c.rows,
                alpha2, sigma2, grid, features.channels, config,
            )

    n_todo = int(sum(c.rows.size for c in todo))
    bar = tqdm(total=n_todo, desc="Gaussianity tests", unit="mol", disable=not progress)
    written = 0
    pool = None
    try:
        if workers == 1:
            results: Iterator = map(_chunk_task, tasks())
        else:
            method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
            pool = multiprocessing.get_context(method).Pool(workers)
            results = pool.imap_unordered(_chunk_task, tasks())
        for n_atoms, _number, columns in results:
            append_rows(results_path(out_dir, n_atoms), columns)
            n_done = columns["index"].size // len(grid)
            written += n_done
            bar.update(n_done)
            if on_chunk is not None:
                on_chunk(written)
    except KeyboardInterrupt:
        if pool is not None:
            pool.terminate()
        bar.close()
        raise TrainingStopped(
            f"interrupted: {written + len(rows) - n_todo} of {len(rows)} molecules are saved in {out_dir}; "
            "rerun the same command with --resume to finish"
        ) from None
    finally:
        if pool is not None:
            pool.close()
            pool.join()
        bar.close()
    return {
        "n_selected": int(rows.size),
        "n_computed": written,
        "n_already_done": int(rows.size) - n_todo,
        "files": sorted(str(p) for p in out_dir.glob(RESULTS_PATTERN)),
    }
