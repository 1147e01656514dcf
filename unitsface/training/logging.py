"""What a run tells the user: a progress bar, `metrics.jsonl`, optionally TensorBoard and Weights & Biases.

Only rank 0 writes. One JSON object per logged optimiser step (and one per validation)
is appended to `output/metrics.jsonl`, so a resumed run continues the same file. TensorBoard
and W&B get the same scalars, named `train/<key>` and `val/<set>/<metric>` (`.../tar_at_far/<far>`).

W&B (`train.wandb`) is imported only when switched on. The run is named after the output
folder and its id is kept in `output/wandb_run_id`, so a resumed run continues the same W&B
run; project, entity and mode (e.g. `WANDB_MODE=offline`) come from wandb's environment
variables (project default "unitsface"), and its files go to `WANDB_DIR` or the output folder.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any

from tqdm import tqdm

from unitsface.errors import UnitsfaceError
from unitsface.evaluation.report import jsonable, summary
from unitsface.evaluation.threshold import flag_blind, format_rate
from unitsface.io import atomic_write


def start_wandb(out: Path, config: dict[str, Any] | None) -> Any:
    """A W&B run for the output folder `out` (the same run again when resumed)."""
    try:
        import wandb
    except ImportError:
        raise UnitsfaceError("train.wandb=true needs the wandb package (pip install wandb)") from None
    id_file = out / "wandb_run_id"
    run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(6)
    atomic_write(id_file, run_id)
    return wandb.init(project=os.environ.get("WANDB_PROJECT", "unitsface"), name=out.name, id=run_id,
                      resume="allow", config=config, dir=os.environ.get("WANDB_DIR", str(out)))


class RunLogger:
    def __init__(self, out: Path, enabled: bool, total_steps: int, tensorboard: bool = False,
                 resumed_at: int = 0, wandb: bool = False, config: dict[str, Any] | None = None) -> None:
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
        self.wandb = start_wandb(out, config) if enabled and wandb else None

    def _write(self, record: dict[str, Any]) -> None:
        assert self.metrics is not None
        self.metrics.write(json.dumps(record) + "\n")
        self.metrics.flush()

    def due(self, step: int, every: int) -> bool:
        """Whether optimizer step `step` is logged (every `every` steps and the last): only then does the trainer
        read its numbers off the device."""
        return not step % every or step == self.bar.total

    def advance(self) -> None:
        """One step done, not logged: the progress bar only."""
        if self.enabled:
            self.bar.update(1)

    def step(self, step: int, epoch: int, loss: float, lr: float, samples_per_s: float,
             extra: dict[str, Any]) -> None:
        """One logged step: a metrics.jsonl record, the bar's numbers, TensorBoard / W&B scalars; `extra`
        holds scalars, and lists (e.g. bad record ids) that only the JSON line carries."""
        if not self.enabled:
            return
        self.bar.update(1)
        record = {"step": step, "epoch": epoch, "loss": loss, "lr": lr, "samples_per_s": samples_per_s, **extra}
        self._write(record)
        scalars = {k: v for k, v in extra.items() if isinstance(v, (int, float))}
        self.bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.3g}", sps=f"{samples_per_s:.0f}",
                             **{k: f"{v:.4f}" if isinstance(v, float) else v for k, v in scalars.items()})
        self._scalars({f"train/{k}": v for k, v in {"loss": loss, "lr": lr, "samples_per_s": samples_per_s,
                                                     **scalars}.items()}, step)

    def validation(self, step: int, epoch: int, results: dict[str, Any],
                   operating_points: dict[str, dict[str, Any]]) -> None:
        """One metrics.jsonl record per validation: each set's summary and, for a learned threshold, its
        operating point on each set; one line on the console."""
        if not self.enabled or not results:
            return
        summaries = {name: summary(r) for name, r in results.items()}
        record: dict[str, Any] = {"step": step, "epoch": epoch, "validation": summaries}
        if operating_points:
            record["threshold_operating_point"] = operating_points
        self._write(jsonable(record))
        parts = []
        for name, r in summaries.items():
            text = f"{name}: " + (f"{r['accuracy'] * 100:.2f}±{r['accuracy_std'] * 100:.2f}" if "accuracy" in r
                                  else f"AUC {r['auc'] * 100:.2f}")
            if name in operating_points:
                point = operating_points[name]
                text = flag_blind(f"{text}, t={point['threshold']:.3f} at TAR {point['tar']:.3f} "
                                  f"FAR {format_rate(point['far'])}", point["tar"])
            parts.append(text)
        self.bar.write(" | ".join(parts) + f"  (step {step})")
        scalars: dict[str, float] = {}
        for name, values in summaries.items():
            for metric, value in values.items():
                if isinstance(value, dict):  # TAR at each FAR; None where the set has too few impostors
                    scalars.update({f"val/{name}/{metric}/{far:g}": v for far, v in value.items() if v is not None})
                elif value is not None:
                    scalars[f"val/{name}/{metric}"] = value
        self._scalars(scalars, step)

    def _scalars(self, scalars: dict[str, float], step: int) -> None:
        if self.writer is not None:
            for key, value in scalars.items():
                self.writer.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def close(self) -> None:
        self.bar.close()
        if self.metrics is not None:
            self.metrics.close()
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl, in order (a resumed run appends to the same file)."""
    if not path.is_file():
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def threshold_history(path: Path, set_name: str) -> dict[str, Any]:
    """The learned threshold over the logged steps and its operating point on `set_name` at every validation,
    from a run's metrics.jsonl (what `plot_threshold` draws). A resumed run may log a step twice; the last
    record of a step wins."""
    steps: dict[int, float] = {}
    validations: dict[int, dict[str, Any]] = {}
    for record in read_metrics(path):
        if "threshold" in record:
            steps[record["step"]] = record["threshold"]
        point = record.get("threshold_operating_point", {}).get(set_name)
        if point is not None:
            validations[record["step"]] = point
    return {"steps": sorted(steps), "threshold": [steps[k] for k in sorted(steps)],
            "validations": sorted(validations.items())}
