"""Sample-to-class margin heads: softmax, NormFace, CosFace, ArcFace, combined margin.

    softmax:  z_ij = <W_j, x_i> + b_j                    (no normalisation)
    normface: z_ij = s·cos θ_ij                          (Wang et al. 2017)
    cosface:  z_iy = s·(cos θ_iy − m)                    (Wang et al., CVPR 2018)
    arcface:  z_iy = s·cos(θ_iy + m)                     (Deng et al., CVPR 2019)
    combined: z_iy = s·(cos(m1·θ_iy + m2) − m3)          (insightface)
loss = mean_i CE(z_i, y_i); the target transforms are in `unitsface.losses.functional`, the columns are
streamed by `unitsface.losses.columns`; methods.md §1.
"""

from __future__ import annotations

import torch
from torch import nn

from unitsface.heads.base import Head, register
from unitsface.heads.components import ClassProxies
from unitsface.losses import columns as LC
from unitsface.losses import functional as LF


class MarginHead(Head):
    """Class proxies and a softmax over s·cos with a transformed target: what every head of this file shares."""

    def __init__(self, num_classes: int, embedding_size: int, s: float, weight_init: str, sample_rate: float) -> None:
        super().__init__(num_classes, embedding_size, sample_rate)
        self.s = float(s)
        self.proxies = ClassProxies(self.shard, embedding_size, weight_init)
        self.spec = LC.ColumnSpec("softmax", self.s)

    def target(self, c: torch.Tensor) -> torch.Tensor:
        return c

    def compute_loss(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        sample = self.columns_for(labels)
        rows = self.proxies.rows(sample)
        unit, c_y = self.target_cosines(x, rows, sample)
        return LC.column_loss(unit, rows, sample.labels, self.target(c_y), self.spec)


@register("softmax")
class SoftmaxHead(Head):
    """Plain linear classifier with a per-class bias b (sharded with W), fp32 logits (§1.1)."""

    def __init__(self, num_classes: int, embedding_size: int, weight_init: str = "normal",
                 sample_rate: float = 1.0) -> None:
        super().__init__(num_classes, embedding_size, sample_rate)
        self.proxies = ClassProxies(self.shard, embedding_size, weight_init)
        self.bias = nn.Parameter(torch.zeros(self.shard.size))
        self.spec = LC.ColumnSpec("softmax", 1.0, normalized=False)

    def compute_loss(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        sample = self.columns_for(labels)
        rows = self.proxies.rows(sample)
        target = LC.target_cosine(x, rows, sample.labels, normalized=False)  # the raw target dot product
        # z = <W_j, x> + b_j: the engine subtracts its bias, so it is handed −b.
        return LC.column_loss(x, rows, sample.labels, target, self.spec, bias=-sample.take(self.bias))


@register("normface")
class NormFaceHead(MarginHead):
    """NormFace: softmax on s·cos with fixed s (§1.2)."""

    def __init__(self, num_classes: int, embedding_size: int, s: float = 64.0,
                 weight_init: str = "normal", sample_rate: float = 1.0) -> None:
        super().__init__(num_classes, embedding_size, s, weight_init, sample_rate)


@register("cosface")
class CosFaceHead(MarginHead):
    """CosFace, s=64, m=0.4 (the UniTSFace/UniFace/EPL code and arcface_torch value; §1.3)."""

    def __init__(self, num_classes: int, embedding_size: int, s: float = 64.0, m: float = 0.4,
                 weight_init: str = "normal", sample_rate: float = 1.0) -> None:
        super().__init__(num_classes, embedding_size, s, weight_init, sample_rate)
        self.m = float(m)

    def target(self, c: torch.Tensor) -> torch.Tensor:
        return LF.cosface_target(c, self.m)


@register("arcface")
class ArcFaceHead(MarginHead):
    """ArcFace, s=64, m=0.5; `gradient="exact"` (hard fallback) or `"straight_through"` (§1.4)."""

    def __init__(self, num_classes: int, embedding_size: int, s: float = 64.0, m: float = 0.5,
                 gradient: str = "exact", fallback: str = "hard", weight_init: str = "normal",
                 sample_rate: float = 1.0) -> None:
        super().__init__(num_classes, embedding_size, s, weight_init, sample_rate)
        LF.arcface_target(torch.zeros(1), m, gradient, fallback)  # validates the modes up front
        self.m, self.gradient, self.fallback = float(m), gradient, fallback

    def target(self, c: torch.Tensor) -> torch.Tensor:
        return LF.arcface_target(c, self.m, self.gradient, self.fallback)


@register("combined")
class CombinedMarginHead(MarginHead):
    """Combined margin (m1, m2, m3) = (1.0, 0.3, 0.2) by default, s=64 (§1.5)."""

    def __init__(self, num_classes: int, embedding_size: int, s: float = 64.0, m1: float = 1.0,
                 m2: float = 0.3, m3: float = 0.2, gradient: str = "exact", weight_init: str = "normal",
                 sample_rate: float = 1.0) -> None:
        super().__init__(num_classes, embedding_size, s, weight_init, sample_rate)
        LF.combined_target(torch.zeros(1), m1, m2, m3, gradient)
        self.m1, self.m2, self.m3, self.gradient = float(m1), float(m2), float(m3), gradient

    def target(self, c: torch.Tensor) -> torch.Tensor:
        return LF.combined_target(c, self.m1, self.m2, self.m3, self.gradient)
