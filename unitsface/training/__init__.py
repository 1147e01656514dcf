"""Training: the loop (`trainer`), lr schedules, checkpoints, run logging."""

from unitsface.training.trainer import Trainer, train

__all__ = ["Trainer", "train"]
