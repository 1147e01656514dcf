"""What every export format shares: the exported module, its metadata and the parity check.

An exported model is only useful if it computes what the checkpoint computes, on the inputs it
will really see. So every export is run against the PyTorch model before it is written, on
random pixels and on face images (rendered synthetic faces, plus any real images the caller
gives), and refused when the outputs differ by more than a float32 tolerance.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from unitsface.data import synthetic
from unitsface.data.images import to_face_image
from unitsface.errors import UnitsfaceError
from unitsface.evaluation.embed import to_input
from unitsface.evaluation.threshold import learned_point
from unitsface.models import load_backbone
from unitsface.training.checkpoint import file_sha256

FORMAT_VERSION = 1
TOLERANCE = 1e-4  # max abs difference allowed between exported and PyTorch outputs (float32)


class FlipSum(nn.Module):
    """f(x) + f(flip(x)): the flip-sum embedding (evaluation.md §1) inside one graph."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x) + self.backbone(torch.flip(x, dims=[3]))


@dataclass
class Exportable:
    """The module to export (eval mode) and the metadata that travels with it."""

    module: nn.Module
    metadata: dict[str, Any]

    @property
    def input_size(self) -> int:
        return int(self.metadata["input_size"])


@dataclass
class ExportReport:
    """What was written and how closely it reproduces PyTorch, per input kind."""

    path: str
    format: str
    metadata: dict[str, Any]
    max_abs_diff: dict[str, float] = field(default_factory=dict)
    tolerance: float = TOLERANCE

    def as_dict(self) -> dict[str, Any]:
        return {"path": self.path, "format": self.format, "max_abs_diff": self.max_abs_diff,
                "tolerance": self.tolerance, "metadata": self.metadata}


def threshold_metadata(meta: dict[str, Any]) -> dict[str, Any]:
    """The learned threshold and where it operates, as an export records them: `threshold` (b/s or None),
    `threshold_source`, and from the run's `threshold_set` (its validation set with the most impostor
    pairs) `threshold_far` (a number, or "< 1/n" without a false accept), `threshold_tar`,
    `threshold_pairs` ({"genuine", "impostor"}) and `threshold_set`; None where unknown."""
    point = learned_point(meta)
    if point is None:
        return {"threshold": None, "threshold_source": None, "threshold_far": None, "threshold_tar": None,
                "threshold_pairs": None, "threshold_set": None}
    measured = (meta.get("threshold_operating_point") or {}).get(point.measured_on or "", {})
    return {"threshold": point.threshold, "threshold_source": point.source, "threshold_far": point.far,
            "threshold_tar": point.tar,
            "threshold_pairs": ({"genuine": measured["n_genuine"], "impostor": measured["n_impostor"]}
                                if measured else None),
            "threshold_set": point.measured_on}


def load_exportable(checkpoint: str | Path, flip_sum: bool = False) -> Exportable:
    """The checkpoint's backbone (optionally wrapped in FlipSum) and its deployment metadata.

    The metadata names everything a consumer must reproduce: input size, colour order and
    normalisation, embedding size, whether flip-sum is already inside, the learned threshold,
    the training head, and the sha256 of the checkpoint it came from.
    """
    model, meta = load_backbone(checkpoint)
    contract = meta.get("input") or {}
    missing = [key for key in ("size", "color", "mean", "std") if key not in contract]
    if missing:
        raise UnitsfaceError(f"{checkpoint}: meta.input lacks {', '.join(missing)}; cannot record the input contract")
    metadata = {
        "unitsface_format": FORMAT_VERSION,
        "backbone": meta["backbone"],
        "embedding_size": int(meta["embedding_size"]),
        "input_size": int(contract["size"]),
        "color": str(contract["color"]),
        "mean": contract["mean"],
        "std": contract["std"],
        "flip_sum": bool(flip_sum),
        **threshold_metadata(meta),
        "head": meta.get("head"),
        "source_sha256": file_sha256(checkpoint),
    }
    module = FlipSum(model) if flip_sum else model
    return Exportable(module.eval(), metadata)


def pixel_stats(mean: Any, std: Any) -> tuple[float | torch.Tensor, float | torch.Tensor]:
    """(mean, std) as `to_input` takes them: floats, or 3×1×1 tensors for per-channel values.

    Per-channel statistics exist in the wild (UNPG's ImageNet mean/std, formats.md §9.2); they
    are given in 0..255 pixel units, in the channel order the network receives.
    """
    def one(value: Any, name: str) -> float | torch.Tensor:
        try:
            flat = np.asarray(value, dtype=np.float64).ravel()
        except (TypeError, ValueError):
            flat = np.array([np.nan])
        if flat.size not in (1, 3) or not np.isfinite(flat).all() or (name == "std" and (flat == 0).any()):
            raise UnitsfaceError(f"normalisation {name} must be one number or three (non-zero for std), "
                                 f"got {value!r}")
        return float(flat[0]) if flat.size == 1 else torch.tensor(flat, dtype=torch.float32).view(3, 1, 1)

    return one(mean, "mean"), one(std, "std")


def rendered_faces(size: int, count: int) -> np.ndarray:
    """Synthetic faces from the project's renderer: realistic pixel statistics, no data needed."""
    split = synthetic.VAL_SPLIT
    return np.stack([
        synthetic.render_face(synthetic.identity_params(0, split, i), synthetic.nuisance_params(0, split, i, 0), size)
        for i in range(count)
    ])


def check_batches(exportable: Exportable, images: Sequence[np.ndarray] = (), count: int = 4) -> dict[str, torch.Tensor]:
    """Named float N×3×S×S inputs for the parity check, normalised as the model was trained."""
    size = exportable.input_size
    mean, std = pixel_stats(exportable.metadata["mean"], exportable.metadata["std"])
    generator = np.random.default_rng(0)
    batches = {
        "random": to_input(generator.integers(0, 256, (count, size, size, 3), dtype=np.uint8), mean, std),
        "faces": to_input(rendered_faces(size, count), mean, std),
    }
    if len(images):
        batches["images"] = to_input(np.stack([to_face_image(img, size) for img in images]), mean, std)
    return batches


@torch.no_grad()
def compare(
    reference: nn.Module, exported: Callable[[torch.Tensor], np.ndarray], batches: dict[str, torch.Tensor],
    tolerance: float = TOLERANCE, what: str = "export",
) -> dict[str, float]:
    """Max abs difference of `exported` vs `reference` per batch; UnitsfaceError above `tolerance`."""
    diffs = {}
    for name, x in batches.items():
        expected = reference(x).float().numpy()
        got = np.asarray(exported(x), dtype=np.float32)
        if got.shape != expected.shape:
            raise UnitsfaceError(f"{what}: output shape {got.shape} differs from PyTorch's {expected.shape}")
        diffs[name] = float(np.abs(got - expected).max())
    worst = max(diffs, key=diffs.get)
    if not diffs[worst] <= tolerance:  # also catches NaN
        raise UnitsfaceError(f"{what} differs from PyTorch by {diffs[worst]:.2e} on {worst} inputs "
                             f"(tolerance {tolerance:g}); nothing was written")
    return diffs
