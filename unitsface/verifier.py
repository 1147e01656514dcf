"""`FaceVerifier`: one face model, one threshold, one decision — for checkpoints and ONNX graphs alike.

A verifier is an `Embedder` (`unitsface.embedder`: aligned faces as uint8 RGB arrays or image files,
other sizes scaled to fit) that scores a pair by the cosine of their L2-normalised flip-sum embeddings
and says "same" when the score is ≥ the threshold in use.

Which threshold is in use is decided in one place (`resolve_threshold`), in this order:
1. an explicit threshold given by the caller ("given by hand");
2. a calibration stored beside the model by `unitsface calibrate`: `<model>.threshold.json`
   (the same sidecar scheme for checkpoints and ONNX files, so a model file is never rewritten;
   it records the model's sha256 and is refused once the model changes);
3. the unified threshold b/s the model learned in training (UniTSFace/UniFace heads), found in
   the checkpoint's meta or the exported ONNX metadata ("learned b/s"), with its operating point on
   the run's held-out validation set;
4. none: `verify` then refuses to decide and says how to get one.

Every threshold in use comes with what is known of it (`OperatingPoint.describe`): the FAR and TAR
it was measured at and where — on the run's validation set for a learned one, on the calibration
file for a calibrated one — or "unknown" for a threshold given by hand.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from unitsface.embedder import Embedder, ImageLike
from unitsface.errors import UnitsfaceError
from unitsface.evaluation.threshold import OperatingPoint
from unitsface.io import atomic_write
from unitsface.training.checkpoint import file_sha256

SIDECAR_SUFFIX = ".threshold.json"
SIDECAR_FORMAT = "unitsface-threshold"


def sidecar_path(model_path: str | os.PathLike) -> Path:
    return Path(str(model_path) + SIDECAR_SUFFIX)


def write_calibration(model_path: str | os.PathLike, point: OperatingPoint) -> Path:
    """Store a calibrated threshold beside the model (atomically); returns the sidecar path."""
    path = sidecar_path(model_path)
    record = {"format": SIDECAR_FORMAT, "version": 1, "threshold": point.threshold, "source": point.source,
              "far": point.far, "frr": point.frr, "pairs_file": point.measured_on, "pairs": point.impostor_pairs,
              "model_sha256": file_sha256(model_path)}
    atomic_write(path, (json.dumps(record, indent=2) + "\n").encode())
    return path


def read_calibration(model_path: str | os.PathLike) -> OperatingPoint | None:
    """The sidecar calibration of a model, None if there is none; refused if made for another model."""
    path = sidecar_path(model_path)
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        threshold, source, sha = float(record["threshold"]), str(record["source"]), record["model_sha256"]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise UnitsfaceError(f"corrupt threshold file {path}: {type(exc).__name__}: {exc}") from None
    if record.get("format") != SIDECAR_FORMAT:
        raise UnitsfaceError(f"{path} is not a unitsface threshold file")
    if sha != file_sha256(model_path):
        raise UnitsfaceError(f"stale threshold file {path}: it was calibrated for another version of {model_path}; "
                             "re-run `unitsface calibrate` or delete it")
    frr = record.get("frr")
    return OperatingPoint(threshold, source, record.get("far"), None if frr is None else 1.0 - frr,
                          record.get("pairs_file"), record.get("pairs"))


def resolve_threshold(model_path: str | os.PathLike, learned: OperatingPoint | None, given: float | None = None,
                      calibration: bool = True) -> OperatingPoint | None:
    """The threshold in use: given > calibrated sidecar > learned b/s > none (module docstring).

    `calibration=False` ignores the sidecar, for re-calibrating a model whose sidecar is stale.
    """
    if given is not None:
        return OperatingPoint(float(given), "given by hand")
    calibrated = read_calibration(model_path) if calibration else None
    return calibrated if calibrated is not None else learned


class FaceVerifier(Embedder):
    """An `Embedder` with the threshold in use: scores pairs of faces and decides "same" when the score is
    ≥ the threshold. Build with `FaceVerifier.load(path)`; the constructor takes what `Embedder`'s does,
    and the `operating_point` in use.
    """

    def __init__(self, forward: Callable[[torch.Tensor], torch.Tensor], contract: dict[str, Any],
                 flip_outside: bool = True, operating_point: OperatingPoint | None = None, **embedder: Any) -> None:
        super().__init__(forward, contract, flip_outside, **embedder)
        self.operating_point = operating_point

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        input_size: int | None = None,
        normalize: tuple[Any, Any] | None = None,
        color: str | None = None,
        threshold: float | None = None,
        batch_size: int = 32,
        calibration: bool = True,
    ) -> FaceVerifier:
        """A verifier for a unitsface checkpoint or any ONNX graph (`Embedder.load`); `threshold` overrides the
        threshold; `calibration=False` ignores a stored calibration (see `resolve_threshold`)."""
        verifier = super().load(path, input_size, normalize, color, batch_size)
        verifier.operating_point = resolve_threshold(path, verifier.learned, threshold, calibration)
        return verifier

    @property
    def threshold(self) -> float | None:
        return None if self.operating_point is None else self.operating_point.threshold

    @property
    def threshold_source(self) -> str:
        return "none" if self.operating_point is None else self.operating_point.source

    def describe_threshold(self) -> str:
        """The threshold in use, its source and what is known of its FAR/TAR, in one line."""
        return "no threshold" if self.operating_point is None else self.operating_point.describe()

    def decide(self, score: float) -> bool:
        """Same identity iff score ≥ the threshold in use."""
        if self.operating_point is None:
            raise UnitsfaceError(f"no threshold for {self.name}: it has no learned threshold and no calibration; "
                                 "run `unitsface calibrate` or pass a threshold")
        return bool(score >= self.operating_point.threshold)

    def verify(self, a: ImageLike, b: ImageLike) -> tuple[bool, float]:
        """(same, score) for two faces."""
        score = self.score(a, b)
        return self.decide(score), score
