"""training.schedule: linear warm-up, cosine decay, constant."""

from __future__ import annotations

import math

import pytest

from training.schedule import LRSchedule, ScheduleError


def test_warmup_is_linear_and_reaches_peak() -> None:
    s = LRSchedule(max_lr=1e-3, min_lr=1e-4, warmup_steps=10, total_steps=110)
    assert [s.lr(i) for i in range(3)] == pytest.approx([1e-4, 2e-4, 3e-4])
    assert s.lr(9) == pytest.approx(1e-3)
    assert s.lr(10) == pytest.approx(1e-3)  # first decay step starts at the peak


def test_cosine_midpoint_and_floor() -> None:
    s = LRSchedule(max_lr=1.0, min_lr=0.1, warmup_steps=0, total_steps=100)
    assert s.lr(50) == pytest.approx(0.55)  # halfway down the cosine: the mean of max and min
    assert s.lr(25) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 4)))
    assert s.lr(100) == pytest.approx(0.1)
    assert s.lr(1000) == pytest.approx(0.1)  # past the end it stays at the floor
    lrs = [s.lr(i) for i in range(101)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_constant_after_warmup() -> None:
    s = LRSchedule(max_lr=4e-4, min_lr=0.0, warmup_steps=2, total_steps=90, kind="constant")
    assert s.lr(0) == pytest.approx(2e-4)
    assert {s.lr(i) for i in range(2, 90)} == {4e-4}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(max_lr=0.0, min_lr=0.0, warmup_steps=0, total_steps=10), "--lr"),
        (dict(max_lr=1e-3, min_lr=1e-2, warmup_steps=0, total_steps=10), "--min-lr"),
        (dict(max_lr=1e-3, min_lr=0.0, warmup_steps=11, total_steps=10), "--warmup-steps"),
        (dict(max_lr=1e-3, min_lr=0.0, warmup_steps=0, total_steps=10, kind="linear"), "unknown schedule"),
    ],
)
def test_bad_settings(kwargs: dict, message: str) -> None:
    with pytest.raises(ScheduleError, match=message):
        LRSchedule(**kwargs)
