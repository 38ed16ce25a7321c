"""``--lr_schedule``: a piecewise-constant learning rate by epoch, e.g. ``"70:1e-4"`` or ``"70:1e-4,90:5e-5"``.

Each ``epoch:lr`` pair sets the learning rate from the start of that epoch on; before the first
pair the run trains at ``--lr``. The learning rate is a function of the epoch alone, so a run
resumed at any step continues the schedule exactly. A schedule may be added to (or changed in) a
run on ``--resume`` only where it leaves the epochs already trained as they were
(``check_resume_change``): the past of a run is never rewritten.

The parsed schedule is stored in args.pickle in a canonical spelling (``format_schedule``), so
that two spellings of one schedule compare equal.
"""
from __future__ import annotations

import math

from configs.errors import UserInputError

Schedule = tuple[tuple[int, float], ...]  # ((first epoch, lr), ...), epochs strictly increasing

EXAMPLE = "70:1e-4 (from epoch 70 on, lr 1e-4) or 70:1e-4,90:5e-5"


def parse_schedule(text: str | None) -> Schedule:
    """``"70:1e-4,90:5e-5"`` -> ((70, 1e-4), (90, 5e-5)); None or '' or 'none' -> (). One-line error otherwise."""
    if text is None or not str(text).strip() or str(text).strip().lower() == "none":
        return ()
    pairs: list[tuple[int, float]] = []
    for item in str(text).split(","):
        epoch_text, sep, lr_text = item.strip().partition(":")
        try:
            epoch, lr = int(epoch_text), float(lr_text)
        except ValueError:
            epoch, lr = -1, float("nan")
        if not sep or epoch < 1 or not (math.isfinite(lr) and lr > 0):
            raise UserInputError(f"--lr_schedule {text!r}: {item.strip()!r} is not epoch:lr with an epoch >= 1 and a "
                                 f"positive lr; write e.g. {EXAMPLE}")
        pairs.append((epoch, lr))
    epochs = [epoch for epoch, _ in pairs]
    if epochs != sorted(set(epochs)):
        raise UserInputError(f"--lr_schedule {text!r}: the epochs must increase strictly; write e.g. {EXAMPLE}")
    return tuple(pairs)


def format_schedule(schedule: Schedule) -> str | None:
    """The canonical spelling stored in args.pickle (None for no schedule)."""
    return ",".join(f"{epoch}:{lr!r}" for epoch, lr in schedule) or None


def canonical(text: str | None) -> str | None:
    """``text`` checked and respelled canonically (what ``--lr_schedule`` stores)."""
    return format_schedule(parse_schedule(text))


def lr_at_epoch(base_lr: float, schedule: Schedule | str | None, epoch: int) -> float:
    """The learning rate of ``epoch``: the last pair at or before it, else ``base_lr``."""
    pairs = parse_schedule(schedule) if not isinstance(schedule, tuple) else schedule
    lr = float(base_lr)
    for first_epoch, value in pairs:
        if epoch >= first_epoch:
            lr = value
    return lr


def check_resume_change(base_lr: float, old: str | None, new: str | None, epochs_started: int) -> None:
    """Refuse (one line) a new schedule that gives any of the first ``epochs_started`` epochs another lr."""
    old_pairs, new_pairs = parse_schedule(old), parse_schedule(new)
    changed = [e for e in range(epochs_started) if lr_at_epoch(base_lr, old_pairs, e) != lr_at_epoch(base_lr, new_pairs, e)]
    if changed:
        e = changed[0]
        raise UserInputError(
            f"--lr_schedule {new!r} would change the lr of epoch {e}, which the run has already trained at "
            f"{lr_at_epoch(base_lr, old_pairs, e):g} (it has started {epochs_started} epochs); a schedule may only change "
            f"epochs from {epochs_started} on"
        )
