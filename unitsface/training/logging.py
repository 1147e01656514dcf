"""What a run tells the user: a progress bar, `metrics.jsonl`, optionally TensorBoard.

Only rank 0 writes. One JSON object per logged optimiser step (and one per validation)
is appended to `output/metrics.jsonl`, so a resumed run continues the same file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tqdm import tqdm

from unitsface.errors import UnitsfaceError


class RunLogger:
    def __init__(self, out: Path, enabled: bool, total_steps: int, tensorboard: bool = False,
                 resumed_at: int = 0) -> None:
        self.enabled = enabled
        self.metrics = open(out / "metrics.jsonl", "a") if enabled else None
        self.bar = tqdm(total=total_steps, initial=resumed_at, unit="step", dynamic_ncols=True,
                        disable=not enabled)
        self.writer = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise UnitsfaceError(
                    "train.tensorboard=true needs the tensorboard package (pip install tensorboard)"
                ) from None
            self.writer = SummaryWriter(str(out / "tensorboard"))

    def _write(self, record: dict[str, Any]) -> None:
        assert self.metrics is not None
        self.metrics.write(json.dumps(record) + "\n")
        self.metrics.flush()

    def step(self, step: int, epoch: int, loss: float, lr: float, samples_per_s: float,
             extra: dict[str, Any], every: int) -> None:
        """Log one optimiser step; `extra` holds scalars, and lists (e.g. bad record ids) that only the
        JSON line carries."""
        if not self.enabled:
            return
        self.bar.update(1)
        if step % every and step != self.bar.total:
            return
        record = {"step": step, "epoch": epoch, "loss": loss, "lr": lr, "samples_per_s": samples_per_s, **extra}
        self._write(record)
        scalars = {k: v for k, v in extra.items() if isinstance(v, (int, float))}
        self.bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.3g}", sps=f"{samples_per_s:.0f}",
                             **{k: f"{v:.4f}" if isinstance(v, float) else v for k, v in scalars.items()})
        if self.writer is not None:
            for key, value in {"loss": loss, "lr": lr, "samples_per_s": samples_per_s, **scalars}.items():
                self.writer.add_scalar(f"train/{key}", value, step)

    def validation(self, step: int, epoch: int, results: dict[str, Any]) -> None:
        if not self.enabled or not results:
            return
        summary = {name: {"accuracy": r["accuracy"], "accuracy_std": r["accuracy_std"], "auc": r["auc"]}
                   for name, r in results.items()}
        self._write({"step": step, "epoch": epoch, "validation": summary})
        self.bar.write(" | ".join(f"{n}: {v['accuracy'] * 100:.2f}±{v['accuracy_std'] * 100:.2f}"
                                  for n, v in summary.items()) + f"  (step {step})")
        if self.writer is not None:
            for name, values in summary.items():
                self.writer.add_scalar(f"val/{name}/accuracy", values["accuracy"], step)

    def close(self) -> None:
        self.bar.close()
        if self.metrics is not None:
            self.metrics.close()
        if self.writer is not None:
            self.writer.close()
