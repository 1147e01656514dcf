"""MagFace: an ArcFace margin that grows with the feature magnitude (Meng et al., CVPR 2021).

    a_i   = clamp(|x_i|, l_a, u_a)                      (gradient kept inside the clamp)
    m(a)  = l_m + (u_m − l_m)/(u_a − l_a)·(a − l_a)
    z_iy  = s·cos(θ_iy + m(a_i)) if cos θ_iy > 0 else s·cos θ_iy     (easy margin)
    loss  = mean_i CE(z_i, y_i) + λ_g·mean_i g(a_i),   g(a) = a/u_a² + 1/a

Official code IrvingMeng/MagFace `models/magface.py`, defaults from `run/run.sh`
(methods.md §1.7). λ_g below the feasibility bound is refused (the reference only warns).
"""

from __future__ import annotations

import torch

from unitsface.heads.base import Head, register
from unitsface.heads.components import ClassProxies
from unitsface.losses import columns as LC
from unitsface.losses import functional as LF


@register("magface")
class MagFaceHead(Head):
    """MagFace, s=64, margins 0.45–0.8 over magnitudes 10–110, λ_g=35; W init "unit" as the reference."""

    def __init__(self, num_classes: int, embedding_size: int, s: float = 64.0, l_margin: float = 0.45,
                 u_margin: float = 0.8, l_a: float = 10.0, u_a: float = 110.0, lambda_g: float = 35.0,
                 weight_init: str = "unit", sample_rate: float = 1.0) -> None:
        super().__init__(num_classes, embedding_size, sample_rate)
        LF.check_magface(s, l_margin, u_margin, l_a, u_a, lambda_g)
        self.s = float(s)
        self.magnitudes = LF.MagFaceMagnitudes(l_margin, u_margin, l_a, u_a, lambda_g)
        self.proxies = ClassProxies(self.shard, embedding_size, weight_init)
        self.spec = LC.ColumnSpec("softmax", self.s)

    def compute_loss(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        sample = self.columns_for(labels)
        rows = self.proxies.rows(sample)
        unit, c_y = self.target_cosines(x, rows, sample)
        return LC.column_loss(unit, rows, sample.labels, self.magnitudes.target(c_y, x), self.spec) \
            + self.magnitudes.regularizer(x)
