"""The budget projection: a power law in (1 - stability) against steps, fitted in log-log."""
from __future__ import annotations

import math

import pytest

from training.study_projection import compare_at_equal_steps, fit_power_law, project


def records(steps, gap_of_step):
    return [{"epoch": 2 * k, "step": s, "stability": {"atm_stable": 1.0 - gap_of_step(s)}} for k, s in enumerate(steps)]


def test_an_exact_power_law_is_recovered_and_projected_to_the_step_it_reaches_the_target():
    steps = [4000, 8000, 12000, 16000, 20000]
    recs = records(steps, lambda s: 30.0 * s ** -0.5)  # 1 - stab = 30 / sqrt(steps): 0.10 at 90,000 steps
    log_c, exponent, se = fit_power_law(steps, [r["stability"]["atm_stable"] for r in recs])
    assert exponent == pytest.approx(0.5) and math.exp(log_c) == pytest.approx(30.0) and se == pytest.approx(0.0, abs=1e-9)
    p = project(recs, target=0.90)
    assert p.steps_at_target == pytest.approx(90_000, rel=1e-9)
    assert p.steps_range == pytest.approx((90_000, 90_000), rel=1e-6)  # no noise, no curvature: no spread
    assert "90,000 steps (epoch 58)" in p.describe(steps_per_epoch=1563) and "an extrapolation" in p.describe()


def test_a_slowing_rate_widens_the_range_towards_later_steps():
    steps = [4000, 8000, 12000, 16000, 20000]
    # A floor under the power law bends it in log-log: the last points alone project later, and
    # all of them sooner than the truth (0.05 + 20 / sqrt(s) = 0.10 at 160,000 steps).
    recs = records(steps, lambda s: 0.05 + 20.0 / math.sqrt(s))
    p = project(recs, target=0.90)
    soonest, latest = p.steps_range
    assert soonest <= p.steps_at_target < latest == max(p.window_steps) < 160_000


def test_too_few_evaluations_or_a_reached_target():
    assert project(records([1000, 2000], lambda s: 0.5)) is None
    assert project([{"epoch": 0, "step": 100, "stability": None}] * 4) is None
    p = project(records([1000, 2000, 3000], lambda s: 0.2 - s * 1e-5 * 4), target=0.8)  # 0.16 -> 0.08 unstable
    assert p.steps_at_target == 3000 and "already at the target" in p.describe()


def test_a_rate_that_does_not_fall_never_reaches_the_target():
    p = project(records([1000, 2000, 3000, 4000], lambda s: 0.2 + s * 1e-5), target=0.9)
    assert p.exponent < 0 and math.isinf(p.steps_at_target) and "never" in p.describe()


def test_two_runs_are_compared_at_the_steps_both_evaluated():
    a = records([1000, 2000, 3000, 4000], lambda s: 0.5 - s * 5e-5)  # 0.55, 0.60, 0.65, 0.70 stable
    b = records([1000, 2000, 3000], lambda s: 0.4 - s * 5e-5)  # 0.65, 0.70, 0.75: ahead by 0.10, earlier at 0.70
    c = compare_at_equal_steps(a, b)
    assert [s for s, _ in c.gaps] == [1000, 2000, 3000] and [g for _, g in c.gaps] == pytest.approx([0.10] * 3)
    assert (c.a_last_step, c.b_steps_to_a_last) == (4000, 2000) and c.a_last_value == pytest.approx(0.70)
    text = c.describe("EDM", "GAGA")
    assert "higher at 3" in text and "by +10.0 to +10.0 points" in text and "at step 2,000, 0.50x of EDM's 4,000" in text
    behind = compare_at_equal_steps(b, a)  # a never reaches b's latest 0.75 within its evaluations
    assert behind.b_steps_to_a_last is None and "higher at 0" in behind.describe("GAGA", "EDM")
    assert compare_at_equal_steps([], b) is None
    assert "no evaluation at a common step" in compare_at_equal_steps(a, records([1500], lambda s: 0.3)).describe("x", "y")


def test_a_near_flat_fit_reports_its_far_end_as_beyond_a_hundred_times_the_steps_so_far():
    p = project(records([1000, 2000, 3000, 4000], lambda s: 0.2 * (s / 1000) ** -0.01), target=0.9)
    assert p.steps_at_target > 100 * 4000 and "beyond 400,000 steps (100x the steps so far)" in p.describe()


def test_a_fit_never_spans_a_learning_rate_change():
    # A flat stretch at lr 5e-4 (no field: records before the field existed), then an exact power law at 1e-4.
    before = records([4000, 8000, 12000, 16000], lambda s: 0.2)
    after = records([20000, 24000, 28000], lambda s: 30.0 * s ** -0.5)
    for r in after:
        r["lr"] = 1e-4
    assert project(before + after[:2], target=0.90) is None  # two evaluations at the new rate: no fit yet
    p = project(before + after, target=0.90)
    assert p.points == 3 and p.first_step == 20000 and p.exponent == pytest.approx(0.5)
    assert project(before, target=0.90).exponent == pytest.approx(0.0, abs=1e-9)  # the flat stretch alone


def test_with_the_runs_schedule_known_the_lr_comes_from_its_arguments_not_the_stored_field():
    # Records from before and after the ``lr`` field existed, all at 5e-4: an exact power law.
    recs = records([4000, 8000, 12000, 16000, 20000], lambda s: 30.0 * s ** -0.5)
    for r in recs[3:]:
        r["lr"] = 5e-4
    assert project(recs, target=0.90) is None  # from the field alone: two records at "5e-4", no fit
    p = project(recs, target=0.90, lr_of_epoch=lambda epoch: 5e-4)  # no schedule: one rate throughout
    assert p.points == 5 and p.exponent == pytest.approx(0.5)
    switched = project(recs, target=0.90, lr_of_epoch=lambda epoch: 5e-4 if epoch < 4 else 1e-4)  # epochs 0, 2 | 4, 6, 8
    assert switched.points == 3 and switched.first_step == 12000
