"""UniFace heads: unified-threshold BCE (UCE) and BCE with one bias per class.

    uce: L_i = sp(−(s(c_iy − m) − b)) + λ·Σ_{j≠y} sp(s·c_ij − b),   b one scalar
    bce: L_i = sp(−(s(c_iy − m) − b_y)) + λ·Σ_{j≠y} sp(s·c_ij − b_j), b ∈ R^C
summed over classes, mean over the batch (Zhou et al., "UniFace: Unified Cross-Entropy
Loss", ICCV 2023, Eqs. 23, 31, 32 and supplementary s17; official code CVI-SZU/UniFace
`head.py`). Formulas and defaults: methods.md §3.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from unitsface.heads.base import ClassifierHead, register
from unitsface.losses import functional as LF


def clamp_mode(clamp: bool | str) -> bool:
    """The references' [−s, s] argument clamp: True / "reference", or False / "none" (methods.md §3.5)."""
    modes = {True: True, False: False, "reference": True, "none": False}
    if not isinstance(clamp, (bool, str)) or clamp not in modes:
        raise ValueError(f"clamp must be true, false, 'reference' or 'none', got {clamp!r}")
    return modes[clamp]


class BiasThresholds:
    """Thresholds in cosine units read from a learned bias: t = b/s (methods.md §2.7, §3.1)."""

    bias: nn.Parameter
    s: float

    @property
    def threshold(self) -> float | None:
        """The unified threshold b/s; None for per-class biases, which have no single one."""
        return float(self.bias.detach()) / self.s if self.bias.numel() == 1 else None

    @property
    def thresholds(self) -> torch.Tensor:
        """t_j = b_j/s for this shard's classes (one value for a unified bias)."""
        return self.bias.detach() / self.s


def uce_thresholds(bias: float, s: float, num_classes: int) -> dict[str, float]:
    """Both UCE conventions (methods.md §3.1, §8 #8): t_raw = b/s, the UniTSFace one and the primary, and
    t_uce = (b − log(C − 1))/s from UniFace's b̃ = s·t + log(N − 1); the paper does not say which it reports."""
    return {"b/s": bias / s, "(b - log(C-1))/s": (bias - math.log(num_classes - 1)) / s}


class ThresholdBCEHead(BiasThresholds, ClassifierHead):
    """Class proxies + a learned threshold bias, sampled columns included (methods.md §3.1–3.3).

    The default bias b0 = log(10·C·r) puts the negatives of an all-zero cosine matrix at about
    0.1 nat in total; r is the sampling rate, because only C·r columns are summed.
    """

    def __init__(self, num_classes: int, embedding_size: int, per_class: bool, s: float, m: float,
                 neg_weight: float, sample_rate: float, bias_init: float | None, clamp: bool | str,
                 weight_init: str) -> None:
        super().__init__(num_classes, embedding_size, weight_init, sample_rate)
        self.s, self.m, self.neg_weight, self.clamp = float(s), float(m), float(neg_weight), clamp_mode(clamp)
        b0 = math.log(10.0 * num_classes * self.sample_rate) if bias_init is None else float(bias_init)
        # A per-class bias is sharded with the proxies, like any per-class state (D2).
        self.bias = nn.Parameter(torch.full((self.shard.size if per_class else 1,), b0))

    def compute_loss(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cos, local, columns = self.class_cosine(x, labels)
        bias = self.bias if columns is None or self.bias.numel() == 1 else self.bias[columns]
        return LF.threshold_bce_loss(cos, local, bias, self.s, self.m, self.neg_weight, self.clamp)


@register("uce")
class UCEHead(ThresholdBCEHead):
    """UniFace UCE: one unified bias, s=64, m=0.4, λ=`neg_weight`, r=`sample_rate` (§3.1, §3.2).

    `threshold` is t_raw = b/s (the UniTSFace convention); `threshold_uce` the UniFace one.
    """

    def __init__(self, num_classes: int, embedding_size: int, s: float = 64.0, m: float = 0.4,
                 neg_weight: float = 1.0, sample_rate: float = 1.0, bias_init: float | None = None,
                 clamp: bool | str = False, weight_init: str = "normal") -> None:
        super().__init__(num_classes, embedding_size, False, s, m, neg_weight, sample_rate, bias_init, clamp,
                         weight_init)

    @property
    def threshold_uce(self) -> float:
        """t_uce = (b − log(C − 1))/s, from UniFace's b̃ = s·t + log(N − 1) (methods.md §3.1, §8 #8)."""
        return self.learned_thresholds()["(b - log(C-1))/s"]

    def learned_thresholds(self) -> dict[str, float]:
        return uce_thresholds(float(self.bias.detach()), self.s, self.num_classes)


@register("bce")
class PerClassBCEHead(ThresholdBCEHead):
    """BCE with one bias per class (diverse thresholds), each starting at log(10·C·r) (§3.3)."""

    def __init__(self, num_classes: int, embedding_size: int, s: float = 64.0, m: float = 0.4,
                 neg_weight: float = 1.0, sample_rate: float = 1.0, bias_init: float | None = None,
                 clamp: bool | str = False, weight_init: str = "normal") -> None:
        super().__init__(num_classes, embedding_size, True, s, m, neg_weight, sample_rate, bias_init, clamp,
                         weight_init)
