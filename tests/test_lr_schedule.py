"""--lr_schedule: a piecewise-constant lr by epoch that a run may take up on --resume without
rewriting its past, and that resumes bit-identically like everything else in a run."""
from __future__ import annotations

import pytest
import torch

from configs.errors import UserInputError
from training.args import parse_args
from training.checkpoint import load_resume_state
from training.lr_schedule import canonical, lr_at_epoch, parse_schedule
from training.metrics_log import read_records
from training.run import main
from training.trainer import Trainer
from tests.test_resume import argv, assert_same

pytestmark = pytest.mark.usefixtures("one_thread")


def test_a_schedule_is_epoch_lr_pairs_stored_in_one_spelling():
    assert parse_schedule("70:1e-4, 90:5e-5") == ((70, 1e-4), (90, 5e-5))
    assert parse_schedule(None) == parse_schedule("") == parse_schedule("none") == ()
    assert canonical("70:1e-4") == canonical("70:0.0001") == "70:0.0001"
    assert canonical(None) is None


@pytest.mark.parametrize("text", ["70", "0:1e-4", "70:-1e-4", "70:nan", "x:1e-4", "70:abc", "90:1e-4,70:5e-5",
                                  "70:1e-4,70:5e-5"])
def test_a_malformed_schedule_is_a_one_line_error_with_an_example(text):
    with pytest.raises(UserInputError, match="e.g. 70:1e-4") as e:
        parse_args(["--lr_schedule", text])
    assert "\n" not in str(e.value)


def test_the_lr_of_an_epoch_is_the_last_pair_at_or_before_it():
    schedule = "70:1e-4,90:5e-5"
    assert [lr_at_epoch(5e-4, schedule, e) for e in (0, 69, 70, 89, 90, 500)] == [5e-4, 5e-4, 1e-4, 1e-4, 5e-5, 5e-5]
    assert lr_at_epoch(5e-4, None, 70) == 5e-4


class RecordingTrainer(Trainer):
    """Records the optimiser's lr at every step."""
    lrs: list[tuple[int, float]] = []

    def after_step(self) -> None:
        RecordingTrainer.lrs.append((self.state.epoch, self.optim.param_groups[0]["lr"]))


def test_training_takes_each_epochs_lr_from_the_schedule(tmp_path, qm9_datadir):
    RecordingTrainer.lrs = []
    main(argv(tmp_path, qm9_datadir, "run", "--lr", "5e-4", "--lr_schedule", "1:1e-4,2:5e-5"),
         trainer_cls=RecordingTrainer)
    assert RecordingTrainer.lrs == [(0, 5e-4)] * 3 + [(1, 1e-4)] * 3 + [(2, 5e-5)] * 3
    assert [r["lr"] for r in read_records(tmp_path / "run")] == [5e-4, 1e-4, 5e-5]


@pytest.fixture(scope="module")
def scheduled(tmp_path_factory, qm9_datadir):
    """3 epochs, lr 2e-4 (the QM9 default) for epochs 0-1 and 1e-4 from epoch 2 on, uninterrupted."""
    root = tmp_path_factory.mktemp("scheduled")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    main(argv(root, qm9_datadir, "run", "--lr_schedule", "2:1e-4"))
    torch.set_num_threads(threads)
    return root / "run"


def test_a_schedule_taken_up_on_resume_continues_as_if_given_from_the_start(tmp_path, qm9_datadir, scheduled):
    main(argv(tmp_path, qm9_datadir, "run", "--n_epochs", "2"))  # no schedule: epochs 0-1 at 2e-4
    main(["--resume", str(tmp_path / "run"), "--n_epochs", "3", "--lr_schedule", "2:1e-4"])
    assert_same(load_resume_state(scheduled), load_resume_state(tmp_path / "run"))
    assert load_resume_state(tmp_path / "run")["optim"]["param_groups"][0]["lr"] == 1e-4


def test_a_crash_after_the_switch_resumes_bit_identically(tmp_path, qm9_datadir, scheduled):
    # The last checkpoint is step 8 (epoch 2, batch 2), after the switch; the restored optimiser
    # carries 1e-4 and the schedule agrees.
    main(argv(tmp_path, qm9_datadir, "run", "--lr_schedule", "2:1e-4", "--checkpoint_every_steps", "2",
              "--stop_after_steps", "8"))
    assert load_resume_state(tmp_path / "run")["state"]["global_step"] == 8
    main(["--resume", str(tmp_path / "run")])
    assert_same(load_resume_state(scheduled), load_resume_state(tmp_path / "run"))


def test_a_schedule_that_would_change_an_epoch_already_begun_is_refused(tmp_path, qm9_datadir):
    # Stopped in epoch 1 (checkpoint at step 4 = epoch 1, batch 1): epochs 0 and 1 have begun at 2e-4.
    main(argv(tmp_path, qm9_datadir, "run", "--checkpoint_every_steps", "2", "--stop_after_steps", "5"))
    with pytest.raises(UserInputError, match="would change the lr of epoch 1.*from 2 on"):
        main(["--resume", str(tmp_path / "run"), "--lr_schedule", "1:1e-4"])
    with pytest.raises(UserInputError, match="--lr cannot change"):
        main(["--resume", str(tmp_path / "run"), "--lr", "1e-4"])
    RecordingTrainer.lrs = []
    main(["--resume", str(tmp_path / "run"), "--lr_schedule", "2:1e-4"], trainer_cls=RecordingTrainer)
    assert RecordingTrainer.lrs == [(1, 2e-4)] * 2 + [(2, 1e-4)] * 3
    # The run now holds the schedule: resuming with it again is no change, removing it would rewrite epoch 2.
    with pytest.raises(UserInputError, match="would change the lr of epoch 2"):
        main(["--resume", str(tmp_path / "run"), "--n_epochs", "4", "--lr_schedule", "none"])
