"""GAGA_test.py: Gaussian-shortcut sampling evaluation on our runs and on legacy run folders."""
from __future__ import annotations

import argparse
import json
import os
import pickle
from pathlib import Path

import pytest
import torch

import GAGA_test
from configs.datasets_config import get_dataset_info
from configs.run_args import save_run_args
from equivariant_diffusion.noise_schedule import gamma_table
from qm9.models import get_model
from test_models import gaga_qm9_args, reference_shapes
from training import sampling_benchmark as bench
from training.args import default_args


def tiny_run(folder: Path, **changes) -> Path:
    """A run folder as our training writes it: args.pickle + EMA weights of a tiny untrained model."""
    args = default_args("qm9")
    fields = dict(nf=16, n_layers=1, diffusion_steps=100, max_t=50, dataset_var=0.848, zero_center_h=True,
                  include_charges=False, exp_name=folder.name, diffusion_noise_schedule="polynomial_2")
    fields.update(changes)
    for key, value in fields.items():
        setattr(args, key, value)
    torch.manual_seed(0)
    model, _, _ = get_model(args, "cpu", get_dataset_info("qm9", False), None)
    save_run_args(folder, args)
    torch.save(model.state_dict(), folder / "generative_model_ema.npy")
    torch.save(model.state_dict(), folder / "generative_model.npy")
    return folder


def run_gaga_test(folder: Path, *flags: str) -> list[dict]:
    return GAGA_test.main(["--model_path", str(folder), "--no-cuda", "--no_novelty", *flags])


def test_comparison_mode_writes_one_table_with_every_setting(tmp_path):
    run = tiny_run(tmp_path / "tiny")
    results = run_gaga_test(run, "--compare", "--GA_timestep", "50", "--ddim_stride", "5", "--n_samples", "4",
                            "--batch_size_gen", "4", "--iteration", "2", "--test_name", "cmp", "--solver_steps", "[10]")
    assert [r["steps"] for r in results] == [100, 50, 20, 10, 10, 10]
    assert [r["setting"]["sampler"] for r in results] == ["ddpm", "ddpm", "ddim", "ddim", "dpm_solver_2m", "dpm_solver_2m"]
    assert [r["setting"]["start_step"] for r in results] == [None, 50, None, 50, None, 50]
    for r in results:
        assert len(r["iterations"]) == 2
        assert 0.0 <= r["mean"]["atm_stable"] <= 1.0 and r["mean"]["s_per_molecule"] > 0
    table = (run / "GAGA_test_cmp.md").read_text()
    assert sum(line.startswith("| ") for line in table.splitlines()) == 7 and "speed-up" in table and "1.00x" in table
    assert "DPM-Solver++(2M), 10 steps + GAGA" in table
    saved = json.loads((run / "GAGA_test_cmp.json").read_text())
    assert saved["meta"]["GA_timestep"] == 50 and saved["meta"]["dataset_var"] == 0.848
    assert len((run / "EDM_GA-T=50-Shortcut_log.txt").read_text().splitlines()) == 3
    assert len((run / "EDM_GA-T=100-Shortcut_log.txt").read_text().splitlines()) == 3


def test_defaults_come_from_the_run_and_xyz_files_are_written(tmp_path):
    run = tiny_run(tmp_path / "tiny")
    (result,) = run_gaga_test(run, "--n_samples", "3", "--batch_size_gen", "3", "--iteration", "1",
                              "--save_to_xyz", "True", "--test_name", "t")
    assert result["setting"]["start_step"] == 50 and result["setting"]["dataset_var"] == 0.848
    assert result["steps"] == 50
    assert len(list((run / "GAGA_test_t_xyz").glob("*.xyz"))) == 3


def test_fewer_molecules_than_a_batch_are_sampled_in_one_smaller_batch(tmp_path, monkeypatch):
    run = tiny_run(tmp_path / "tiny")
    import training.loop

    seen = []
    real = training.loop.sample_molecules
    monkeypatch.setattr("training.loop.sample_molecules",
                        lambda *a, **k: seen.append((a[5], k["batch_size"])) or real(*a, **k))
    (result,) = run_gaga_test(run, "--n_samples", "3", "--iteration", "1")  # --batch_size_gen's default is 100
    assert seen[-1] == (3, 3) and {b for _, b in seen} == {3} and result["n_samples"] == 3  # (after a warm-up draw)


def test_gaussian_shortcut_with_stride_and_ddim(tmp_path):
    run = tiny_run(tmp_path / "tiny")
    (result,) = run_gaga_test(run, "--GA_timestep", "40", "--sampling_step_size", "4", "--sampler", "ddim",
                              "--n_samples", "2", "--batch_size_gen", "2", "--iteration", "1")
    assert result["steps"] == 10 and result["setting"]["sampler"] == "ddim"


@pytest.mark.parametrize("flags,message", [
    (["--GA_timestep", "0"], r"--GA_timestep must be an integer >= 1, got 0"),
    (["--GA_timestep", "2000"], r"--GA_timestep must be an integer in \[1, 100\]"),
    (["--GA_timestep", "50", "--sampling_step_size", "3"], "not a multiple of --sampling_step_size 3"),
    (["--n_samples", "5", "--batch_size_gen", "0"], "--batch_size_gen must be an integer >= 1"),
])
def test_bad_flags_fail_before_any_sampling(tmp_path, monkeypatch, flags, message):
    run = tiny_run(tmp_path / "tiny")
    monkeypatch.setattr("training.loop.sample_molecules", lambda *a, **k: pytest.fail("sampled despite bad flags"))
    with pytest.raises(SystemExit, match=message):
        run_gaga_test(run, *flags)


def test_folder_without_weights_or_args_is_a_one_line_error(tmp_path):
    run = tiny_run(tmp_path / "tiny")
    (run / "generative_model_ema.npy").unlink()
    (run / "generative_model.npy").unlink()
    with pytest.raises(SystemExit, match="generative_model"):
        run_gaga_test(run, "--n_samples", "2", "--batch_size_gen", "2")
    with pytest.raises(SystemExit, match="args.pickle is missing"):
        run_gaga_test(tmp_path, "--n_samples", "2", "--batch_size_gen", "2")


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_args_pickle_is_refused_without_running_it(tmp_path):
    run = tiny_run(tmp_path / "tiny")
    marker = tmp_path / "payload_ran"
    (run / "args.pickle").write_bytes(pickle.dumps(argparse.Namespace(nf=16, hook=_Payload(marker))))
    with pytest.raises(SystemExit, match="refusing to unpickle"):
        run_gaga_test(run, "--n_samples", "2", "--batch_size_gen", "2")
    assert not marker.exists()


def _legacy_weights(include_charges: bool) -> dict[str, torch.Tensor]:
    """Small random weights under the reference key names (EDM's charge channel widens embedding/out)."""
    generator = torch.Generator().manual_seed(0)
    state = {}
    for key, shape in reference_shapes().items():
        if include_charges and key == "dynamics.egnn.embedding.weight":
            shape = (shape[0], shape[1] + 1)
        elif include_charges and key.startswith("dynamics.egnn.embedding_out."):
            shape = (shape[0] + 1,) + tuple(shape[1:])
        state[key] = torch.randn(shape, generator=generator) * 0.02
    state["gamma.gamma"] = gamma_table("polynomial_2", 1000, 1e-5)
    state["buffer"] = torch.zeros(1)
    return state


@pytest.mark.parametrize("fork", ["gaga", "edm"])
def test_legacy_run_folders_load_and_sample(tmp_path, fork):
    """Folders as the GAGA fork / EDM write them: a plain Namespace of their fields, weights under EDM's key names."""
    run = tmp_path / f"{fork}_qm9"
    run.mkdir()
    legacy = gaga_qm9_args(exp_name=run.name, ema_decay=0.9999, n_epochs=1650, batch_size=256,
                           datadir="qm9/temp", dp=True, n_stability_samples=1000)
    if fork == "edm":  # EDM's own QM9 run: charges on, no max_t attribute at all
        del legacy.max_t
        legacy.include_charges = True
    (run / "args.pickle").write_bytes(pickle.dumps(legacy))
    torch.save(_legacy_weights(legacy.include_charges), run / "generative_model_ema.npy")
    (result,) = run_gaga_test(run, "--GA_timestep", "4", "--dataset_var", "0.848", "--n_samples", "2",
                              "--batch_size_gen", "2", "--iteration", "1", "--test_name", "QM9_GA")
    assert result["steps"] == 4 and result["setting"]["start_step"] == 4
    assert (run / "GAGA_test_QM9_GA.md").exists()
    assert (run / "EDM_GA-T=4-Shortcut_log.txt").exists()


def test_settings_validate_like_the_sampler():
    with pytest.raises(ValueError, match="needs --GA_timestep"):
        bench.single_setting("Gaussian", None, 1, "ddpm", 0.848, 1000)
    with pytest.raises(ValueError, match="chain length T = 1000 is not a multiple"):
        bench.single_setting("none", None, 3, "ddpm", 1.0, 1000)
    settings = bench.comparison_settings(1000, 550, 2, 0.848)
    assert [s.n_steps(1000) for s in settings] == [1000, 550, 500, 275]
    solver = bench.comparison_settings(1000, 550, 2, 0.848, solver_steps=(50, 100))[4:]
    assert [(s.sampler, s.start_step, s.n_steps(1000)) for s in solver] == [
        ("dpm_solver_2m", None, 50), ("dpm_solver_2m", 550, 50), ("dpm_solver_2m", None, 100), ("dpm_solver_2m", 550, 110)]
