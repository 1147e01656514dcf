"""UNPG: unified negative pair generation (Jung et al., arXiv 2203.11593).

The negative pairs of the batch (unordered, different labels, cosine of unit features) are
filtered by Tukey fences and appended as extra non-target columns to every row of the
base head's logits:

    S'_n = {v in S_n : Q1 − w·IQR <= v <= Q3 + w·IQR}     (truncated-index quartiles)
    L_i  = logaddexp(LSE_c z_ic, LSE_{v in S'_n} s·v) − s·φ_i

Official code Jung-Jun-Uk/UNPG `recognition/models/build.py`, `head.py` (methods.md §6).
The pair block is one LSE scalar per step, the engine's extra logit, never B×K'. Bases:
CosFace, ArcFace (§1.4 modes), MagFace (CE‖pairs + λ_g·ḡ, [unverified] composition: the
reference has no MagFace branch). `pairs.last_num_pairs` / `pairs.last_num_kept` report the
last step's |S_n| and |S'_n|. W init is Xavier uniform as in the reference (MagFace's own for
MagFace).
"""

from __future__ import annotations

import torch

from unitsface.heads.base import Head, register
from unitsface.heads.components import ClassProxies, NegativePairs
from unitsface.losses import columns as LC
from unitsface.losses import functional as LF


class PairHead(Head):
    """A margin head whose softmax gets the batch's filtered negative pairs as one extra logit."""

    def __init__(self, num_classes: int, embedding_size: int, s: float, whisker: float, weight_init: str,
                 sample_rate: float) -> None:
        super().__init__(num_classes, embedding_size, sample_rate)
        self.s = float(s)
        self.proxies = ClassProxies(self.shard, embedding_size, weight_init)
        self.pairs = NegativePairs(whisker)
        self.spec = LC.ColumnSpec("softmax", self.s)

    @property
    def whisker(self) -> float:
        return self.pairs.whisker

    @property
    def last_num_pairs(self) -> int:
        return self.pairs.last_num_pairs

    @property
    def last_num_kept(self) -> int:
        return self.pairs.last_num_kept

    def target(self, c: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def extra_terms(self, x: torch.Tensor) -> torch.Tensor | float:
        return 0.0

    def compute_loss(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        sample = self.columns_for(labels)
        rows = self.proxies.rows(sample)
        unit, c_y = self.target_cosines(x, rows, sample)
        extra = self.pairs.extra_logit(x, labels, self.s)
        return LC.column_loss(unit, rows, sample.labels, self.target(c_y, x), self.spec, extra=extra) \
            + self.extra_terms(x)


@register("cosface_unpg")
class CosFaceUNPGHead(PairHead):
    """CosFace + UNPG; m=0.5 as UNPG's `head.zoo.yaml` (methods.md §6.4), whisker 1.5 (MS1MV2)."""

    def __init__(self, num_classes: int, embedding_size: int, s: float = 64.0, m: float = 0.5,
                 whisker: float = 1.5, weight_init: str = "xavier", sample_rate: float = 1.0) -> None:
        super().__init__(num_classes, embedding_size, s, whisker, weight_init, sample_rate)
        self.m = float(m)

    def target(self, c: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return LF.cosface_target(c, self.m)


@register("arcface_unpg")
class ArcFaceUNPGHead(PairHead):
    """ArcFace + UNPG, s=64, m=0.5 (`fallback="none"` is the reference's arccos without fallback)."""

    def __init__(self, num_classes: int, embedding_size: int, s: float = 64.0, m: float = 0.5,
                 gradient: str = "exact", fallback: str = "hard", whisker: float = 1.5,
                 weight_init: str = "xavier", sample_rate: float = 1.0) -> None:
        super().__init__(num_classes, embedding_size, s, whisker, weight_init, sample_rate)
        LF.arcface_target(torch.zeros(1), m, gradient, fallback)  # validates the modes up front
        self.m, self.gradient, self.fallback = float(m), gradient, fallback

    def target(self, c: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return LF.arcface_target(c, self.m, self.gradient, self.fallback)


@register("magface_unpg")
class MagFaceUNPGHead(PairHead):
    """MagFace + UNPG: CE(MagFace logits ‖ S'_n) + λ_g·mean g(a) (methods.md §6.4, [unverified]).

    W init "unit": the UNPG repository's MagFace keeps MagFace's own `MagLinear` init.
    """

    def __init__(self, num_classes: int, embedding_size: int, s: float = 64.0, l_margin: float = 0.45,
                 u_margin: float = 0.8, l_a: float = 10.0, u_a: float = 110.0, lambda_g: float = 35.0,
                 whisker: float = 1.5, weight_init: str = "unit", sample_rate: float = 1.0) -> None:
        super().__init__(num_classes, embedding_size, s, whisker, weight_init, sample_rate)
        LF.check_magface(s, l_margin, u_margin, l_a, u_a, lambda_g)
        self.magnitudes = LF.MagFaceMagnitudes(l_margin, u_margin, l_a, u_a, lambda_g)

    def target(self, c: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.magnitudes.target(c, x)

    def extra_terms(self, x: torch.Tensor) -> torch.Tensor:
        return self.magnitudes.regularizer(x)
