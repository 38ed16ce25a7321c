"""--resume continues a run bit-identically: weights, EMA, optimiser, clipping queue, RNG, counters."""
from __future__ import annotations

import shutil

import pytest
import torch

from training.checkpoint import RESUME_FILE, load_resume_state
from training.run import main


pytestmark = pytest.mark.usefixtures("one_thread")


def argv(root, datadir, name, *extra: str) -> list[str]:
    """3 epochs of 3 batches (48 molecules, batch 16); validation, test and stability every epoch."""
    return [
        "--exp_name", name, "--output_root", str(root), "--datadir", str(datadir), "--data_subset", "48",
        "--nf", "16", "--n_layers", "2", "--diffusion_steps", "10", "--diffusion_noise_schedule", "polynomial_2",
        "--diffusion_loss_type", "l2", "--normalize_factors", "[1,4,10]", "--batch_size", "16", "--n_epochs", "3",
        "--test_epochs", "1", "--n_stability_samples", "3", "--visualize_every_batch", "0", "--ema_decay", "0.9",
        "--max_t", "6", "--include_charges=False", *extra,
    ]


def assert_same(a, b, path="state"):
    """Bit-identical nested states (tensors with torch.equal, everything else with ==)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert set(a) == set(b), path
        for key in a:
            assert_same(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for k, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{k}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, qm9_datadir):
    root = tmp_path_factory.mktemp("straight")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    main(argv(root, qm9_datadir, "run"))
    torch.set_num_threads(threads)
    return root / "run"


def test_resume_after_a_crash_mid_epoch_is_bit_identical(tmp_path, qm9_datadir, uninterrupted):
    # Save every 2 steps and "crash" after step 5 (epoch 1, batch 2): the last state is step 4 (epoch 1, batch 1).
    main(argv(tmp_path, qm9_datadir, "run", "--checkpoint_every_steps", "2", "--stop_after_steps", "5"))
    crashed = load_resume_state(tmp_path / "run")
    assert crashed["state"]["epoch"] == 1 and crashed["state"]["step_in_epoch"] == 1 and crashed["state"]["global_step"] == 4
    summary = main(["--resume", str(tmp_path / "run")])
    assert summary["state"]["epoch"] == 3
    assert_same(load_resume_state(uninterrupted), load_resume_state(tmp_path / "run"))
    for name in ("generative_model.npy", "generative_model_ema.npy", "optim.npy"):
        assert_same(torch.load(uninterrupted / name, weights_only=True), torch.load(tmp_path / "run" / name, weights_only=True), name)


def test_resume_at_an_epoch_boundary_with_more_epochs_is_bit_identical(tmp_path, qm9_datadir, uninterrupted):
    main(argv(tmp_path, qm9_datadir, "run", "--n_epochs", "1"))
    assert load_resume_state(tmp_path / "run")["state"]["epoch"] == 1
    main(["--resume", str(tmp_path / "run"), "--n_epochs", "3"])  # n_epochs may change on resume
    assert_same(load_resume_state(uninterrupted), load_resume_state(tmp_path / "run"))


def test_the_resume_state_holds_everything_a_continuation_needs(uninterrupted):
    saved = load_resume_state(uninterrupted)
    assert set(saved) >= {"state", "model", "model_ema", "optim", "gradnorm_queue", "rng", "world_size"}
    assert set(saved["rng"][0]) == {"torch", "numpy", "python", "cuda"}
    state = saved["state"]
    assert (state["epoch"], state["step_in_epoch"], state["global_step"], state["nan_total"]) == (3, 0, 9, 0)
    assert 1 <= len(saved["gradnorm_queue"]["items"]) <= 50 and 3000.0 in saved["gradnorm_queue"]["items"]


def test_a_run_without_resume_state_continues_from_its_best_model(tmp_path, uninterrupted):
    # An EDM/GAGA-fork run folder has args.pickle and the best-model files only.
    legacy = tmp_path / "legacy"
    shutil.copytree(uninterrupted, legacy)
    (legacy / RESUME_FILE).unlink()
    summary = main(["--resume", str(legacy), "--n_epochs", "4"])
    assert summary["state"]["epoch"] == 4  # continued after the best model's epoch
    assert (legacy / RESUME_FILE).is_file()
