"""CPU seconds per training step (one thread) of a conditional generator and of the property classifier.

    python bench/bench_conditional.py            # a few minutes on one core

Measures ``time.process_time()`` around 12 steps of ``training.trainer.Trainer.train_step``
(conditional EDM and EDM+GAGA, nf 64, 4 layers, batch 64, alpha, second half) and 10 steps of
the classifier recipe (EDM's nf 128 / 7 layers and nf 64 / 4 layers, batch 96, size groups on and
off), after 2 warm-up steps; prints the per-epoch time of the 50,000-molecule halves.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

try:  # installed (`pip install -e .`): the packages import as they are
    import configs  # noqa: F401
except ImportError:  # a plain checkout: import from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qm9.data.collate import PaddedMoleculeDataset  # noqa: E402
from qm9.data.halves import load_qm9_half  # noqa: E402
from qm9.property_prediction.models_property import classifier_inputs, get_model  # noqa: E402
from qm9.property_prediction.train_classifier import batches, epoch_order  # noqa: E402
from training.args import parse_args  # noqa: E402
from training.distributed import DistContext  # noqa: E402
from training.trainer import Trainer  # noqa: E402

GEN_STEPS_PER_EPOCH = 782  # 50,000 / 64
CLS_STEPS_PER_EPOCH = 521  # 50,000 / 96


def generator_step(datadir: str, extra: list[str], steps: int = 12) -> float:
    args = parse_args([
        "--dataset", "qm9_second_half", "--conditioning", "alpha", "--data_subset", str(64 * (steps + 2)),
        "--datadir", datadir, "--nf", "64", "--n_layers", "4", "--batch_size", "64", "--lr", "5e-4",
        "--diffusion_steps", "1000", "--diffusion_noise_schedule", "polynomial_2", "--diffusion_loss_type", "l2",
        "--normalize_factors", "[1,8,1]", "--include_charges", "False", *extra])
    trainer = Trainer.build(args, DistContext(device=torch.device("cpu")), Path("unused"))
    trainer.loaders["train"].sampler.set_epoch(0)
    batches_ = iter(trainer.loaders["train"])
    trainer.model.train()
    for i in range(2):
        trainer.train_step(0, i, next(batches_))
    start = time.process_time()
    for i in range(steps):
        trainer.train_step(0, i + 2, next(batches_))
    return (time.process_time() - start) / steps


def classifier_step(dataset: PaddedMoleculeDataset, nf: int, n_layers: int, grouped: str, steps: int = 10) -> tuple[float, float]:
    torch.manual_seed(0)
    model = get_model("egnn", nf, n_layers)
    model.group_by_size = grouped
    optim = torch.optim.Adam(model.parameters(), 1e-4)
    data = batches(dataset, 96, epoch_order(len(dataset), 1, 0))

    def step() -> None:
        batch = next(data)
        optim.zero_grad()
        model(**classifier_inputs(batch)).abs().mean().backward()
        optim.step()

    for _ in range(2):
        step()
    start = time.process_time()
    for _ in range(steps):
        step()
    train = (time.process_time() - start) / steps
    model.eval()
    start = time.process_time()
    with torch.no_grad():
        for _ in range(6):
            model(**classifier_inputs(next(data)))
    return train, (time.process_time() - start) / 6


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--datadir", default="qm9/temp")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    for name, extra in (("EDM", []), ("EDM+GAGA (--max_t 550)", ["--max_t", "550"])):
        s = generator_step(args.datadir, extra)
        print(f"conditional {name}, nf 64, 4 layers, batch 64: {s:.3f} CPU s/step, "
              f"{s * GEN_STEPS_PER_EPOCH / 60:.1f} min/epoch", flush=True)
    dataset = PaddedMoleculeDataset(load_qm9_half(args.datadir, "qm9_first_half", "train", progress=False))
    for nf, n_layers, grouped in ((128, 7, "true"), (128, 7, "false"), (64, 4, "true")):
        s, e = classifier_step(dataset, nf, n_layers, grouped)
        print(f"classifier nf {nf}, {n_layers} layers, batch 96, size groups {grouped}: {s:.3f} CPU s/step, "
              f"{s * CLS_STEPS_PER_EPOCH / 60:.1f} min/epoch; validation {e * 185 / 60:.1f} min, "
              f"test {e * CLS_STEPS_PER_EPOCH / 60:.1f} min", flush=True)


if __name__ == "__main__":
    main()
