"""The conditional (alpha) study (training/conditional_study.py) on the generic study machinery:
its runs' command lines, adopting a classifier started by hand, train / snapshot / restore on a
fresh machine for the classifiers and both generators, ship, and the cached, resumable evaluation."""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys

import pytest

from qm9.property_prediction import train_classifier as tc
from training import conditional_study as cs
from training import study
from training.args import parse_args

GAGA_ONLY = {"exp_name", "max_t", "dataset_var", "zero_center_h"}
RUNS = {r.name: r for r in cs.COND_RUNS}


def test_the_generators_differ_only_in_gaga_flags_and_share_the_qm9_studys_recipe(tmp_path):
    parsed = {name: vars(parse_args(study.training_command(name, 9, False, tmp_path)[2:])) for name in cs.GENERATORS}
    edm, gaga = (parsed[name] for name in cs.GENERATORS)
    assert {k for k in edm if edm[k] != gaga[k]} == GAGA_ONLY
    assert gaga["max_t"] == 550 and gaga["dataset_var"] == 0.848 and edm["max_t"] is None
    assert edm["dataset"] == "qm9_second_half" and edm["conditioning"] == ["alpha"] and edm["n_epochs"] == 9
    qm9_edm = vars(parse_args(study.training_command("qm9_edm_small", 9, False, tmp_path)[2:]))
    differ = {k for k in edm if edm[k] != qm9_edm[k]}
    # The QM9 study's lr decay (from epoch 70) is its own: the conditional runs train 10 epochs.
    assert differ == {"exp_name", "dataset", "conditioning", "n_stability_samples", "lr_schedule"}, differ
    assert (edm["lr"], edm["lr_schedule"], qm9_edm["lr_schedule"]) == (5e-4, None, "70:0.0001,90:2e-05")
    assert edm["normalize_factors"] == [1, 4, 10] and edm["checkpoint_every_steps"] == 250 and edm["nf"] == 64
    assert study.training_command("cond_alpha_gaga_small", 12, True)[2:] == [
        "--resume", "outputs/cond_alpha/cond_alpha_gaga_small", "--n_epochs", "12"]


def test_classifier_commands_are_the_leads_recipe_and_resume_without_changing_epochs():
    parser = tc.build_parser()
    fresh = vars(tc.check_args(parser.parse_args(study.training_command(cs.CLASSIFIER_RUN, 5, False)[2:])))
    assert (fresh["property"], fresh["lr"], fresh["nf"], fresh["n_layers"], fresh["epochs"], fresh["no_cuda"]) == (
        "alpha", 5e-4, 64, 4, 30, True)  # the study's --epochs (5) does not reach a classifier
    assert fresh["outf"] == "qm9/property_prediction/outputs" and fresh["dataset"] == "qm9_first_half"
    numnodes = vars(parser.parse_args(study.training_command(cs.NUMNODES_RUN, 5, False)[2:]))
    assert (numnodes["model_name"], numnodes["epochs"], numnodes["lr"]) == ("numnodes", 300, 5e-4)
    resume = study.training_command(cs.CLASSIFIER_RUN, 5, True)[2:]
    assert resume == ["--exp_name", "exp_class_alpha_cpu", "--outf", "qm9/property_prediction/outputs", "--resume", "--no-cuda"]
    assert RUNS[cs.CLASSIFIER_RUN].target_epochs(60) == 30 and RUNS[cs.GENERATORS[0]].target_epochs(60) == 60


def test_the_qm9_study_keeps_its_commands_and_defaults():
    default, explicit = study.build_parser(), study.build_parser(study.studies()["qm9"])
    assert default.format_help() == explicit.format_help()
    args = default.parse_args(["train", "--epochs", "3"])
    assert args.runs == "qm9_edm_small,qm9_gaga_small" and args.hours == 2.5 and args.study == "qm9"
    ev = default.parse_args(["evaluate"])
    assert ev.cache_dir.endswith("pretrained/equal_budget_eval") and ev.out.endswith("pretrained/equal_budget_results")
    cond = study.build_parser(study.studies()["cond_alpha"]).parse_args(["--study", "cond_alpha", "evaluate"])
    assert cond.out.endswith("pretrained/conditional_results") and (cond.iterations, cond.batch_size) == (100, 100)
    with pytest.raises(ValueError, match="choose one of cond_alpha, qm9"):
        study.main(["--study", "cond", "status"])
    with pytest.raises(ValueError, match="unknown run"):
        study.main(["--study", "cond_alpha", "snapshot", "--runs", "qm9_edm_small"])


def _tiny_runs(datadir):
    gen = {"datadir": str(datadir), "data_subset": "32", "nf": "8", "n_layers": "1", "batch_size": "16",
           "test_epochs": "1", "n_stability_samples": "2", "checkpoint_every_steps": "1", "diffusion_steps": "20"}
    cls = {"datadir": str(datadir), "data_subset": "60", "nf": "8", "n_layers": "1", "batch_size": "30"}
    return [RUNS[cs.CLASSIFIER_RUN].with_flags(**cls, epochs="2"), RUNS[cs.NUMNODES_RUN].with_flags(**cls, epochs="1"),
            RUNS[cs.GENERATORS[0]].with_flags(**gen), RUNS[cs.GENERATORS[1]].with_flags(**gen, max_t="11")]


@pytest.fixture(scope="module")
def shipped(tmp_path_factory, qm9_datadir):
    """The whole study at toy size over three 'sessions' on 'fresh machines', then shipped."""
    root = tmp_path_factory.mktemp("cond_study")
    live, state, pretrained = root / "live", root / "state", root / "pretrained"
    runs = _tiny_runs(qm9_datadir)
    classifier, numnodes, edm, gaga = runs
    # Session 0: the classifier started by hand (one of its two epochs), the #Atoms baseline finished.
    for run, extra in ((classifier, ["--stop_after_epochs", "1"]), (numnodes, [])):
        tc.main(run.command(1, False, live)[2:] + extra)
    assert study.run_progress(live / classifier.name)["epoch"] == 1
    # ... adopted: its folder is snapshotted as it is; then the machine is gone.
    for run in (classifier, numnodes):
        assert {p.name for p in study.snapshot(run, live, state)} == set(study.CLASSIFIER_STATE_FILES) - {"train_summary.log"}
    shutil.rmtree(live)
    # Session 1: the classifier resumes from the committed state; the generators train epoch 0.
    codes = study.train(runs, epochs=1, hours=1.0, nice=0, live_root=live, state_root=state, poll_seconds=0.2)
    assert codes == {r.name: 0 for r in runs}
    assert study.run_progress(state / classifier.name)["epoch"] == 2
    assert "Resuming" in (state / classifier.name / "train_summary.log").read_text()
    assert json.loads((state / classifier.name / "losess.json").read_text())["epochs"] == [0, 1]
    for run in (edm, gaga):
        assert study.run_progress(state / run.name) == {"epoch": 1, "step_in_epoch": 0, "global_step": 2}
    shutil.rmtree(live)
    # Session 2: generators restored and continued to epoch 2; classifiers have nothing left to do.
    codes = study.train(runs, epochs=2, hours=1.0, nice=0, live_root=live, state_root=state, poll_seconds=0.2)
    assert codes == {r.name: 0 for r in runs}
    for run in (edm, gaga):
        assert study.run_progress(state / run.name)["global_step"] == 4
        assert "Resuming" in (live / run.name / "train.log").read_text()
    lines = study.status(runs, live, state)
    assert lines[0].startswith("exp_class_alpha_cpu: epoch 2 of 2; best valid MAE") and "global_step': 4" in lines[2]
    for run in runs:
        study.ship(run, 2, live, state, pretrained)
    assert {p.name for p in (pretrained / "classifiers" / classifier.name).iterdir()} == {"args.pickle", "best_checkpoint.npy"}
    assert {p.name for p in (pretrained / edm.name).iterdir()} == {"args.pickle", "generative_model_ema.npy"}
    return root, runs


def test_an_unfinished_classifier_does_not_ship(tmp_path, qm9_datadir):
    run = _tiny_runs(qm9_datadir)[0]
    tc.main(run.command(1, False, tmp_path)[2:] + ["--stop_after_epochs", "1"])
    with pytest.raises(ValueError, match="at epoch 1 of 2; train it to the end first"):
        study.ship(run, 1, tmp_path, tmp_path / "state", tmp_path / "pretrained")


def test_evaluation_table_has_every_row_and_resumes_from_its_cache(shipped, qm9_datadir, monkeypatch):
    root, runs = shipped
    pretrained, cache = root / "pretrained", root / "cache"
    kwargs = dict(batch_size=3, datadir=str(qm9_datadir), data_subset=60)
    first = cs.evaluate(pretrained, iterations=1, cache_dir=cache, **kwargs)
    from training import conditional_eval as ce

    calls = []
    real = ce.evaluate_generated
    monkeypatch.setattr(ce, "evaluate_generated", lambda *a, **k: calls.append(1) or real(*a, **k))
    both = cs.evaluate(pretrained, iterations=2, cache_dir=cache, out_stem=root / "results", **kwargs)
    assert len(calls) == 2  # one new iteration per generator; the first came from the cache
    fresh = cs.evaluate(pretrained, iterations=2, cache_dir=root / "other", **kwargs)
    assert len(calls) == 6
    rows = both["rows"]
    assert set(rows) == {"naive", "numnodes", "qm9_second_half", *cs.GENERATORS}
    for g in cs.GENERATORS:
        assert rows[g]["iterations"] == 2 and rows[g]["molecules"] == 6 and math.isfinite(rows[g]["mae"])
        assert rows[g]["mae"] == fresh["rows"][g]["mae"]  # resumed = uninterrupted
        cached = json.loads((cache / f"{g}.json").read_text())["iterations"][0]["mae"]
        assert cached == first["rows"][g]["mae"]
    assert rows["cond_alpha_gaga_small"]["sampling"]["start_step"] == 11 and rows["cond_alpha_edm_small"]["sampling"]["start_step"] is None
    # The lower bound is the classifier's own test MAE: the same 60 second-half molecules.
    best_test = study.run_progress(root / "state" / cs.CLASSIFIER_RUN)["best_test"]
    assert rows["qm9_second_half"]["molecules"] == 60 and rows["qm9_second_half"]["mae"] == pytest.approx(best_test, rel=1e-4)
    table = (root / "results.md").read_text()
    for label in ("Naive", "#Atoms", "| EDM |", "| EDM+GAGA |", "QM9 (lower bound)"):
        assert label in table
    assert json.loads((root / "results.json").read_text())["rows"]["numnodes"]["molecules"] == 60


def test_evaluate_command_runs_both_generators_in_parallel_jobs(shipped, qm9_datadir):
    root, _ = shipped
    out = root / "cli_results"
    cmd = [sys.executable, str(study.REPO / "equal_budget.py"), "--study", "cond_alpha", "evaluate", "--jobs", "2",
           "--iterations", "1", "--batch_size", "2", "--model_root", str(root / "pretrained"), "--cache_dir",
           str(root / "cli_cache"), "--out", str(out), "--datadir", str(qm9_datadir), "--data_subset", "30"]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=study.REPO, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert {p.name for p in (root / "cli_cache").iterdir()} == {f"{g}.json" for g in cs.GENERATORS} | {"dataset_rows.json"}
    assert "| EDM+GAGA |" in out.with_suffix(".md").read_text()
    with pytest.raises(ValueError, match="not shipped yet"):
        study.main(["--study", "cond_alpha", "evaluate", "--model_root", str(root / "nothing")])


def test_train_refuses_a_run_that_another_process_is_training(tmp_path):
    """A classifier started by hand and still running is not resumed a second time (two writers)."""
    run = RUNS[cs.CLASSIFIER_RUN]
    fake = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "main_qm9_prop.py", "--exp_name",
                             run.name, "--outf", str(tmp_path)], cwd=study.REPO)
    try:
        import time

        for _ in range(50):  # until its command line is readable
            if study.running_elsewhere(run, tmp_path) == fake.pid:
                break
            time.sleep(0.1)
        assert study.running_elsewhere(run, tmp_path) == fake.pid
        assert study.running_elsewhere(run, tmp_path / "elsewhere") is None
        with pytest.raises(ValueError, match=f"already being trained by process {fake.pid}"):
            study.train([run], epochs=1, hours=0.01, nice=0, live_root=tmp_path, state_root=tmp_path / "state")
    finally:
        fake.kill()
        fake.wait()
    assert not (tmp_path / "state").exists()
