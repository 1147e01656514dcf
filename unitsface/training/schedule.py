"""Learning-rate schedules, stepped once per optimiser step (not per micro-batch).

All three take epochs as the unit of the recipe and convert to optimiser steps with
`steps_per_epoch`, so `train.max_steps` can stop a run early without changing its shape.
    step:   lr·gamma^(number of milestones passed), milestones in epochs (CASIA recipe 16, 24)
    poly:   linear warm-up, then lr·(1 − t)^power (UniTSFace/UniFace large-scale recipes)
    cosine: linear warm-up, then lr·½(1 + cos πt) (UNPG)
"""

from __future__ import annotations

import bisect
import math
from typing import Callable


def lr_factor(
    schedule: str,
    steps_per_epoch: int,
    epochs: int,
    milestones: list[int] | tuple[int, ...] = (),
    gamma: float = 0.1,
    warmup_epochs: float = 0.0,
    power: float = 2.0,
) -> Callable[[int], float]:
    """The multiplier of the base lr at optimiser step `step` (0-based), for LambdaLR."""
    total = max(1, steps_per_epoch * epochs)
    warmup = int(round(warmup_epochs * steps_per_epoch))
    bounds = sorted(m * steps_per_epoch for m in milestones)

    def progress(step: int) -> float:  # 0 -> 1 over the steps after warm-up
        return min(1.0, max(0.0, (step - warmup) / max(1, total - warmup)))

    decays: dict[str, Callable[[int], float]] = {
        "step": lambda step: gamma ** bisect.bisect_right(bounds, step),
        "poly": lambda step: (1.0 - progress(step)) ** power,
        "cosine": lambda step: 0.5 * (1.0 + math.cos(math.pi * progress(step))),
    }
    if schedule not in decays:
        raise ValueError(f"unknown schedule {schedule!r}")
    decay = decays[schedule]
    return lambda step: (step + 1) / warmup if step < warmup else decay(step)
