"""Training: the loop (`trainer.Trainer`, `trainer.train`), lr schedules, checkpoints, run logging, the
several-process layer (`distributed`) and the benchmarks that train (`compare`, `threshold_study`).

Nothing is imported here: `training.checkpoint` (the file format) sits below the models and the export,
which must not pull in the trainer."""
