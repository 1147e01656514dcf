"""Choosing the checkpoint worth keeping: `train.keep_best: METRIC` names a validation number, and the trainer
writes `best.pt` whenever it improves.

METRIC is `[SET:]NAME`: NAME one of `accuracy` (the 10-fold accuracy of a pair set), `auc`, `eer`, `rank1`
(identity sets) or `tar@FAR` (exact TAR at that FAR, e.g. `tar@1e-4`); SET a validation set's name, the
first set when left out. `eer` is better lower, every other metric higher.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from unitsface.errors import UnitsfaceError

NAMES = ("accuracy", "auc", "eer", "rank1")


@dataclass(frozen=True)
class ValidationMetric:
    """One number of the validation results, and which way is better."""

    set_name: str | None
    name: str
    far: float | None = None

    @classmethod
    def parse(cls, text: str) -> ValidationMetric:
        set_name, _, name = text.rpartition(":")
        far = None
        if name.startswith("tar@"):
            try:
                far = float(name[4:])
            except ValueError:
                far = math.nan
            if not 0 < far < 1:
                raise UnitsfaceError(f"train.keep_best {text!r}: tar@FAR needs a FAR in (0, 1), e.g. tar@1e-4")
            name = "tar"
        elif name not in NAMES:
            raise UnitsfaceError(f"train.keep_best {text!r}: the metric must be one of {', '.join(NAMES)} or "
                                 "tar@FAR, optionally after SET:")
        return cls(set_name or None, name, far)

    @property
    def higher_is_better(self) -> bool:
        return self.name != "eer"

    def read(self, results: dict[str, Any]) -> float:
        """The metric's value in validation results (set name -> result)."""
        set_name = self.set_name or next(iter(results), None)
        if set_name not in results:
            raise UnitsfaceError(f"train.keep_best: no validation set {set_name!r}; sets: {', '.join(results)}")
        result = results[set_name]
        value = result["tar_at_far"].get(self.far) if self.name == "tar" else result.get(self.name)
        if value is None:
            what = f"TAR at FAR {self.far:g}" if self.name == "tar" else self.name
            raise UnitsfaceError(f"train.keep_best: validation set {set_name!r} has no {what} "
                                 "(too few impostor pairs, or not that kind of set)")
        return float(value)

    def better(self, value: float, best: float | None) -> bool:
        if best is None:
            return True
        return value > best if self.higher_is_better else value < best
