"""CurricularFace: hard negatives re-weighted by a running curriculum t (Huang et al., CVPR 2020).

    z_iy = s·φ(c_iy)  (ArcFace, hard fallback c − m·sin m where θ + m > π)
    z_ij = s·c_ij·(t + c_ij)  if c_ij > cos(θ_iy + m)  else s·c_ij        (j ≠ y_i)
    t   <- α·mean_i c_iy + (1 − α)·t,  once per training forward, before the modulation
The authors' head as carried in JDAI-CV/FaceX-Zoo `head/CurricularFace.py` (α = 0.01, the
default here) and Tencent/TFace `torchkit/head/localfc/curricularface.py` (α = 0.1);
methods.md §1.6.
"""

from __future__ import annotations

import torch

from unitsface.heads.base import ClassifierHead, register
from unitsface.losses import functional as LF
from unitsface.parallel import sum_over_shards


@register("curricularface")
class CurricularFaceHead(ClassifierHead):
    """CurricularFace, s=64, m=0.5, alpha=0.01; buffer `t`=0; W init N(0, 0.01²) as the reference."""

    def __init__(self, num_classes: int, embedding_size: int, s: float = 64.0, m: float = 0.5,
                 alpha: float = 0.01, weight_init: str = "normal_001", sample_rate: float = 1.0) -> None:
        super().__init__(num_classes, embedding_size, weight_init, sample_rate)
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        self.s, self.m, self.alpha = float(s), float(m), float(alpha)
        self.register_buffer("t", torch.zeros(1))

    def compute_loss(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cos, local, _ = self.class_cosine(x, labels)
        # Each row's target cosine from its owner shard: every shard needs it for the hard mask,
        # and t averages it over the global batch (D5).
        target_cos = sum_over_shards(LF.gather_target(cos.detach(), local))
        if self.training:
            with torch.no_grad():
                self.t.copy_(target_cos.mean() * self.alpha + (1 - self.alpha) * self.t)
        return LF.curricularface_loss(cos, local, target_cos, self.t, self.s, self.m)
