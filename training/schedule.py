"""Learning-rate schedules (the book's appendix D).

Linear warm-up from near zero to the peak rate, then cosine decay to a floor
(Loshchilov & Hutter, 2017, "SGDR"; the schedule GPT-2/GPT-3 style training
uses). ``constant`` keeps the peak rate throughout, which is what the book's
chapter 5 training loop does.

The schedule is a pure function of the step, so resuming a run needs only the
step number to continue on exactly the same curve.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

SCHEDULES = ("cosine", "constant")


class ScheduleError(ValueError):
    """Schedule settings that contradict each other (warm-up longer than the run, min above max...)."""


@dataclass(frozen=True)
class LRSchedule:
    max_lr: float
    min_lr: float
    warmup_steps: int
    total_steps: int
    kind: str = "cosine"

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise ScheduleError(f"unknown schedule {self.kind!r}; use one of {', '.join(SCHEDULES)}")
        if self.max_lr <= 0:
            raise ScheduleError(f"--lr must be positive, got {self.max_lr}")
        if not 0 <= self.min_lr <= self.max_lr:
            raise ScheduleError(f"--min-lr must be in [0, lr={self.max_lr}], got {self.min_lr}")
        if self.total_steps < 1:
            raise ScheduleError(f"the run must have at least one step, got {self.total_steps}")
        if not 0 <= self.warmup_steps <= self.total_steps:
            raise ScheduleError(f"--warmup-steps {self.warmup_steps} must be in [0, total steps {self.total_steps}]")

    def lr(self, step: int) -> float:
        """Learning rate for optimizer step ``step`` (0-based: the first update uses lr(0))."""
        if step < self.warmup_steps:
            # (step + 1) so the first update is not wasted at lr = 0.
            return self.max_lr * (step + 1) / self.warmup_steps
        if self.kind == "constant":
            return self.max_lr
        decay_steps = self.total_steps - self.warmup_steps
        if decay_steps <= 0:
            return self.max_lr
        progress = min((step - self.warmup_steps) / decay_steps, 1.0)
        return self.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (self.max_lr - self.min_lr)

    def state_dict(self) -> dict:
        return asdict(self)
