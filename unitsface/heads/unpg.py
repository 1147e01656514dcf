"""UNPG: unified negative pair generation (Jung et al., arXiv 2203.11593).

The negative pairs of the batch (unordered, different labels, cosine of unit features) are
filtered by Tukey fences and appended as extra non-target columns to every row of the
base head's logits:

    S'_n = {v in S_n : Q1 − w·IQR <= v <= Q3 + w·IQR}     (truncated-index quartiles)
    L_i  = logaddexp(LSE_c z_ic, LSE_{v in S'_n} s·v) − s·φ_i

Official code Jung-Jun-Uk/UNPG `recognition/models/build.py`, `head.py` (methods.md §6).
The pair block is one LSE scalar per step, never B×K'. Bases: CosFace, ArcFace (§1.4
modes), MagFace (CE‖pairs + λ_g·ḡ, [unverified] composition: the reference has no MagFace
branch). UNPG adds no state; `last_num_pairs` / `last_num_kept` report the last step's
|S_n| and |S'_n|. W init is Xavier uniform as in the reference (MagFace's own for MagFace).
"""

from __future__ import annotations

import torch

from unitsface.heads.base import register
from unitsface.heads.magface import MagFaceHead
from unitsface.heads.margin import ArcFaceHead, CosFaceHead
from unitsface.losses import functional as LF


class PairMixin:
    """The UNPG classification term; base heads call `identity_loss` on their margin cosines."""

    s: float

    def init_pairs(self, whisker: float) -> None:
        if whisker < 0:
            raise ValueError(f"whisker must be >= 0, got {whisker}")
        self.whisker = float(whisker)
        self.last_num_pairs = 0
        self.last_num_kept = 0

    def identity_loss(
        self, margin_cos: torch.Tensor, x: torch.Tensor, labels: torch.Tensor, local: torch.Tensor
    ) -> torch.Tensor:
        loss, self.last_num_pairs, self.last_num_kept = LF.unpg_loss(
            margin_cos, x, labels, self.s, self.whisker, class_labels=local
        )
        return loss


@register("cosface_unpg")
class CosFaceUNPGHead(PairMixin, CosFaceHead):
    """CosFace + UNPG; m=0.5 as UNPG's `head.zoo.yaml` (methods.md §6.4), whisker 1.5 (MS1MV2)."""

    def __init__(self, num_classes: int, embedding_size: int, s: float = 64.0, m: float = 0.5,
                 whisker: float = 1.5, weight_init: str = "xavier", sample_rate: float = 1.0) -> None:
        super().__init__(num_classes, embedding_size, s, m, weight_init, sample_rate)
        self.init_pairs(whisker)

    def compute_loss(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cos, local, _ = self.class_cosine(x, labels)
        return self.identity_loss(cos - self.m * LF.target_mask(local, cos.shape[1]), x, labels, local)


@register("arcface_unpg")
class ArcFaceUNPGHead(PairMixin, ArcFaceHead):
    """ArcFace + UNPG, s=64, m=0.5. The reference's arccos has no fallback: `fallback="none"`."""

    def __init__(self, num_classes: int, embedding_size: int, s: float = 64.0, m: float = 0.5,
                 gradient: str = "exact", fallback: str = "hard", whisker: float = 1.5,
                 weight_init: str = "xavier", sample_rate: float = 1.0) -> None:
        super().__init__(num_classes, embedding_size, s, m, gradient, fallback, weight_init, sample_rate)
        self.init_pairs(whisker)

    def compute_loss(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cos, local, _ = self.class_cosine(x, labels)
        target = LF.arcface_target(LF.gather_target(cos, local), self.m, self.gradient, self.fallback)
        return self.identity_loss(LF.replace_target(cos, local, target), x, labels, local)


@register("magface_unpg")
class MagFaceUNPGHead(PairMixin, MagFaceHead):
    """MagFace + UNPG: CE(MagFace logits ‖ S'_n) + λ_g·mean g(a) (methods.md §6.4, [unverified]).

    W init "unit": the UNPG repository's MagFace keeps MagFace's own `MagLinear` init.
    """

    def __init__(self, num_classes: int, embedding_size: int, s: float = 64.0, l_margin: float = 0.45,
                 u_margin: float = 0.8, l_a: float = 10.0, u_a: float = 110.0, lambda_g: float = 35.0,
                 whisker: float = 1.5, weight_init: str = "unit", sample_rate: float = 1.0) -> None:
        super().__init__(num_classes, embedding_size, s, l_margin, u_margin, l_a, u_a, lambda_g,
                         weight_init, sample_rate)
        self.init_pairs(whisker)
