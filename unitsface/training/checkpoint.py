"""Checkpoints: one file with everything needed to resume exactly, or to deploy the backbone.

Layout (a plain dict of tensors, numbers, strings, lists and dicts, so that it loads with
`torch.load(..., weights_only=True)`):

    format, version     "unitsface-checkpoint", 1
    config              the full validated training config (nested dict)
    meta                backbone, embedding_size, head, num_classes, threshold (b/s or None),
                        input contract (size, colour order, mean, std)
    model, head         state dicts (the head's per-identity state included: memory, bias, ...)
    optimizer, scheduler, scaler, rng, epoch, step     resume state

Files are written to a temporary name in the same folder and renamed, so a crash while
saving leaves the previous checkpoint intact.
"""

from __future__ import annotations

import hashlib
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from unitsface.errors import UnitsfaceError, one_line
from unitsface.io import atomic_open, remove_stale_temp_files

FORMAT = "unitsface-checkpoint"
VERSION = 1


def atomic_save(obj: Any, path: str | Path) -> None:
    """torch.save to a temp file beside `path`, fsync, then rename over it.

    A checkpoint file has one writer, so temp files beside it are what a killed run left behind (a
    checkpoint's worth of disk each time); they go first.
    """
    remove_stale_temp_files(path)
    with atomic_open(path) as f:
        torch.save(obj, f)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load and check a unitsface checkpoint (weights_only: a checkpoint can never run code)."""
    path = Path(path)
    if not path.is_file():
        raise UnitsfaceError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, zipfile.BadZipFile, ValueError) as exc:
        first = one_line(exc)
        raise UnitsfaceError(f"corrupt or unreadable checkpoint {path}: {first}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise UnitsfaceError(f"{path} is not a unitsface checkpoint")
    if ckpt.get("version", 0) > VERSION:
        raise UnitsfaceError(f"{path} has checkpoint version {ckpt['version']}; this unitsface reads {VERSION}")
    return ckpt


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
