"""Sample-to-class margin heads: softmax, NormFace, CosFace, ArcFace, combined margin.

    softmax:  z_ij = <W_j, x_i> + b_j                    (no normalisation)
    normface: z_ij = s·cos θ_ij                          (Wang et al. 2017)
    cosface:  z_iy = s·(cos θ_iy − m)                    (Wang et al., CVPR 2018)
    arcface:  z_iy = s·cos(θ_iy + m)                     (Deng et al., CVPR 2019)
    combined: z_iy = s·(cos(m1·θ_iy + m2) − m3)          (insightface)
loss = mean_i CE(z_i, y_i); formulas in `unitsface.losses.functional`, methods.md §1.
"""

from __future__ import annotations

import torch
from torch import nn

from unitsface.heads.base import ClassifierHead, register
from unitsface.losses import functional as LF
from unitsface.losses import rows as LR


@register("softmax")
class SoftmaxHead(ClassifierHead):
    """Plain linear classifier with a per-class bias b (sharded with W), fp32 logits (§1.1)."""

    def __init__(self, num_classes: int, embedding_size: int, weight_init: str = "normal",
                 sample_rate: float = 1.0) -> None:
        super().__init__(num_classes, embedding_size, weight_init, sample_rate)
        self.bias = nn.Parameter(torch.zeros(self.shard.size))

    def compute_loss(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        weight, local, columns = self.class_rows(labels)
        bias = self.bias if columns is None else self.bias[columns]
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits = x.float() @ weight.float().t() + bias.float()
        return LF.cross_entropy_rows(logits, local).mean()


@register("normface")
class NormFaceHead(ClassifierHead):
    """NormFace: softmax on s·cos with fixed s (§1.2)."""

    def __init__(self, num_classes: int, embedding_size: int, s: float = 64.0,
                 weight_init: str = "normal", sample_rate: float = 1.0) -> None:
        super().__init__(num_classes, embedding_size, weight_init, sample_rate)
        self.s = float(s)

    def compute_loss(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cos, local, _ = self.class_cosine(x, labels)
        return LF.normface_loss(cos, local, self.s)


@register("cosface")
class CosFaceHead(ClassifierHead):
    """CosFace, s=64, m=0.4 (the UniTSFace/UniFace/EPL code and arcface_torch value; §1.3)."""

    def __init__(self, num_classes: int, embedding_size: int, s: float = 64.0, m: float = 0.4,
                 weight_init: str = "normal", sample_rate: float = 1.0) -> None:
        super().__init__(num_classes, embedding_size, weight_init, sample_rate)
        self.s, self.m = float(s), float(m)

    def compute_loss(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        rows, local, _ = self.class_rows(labels)
        return LR.cosface_rows_loss(x, rows, local, self.s, self.m)


@register("arcface")
class ArcFaceHead(ClassifierHead):
    """ArcFace, s=64, m=0.5; `gradient="exact"` (hard fallback) or `"straight_through"` (§1.4)."""

    def __init__(self, num_classes: int, embedding_size: int, s: float = 64.0, m: float = 0.5,
                 gradient: str = "exact", fallback: str = "hard", weight_init: str = "normal",
                 sample_rate: float = 1.0) -> None:
        super().__init__(num_classes, embedding_size, weight_init, sample_rate)
        LF.arcface_target(torch.zeros(1), m, gradient, fallback)  # validates the modes up front
        self.s, self.m, self.gradient, self.fallback = float(s), float(m), gradient, fallback

    def compute_loss(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cos, local, _ = self.class_cosine(x, labels)
        return LF.arcface_loss(cos, local, self.s, self.m, self.gradient, self.fallback)


@register("combined")
class CombinedMarginHead(ClassifierHead):
    """Combined margin (m1, m2, m3) = (1.0, 0.3, 0.2) by default, s=64 (§1.5)."""

    def __init__(self, num_classes: int, embedding_size: int, s: float = 64.0, m1: float = 1.0,
                 m2: float = 0.3, m3: float = 0.2, gradient: str = "exact", weight_init: str = "normal",
                 sample_rate: float = 1.0) -> None:
        super().__init__(num_classes, embedding_size, weight_init, sample_rate)
        LF.combined_target(torch.zeros(1), m1, m2, m3, gradient)
        self.s, self.m1, self.m2, self.m3, self.gradient = float(s), float(m1), float(m2), float(m3), gradient

    def compute_loss(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cos, local, _ = self.class_cosine(x, labels)
        return LF.combined_loss(cos, local, self.s, self.m1, self.m2, self.m3, self.gradient)
