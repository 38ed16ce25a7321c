"""A run's evaluation history, ``metrics.jsonl`` in the run folder: one JSON object per line.

Training appends a record at every test epoch (validation/test NLL, stability of sampled
molecules, optimiser step, training seconds so far). A crash between an evaluation and the
next resume point makes the continuation evaluate the same epoch again, so readers keep the
last record per epoch. Lines that are not valid JSON (a write cut by a kill) are skipped.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN/inf
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def append_record(run_dir: str | os.PathLike, record: dict[str, Any]) -> None:
    """Append one record (a line) to the run's metrics file, flushed to disk."""
    path = Path(run_dir) / METRICS_FILE
    line = json.dumps(_jsonable(record), sort_keys=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_records(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The run's records in epoch order, the last one per epoch (see the module docstring)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    by_epoch: dict[int, dict[str, Any]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("epoch"), int):
            by_epoch[record["epoch"]] = record
    return [by_epoch[e] for e in sorted(by_epoch)]
