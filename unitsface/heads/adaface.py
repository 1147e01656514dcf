"""AdaFace: a margin adapted to image quality, proxied by the feature norm (Kim et al., CVPR 2022).

    n_i  = sg(clip(|x_i|, 1e-3, 100));  μ, σ EMA of the batch mean / unbiased std (α = t_alpha)
    ẑ_i  = clip(h·(n_i − μ)/(σ + ε), −1, 1)
    z_iy = s·[cos(clip(θ_iy − m·ẑ_i, ε, π − ε)) − (m + m·ẑ_i)],   z_ij = s·cos θ_ij
with cosines clamped to [−1 + ε, 1 − ε], ε = 1e-3. Official code mk-minchul/AdaFace `head.py`,
defaults from `scripts/run_ir101_ms1mv2.sh` (methods.md §1.8).
"""

from __future__ import annotations

import torch

from unitsface.heads.base import Head, register
from unitsface.heads.components import ClassProxies
from unitsface.losses import columns as LC
from unitsface.losses import functional as LF


@register("adaface")
class AdaFaceHead(Head):
    """AdaFace, s=64, m=0.4, h=0.333, t_alpha=0.01; buffers `batch_mean`=20, `batch_std`=100."""

    def __init__(self, num_classes: int, embedding_size: int, s: float = 64.0, m: float = 0.4, h: float = 0.333,
                 t_alpha: float = 0.01, weight_init: str = "unit", sample_rate: float = 1.0) -> None:
        super().__init__(num_classes, embedding_size, sample_rate)
        if not 0.0 < t_alpha <= 1.0:
            raise ValueError(f"t_alpha must be in (0, 1], got {t_alpha}")
        self.s, self.m, self.h, self.t_alpha = float(s), float(m), float(h), float(t_alpha)
        self.proxies = ClassProxies(self.shard, embedding_size, weight_init)
        self.register_buffer("batch_mean", torch.full((1,), 20.0))
        self.register_buffer("batch_std", torch.full((1,), 100.0))
        self.spec = LC.ColumnSpec("softmax", self.s, negatives=LF.adaface_negatives)

    @torch.no_grad()
    def update_statistics(self, norms: torch.Tensor) -> None:
        """One EMA step per training forward over the global batch, duplicates included (D5).

        A batch of one row has no spread: σ then keeps its value instead of becoming NaN.
        """
        a = self.t_alpha
        self.batch_mean.copy_(norms.mean() * a + (1 - a) * self.batch_mean)
        if norms.numel() > 1:
            self.batch_std.copy_(norms.std() * a + (1 - a) * self.batch_std)

    def compute_loss(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        sample = self.columns_for(labels)
        rows = self.proxies.rows(sample)
        unit, c_y = self.target_cosines(x, rows, sample)
        norms = torch.linalg.vector_norm(x.detach(), dim=1).clamp(LF.ADAFACE_EPS, 100.0)
        if self.training:
            self.update_statistics(norms)  # before use, as the reference does
        quality = LF.adaface_quality(norms, self.batch_mean, self.batch_std, self.h)
        target = LF.adaface_target(LF.adaface_negatives(c_y), quality, self.m, LF.ADAFACE_EPS)
        return LC.column_loss(unit, rows, sample.labels, target, self.spec)
