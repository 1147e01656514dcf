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

from unitsface.heads.base import ClassifierHead, register
from unitsface.losses import functional as LF


@register("magface")
class MagFaceHead(ClassifierHead):
    """MagFace, s=64, margins 0.45–0.8 over magnitudes 10–110, λ_g=35; W init "unit" as the reference."""

    def __init__(self, num_classes: int, embedding_size: int, s: float = 64.0, l_margin: float = 0.45,
                 u_margin: float = 0.8, l_a: float = 10.0, u_a: float = 110.0, lambda_g: float = 35.0,
                 weight_init: str = "unit", sample_rate: float = 1.0) -> None:
        super().__init__(num_classes, embedding_size, weight_init, sample_rate)
        if not 0.0 < l_a < u_a:
            raise ValueError(f"MagFace needs 0 < l_a < u_a, got l_a={l_a}, u_a={u_a}")
        bound = LF.magface_lambda_bound(s, l_margin, u_margin, l_a, u_a)
        if lambda_g < bound:
            raise ValueError(
                f"lambda_g={lambda_g} is below MagFace's feasibility bound {bound:.2f} for these s, margins "
                f"and magnitudes (methods.md §1.7)"
            )
        self.s, self.l_margin, self.u_margin = float(s), float(l_margin), float(u_margin)
        self.l_a, self.u_a, self.lambda_g = float(l_a), float(u_a), float(lambda_g)

    def margin_terms(self, x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(cosines with the magnitude-aware margin on the target, local labels, mean g(a))."""
        cos, local, _ = self.class_cosine(x, labels)
        a = torch.linalg.vector_norm(x, dim=1).clamp(self.l_a, self.u_a)  # fp32 norm (N4)
        margin = self.l_margin + (self.u_margin - self.l_margin) / (self.u_a - self.l_a) * (a - self.l_a)
        target = LF.magface_target(LF.gather_target(cos, local), margin)
        # Every rank sees the whole global batch: count the regulariser's gradient once (D1).
        regularizer = LF.count_once(LF.magface_regularizer(a, self.u_a).mean())
        return LF.replace_target(cos, local, target), local, regularizer

    def identity_loss(
        self, margin_cos: torch.Tensor, x: torch.Tensor, labels: torch.Tensor, local: torch.Tensor
    ) -> torch.Tensor:
        """The classification term on the margin cosines (UNPG swaps in its pair-augmented CE)."""
        return LF.cross_entropy_rows(self.s * margin_cos, local).mean()

    def compute_loss(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        margin_cos, local, regularizer = self.margin_terms(x, labels)
        return self.identity_loss(margin_cos, x, labels, local) + self.lambda_g * regularizer
