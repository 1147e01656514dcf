"""Turning face images into embeddings: the one place that applies the input contract.

Images arrive as uint8 RGB arrays (N×H×W×3, 112×112). `embed_images` normalises them the
way the backbone was trained ((x/255 − 0.5)/0.5), runs the model in eval mode in batches,
and returns flip-sum embeddings: f(x) + f(flip(x)) on the raw outputs (evaluation.md §1),
un-normalised, so that callers can still read norms. Callers L2-normalise for cosines.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import nn


def to_input(images: np.ndarray | torch.Tensor, mean: float = 127.5, std: float = 127.5) -> torch.Tensor:
    """uint8 N×H×W×3 (or N×3×H×W tensor) -> float N×3×H×W normalised as (x − mean)/std."""
    t = torch.as_tensor(images)
    if t.dim() == 3:
        t = t.unsqueeze(0)
    if t.shape[-1] == 3 and t.shape[1] != 3:
        t = t.permute(0, 3, 1, 2)
    return (t.float() - mean) / std


@torch.no_grad()
def embed_batches(
    forward: Callable[[torch.Tensor], torch.Tensor],
    images: np.ndarray | torch.Tensor,
    batch_size: int = 64,
    flip: bool = True,
    mean: float = 127.5,
    std: float = 127.5,
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Flip-sum (or plain) embeddings of uint8 images through any `forward(float NCHW) -> N×d`."""
    out = []
    for start in range(0, len(images), batch_size):
        x = to_input(images[start : start + batch_size], mean, std)
        emb = forward(x).float()
        if flip:
            emb = emb + forward(torch.flip(x, dims=[3])).float()
        out.append(emb.cpu().numpy())
        if progress is not None:
            progress(len(x))
    if not out:
        return np.zeros((0, 0), dtype=np.float32)
    return np.concatenate(out).astype(np.float32, copy=False)


def embed_images(
    model: nn.Module,
    images: np.ndarray | torch.Tensor,
    batch_size: int = 64,
    flip: bool = True,
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """Flip-sum embeddings of uint8 RGB images through a backbone (set to eval mode, restored after)."""
    was_training = model.training
    model.eval()
    try:
        return embed_batches(lambda x: model(x.to(device)), images, batch_size, flip)
    finally:
        model.train(was_training)
