"""The equal-budget study (training/study.py): two runs that differ only in GAGA's switches,
trained side by side, snapshotted to a committed folder and resumed from it on a fresh machine."""
from __future__ import annotations

import math

import pytest

from training import study, study_eval
from training.args import parse_args
from training.metrics_log import METRICS_FILE, append_record, read_records

GAGA_ONLY = {"exp_name", "max_t", "dataset_var", "zero_center_h"}


def test_the_two_runs_differ_only_in_gaga_flags(tmp_path):
    parsed = {}
    for run in study.RUNS:
        argv = study.training_command(run, epochs=7, resume=False, live_root=tmp_path)[2:]
        parsed[run] = vars(parse_args(argv))
    edm, gaga = parsed["qm9_edm_small"], parsed["qm9_gaga_small"]
    assert {k for k in edm if edm[k] != gaga[k]} == GAGA_ONLY
    assert edm["max_t"] is None and edm["zero_center_h"] is False and edm["dataset_var"] == 1.0
    assert gaga["max_t"] == 550 and gaga["zero_center_h"] is True and gaga["dataset_var"] == 0.848
    assert edm["n_epochs"] == 7 and edm["diffusion_steps"] == 1000 and edm["diffusion_noise_schedule"] == "polynomial_2"


def test_resume_command_extends_the_budget_and_carries_the_lr_schedule(tmp_path):
    argv = study.training_command("qm9_gaga_small", epochs=12, resume=True, live_root=tmp_path)[2:]
    assert argv == ["--resume", str(tmp_path / "qm9_gaga_small"), "--n_epochs", "12", "--lr_schedule", "70:1e-4,90:2e-5"]
    override = study.training_command("qm9_gaga_small", 12, True, tmp_path, overrides={"lr_schedule": "1:1e-4"})
    assert override[-2:] == ["--lr_schedule", "1:1e-4"]


def test_both_runs_switch_to_lr_1e_4_at_epoch_70(tmp_path):
    for run in study.RUNS:
        args = parse_args(study.training_command(run, epochs=90, resume=False, live_root=tmp_path)[2:])
        assert (args.lr, args.lr_schedule) == (5e-4, "70:0.0001,90:2e-05")


def test_metrics_log_keeps_the_last_record_per_epoch_and_skips_cut_lines(tmp_path):
    append_record(tmp_path, {"epoch": 0, "step": 10, "val_nll": 5.0})
    append_record(tmp_path, {"epoch": 2, "step": 30, "val_nll": float("nan"), "stability": {"atm_stable": 0.5}})
    append_record(tmp_path, {"epoch": 0, "step": 10, "val_nll": 4.0})  # the same epoch evaluated again after a crash
    with open(tmp_path / METRICS_FILE, "a") as f:
        f.write('{"epoch": 3, "step"')  # a write cut by a kill
    records = read_records(tmp_path)
    assert [r["epoch"] for r in records] == [0, 2]
    assert records[0]["val_nll"] == 4.0 and records[1]["val_nll"] is None


def test_curves_plot_both_runs(tmp_path):
    for run, offset in (("a", 0.0), ("b", 0.1)):
        for epoch in range(3):
            (tmp_path / run).mkdir(exist_ok=True)
            append_record(tmp_path / run, {
                "epoch": epoch, "step": 100 * (epoch + 1), "val_nll": 100.0 - epoch,
                "stability": {"atm_stable": 0.3 + offset + 0.1 * epoch, "mol_stable": 0.01 * epoch},
            })
    out = study.plot_curves({"a": tmp_path / "a", "b": tmp_path / "b"}, tmp_path / "curves.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000

    # The study's evaluations at a budget: error bars at epoch x steps per epoch, and the bars.
    budgets = {"a": [{"epoch": 2, "n_samples": 1000, "iterations": [
        {"atm_stable": 0.90, "mol_stable": 0.18}, {"atm_stable": 0.92, "mol_stable": 0.22}]}]}
    fig = study.curves_figure({"a": tmp_path / "a", "b": tmp_path / "b"}, budgets)
    molecule = fig.axes[2]
    (bars,) = molecule.containers
    x, y = bars.lines[0].get_data()
    assert list(x) == [200] and list(y) == pytest.approx([20.0])  # epoch 2 at 100 steps per epoch; the mean
    labels = molecule.get_legend_handles_labels()[1]
    assert "a: 2 x 1,000 molecules, mean ± std" in labels and "bar for EDM's full chain: 20%" in labels
    assert list(fig.axes[1].containers[0].lines[0].get_data()[1]) == pytest.approx([91.0])


def test_the_curves_mark_each_lr_switch_the_run_has_reached(tmp_path):
    from configs.run_args import save_run_args

    save_run_args(tmp_path, parse_args(["--lr_schedule", "2:1e-4,9:5e-5"]))
    records = [{"epoch": e, "step": 100 * (e + 1)} for e in (0, 2, 4)]  # 100 steps per epoch
    assert study.lr_switch_steps(records, study.run_lr_of_epoch(tmp_path)) == {(200, 1e-4)}  # epoch 9 is not reached yet
    assert study.run_lr_of_epoch(tmp_path / "missing") is None and study.lr_switch_steps(records, None) == set()


def test_status_projects_each_run_and_compares_the_two_at_equal_steps(tmp_path):
    state = tmp_path / "state"  # no resume state anywhere: status reads the committed metrics
    for run, offset in (("qm9_edm_small", 0.0), ("qm9_gaga_small", 0.05)):
        for epoch in range(4):
            (state / run).mkdir(parents=True, exist_ok=True)
            append_record(state / run, {"epoch": 2 * epoch, "step": 1000 * (epoch + 1), "val_nll": 1.0,
                                        "stability": {"atm_stable": 0.6 + offset + 0.05 * epoch, "mol_stable": 0.0}})
    lines = study.status(study.QM9_RUNS, tmp_path / "live", state)
    assert lines[0].startswith("qm9_edm_small: not started; epoch 6") and "90% projected at" in lines[0]
    assert lines[2] == ("qm9_gaga_small vs qm9_edm_small at equal steps (4 common evaluations): atm_stable higher at 4, "
                        "by +5.0 to +5.0 points (latest +5.0 at step 4,000); qm9_gaga_small first reached "
                        "qm9_edm_small's latest 75.0% at step 3,000, 0.75x of qm9_edm_small's 4,000")


def test_logged_hours_sum_the_epoch_and_sampling_times_of_the_log(tmp_path):
    (tmp_path / "train_summary.log").write_text(
        "Epoch 0: train NLL 2.58, took 1800.0 s\n"
        "Stability at epoch 0: mol_stable 0.0000, atm_stable 0.17, validity 0.35 (900.0 s)\n"
        "Val loss: 485.87 \t Test loss: 466.80\n"
        "Epoch 1: learning rate 0.0001 (--lr_schedule 1:0.0001)\n"
        "Epoch 1: train NLL 2.55, took 3600.0 s\n")
    assert study.logged_hours(tmp_path) == {"train": 1.5, "sampling": 0.25}
    # the live log (progress bars joined by carriage returns) wins over the summary
    (tmp_path / "train.log").write_text("epoch 0: 10%|#|\rEpoch 0: train NLL 2.5, took 360.0 s\r")
    assert study.logged_hours(tmp_path) == {"train": 0.1, "sampling": 0.0}
    assert study.logged_hours(tmp_path / "missing") is None


def test_candidate_parsing_rejects_unknown_flags():
    assert study.parse_candidate("nf=96,n_layers=6") == {"nf": "96", "n_layers": "6"}
    with pytest.raises(ValueError, match="key=value"):
        study.parse_candidate("width=96")


def test_train_snapshot_and_resume_on_a_fresh_machine(tmp_path, qm9_datadir):
    """Both runs train an epoch; the live folders are deleted (a fresh machine); training to
    epoch 2 restores them from the committed state and continues where they stopped."""
    live, state = tmp_path / "outputs", tmp_path / "state"
    tiny = {"datadir": str(qm9_datadir), "data_subset": "32", "nf": "8", "n_layers": "1", "batch_size": "16",
            "test_epochs": "1", "n_stability_samples": "2", "checkpoint_every_steps": "1"}
    codes = study.train(list(study.RUNS), epochs=1, hours=1.0, nice=0, live_root=live, state_root=state,
                        overrides=tiny, poll_seconds=0.2)
    assert codes == {run: 0 for run in study.RUNS}
    for run in study.RUNS:
        assert {p.name for p in (state / run).iterdir()} == set(study.STATE_FILES)
        assert "Epoch 0" in (state / run / "train_summary.log").read_text()
        assert study.run_progress(state / run) == {"epoch": 1, "step_in_epoch": 0, "global_step": 2}

    import shutil

    shutil.rmtree(live)
    codes = study.train(list(study.RUNS), epochs=2, hours=1.0, nice=0, live_root=live, state_root=state,
                        overrides=tiny, poll_seconds=0.2)
    assert codes == {run: 0 for run in study.RUNS}
    for run in study.RUNS:
        assert study.run_progress(state / run)["global_step"] == 4
        records = read_records(state / run)
        assert [r["epoch"] for r in records] == [0, 1]
        assert all(math.isfinite(r["val_nll"]) and r["stability"] is not None for r in records)
        log = (live / run / "train.log").read_text()
        assert "Resuming" in log and log.count("=== ") == 2  # the first session's summary, then this session
        summary = (state / run / "train_summary.log").read_text()
        assert "Epoch 0" in summary and "Epoch 1" in summary

    # Shipping needs the run exactly at the budget; then every row of the table runs on the shipped folders.
    with pytest.raises(ValueError, match="not at the end of epoch 3"):
        study.ship("qm9_edm_small", 3, live, state, tmp_path / "pretrained")
    for run in study.RUNS:
        shipped = study.ship(run, 2, live, state, tmp_path / "pretrained")
        assert {p.name for p in shipped.iterdir()} == {"args.pickle", "generative_model_ema.npy"}
    results = study_eval.evaluate(study_eval.evaluation_rows(), tmp_path / "pretrained", n_samples=2, iterations=1,
                                  batch_size=2, out_stem=tmp_path / "results", nll=True, datadir=str(qm9_datadir),
                                  novelty=False)
    assert [r["steps"] for r in results] == [1000, 500, 50, 550, 550, 450, 275, 50]
    assert all(math.isfinite(r["test_nll"]) for r in results)
    table = (tmp_path / "results.md").read_text()
    assert table.count("| qm9_edm_small |") == 4 and table.count("| qm9_gaga_small |") == 4


def test_rows_are_split_into_jobs_of_about_equal_sampling_cost():
    rows = study_eval.evaluation_rows()
    costs = [study_eval.row_cost(r) for r in rows]
    assert costs == [1000, 500, 50, 550, 550, 450, 275, 50]
    groups = study_eval.partition_rows(rows, 2)
    assert sorted(i for g in groups for i in g) == list(range(8))
    loads = [sum(costs[i] for i in g) for g in groups]
    assert max(loads) - min(loads) <= 50  # 1,725 vs 1,700 network evaluations per molecule
    assert study_eval.partition_rows(rows[:1], 4) == [[0]]
    # Balanced on the work left: with EDM+GAGA's rows (5-8) cached, EDM's four rows split 1,050 / 1,050.
    left = costs[:4] + [0] * 4
    groups = study_eval.partition_rows(rows, 2, left)
    assert sorted(i for g in groups for i in g) == [0, 1, 2, 3] and [sum(left[i] for i in g) for g in groups] == [1050, 1050]
    assert study_eval.partition_rows(rows, 2, [0] * 8) == []  # nothing left: no job
    with pytest.raises(ValueError, match="between 1 and 8"):
        study_eval.select_rows(rows, "0,9")
    assert [r.label for r in study_eval.select_rows(rows, "3,8")] == [rows[2].label, rows[7].label]
    assert len({r.slug for r in rows}) == 8


def _tiny_shipped_model(root, qm9_datadir, name="qm9_gaga_small"):
    """A tiny untrained run folder shipped under ``name`` (what ``ship`` writes)."""
    import torch

    from configs.run_args import save_run_args
    from qm9.models import get_model
    from training.checkpoint import EMA_FILE, atomic_torch_save

    argv = study.training_command(name, epochs=1, resume=False, live_root=root)[2:]
    args = parse_args(argv + ["--nf", "8", "--n_layers", "1", "--datadir", str(qm9_datadir)])
    from configs.datasets_config import get_dataset_info

    torch.manual_seed(0)
    model, _, _ = get_model(args, torch.device("cpu"), get_dataset_info(args.dataset, args.remove_h), None)
    atomic_torch_save(model.state_dict(), root / name / EMA_FILE)
    save_run_args(root / name, args)
    return root / name


def test_a_stopped_evaluation_resumes_at_the_next_iteration(tmp_path, qm9_datadir, monkeypatch):
    """Iterations are cached as they finish: asking for 2 after 1 samples only the second (same
    seeds as an uninterrupted run); new weights invalidate the cache."""
    from training import loop

    model_root, cache = tmp_path / "pretrained", tmp_path / "cache"
    _tiny_shipped_model(model_root, qm9_datadir)
    row = [r for r in study_eval.evaluation_rows() if r.label.startswith("EDM+GAGA DPM")]
    calls = []
    real = loop.sample_molecules
    monkeypatch.setattr(loop, "sample_molecules", lambda *a, **k: calls.append(1) or real(*a, **k))
    kwargs = dict(n_samples=3, batch_size=3, nll=False, datadir=str(qm9_datadir), novelty=False, cache_dir=cache)
    left = lambda iterations: study_eval.remaining_costs(row, model_root, 3, iterations, 3, cache, novelty=False)
    assert left(2) == [100]  # 50 network evaluations per molecule x 2 iterations
    first = study_eval.evaluate(row, model_root, iterations=1, **kwargs)[0]
    assert len(calls) == 1 and left(2) == [50] and left(1) == [0]
    both = study_eval.evaluate(row, model_root, iterations=2, **kwargs)[0]
    assert len(calls) == 2  # only the second iteration was sampled
    fresh = study_eval.evaluate(row, model_root, iterations=2, **{**kwargs, "cache_dir": tmp_path / "other"})[0]
    strip = lambda it: {k: v for k, v in it.items() if k not in ("seconds", "s_per_molecule", "threads")}
    assert strip(both["iterations"][0]) == strip(first["iterations"][0])
    assert [strip(i) for i in both["iterations"]] == [strip(i) for i in fresh["iterations"]]
    assert len(calls) == 4
    stored = (cache / f"{row[0].slug}.json").read_bytes()
    again = study_eval.evaluate(row, model_root, iterations=2, **kwargs)[0]
    assert len(calls) == 4  # everything cached
    assert (cache / f"{row[0].slug}.json").read_bytes() == stored  # and the cache is left as it was
    import torch

    assert again["device"] == f"CPU ({torch.get_num_threads()} thread(s))"  # where the iterations were measured

    _tiny_shipped_model(model_root, qm9_datadir)  # same seed, same weights: still cached
    study_eval.evaluate(row, model_root, iterations=1, **kwargs)
    assert len(calls) == 4
    from training.checkpoint import EMA_FILE, atomic_torch_save

    state = torch.load(model_root / "qm9_gaga_small" / EMA_FILE, weights_only=True)
    first_key = next(iter(state))
    state[first_key] = state[first_key] + 0.01
    atomic_torch_save(state, model_root / "qm9_gaga_small" / EMA_FILE)
    study_eval.evaluate(row, model_root, iterations=1, **kwargs)
    assert len(calls) == 5  # the weights changed: measured again


def test_evaluate_command_runs_rows_in_parallel_jobs(tmp_path, qm9_datadir, monkeypatch):
    """``evaluate --jobs 2`` fills the cache from two single-thread processes, then writes the table."""
    import subprocess
    import sys

    model_root = tmp_path / "pretrained"
    for name in study.RUNS:
        _tiny_shipped_model(model_root, qm9_datadir, name)
    out = tmp_path / "results"
    cmd = [sys.executable, str(study.REPO / "equal_budget.py"), "evaluate", "--rows", "3,8", "--jobs", "2",
           "--n_samples", "2", "--iterations", "1", "--batch_size", "2", "--model_root", str(model_root),
           "--cache_dir", str(tmp_path / "cache"), "--out", str(out), "--no_nll"]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=study.REPO, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("job ") == 2 and {p.name for p in (tmp_path / "cache").iterdir()} == {
        "edm_dpm_solver_2m_50_steps.json", "edm_gaga_dpm_solver_2m_50_steps.json"}
    table = out.with_suffix(".md").read_text()
    assert "| EDM DPM-Solver++(2M) 50 steps | qm9_edm_small |" in table and "1 thread(s)" in table


def test_models_shipped_at_different_epochs_are_not_evaluated_together(tmp_path, qm9_datadir):
    from configs.run_args import load_run_args, save_run_args

    model_root = tmp_path / "pretrained"
    for name, epoch in (("qm9_edm_small", 30), ("qm9_gaga_small", 60)):
        folder = _tiny_shipped_model(model_root, qm9_datadir, name)
        args = load_run_args(folder)
        args.current_epoch = epoch
        save_run_args(folder, args)
    argv = ["evaluate", "--n_samples", "2", "--iterations", "1", "--model_root", str(model_root),
            "--cache_dir", str(tmp_path / "cache"), "--out", str(tmp_path / "results"), "--no_nll"]
    with pytest.raises(ValueError, match=r"qm9_edm_small at epoch 30, qm9_gaga_small at epoch 60\); ship them at the same epoch"):
        study.main(argv + ["--rows", "1,5"])
    assert not (tmp_path / "cache").exists()  # refused before sampling anything
    assert study_eval.check_same_budget(model_root, ["qm9_gaga_small"]) == 60  # one model's rows alone are fine


def test_ship_takes_an_epochs_weights_from_its_per_epoch_copy(tmp_path, qm9_datadir):
    """A run past the budget's epoch ships the EMA copy that epoch's validation left behind, and
    refuses an epoch it has neither a resume state nor a copy of."""
    import torch

    from configs.run_args import load_run_args, save_run_args
    from training.checkpoint import EMA_FILE, atomic_torch_save, save_resume_state

    live = tmp_path / "outputs"
    run_dir = _tiny_shipped_model(live, qm9_datadir, "qm9_edm_small")
    args = load_run_args(run_dir)
    weights = torch.load(run_dir / EMA_FILE, weights_only=True)
    save_resume_state(run_dir, {"state": {"epoch": 4, "step_in_epoch": 10, "global_step": 100}, "model": weights,
                                "model_ema": weights})
    epoch_2 = {k: v + 1.0 for k, v in weights.items()}
    atomic_torch_save(epoch_2, run_dir / "generative_model_ema_2.npy")
    args.current_epoch = 3
    save_run_args(run_dir, args, "args_2.pickle")

    shipped = study.ship("qm9_edm_small", 3, live, tmp_path / "state", tmp_path / "pretrained")
    got = torch.load(shipped / EMA_FILE, weights_only=True)
    assert all(torch.equal(got[k], epoch_2[k]) for k in weights)
    assert load_run_args(shipped).current_epoch == 3
    with pytest.raises(ValueError, match="not at the end of epoch 2"):
        study.ship("qm9_edm_small", 2, live, tmp_path / "state", tmp_path / "pretrained")


def test_speed_times_every_row_in_one_process_and_feeds_the_table(tmp_path, qm9_datadir):
    """``speed`` samples the rows in turn in one process; the table's s/mol column takes its figures
    while they match the evaluated weights, and falls back on the evaluation's own timings."""
    import torch

    from training import study_speed
    from training.checkpoint import EMA_FILE, atomic_torch_save

    model_root, cache = tmp_path / "pretrained", tmp_path / "cache"
    for name in study.RUNS:
        _tiny_shipped_model(model_root, qm9_datadir, name)
    rows = study_eval.select_rows(study_eval.evaluation_rows(), "1,3,8")  # 1000, 50 and 50 steps
    threads = torch.get_num_threads()
    try:
        record = study_speed.measure_speed(rows, model_root, n_batches=2, batch_size=2, datadir=str(qm9_datadir),
                                           progress=False)
    finally:
        torch.set_num_threads(threads)
    timed = record["rows"]
    assert list(timed) == [r.slug for r in rows] and record["threads"] == 1
    assert [t["steps"] for t in timed.values()] == [1000, 50, 50]
    assert all(len(t["batch_seconds"]) == 2 for t in timed.values())
    full, solver = timed[rows[0].slug]["s_per_molecule"], timed[rows[1].slug]["s_per_molecule"]
    assert full > 5 * solver > 0  # 20x the network evaluations: the clock measured the chain

    study_speed.save_speed({**record, "rows": {k: timed[k] for k in list(timed)[:1]}}, cache)
    study_speed.save_speed({**record, "rows": {k: timed[k] for k in list(timed)[1:]}}, cache)  # merged
    stored = study_speed.stored_speed(cache, model_root, rows)
    assert stored["rows"] == timed

    results = study_eval.evaluate(rows[1:], model_root, n_samples=2, iterations=1, batch_size=2, nll=False,
                                  datadir=str(qm9_datadir), novelty=False)
    table = study_eval.markdown_report(results, stored)
    assert f"| {timed[rows[1].slug]['s_per_molecule']:.4f} ± " in table and "`python equal_budget.py speed`" in table
    assert f"| {results[0]['mean']['s_per_molecule']:.4f} |" in study_eval.markdown_report(results)

    state = torch.load(model_root / "qm9_edm_small" / EMA_FILE, weights_only=True)
    key = next(iter(state))
    state[key] = state[key] + 0.01
    atomic_torch_save(state, model_root / "qm9_edm_small" / EMA_FILE)
    assert study_speed.stored_speed(cache, model_root, rows) is None  # other weights: not their speed


def test_each_runs_own_chain_is_collected_at_every_budget_it_was_evaluated_at(tmp_path, qm9_datadir):
    """Earlier budgets from ``epoch_<N>/``; the live cache counts for the shipped epoch only while
    it was measured on the shipped weights; other rows (not the run's own chain) are ignored."""
    from configs.atomic_io import write_json
    from configs.run_args import load_run_args, save_run_args

    model_root, cache = tmp_path / "pretrained", tmp_path / "cache"
    folder = _tiny_shipped_model(model_root, qm9_datadir, "qm9_edm_small")
    args = load_run_args(folder)
    args.current_epoch = 100
    save_run_args(folder, args)
    own = study_eval.own_chain_rows()
    assert own["qm9_edm_small"].label == "EDM full chain" and own["qm9_gaga_small"].label == "EDM+GAGA at T*=550"
    digest = study_eval.weight_digests(model_root, [own["qm9_edm_small"]])["qm9_edm_small"]

    def cache_file(where, row, weights, mol):
        key = study_eval.row_key(row, weights, 1000, 100, 0, True)
        write_json(where / f"{row.slug}.json", {"key": key, "label": row.label, "result": {"iterations": [
            {"atm_stable": 0.9, "mol_stable": mol}]}})

    cache_file(cache / "epoch_80", own["qm9_edm_small"], "old-weights", 0.18)
    cache_file(cache / "epoch_80", own["qm9_gaga_small"], "old-gaga", 0.28)
    cache_file(cache / "epoch_80", study_eval.evaluation_rows()[1], "old-weights", 0.05)  # DDIM: not an own chain
    cache_file(cache, own["qm9_edm_small"], digest, 0.196)
    budgets = study_eval.measured_budgets(cache, model_root)
    assert [(b["epoch"], b["iterations"][0]["mol_stable"]) for b in budgets["qm9_edm_small"]] == [(80, 0.18), (100, 0.196)]
    assert [b["epoch"] for b in budgets["qm9_gaga_small"]] == [80]  # not shipped here: its earlier budget only

    cache_file(cache, own["qm9_edm_small"], "other-weights", 0.5)  # stale: the shipped weights changed since
    assert [b["epoch"] for b in study_eval.measured_budgets(cache, model_root)["qm9_edm_small"]] == [80]
