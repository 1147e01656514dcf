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

from unitsface.heads.base import Head, register
from unitsface.heads.components import ClassProxies
from unitsface.losses import columns as LC
from unitsface.losses import functional as LF


@register("curricularface")
class CurricularFaceHead(Head):
    """CurricularFace, s=64, m=0.5, alpha=0.01; buffer `t`=0; W init N(0, 0.01²) as the reference."""

    def __init__(self, num_classes: int, embedding_size: int, s: float = 64.0, m: float = 0.5,
                 alpha: float = 0.01, weight_init: str = "normal_001", sample_rate: float = 1.0) -> None:
        super().__init__(num_classes, embedding_size, sample_rate)
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        self.s, self.m, self.alpha = float(s), float(m), float(alpha)
        self.proxies = ClassProxies(self.shard, embedding_size, weight_init)
        self.register_buffer("t", torch.zeros(1))

    def compute_loss(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        sample = self.columns_for(labels)
        rows = self.proxies.rows(sample)
        unit, c_y = self.target_cosines(x, rows, sample)
        # Every row's target cosine is known on every shard: the hard mask needs it, and t averages it
        # over the global batch (D5).
        target_cos = c_y.detach()
        if self.training:
            with torch.no_grad():
                self.t.copy_(target_cos.mean() * self.alpha + (1 - self.alpha) * self.t)
        t = self.t.clone()  # the value of this step, whatever happens to the buffer before backward
        spec = LC.ColumnSpec("softmax", self.s, negatives=lambda c: LF.curricular_negatives(c, target_cos, t, self.m))
        return LC.column_loss(unit, rows, sample.labels, LF.arcface_target(c_y, self.m, "exact", "hard"), spec)
