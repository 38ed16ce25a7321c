"""bench/bench_model.py --baseline: the before/after comparison's argument checks and summary."""
from __future__ import annotations

import argparse

import pytest

from bench import bench_model


def test_baseline_without_a_checkout_is_one_line_error(tmp_path):
    with pytest.raises(SystemExit, match="no bench/bench_model.py there"):
        bench_model.main(["--baseline", str(tmp_path), "--models", "small", "--threads", "1"])


def test_baseline_alternates_checkouts_and_summarises(tmp_path, monkeypatch):
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "bench_model.py").write_text("")
    calls = []
    times = iter([
        {"train_ms": 300.0, "sample_ms": 150.0}, {"train_ms": 250.0, "sample_ms": 140.0},
        {"train_ms": 320.0, "sample_ms": 160.0}, {"train_ms": 260.0, "sample_ms": 150.0},
        {"train_ms": 310.0, "sample_ms": 155.0}, {"train_ms": 240.0, "sample_ms": 145.0},
    ])

    def fake(opts, name, n_threads, script=bench_model.__file__):
        calls.append("baseline" if str(tmp_path) in str(script) else "ours")
        return next(times)

    monkeypatch.setattr(bench_model, "measure_in_subprocess", fake)
    opts = argparse.Namespace(baseline=str(tmp_path), rounds=3, repeats=1)
    report = bench_model.compare_with_baseline(opts, ["small"], [1])
    assert calls == ["baseline", "ours"] * 3
    row = report["results"]["small_1thread"]
    assert row["baseline"]["train_ms"]["best"] == 300.0 and row["ours"]["train_ms"]["best"] == 240.0
    assert row["baseline"]["train_ms"]["median"] == 310.0 and row["ours"]["train_ms"]["median"] == 250.0
    assert row["speedup_best"]["train_ms"] == 1.25
    assert row["speedup_median"]["train_ms"] == 1.24
