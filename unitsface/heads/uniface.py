"""UniFace heads: unified-threshold BCE (UCE) and BCE with one bias per class.

    uce: L_i = sp(−(s(c_iy − m) − b)) + λ·Σ_{j≠y} sp(s·c_ij − b),   b one scalar
    bce: L_i = sp(−(s(c_iy − m) − b_y)) + λ·Σ_{j≠y} sp(s·c_ij − b_j), b ∈ R^C
summed over classes, mean over the batch (Zhou et al., "UniFace: Unified Cross-Entropy
Loss", ICCV 2023, Eqs. 23, 31, 32 and supplementary s17; official code CVI-SZU/UniFace
`head.py`). Formulas and defaults: methods.md §3.
"""

from __future__ import annotations

import torch

from unitsface.heads.base import Head, clamp_mode, register
from unitsface.heads.components import ClassProxies, LearnedBias, uniface_bias_start
from unitsface.losses import columns as LC
from unitsface.losses import functional as LF


class ThresholdBCEHead(Head):
    """Class proxies + a learned threshold bias, sampled columns included (methods.md §3.1–3.3)."""

    renamed = {"neg_weight": "lam"}

    def __init__(self, num_classes: int, embedding_size: int, per_class: bool, s: float, m: float,
                 lam: float, sample_rate: float, bias_init: float | None, clamp: bool | str,
                 weight_init: str) -> None:
        super().__init__(num_classes, embedding_size, sample_rate)
        self.s, self.m, self.lam = float(s), float(m), float(lam)
        self.proxies = ClassProxies(self.shard, embedding_size, weight_init)
        # A per-class bias is sharded with the proxies, like any per-class state (D2).
        self.bias = LearnedBias(self.shard, per_class, uniface_bias_start(num_classes, self.sample_rate, bias_init),
                                self.s)
        self.spec = LC.ColumnSpec("bce", self.s, lam=self.lam, clamp=clamp_mode(clamp))

    @property
    def clamp(self) -> bool:
        return self.spec.clamp

    def compute_loss(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        sample = self.columns_for(labels)
        rows = self.proxies.rows(sample)
        unit, c_y = self.target_cosines(x, rows, sample)
        return LC.column_loss(unit, rows, sample.labels, LF.cosface_target(c_y, self.m), self.spec,
                              bias=self.bias.columns(sample))


@register("uce")
class UCEHead(ThresholdBCEHead):
    """UniFace UCE: one unified bias, s=64, m=0.4, λ=`lam`, r=`sample_rate` (§3.1, §3.2).

    `threshold` is t_raw = b/s (the UniTSFace convention); `threshold_uce` the UniFace one.
    """

    def __init__(self, num_classes: int, embedding_size: int, s: float = 64.0, m: float = 0.4,
                 lam: float = 1.0, sample_rate: float = 1.0, bias_init: float | None = None,
                 clamp: bool | str = False, weight_init: str = "normal") -> None:
        super().__init__(num_classes, embedding_size, False, s, m, lam, sample_rate, bias_init, clamp, weight_init)

    @property
    def threshold_uce(self) -> float:
        """t_uce = (b − log(C − 1))/s, from UniFace's b̃ = s·t + log(N − 1) (methods.md §3.1, §8 #8)."""
        return self.learned_thresholds()["(b - log(C-1))/s"]

    def learned_thresholds(self) -> dict[str, float]:
        return self.bias.uce_conventions(self.num_classes)


@register("bce")
class PerClassBCEHead(ThresholdBCEHead):
    """BCE with one bias per class (diverse thresholds), each starting at log(10·C·r) (§3.3)."""

    def __init__(self, num_classes: int, embedding_size: int, s: float = 64.0, m: float = 0.4,
                 lam: float = 1.0, sample_rate: float = 1.0, bias_init: float | None = None,
                 clamp: bool | str = False, weight_init: str = "normal") -> None:
        super().__init__(num_classes, embedding_size, True, s, m, lam, sample_rate, bias_init, clamp, weight_init)
