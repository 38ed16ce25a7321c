"""The Trainer seam: a baseline's loss is a subclass with one method; the run around it is unchanged."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from training.args import parse_args
from training.checkpoint import load_resume_state
from training.distributed import DistContext
from training.run import main
from training.trainer import Trainer, seed_everything

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_argv(root, datadir, name: str, *extra: str) -> list[str]:
    """2 epochs of 2 batches (32 molecules, batch 16), a 2-layer nf 16 model, T = 10, no sampling."""
    return [
        "--exp_name", name, "--output_root", str(root), "--datadir", str(datadir), "--data_subset", "32",
        "--nf", "16", "--n_layers", "2", "--diffusion_steps", "10", "--diffusion_noise_schedule", "polynomial_2",
        "--diffusion_loss_type", "l2", "--normalize_factors", "[1,4,10]", "--batch_size", "16", "--n_epochs", "2",
        "--test_epochs", "1", "--n_stability_samples", "0", "--visualize_every_batch", "0", "--ema_decay", "0.99",
        "--lr", "1e-3", *extra,
    ]


class WeightPenaltyTrainer(Trainer):
    """A baseline's loss: EDM's NLL plus an L2 penalty on the network's weights (as the regulariser)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.loss_calls = self.steps_taken = 0

    def loss(self, batch):
        nll, _ = super().loss(batch)
        self.loss_calls += 1
        penalty = sum((p ** 2).sum() for p in self.model.parameters())
        return nll, penalty.reshape(1)

    def after_step(self):
        self.steps_taken += 1


def _weights(summary) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in summary["model"].state_dict().items()}


def test_a_trainer_subclass_with_its_own_loss_trains_a_run(tmp_path, qm9_datadir):
    """The override is what the optimiser minimises; the rest of the run (evaluation, records, resume state) stays."""
    plain = main(tiny_argv(tmp_path, qm9_datadir, "plain"))
    trainers: list[WeightPenaltyTrainer] = []

    class Recorded(WeightPenaltyTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            trainers.append(self)

    # A strong penalty, so that its effect on the weights is unmistakable in 4 steps.
    penalised = main(tiny_argv(tmp_path, qm9_datadir, "penalised", "--ode_regularization", "10"), trainer_cls=Recorded)
    (trainer,) = trainers
    assert trainer.loss_calls == 4 and trainer.steps_taken == 4 == penalised["state"]["global_step"]
    norm = {name: sum(float((w ** 2).sum()) for w in _weights(s).values()) for name, s in
            [("plain", plain), ("penalised", penalised)]}
    assert norm["penalised"] < norm["plain"]  # the penalty reached the gradients
    # Evaluation keeps EDM's NLL, and the run writes what every run writes.
    records = [json.loads(line) for line in (tmp_path / "penalised" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1]
    assert all(r["val_nll"] == r["val_nll"] and r["test_nll"] == r["test_nll"] for r in records)  # finite, not NaN
    assert load_resume_state(tmp_path / "penalised")["state"]["global_step"] == 4


def test_the_same_loss_override_with_the_default_weight_is_the_plain_run(tmp_path, qm9_datadir):
    """A subclass that returns EDM's (nll, reg_term) unchanged trains bit-identically to the default Trainer."""

    class Same(Trainer):
        def loss(self, batch):
            nll, reg_term = super().loss(batch)
            return nll * 1.0, reg_term

    plain = main(tiny_argv(tmp_path, qm9_datadir, "plain", "--n_epochs", "1"))
    same = main(tiny_argv(tmp_path, qm9_datadir, "same", "--n_epochs", "1"), trainer_cls=Same)
    a, b = _weights(plain), _weights(same)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert plain["best_nll_val"] == same["best_nll_val"]


def test_loop_train_epoch_is_a_front_end_of_the_trainer(tmp_path, qm9_datadir):
    """EDM's 17-argument train_epoch over parts built elsewhere trains exactly as Trainer.train_epoch."""
    from training.loop import train_epoch

    args = parse_args(tiny_argv(tmp_path, qm9_datadir, "parts"), "qm9")
    ctx = DistContext()
    first = Trainer.build(copy.deepcopy(args), ctx, tmp_path / "parts")
    second = Trainer.build(copy.deepcopy(args), ctx, tmp_path / "parts")
    assert all(torch.equal(p, q) for p, q in zip(first.model.parameters(), second.model.parameters()))

    seed_everything(1)
    first.loaders["train"].sampler.set_epoch(0, start=0)
    nll_first = first.train_epoch(0)
    seed_everything(1)
    second.loaders["train"].sampler.set_epoch(0, start=0)
    logged: list[dict] = []
    nll_second = train_epoch(
        second.args, second.loaders["train"], 0, second.model, second.model, second.model_ema, second.ema,
        ctx.device, torch.float32, second.optim, second.nodes_dist, second.gradnorm_queue, second.state, ctx,
        log_fn=logged.append,
    )
    assert nll_first == nll_second and second.state.global_step == first.state.global_step == 2
    assert all(torch.equal(p, q) for p, q in zip(first.model.parameters(), second.model.parameters()))
    assert all(torch.equal(p, q) for p, q in zip(first.model_ema.parameters(), second.model_ema.parameters()))
    assert logged[-1] == {"Train Epoch NLL": nll_second}


def test_a_trainer_subclass_changes_the_training_t_schedule_and_not_the_evaluation(tmp_path, qm9_datadir):
    """train_t_sampler replaces the training draw of t; the validation/test NLL still draws t uniformly."""
    drawn: list[torch.Tensor] = []

    class EarlyT(Trainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.diffusion.train_t_sampler = self.draw

        @staticmethod
        def draw(n, max_t, device):
            t = torch.randint(0, 3, (n, 1), device=device)  # only the three least noisy steps
            drawn.append(t)
            return t

    summary = main(tiny_argv(tmp_path, qm9_datadir, "early", "--n_epochs", "1"), trainer_cls=EarlyT)
    assert len(drawn) == 2 and all(t.shape == (16, 1) and int(t.max()) <= 2 for t in drawn)  # 2 training batches
    # Validation and test ran (finite NLLs) after the epoch without asking the baseline's sampler.
    assert summary["nll_val"] == summary["nll_val"] and summary["nll_test"] == summary["nll_test"]
    assert summary["model"].train_t_sampler is not None

