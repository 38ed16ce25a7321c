"""The checkpoints that ship with the repository (pretrained/, written by `equal_budget.py ship`):
every script loads them strictly, with their GAGA switches, and they make molecules that a
random network does not."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from training.evaluate import evaluate_molecules, load_run
from training.loop import sample_molecules

pytestmark = pytest.mark.usefixtures("one_thread")

PRETRAINED = Path(__file__).resolve().parents[1] / "pretrained"
SHIPPED = {  # run -> (max_t, dataset_var, zero_center_h)
    "qm9_edm_small": (None, 1.0, False),
    "qm9_gaga_small": (550, 0.848, True),
}
# Atom stability of 40 molecules drawn with DPM-Solver++(2M) in 50 steps, seed 0, one thread. The
# weights of epoch 100 (the runs' EMA at the end of epoch 100, 156,300 steps each) gave 0.840 (EDM)
# and 0.872 (EDM+GAGA) with seed 0, 0.834 / 0.863 with seed 1 (epoch 90: 0.826 / 0.875; the
# interim weights of epoch 30: 0.773 / 0.823); the bounds leave a margin for other machines'
# float rounding. An untrained network gives 0.0.
MIN_ATOM_STABILITY = {"qm9_edm_small": 0.70, "qm9_gaga_small": 0.70}


def _options(run: str) -> dict:
    max_t = SHIPPED[run][0]
    return dict(sampler="dpm_solver_2m", start_step=max_t, step_size=(max_t or 1000) // 50,
                dataset_var=SHIPPED[run][1])


@pytest.mark.parametrize("run", sorted(SHIPPED))
def test_a_shipped_folder_holds_only_what_the_scripts_load_and_is_small(run):
    folder = PRETRAINED / run
    assert {p.name for p in folder.iterdir()} == {"args.pickle", "generative_model_ema.npy"}
    assert (folder / "generative_model_ema.npy").stat().st_size < 5_000_000


@pytest.mark.parametrize("run", sorted(SHIPPED))
def test_shipped_runs_load_strictly_with_their_gaga_switches(run):
    loaded = load_run(PRETRAINED / run, torch.device("cpu"))
    max_t, dataset_var, centred = SHIPPED[run]
    assert (loaded.args.max_t, loaded.args.dataset_var, loaded.args.zero_center_h) == (max_t, dataset_var, centred)
    assert (loaded.args.nf, loaded.args.n_layers, loaded.args.diffusion_steps) == (64, 4, 1000)
    assert not loaded.model.training


def test_the_two_study_models_ship_at_the_same_budget():
    from training.study_eval import check_same_budget

    assert check_same_budget(PRETRAINED, sorted(SHIPPED)) >= 1


@pytest.mark.parametrize("run", sorted(SHIPPED))
def test_shipped_models_make_molecules_an_untrained_network_does_not(run):
    loaded = load_run(PRETRAINED / run, torch.device("cpu"))
    torch.manual_seed(0)
    molecules = sample_molecules(loaded.args, loaded.model, loaded.nodes_dist, loaded.dataset_info,
                                 torch.device("cpu"), 40, batch_size=40, progress=False, options=_options(run))
    metrics = evaluate_molecules(molecules, loaded.dataset_info, None)
    assert metrics["atm_stable"] >= MIN_ATOM_STABILITY[run], metrics


def test_scripts_run_on_the_shipped_models(tmp_path, qm9_datadir):
    """GAGA_test (shortcut at the run's T*), eval_analyze and eval_sample take a shipped folder as is."""
    import eval_analyze
    import eval_sample
    import GAGA_test

    rows = GAGA_test.main(["--model_path", str(PRETRAINED / "qm9_gaga_small"), "--n_samples", "4",
                           "--batch_size_gen", "4", "--sampler", "dpm_solver_2m", "--sampling_step_size", "11",
                           "--no_novelty", "--out_dir", str(tmp_path / "gaga_test"), "--datadir", str(qm9_datadir)])
    assert rows and rows[0]["steps"] == 50
    metrics = eval_analyze.main(["--model_path", str(PRETRAINED / "qm9_edm_small"), "--n_samples", "4",
                                 "--batch_size_gen", "4", "--sampler", "dpm_solver_2m", "--sampling_step_size", "20",
                                 "--no_novelty", "--metrics_json", str(tmp_path / "metrics.json"),
                                 "--datadir", str(qm9_datadir)])
    assert 0.0 <= metrics["metrics"]["atm_stable"] <= 1.0 and (tmp_path / "metrics.json").is_file()
    copy = shutil.copytree(PRETRAINED / "qm9_gaga_small", tmp_path / "qm9_gaga_small")  # eval_sample writes beside it
    written = eval_sample.main(["--model_path", str(copy), "--n_samples", "2", "--n_chains", "0",
                                "--sampler", "dpm_solver_2m", "--sampling_step_size", "11"])
    assert any(p.suffix == ".png" for paths in written.values() for p in paths)


# ---------------------------------------------------------------- the conditional study's checkpoints
CONDITIONAL = {"cond_alpha_edm_small": (None, 1.0), "cond_alpha_gaga_small": (550, 0.848)}  # run -> (max_t, dataset_var)
CLASSIFIERS = PRETRAINED / "classifiers"


@pytest.mark.parametrize("run", sorted(CONDITIONAL))
def test_shipped_conditional_runs_load_strictly_conditioned_on_alpha(run):
    folder = PRETRAINED / run
    assert {p.name for p in folder.iterdir()} == {"args.pickle", "generative_model_ema.npy"}
    loaded = load_run(folder, torch.device("cpu"))
    assert (loaded.args.conditioning, loaded.args.dataset, loaded.args.context_node_nf) == (["alpha"], "qm9_second_half", 1)
    assert (loaded.args.max_t, loaded.args.dataset_var) == CONDITIONAL[run]


def test_shipped_alpha_classifier_beats_the_atom_count_baseline_on_real_molecules(qm9_datadir):
    """On 300 molecules of the generators' half (the classifiers trained on the other half): the
    classifier's MAE (0.60 Bohr^3 over the whole half) is far below #Atoms' (3.86)."""
    from configs.datasets import dataset_entry, resolve_hook
    from training import conditional_eval as ce

    arrays = resolve_hook(dataset_entry("qm9_second_half").split_arrays)(str(qm9_datadir), "train", remove_h=False,
                                                                          progress=False)
    arrays = {k: v[:300] for k, v in arrays.items()}
    mae = {}
    for name in ("exp_class_alpha_cpu", "exp_class_alpha_numnodes"):
        (model, mean, mad), = ce.load_classifiers([str(CLASSIFIERS / name)], ["alpha"], str(qm9_datadir),
                                                  torch.device("cpu")).values()
        mae[name] = ce.evaluate_dataset(arrays, model, "alpha", mean, mad, 100, progress=False)["mae"]
    assert mae["exp_class_alpha_cpu"] < 1.0 < 3.0 < mae["exp_class_alpha_numnodes"] < 5.0, mae


def test_eval_conditional_runs_on_the_shipped_generator_and_classifier(tmp_path, qm9_datadir):
    import eval_conditional_qm9

    record = eval_conditional_qm9.main([
        "--generators_path", str(PRETRAINED / "cond_alpha_gaga_small"), "--classifiers_path",
        str(CLASSIFIERS / "exp_class_alpha_cpu"), "--property", "alpha", "--task", "edm", "--iterations", "1",
        "--batch_size", "4", "--sampler", "dpm_solver_2m", "--sampling_step_size", "11", "--datadir", str(qm9_datadir),
        "--output_root", str(tmp_path), "--exp_name", "cond"])
    assert record["sampling"]["start_step"] == 550
    summary = record["results"]["alpha"]["edm"]
    assert summary["molecules"] == 4 and 0.0 < summary["mae"] < 50.0
