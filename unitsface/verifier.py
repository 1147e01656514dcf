"""`FaceVerifier`: one face model, one threshold, one decision — for checkpoints and ONNX graphs alike.

A verifier embeds aligned faces (uint8 RGB arrays or image files; other sizes are scaled to fit
with `to_face_image`), scores a pair by the cosine of their L2-normalised flip-sum embeddings,
and says "same" when the score is ≥ the threshold in use.

Which threshold is in use is decided in one place (`resolve_threshold`), in this order:
1. an explicit threshold given by the caller ("given");
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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch

from unitsface.data.images import IMAGE_EXTENSIONS, decode, to_face_image
from unitsface.errors import UnitsfaceError
from unitsface.evaluation.embed import embed_batches
from unitsface.evaluation.threshold import OperatingPoint, exported_point, learned_point
from unitsface.evaluation.verification import l2_normalize, scores_from_pairs
from unitsface.export.common import pixel_stats
from unitsface.io import atomic_write
from unitsface.models import INPUT_CONTRACT
from unitsface.training.checkpoint import file_sha256

ImageLike = Union[np.ndarray, str, os.PathLike]
SIDECAR_SUFFIX = ".threshold.json"
SIDECAR_FORMAT = "unitsface-threshold"
DEFAULT_CONTRACT = INPUT_CONTRACT  # also insightface's ONNX packs' (formats.md §9.2)


def load_image(path: str | os.PathLike) -> np.ndarray:
    """An image file as an H×W×3 uint8 RGB array; UnitsfaceError naming the file if it can't be read."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise UnitsfaceError(f"cannot read image {path}: {exc.strerror or exc}") from None
    return decode(data, source=str(path))


def list_images(spec: str | os.PathLike) -> list[Path]:
    """Image paths from a folder (searched recursively, sorted) or a text file of paths, one a line.

    Relative paths in a list file are taken relative to the list file's folder, so a list and
    its images can move together; blank lines and lines starting with '#' are skipped.
    """
    spec = Path(spec)
    if spec.is_dir():
        paths = sorted(p for p in spec.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        if not paths:
            raise UnitsfaceError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under {spec}")
        return paths
    if not spec.is_file():
        raise UnitsfaceError(f"images not found: {spec} is neither a folder nor a list file")
    lines = [line.strip() for line in spec.read_text().splitlines()]
    paths = [spec.parent / line for line in lines if line and not line.startswith("#")]
    if not paths:
        raise UnitsfaceError(f"list file {spec} names no images")
    return paths


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


class FaceVerifier:
    """Embed, score and verify faces with one model and the threshold in use.

    Build with `FaceVerifier.load(path)`; the constructor takes any `forward(float N×3×S×S) ->
    N×d` with its input contract, for models that live only in memory. `flip_outside=False`
    says that `forward` already returns flip-sum embeddings.
    """

    def __init__(
        self,
        forward: Callable[[torch.Tensor], torch.Tensor],
        contract: dict[str, Any],
        flip_outside: bool = True,
        operating_point: OperatingPoint | None = None,
        name: str = "model",
        batch_size: int = 32,
        learned: OperatingPoint | None = None,
        third_party: bool = False,
    ) -> None:
        if contract.get("color") not in ("rgb", "bgr"):
            raise UnitsfaceError(f"{name}: colour order must be 'rgb' or 'bgr', got {contract.get('color')!r}")
        self.forward, self.flip_outside, self.name, self.batch_size = forward, flip_outside, name, batch_size
        self.contract = dict(contract)
        self.size = int(contract["size"])
        self.mean, self.std = pixel_stats(contract["mean"], contract["std"])
        self.operating_point = operating_point
        self.learned = learned  # b/s from training with its operating point, kept for reports
        self.third_party = third_party  # an ONNX graph without unitsface metadata

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
        """A verifier for a unitsface checkpoint (.pt/.pth/.ckpt) or any ONNX graph (.onnx).

        `input_size`, `normalize=(mean, std)` (0..255 units, one value or three) and `color`
        describe what a third-party ONNX graph expects; they override recorded values when given.
        For unitsface files the recorded contract is used. `threshold` overrides the threshold;
        `calibration=False` ignores a stored calibration (see `resolve_threshold`).
        """
        path = Path(path)
        if not path.is_file():
            raise UnitsfaceError(f"model not found: {path}")
        backend = _onnx_backend(path) if path.suffix.lower() == ".onnx" else _checkpoint_backend(path)
        overrides = {"size": input_size, "color": color}
        if normalize is not None:
            overrides.update(mean=normalize[0], std=normalize[1])
        backend.contract.update({k: v for k, v in overrides.items() if v is not None})
        point = resolve_threshold(path, backend.learned, threshold, calibration)
        return cls(backend.forward, backend.contract, backend.flip_outside, point, str(path), batch_size,
                   backend.learned, backend.third_party)

    @property
    def threshold(self) -> float | None:
        return None if self.operating_point is None else self.operating_point.threshold

    @property
    def threshold_source(self) -> str:
        return "none" if self.operating_point is None else self.operating_point.source

    def describe_threshold(self) -> str:
        """The threshold in use, its source and what is known of its FAR/TAR, in one line."""
        return "no threshold" if self.operating_point is None else self.operating_point.describe()

    def prepare(self, images: ImageLike | Sequence[ImageLike]) -> np.ndarray:
        """N×S×S×3 uint8 RGB faces from paths or arrays (one image, a list, or an N×H×W×3 array)."""
        if isinstance(images, (str, os.PathLike)) or (isinstance(images, np.ndarray) and images.ndim in (2, 3)):
            images = [images]
        return self._stack([load_image(im) if isinstance(im, (str, os.PathLike)) else np.asarray(im)
                            for im in images])

    def _stack(self, images: Sequence[np.ndarray]) -> np.ndarray:
        faces = [to_face_image(img, self.size) for img in images]
        return np.stack(faces) if faces else np.zeros((0, self.size, self.size, 3), np.uint8)

    def raw_embeddings(self, faces: np.ndarray, flip: bool = True, batch_size: int | None = None,
                       progress: Callable[[int], None] | None = None) -> np.ndarray:
        """Un-normalised embeddings (flip-sum unless `flip=False`) of N×S×S×3 uint8 RGB faces.

        A graph exported with flip-sum inside is never flipped again.
        """
        if self.contract["color"] == "bgr":
            faces = np.ascontiguousarray(faces[..., ::-1])
        return embed_batches(self.forward, faces, batch_size or self.batch_size, flip and self.flip_outside,
                             self.mean, self.std, progress)

    def embed_encoded(self, encoded: Sequence[bytes], flip: bool = True, batch_size: int | None = None,
                      progress: Callable[[int], None] | None = None) -> np.ndarray:
        """Un-normalised embeddings of encoded images (JPEG/PNG bytes, e.g. a `.bin`'s entries)."""
        faces = self._stack([decode(data, f"image {i}") for i, data in enumerate(encoded)])
        return self.raw_embeddings(faces, flip, batch_size, progress)

    def embed(self, images: ImageLike | Sequence[ImageLike]) -> np.ndarray:
        """L2-normalised flip-sum embeddings, N×d float32, one row per image."""
        return l2_normalize(self.raw_embeddings(self.prepare(images))).astype(np.float32)

    def scores(self, a: ImageLike | Sequence[ImageLike], b: ImageLike | Sequence[ImageLike]) -> np.ndarray:
        """Cosine scores of pairs (a[i], b[i])."""
        ea, eb = self.embed(a), self.embed(b)
        if len(ea) != len(eb):
            raise UnitsfaceError(f"pair lists differ in length: {len(ea)} vs {len(eb)}")
        return scores_from_pairs(ea, eb)

    def score(self, a: ImageLike, b: ImageLike) -> float:
        """Cosine similarity of two faces' flip-sum embeddings."""
        return float(self.scores([a], [b])[0])

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


@dataclass
class _Backend:
    """What a model file gives a verifier: its forward, input contract, whether flip-sum is still to be
    done outside, its learned threshold, and whether it is a graph without unitsface metadata."""

    forward: Callable[[torch.Tensor], torch.Tensor]
    contract: dict[str, Any]
    flip_outside: bool
    learned: OperatingPoint | None
    third_party: bool = False


def _checkpoint_backend(path: Path) -> _Backend:
    from unitsface.training.checkpoint import load_backbone

    model, meta = load_backbone(path)
    return _Backend(model, {**DEFAULT_CONTRACT, **(meta.get("input") or {})}, True, learned_point(meta))


def _onnx_backend(path: Path) -> _Backend:
    from unitsface.export.onnx import load_onnx

    graph = load_onnx(path)
    meta = graph.metadata

    def forward(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(graph.run(x.numpy()))

    if meta is None:  # third-party graph: what its shape says, insightface defaults for the rest
        return _Backend(forward, {**DEFAULT_CONTRACT, "size": graph.input_size or DEFAULT_CONTRACT["size"]}, True,
                        None, third_party=True)
    contract = {"size": meta["input_size"], "color": meta["color"], "mean": meta["mean"], "std": meta["std"]}
    return _Backend(forward, contract, not meta.get("flip_sum", False), exported_point(meta))


def pair_scores(verifier: FaceVerifier, encoded: Sequence[bytes],
                progress: Callable[[int], None] | None = None) -> np.ndarray:
    """Cosine scores of a `.bin`'s pairs: pair i is encoded images 2i and 2i+1."""
    if len(encoded) % 2:
        raise UnitsfaceError(f"pair images must come in twos, got {len(encoded)}")
    emb = verifier.embed_encoded(encoded, progress=progress)
    return scores_from_pairs(emb[0::2], emb[1::2])
