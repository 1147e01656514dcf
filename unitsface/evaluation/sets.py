"""Validation sets a run scores itself on: pair lists (`.bin`) and labelled identity sets scored all-pairs.

A `.bin` holds 1,000-12,000 pairs, so it can read FAR down to about 1e-3 at best. A learned threshold
sits near FAR ≈ 1/C (docs/threshold.md): measuring it needs many impostor pairs, which a set of
labelled identities gives for free — 100 identities × 8 images are 318k impostor pairs. Such a set is
a folder `<identity>/<image>` or a `.rec` set, and every pair of its images is scored.

`load_validation_set(path)` reads any of them into memory once (uint8 112×112 RGB faces);
`ValidationSet.evaluate(embeddings)` runs the matching protocol on the flip-sum embeddings of its
images (`evaluate_pairs`, the insightface 10-fold protocol, or `evaluate_all_pairs`). Both results
carry the per-pair scores (`pair_scores`) for operating points and histograms.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from unitsface.data.bins import load_bin
from unitsface.data.dataset import ImageFolderDataset, RecordDataset
from unitsface.data.images import FACE_SIZE, decode, to_face_image
from unitsface.errors import UnitsfaceError
from unitsface.evaluation.verification import evaluate_all_pairs, evaluate_pairs


@dataclass(frozen=True)
class ValidationSet:
    """Faces to embed and how to score them: `issame` for a pair list (images 2i and 2i+1 form pair i),
    `labels` for an identity set (every unordered pair scored)."""

    name: str
    path: Path
    images: np.ndarray  # N×112×112×3 uint8 RGB
    issame: np.ndarray | None = None
    labels: np.ndarray | None = None

    @property
    def protocol(self) -> str:
        return "pairs" if self.issame is not None else "all pairs"

    def evaluate(self, embeddings: np.ndarray) -> dict[str, Any]:
        """The protocol's results for the embeddings of `images` (one row per image)."""
        if self.issame is not None:
            return evaluate_pairs(embeddings[0::2], embeddings[1::2], self.issame)
        return evaluate_all_pairs(embeddings, self.labels)


def _faces(encoded: list[bytes], source: Path) -> np.ndarray:
    return np.stack([to_face_image(decode(data, f"{source} image {i}"), FACE_SIZE) for i, data in enumerate(encoded)])


def _identity_set(path: Path, dataset: RecordDataset | ImageFolderDataset) -> ValidationSet:
    """Every image of a labelled dataset, checked to hold genuine and impostor pairs."""
    labels = np.asarray(dataset.labels)
    identities, counts = np.unique(labels, return_counts=True)
    if len(identities) < 2:
        raise UnitsfaceError(f"validation set {path} has {len(identities)} identity; all-pairs scoring needs at "
                             "least 2 (impostor pairs)")
    if counts.max() < 2:
        raise UnitsfaceError(f"validation set {path} has one image per identity; all-pairs scoring needs an "
                             "identity with 2 or more (genuine pairs)")
    images = np.stack([dataset[i][0].numpy().transpose(1, 2, 0) for i in range(len(dataset))])
    return ValidationSet(path.name if path.is_dir() else path.stem, path, images, labels=labels)


def load_validation_set(path: str | os.PathLike) -> ValidationSet:
    """A `.bin` pair list, a `.rec` set (a folder with train.rec/train.idx, or the .rec file), or a folder
    of identities `<identity>/<image>`; named after the file's stem or the folder."""
    path = Path(path).expanduser()
    if path.suffix == ".bin":
        if not path.is_file():
            raise UnitsfaceError(f"validation file not found: {path}")
        encoded, issame = load_bin(path)
        return ValidationSet(path.stem, path, _faces(encoded, path), issame=np.asarray(issame, dtype=bool))
    if path.suffix == ".rec" or (path / "train.rec").is_file():
        return _identity_set(path, RecordDataset(path, train=False, flip=False))
    if path.is_dir():
        return _identity_set(path, ImageFolderDataset(path, train=False, flip=False))
    raise UnitsfaceError(f"validation set not found: {path} (expected a .bin file, a .rec set or a folder of "
                         "identities)")


def load_validation_sets(paths: list[str | os.PathLike]) -> list[ValidationSet]:
    """`load_validation_set` for each path; two sets may not share a name (their results would collide)."""
    sets = [load_validation_set(p) for p in paths]
    names = [s.name for s in sets]
    clash = next((n for n in names if names.count(n) > 1), None)
    if clash is not None:
        paths = [str(s.path) for s in sets if s.name == clash]
        raise UnitsfaceError(f"two validation sets are named {clash!r}: {paths}")
    return sets
