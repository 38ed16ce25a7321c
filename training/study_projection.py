"""How far a training run is from a stability target, extrapolated from its in-training evaluations.

Past the first epochs, the fraction of unstable atoms falls roughly as a power of the optimiser
steps, ``1 - s = c * steps ** -b``. A least-squares line in log-log over the run's most recent
evaluations (the rate slows as training goes on, so old points would flatter it) gives ``b`` and
the step at which ``s`` would reach the target if that rate held. The range covers both the
slope's standard error and the choice of window (fits over the last 3, 4, ... evaluations): a rate
that keeps slowing shows up as a later target step for the shorter windows. A plateau ahead
(a capacity limit of a small network) is invisible to it: if the curve keeps bending, even the
range's end is too early. A fit never spans a learning-rate change (``--lr_schedule``; the lr of a
record's epoch comes from the run's arguments, else from the record's ``lr`` field): only the
evaluations since the last change count, so after a switch there is no projection until three
evaluations at the new rate exist. This is an extrapolation for planning a budget, not a
measurement, and is reported as one.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

DEFAULT_WINDOW = 5  # evaluations (every 2 epochs in the QM9 study: the last ~10 epochs)

LrOfEpoch = Callable[[int], float]  # a run's learning rate by epoch (its --lr and --lr_schedule)


@dataclass(frozen=True)
class Projection:
    """``1 - value = exp(log_c) * steps ** -exponent`` fitted over ``points`` evaluations."""

    key: str
    target: float
    exponent: float
    exponent_se: float
    log_c: float
    points: int
    first_step: int
    last_step: int
    last_value: float
    window_steps: tuple[float, ...] = ()  # the target step of the fits over shorter windows (3 .. points - 1)

    def steps_at(self, exponent: float) -> float:
        """Steps at which the fitted line (with this exponent through the same last point) reaches the target."""
        if self.last_value >= self.target:
            return float(self.last_step)
        if exponent <= 0:
            return math.inf
        # Anchored at the fit's value at the last step, so the range varies the rate only.
        gap_now = math.exp(self.log_c) * self.last_step ** -self.exponent
        return self.last_step * (gap_now / (1.0 - self.target)) ** (1.0 / exponent)

    @property
    def steps_at_target(self) -> float:
        return self.steps_at(self.exponent)

    @property
    def steps_range(self) -> tuple[float, float]:
        """(soonest, latest) target step over exponent +- se and the shorter windows' fits."""
        candidates = [self.steps_at(self.exponent + self.exponent_se), self.steps_at(self.exponent - self.exponent_se),
                      *self.window_steps]
        return min(candidates), max(candidates)

    def describe(self, steps_per_epoch: int | None = None) -> str:
        def fmt(steps: float) -> str:
            if not math.isfinite(steps):
                return "never (the fitted rate does not fall)"
            if steps > 100 * self.last_step:  # a near-flat fit: its far end is not a number to plan with
                return f"beyond {100 * self.last_step:,} steps (100x the steps so far)"
            text = f"{steps:,.0f} steps"
            return text + (f" (epoch {steps / steps_per_epoch:.0f})" if steps_per_epoch else "")

        if self.last_value >= self.target:
            return f"{self.key} {self.last_value:.1%} already at the target {self.target:.0%}"
        fast, slow = self.steps_range
        return (f"{self.key} {self.target:.0%} projected at {fmt(self.steps_at_target)}; range {fmt(fast)} to "
                f"{fmt(slow)} (1 - {self.key} ~ steps^-{self.exponent:.2f} +- {self.exponent_se:.2f}, fitted over "
                f"{self.points} evaluations at steps {self.first_step:,}-{self.last_step:,}; the range also covers fits "
                f"over the last 3+ of them; an extrapolation)")


def stability_points(records: Sequence[dict[str, Any]], key: str = "atm_stable") -> list[tuple[int, float]]:
    """(step, value) of every metrics.jsonl record that has the stability metric."""
    points = []
    for r in records:
        value = (r.get("stability") or {}).get(key)
        if value is not None and r.get("step"):
            points.append((int(r["step"]), float(value)))
    return points


def since_last_lr_change(records: Sequence[dict[str, Any]], lr_of_epoch: LrOfEpoch | None = None) -> list[dict[str, Any]]:
    """The trailing records trained at the latest record's lr.

    A record's lr is ``lr_of_epoch(record["epoch"])`` when the run's schedule is known; else its stored
    ``lr`` field, where records without one (written before the field existed) count as one rate, so
    a run crossing that upgrade gets its window cut there (conservative: a later fit, never a wrong one).
    """
    def lr(record: dict[str, Any]) -> Any:
        return lr_of_epoch(record["epoch"]) if lr_of_epoch is not None and "epoch" in record else record.get("lr")

    out: list[dict[str, Any]] = []
    for r in reversed(records):
        if out and lr(r) != lr(out[0]):
            break
        out.insert(0, r)
    return out


def fit_power_law(steps: Sequence[float], values: Sequence[float]) -> tuple[float, float, float]:
    """(log_c, exponent, exponent standard error) of ``1 - value = c * steps ** -exponent``.

    Needs three points or more with 0 < value < 1 (the standard error needs a residual).
    """
    x = np.log(np.asarray(steps, dtype=float))
    gap = 1.0 - np.asarray(values, dtype=float)
    if len(x) < 3 or np.any(gap <= 0) or np.any(gap >= 1):
        raise ValueError("a power-law fit needs >= 3 evaluations with the metric strictly between 0 and 1")
    y = np.log(gap)
    A = np.stack([np.ones_like(x), x], axis=1)
    coef, *_ = np.linalg.lstsq(A, y, rcond=None)
    residual = y - A @ coef
    dof = len(x) - 2
    sigma2 = float(residual @ residual) / dof
    cov = sigma2 * np.linalg.inv(A.T @ A)
    return float(coef[0]), float(-coef[1]), float(math.sqrt(max(cov[1, 1], 0.0)))


def project(records: Sequence[dict[str, Any]], key: str = "atm_stable", target: float = 0.90,
            window: int = DEFAULT_WINDOW, lr_of_epoch: LrOfEpoch | None = None) -> Projection | None:
    """The projection from the last ``window`` evaluations at the current lr, or None with fewer than
    three usable ones (``lr_of_epoch``: see ``since_last_lr_change``)."""
    usable = stability_points(since_last_lr_change(records, lr_of_epoch), key)
    points = [(s, v) for s, v in usable if 0.0 < v < 1.0][-window:]
    if len(points) < 3:
        return None
    steps, values = zip(*points)
    log_c, exponent, se = fit_power_law(steps, values)
    shorter = [project(records, key, target, w, lr_of_epoch) for w in range(3, len(points))]
    return Projection(key=key, target=target, exponent=exponent, exponent_se=se, log_c=log_c, points=len(points),
                      first_step=steps[0], last_step=steps[-1], last_value=values[-1],
                      window_steps=tuple(p.steps_at_target for p in shorter if p is not None))


@dataclass(frozen=True)
class EqualSteps:
    """Run B against run A at the steps where both were evaluated, and how many steps B needed to
    reach A's latest value (the "trains faster" claim in one line)."""

    key: str
    gaps: tuple[tuple[int, float], ...]  # (step, value_b - value_a) at every common step
    a_last_step: int
    a_last_value: float
    b_steps_to_a_last: int | None  # B's first evaluation step at or above A's latest value

    def describe(self, a: str, b: str) -> str:
        if not self.gaps:
            return f"{b} vs {a}: no evaluation at a common step yet"
        values = [g for _, g in self.gaps]
        ahead = sum(g > 0 for g in values)
        text = (f"{b} vs {a} at equal steps ({len(values)} common evaluations): {self.key} higher at {ahead}, "
                f"by {100 * min(values):+.1f} to {100 * max(values):+.1f} points (latest {100 * values[-1]:+.1f} at step "
                f"{self.gaps[-1][0]:,})")
        if self.b_steps_to_a_last is not None:
            text += (f"; {b} first reached {a}'s latest {self.a_last_value:.1%} at step {self.b_steps_to_a_last:,}, "
                     f"{self.b_steps_to_a_last / self.a_last_step:.2f}x of {a}'s {self.a_last_step:,}")
        return text


def compare_at_equal_steps(records_a: Sequence[dict[str, Any]], records_b: Sequence[dict[str, Any]],
                           key: str = "atm_stable") -> EqualSteps | None:
    """B - A at every step both runs evaluated; None when run A has no evaluation."""
    a, b = dict(stability_points(records_a, key)), dict(stability_points(records_b, key))
    if not a:
        return None
    last_step = max(a)
    reached = [s for s in sorted(b) if b[s] >= a[last_step]]
    return EqualSteps(key=key, gaps=tuple((s, b[s] - a[s]) for s in sorted(set(a) & set(b))), a_last_step=last_step,
                      a_last_value=a[last_step], b_steps_to_a_last=reached[0] if reached else None)
