"""Test material shared by the deployment tests (export, verifier, serve): a small trained-looking
checkpoint in the trainer's exact layout, and real AT&T faces packed as a `.bin`."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch

from unitsface import models
from unitsface.data.bins import save_bin
from unitsface.data.images import encode_jpeg, load_image, to_face_image
from unitsface.evaluation.embed import to_input
from unitsface.export.common import rendered_faces
from unitsface.training.checkpoint import atomic_save


@functools.cache
def _weights(embedding_size: int, seed: int) -> dict[str, torch.Tensor]:
    """tinyfacenet weights whose embeddings depend on the face as a trained net's do.

    A fresh net's BatchNorm statistics make its outputs ~1e-4 and nearly constant, which would let
    any export pass any tolerance; one train-mode pass over rendered faces and noise sets them.
    """
    torch.manual_seed(seed)
    model = models.build("tinyfacenet", embedding_size=embedding_size)
    for module in model.modules():
        if isinstance(module, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            module.momentum = None  # running statistics = plain averages over the pass below
    x = to_input(np.concatenate([rendered_faces(112, 8), random_faces(4, seed)]))
    with torch.no_grad():
        model.train()(x)
    return model.state_dict()


# What the trainer records of a learned threshold on its held-out set (numbers of a real demo run's shape).
HELDOUT_POINT = {"threshold": 0.31, "tar": 0.625, "far": 0.0018, "true_accepts": 1750, "false_accepts": 570,
                 "n_genuine": 2800, "n_impostor": 316800, "convention": "b/s",
                 "threshold_at_far": {"0.01": 0.25, "0.001": 0.33, "0.0001": 0.41}, "balanced_threshold": 0.22}


def make_checkpoint(path: Path, threshold: float | None = 0.31, embedding_size: int = 32, seed: int = 0) -> Path:
    """A checkpoint in the trainer's layout (the weights are cached: tests make many); a learned threshold
    comes with its operating point on a held-out set named "heldout"."""
    points = {} if threshold is None else {"heldout": {**HELDOUT_POINT, "threshold": threshold}}
    meta = {"backbone": "tinyfacenet", "embedding_size": embedding_size, "head": "uss", "num_classes": 10,
            "threshold": threshold, "threshold_operating_point": points,
            "threshold_set": "heldout" if points else None, "input": dict(models.INPUT_CONTRACT)}
    atomic_save({"format": "unitsface-checkpoint", "version": 1, "config": {}, "meta": meta,
                 "model": _weights(embedding_size, seed), "head": {}, "epoch": 0, "step": 0}, path)
    return path


def att_face(shared_dir: Path, person: int, image: int) -> Path:
    return shared_dir / "data" / "att_faces" / f"s{person}" / f"{image}.pgm"


def att_bin(shared_dir: Path, out: Path, people: int = 6) -> Path:
    """A .bin of AT&T faces: per person one genuine pair (images 1, 2) and one impostor pair."""
    images, issame = [], []
    for p in range(1, people + 1):
        other = p % people + 1
        for a, b, same in ((att_face(shared_dir, p, 1), att_face(shared_dir, p, 2), True),
                           (att_face(shared_dir, p, 3), att_face(shared_dir, other, 3), False)):
            images += [encode_jpeg(to_face_image(load_image(a))), encode_jpeg(to_face_image(load_image(b)))]
            issame.append(same)
    save_bin(out, images, issame)
    return out


def onnx_sface(shared_dir: Path) -> Path:
    return shared_dir / "models" / "face_recognition_sface_2021dec_int8bq.onnx"


def random_faces(count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, 112, 112, 3), dtype=np.uint8)
