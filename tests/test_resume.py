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


def test_sigterm_saves_the_resume_state_at_the_step_in_flight(tmp_path, qm9_datadir, uninterrupted):
    """A stop signal (the study's deadline, a scheduler's preemption, Ctrl-C) ends the run after the
    current step with its resume state written there, not at the last periodic checkpoint; the
    continuation is bit-identical to the uninterrupted run."""
    import os
    import signal

    from training.trainer import Trainer

    class SignalAtStep5(Trainer):
        def after_step(self):
            if self.state.global_step == 5:
                os.kill(os.getpid(), signal.SIGTERM)

    before = signal.getsignal(signal.SIGTERM)
    summary = main(argv(tmp_path, qm9_datadir, "run", "--checkpoint_every_steps", "0"), trainer_cls=SignalAtStep5)
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is removed when the run ends
    stopped = load_resume_state(tmp_path / "run")["state"]
    assert (stopped["epoch"], stopped["step_in_epoch"], stopped["global_step"]) == (1, 2, 5) == (
        summary["state"]["epoch"], summary["state"]["step_in_epoch"], summary["state"]["global_step"])
    main(["--resume", str(tmp_path / "run")])
    assert_same(load_resume_state(uninterrupted), load_resume_state(tmp_path / "run"))
    for name in ("generative_model.npy", "generative_model_ema.npy", "optim.npy"):
        assert_same(torch.load(uninterrupted / name, weights_only=True), torch.load(tmp_path / "run" / name, weights_only=True), name)


def test_a_stop_signal_during_validation_stops_at_once_and_the_validation_reruns(tmp_path, qm9_datadir, uninterrupted):
    """Validation samples for minutes: a stop signal there ends the run at once (a deadline's grace
    period never waits for it) with the finished epoch's resume state saved; --resume validates
    that epoch first and continues bit-identically."""
    import os
    import signal

    from training.metrics_log import read_records
    from training.trainer import Trainer

    class SignalInValidationOfEpoch1(Trainer):
        def validate(self, epoch, train_nll, epoch_seconds):
            if epoch == 1:
                os.kill(os.getpid(), signal.SIGTERM)
            super().validate(epoch, train_nll, epoch_seconds)

    summary = main(argv(tmp_path, qm9_datadir, "run", "--checkpoint_every_steps", "0"),
                   trainer_cls=SignalInValidationOfEpoch1)
    stopped = load_resume_state(tmp_path / "run")["state"]
    assert (stopped["epoch"], stopped["step_in_epoch"], stopped["global_step"]) == (2, 0, 6)
    assert stopped["pending_validation"]["epoch"] == 1 and summary["state"]["pending_validation"]["epoch"] == 1
    assert [r["epoch"] for r in read_records(tmp_path / "run")] == [0]  # epoch 1's validation did not finish
    main(["--resume", str(tmp_path / "run")])
    assert [r["epoch"] for r in read_records(tmp_path / "run")] == [0, 1, 2]
    assert_same(load_resume_state(uninterrupted), load_resume_state(tmp_path / "run"))
    for name in ("generative_model.npy", "generative_model_ema.npy", "optim.npy"):
        assert_same(torch.load(uninterrupted / name, weights_only=True), torch.load(tmp_path / "run" / name, weights_only=True), name)
    straight = {r["epoch"]: r for r in read_records(uninterrupted)}
    for record in read_records(tmp_path / "run"):  # the rerun validation gives the same numbers
        assert (record["val_nll"], record["test_nll"], record["stability"]) == (
            straight[record["epoch"]]["val_nll"], straight[record["epoch"]]["test_nll"], straight[record["epoch"]]["stability"])


def test_interrupting_work_raises_at_once_also_for_a_signal_already_received():
    import os
    import signal

    from training.signals import StopNow, StopOnSignal

    with StopOnSignal() as stop:
        with pytest.raises(StopNow):
            with stop.interrupting():
                os.kill(os.getpid(), signal.SIGTERM)
                for _ in range(1000):  # the handler runs between bytecodes
                    pass
        with pytest.raises(StopNow):
            with stop.interrupting():
                pass  # never reached: the signal came before


def test_a_second_stop_signal_stops_at_once():
    import os
    import signal

    from training.signals import StopOnSignal

    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        with StopOnSignal() as stop:
            os.kill(os.getpid(), signal.SIGINT)
            assert stop.requested == "SIGINT"
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(1000):  # the handler runs between bytecodes
                pass
    assert signal.getsignal(signal.SIGINT) is before
