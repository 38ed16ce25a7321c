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
# interim weights of epoch 3 gave 0.245 (EDM) and 0.465 (EDM+GAGA) with seed 0, 0.276 / 0.421 with
# seed 1; the bounds leave a margin for other machines' float rounding. An untrained network gives 0.0.
MIN_ATOM_STABILITY = {"qm9_edm_small": 0.15, "qm9_gaga_small": 0.30}


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
