"""Learning-rate schedules against hand-computed values (per optimiser step)."""

from __future__ import annotations

import math

import pytest

from unitsface.training.schedule import lr_factor


def test_step_schedule_milestones_in_epochs():
    f = lr_factor("step", steps_per_epoch=10, epochs=28, milestones=[16, 24], gamma=0.1)
    assert f(0) == 1.0
    assert f(159) == 1.0
    assert f(160) == pytest.approx(0.1)
    assert f(239) == pytest.approx(0.1)
    assert f(240) == pytest.approx(0.01)


def test_poly_with_warmup():
    f = lr_factor("poly", steps_per_epoch=10, epochs=20, warmup_epochs=1, power=2)
    assert f(0) == pytest.approx(1 / 10)
    assert f(9) == pytest.approx(1.0)
    # after warm-up: (1 - (step - 10) / 190)^2
    assert f(10) == pytest.approx(1.0)
    assert f(105) == pytest.approx((1 - 95 / 190) ** 2)
    assert f(200) == pytest.approx(0.0)


def test_poly_power_one_is_arcface_torchs_linear_decay():
    """arcface_torch's PolynomialLRWarmup (power 1.0): lr·step/w during warm-up, then lr·(1 − (step − w)/(T − w))."""
    f = lr_factor("poly", steps_per_epoch=100, epochs=40, warmup_epochs=4, power=1.0)
    assert f(199) == pytest.approx(200 / 400)
    assert f(400) == pytest.approx(1.0)
    assert f(1300) == pytest.approx(1 - 900 / 3600)
    assert f(2200) == pytest.approx(0.5)
    assert [f(s) - f(s + 1) for s in (1000, 2000, 3000)] == pytest.approx([1 / 3600] * 3)  # a straight line


def test_cosine_halfway_is_half():
    f = lr_factor("cosine", steps_per_epoch=4, epochs=10)
    assert f(0) == pytest.approx(1.0)
    assert f(20) == pytest.approx(0.5)
    assert f(40) == pytest.approx(0.0, abs=1e-12)
    assert f(10) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.25)))


def test_unknown_schedule():
    with pytest.raises(ValueError):
        lr_factor("linear", 1, 1)
