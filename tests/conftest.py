"""Shared test fixtures: the repository root on sys.path and the QM9 cache (built once)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

FIXTURES = Path(__file__).resolve().parent / "fixtures"


@pytest.fixture(scope="session")
def qm9_datadir() -> Path:
    """The default QM9 cache folder (qm9/temp, git-ignored), built on first use (~5 s)."""
    from qm9.data.qm9 import ensure_cache

    datadir = Path(os.environ.get("QM9_DATADIR", REPO_ROOT / "qm9" / "temp"))
    ensure_cache(datadir, progress=False)
    return datadir


@pytest.fixture
def one_thread():
    """Run a test with one torch thread (bit-identical reruns; no oversubscription), then restore."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
