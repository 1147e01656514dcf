"""Embedding faces with a model file: a unitsface checkpoint or any ONNX graph, through one input contract.

`Embedder.load(path)` reads the model and what it expects (size, colour order, normalisation, whether
flip-sum is already inside the graph) and what it says of itself (its learned threshold with the operating
point training measured); an `Embedder` turns image files, arrays or encoded bytes into flip-sum
embeddings. The evaluation commands embed through it, and `FaceVerifier` is an `Embedder` with a
threshold, so both sit above this module and neither needs the other.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch

from unitsface.data.images import decode, load_image, to_face_image
from unitsface.errors import UnitsfaceError
from unitsface.evaluation.embed import embed_batches
from unitsface.evaluation.threshold import OperatingPoint, exported_point, learned_point
from unitsface.evaluation.verification import l2_normalize, scores_from_pairs
from unitsface.export.common import pixel_stats
from unitsface.export.onnx import load_onnx
from unitsface.models import INPUT_CONTRACT, load_backbone

ImageLike = Union[np.ndarray, str, os.PathLike]
DEFAULT_CONTRACT = INPUT_CONTRACT  # also insightface's ONNX packs' (formats.md §9.2)


@dataclass
class _Backend:
    """What a model file gives: its forward, input contract, whether flip-sum is still to be done outside,
    its learned threshold, and whether it is a graph without unitsface metadata."""

    forward: Callable[[torch.Tensor], torch.Tensor]
    contract: dict[str, Any]
    flip_outside: bool
    learned: OperatingPoint | None
    third_party: bool = False


def _checkpoint_backend(path: Path) -> _Backend:
    model, meta = load_backbone(path)
    return _Backend(model, {**DEFAULT_CONTRACT, **(meta.get("input") or {})}, True, learned_point(meta))


def _onnx_backend(path: Path) -> _Backend:
    graph = load_onnx(path)
    meta = graph.metadata

    def forward(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(graph.run(x.numpy()))

    if meta is None:  # third-party graph: what its shape says, insightface defaults for the rest
        return _Backend(forward, {**DEFAULT_CONTRACT, "size": graph.input_size or DEFAULT_CONTRACT["size"]}, True,
                        None, third_party=True)
    contract = {"size": meta["input_size"], "color": meta["color"], "mean": meta["mean"], "std": meta["std"]}
    return _Backend(forward, contract, not meta.get("flip_sum", False), exported_point(meta))


class Embedder:
    """Flip-sum embeddings of aligned faces with one model and its input contract.

    Build with `Embedder.load(path)`; the constructor takes any `forward(float N×3×S×S) -> N×d` with its
    input contract, for models that live only in memory. `flip_outside=False` says that `forward` already
    returns flip-sum embeddings. `learned` is the threshold the model carries (unitsface files only).
    """

    def __init__(
        self,
        forward: Callable[[torch.Tensor], torch.Tensor],
        contract: dict[str, Any],
        flip_outside: bool = True,
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
        self.learned = learned  # b/s from training with its operating point
        self.third_party = third_party  # an ONNX graph without unitsface metadata

    @classmethod
    def load(cls, path: str | os.PathLike, input_size: int | None = None, normalize: tuple[Any, Any] | None = None,
             color: str | None = None, batch_size: int = 32, **extra: Any) -> Embedder:
        """The model of a unitsface checkpoint (.pt/.pth/.ckpt) or any ONNX graph (.onnx).

        `input_size`, `normalize=(mean, std)` (0..255 units, one value or three) and `color` describe what a
        third-party ONNX graph expects; they override recorded values when given. For unitsface files the
        recorded contract is used. `extra` goes to the constructor (a subclass's own arguments).
        """
        path = Path(path)
        if not path.is_file():
            raise UnitsfaceError(f"model not found: {path}")
        backend = _onnx_backend(path) if path.suffix.lower() == ".onnx" else _checkpoint_backend(path)
        overrides = {"size": input_size, "color": color}
        if normalize is not None:
            overrides.update(mean=normalize[0], std=normalize[1])
        backend.contract.update({k: v for k, v in overrides.items() if v is not None})
        return cls(backend.forward, backend.contract, backend.flip_outside, name=str(path), batch_size=batch_size,
                   learned=backend.learned, third_party=backend.third_party, **extra)

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


def pair_scores(embedder: Embedder, encoded: Sequence[bytes],
                progress: Callable[[int], None] | None = None) -> np.ndarray:
    """Cosine scores of a `.bin`'s pairs: pair i is encoded images 2i and 2i+1."""
    if len(encoded) % 2:
        raise UnitsfaceError(f"pair images must come in twos, got {len(encoded)}")
    emb = embedder.embed_encoded(encoded, progress=progress)
    return scores_from_pairs(emb[0::2], emb[1::2])
