"""EPL: empirical prototype learning (arXiv 2405.12447), official code WakingHours-GitHub/EPL
`head_EPL.py`, `train_with_stepLR.py` (methods.md §5).

A bank Q (C×d, no gradient) tracks each identity's features. On every training forward,
before the loss, for each sample (global batch, all rows reading the old Q):

    ẽ = normalize(sg(x)),  a = <Q_y, ẽ>,  α = g(a) (softsign by default)
    Q_y <- normalize(α·Q_y + (1 − α)·ẽ)            (last occurrence of a label wins)

From epoch index `start_epoch` (3) the EP rows v_ij = <e_i, sg(Q̂_j)>, with the adaptive
target v'_iy = v_iy − k·sg(v_iy), are stacked under the classifier rows:

    L = ½(L_W + L_EP)   (stack_weight="half", the reference's mean over 2B rows)

Variants: `cosface_epl` (CosFace rows, EP rows without fixed margin), `arcface_epl`
(straight-through ArcFace, m=0.4, the margin also on the EP rows), `uce_epl` (UCE with one
shared scalar bias on both blocks, the reference's [−s, s] clamp). Every row has one
positive, so the EPL criterion log(1 + Σ_neg e^z · Σ_pos e^−z) is exactly CE, computed as
LSE − target (the stable form of §5.5).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from unitsface.heads.base import ClassifierHead, register, write_rows
from unitsface.heads.uniface import BiasThresholds, clamp_mode, uce_thresholds
from unitsface.losses import functional as LF


class PrototypeHead(ClassifierHead):
    """The EPL machinery: the `prototypes` bank, its update, the EP rows and their stacking."""

    def __init__(self, num_classes: int, embedding_size: int, s: float, m: float, k: float, start_epoch: int,
                 alpha: str, bank_init: str, update: str, stack_weight: str, weight_init: str,
                 sample_rate: float) -> None:
        super().__init__(num_classes, embedding_size, weight_init, sample_rate)
        LF.prototype_gate(torch.zeros(1), alpha)  # validates the gate name up front
        for name, value, allowed in (("bank_init", bank_init, ("reference", "unit")),
                                     ("update", update, ("before_loss", "after_loss")),
                                     ("stack_weight", stack_weight, ("half", "sum"))):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
        self.s, self.m, self.k, self.start_epoch = float(s), float(m), float(k), int(start_epoch)
        self.alpha, self.update, self.stack_weight = alpha, update, stack_weight
        # The reference bank is N(0, 1), not normalised: the first write to a row is dominated by it.
        bank = torch.randn(self.shard.size, embedding_size)
        self.register_buffer("prototypes", LF.normalize(bank) if bank_init == "unit" else bank)

    @torch.no_grad()
    def update_prototypes(self, x: torch.Tensor, labels: torch.Tensor) -> None:
        """Gated moving prototype of §5.2: parallel read of the old rows, last writer wins."""
        local = self.shard.local_labels(labels)
        e = LF.normalize(x)
        old = self.prototypes[local.clamp(min=0)]
        gate = LF.prototype_gate((old * e).sum(dim=1), self.alpha).unsqueeze(1)
        write_rows(self.prototypes, local, LF.normalize(gate * old + (1.0 - gate) * e))

    def classifier_loss(self, cos: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def prototype_loss(self, v: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def compute_loss(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        sample = self.columns_for(labels)  # one Partial FC draw for `weight` and `prototypes` alike
        cos, local = LF.cosine(x, sample.take(self.weight)), sample.labels
        if self.training and self.update == "before_loss":
            self.update_prototypes(x, labels)  # the real rows, sampled or not
        loss = self.classifier_loss(cos, local)
        if self.epoch >= self.start_epoch:
            v = LF.adaptive_prototype_margin(LF.cosine(x, sample.take(self.prototypes)), local, self.k)
            ep = self.prototype_loss(v, local)
            loss = 0.5 * (loss + ep) if self.stack_weight == "half" else loss + ep
        if self.training and self.update == "after_loss":
            self.update_prototypes(x, labels)
        return loss


@register("cosface_epl")
class CosFaceEPLHead(PrototypeHead):
    """`CosFace_EPL`, the reference's default head: s=64, m=0.4, k=0.7, EP from epoch index 3."""

    def __init__(self, num_classes: int, embedding_size: int, s: float = 64.0, m: float = 0.4, k: float = 0.7,
                 start_epoch: int = 3, alpha: str = "softsign", bank_init: str = "reference",
                 update: str = "before_loss", stack_weight: str = "half", weight_init: str = "normal",
                 sample_rate: float = 1.0) -> None:
        super().__init__(num_classes, embedding_size, s, m, k, start_epoch, alpha, bank_init, update,
                         stack_weight, weight_init, sample_rate)

    def classifier_loss(self, cos: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
        return LF.cosface_loss(cos, local, self.s, self.m)

    def prototype_loss(self, v: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
        return LF.normface_loss(v, local, self.s)  # the adaptive margin only, no fixed m


@register("arcface_epl")
class ArcFaceEPLHead(PrototypeHead):
    """`Arcface_EPL`: straight-through ArcFace (m=0.4, no fallback) on both blocks."""

    def __init__(self, num_classes: int, embedding_size: int, s: float = 64.0, m: float = 0.4, k: float = 0.7,
                 start_epoch: int = 3, alpha: str = "softsign", bank_init: str = "reference",
                 update: str = "before_loss", stack_weight: str = "half", gradient: str = "straight_through",
                 fallback: str = "none", weight_init: str = "normal", sample_rate: float = 1.0) -> None:
        super().__init__(num_classes, embedding_size, s, m, k, start_epoch, alpha, bank_init, update,
                         stack_weight, weight_init, sample_rate)
        LF.arcface_target(torch.zeros(1), m, gradient, fallback)  # validates the modes up front
        self.gradient, self.fallback = gradient, fallback

    def classifier_loss(self, cos: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
        return LF.arcface_loss(cos, local, self.s, self.m, self.gradient, self.fallback)

    prototype_loss = classifier_loss  # the EP target carries the adaptive and the angular margin


@register("uce_epl")
class UCEEPLHead(BiasThresholds, PrototypeHead):
    """`Uniface_EPL`: UCE with one learnable scalar `bias` shared by both blocks, b0 = log(10·C·r)."""

    def __init__(self, num_classes: int, embedding_size: int, s: float = 64.0, m: float = 0.4, k: float = 0.7,
                 start_epoch: int = 3, alpha: str = "softsign", bank_init: str = "reference",
                 update: str = "before_loss", stack_weight: str = "half", bias_init: float | None = None,
                 neg_weight: float = 1.0, clamp: bool | str = True, weight_init: str = "normal",
                 sample_rate: float = 1.0) -> None:
        super().__init__(num_classes, embedding_size, s, m, k, start_epoch, alpha, bank_init, update,
                         stack_weight, weight_init, sample_rate)
        if bias_init is None:
            bias_init = math.log(10.0 * num_classes * sample_rate)  # UniFace code; r-aware (§3.2)
        self.bias = nn.Parameter(torch.tensor([float(bias_init)]))
        self.neg_weight, self.clamp = float(neg_weight), clamp_mode(clamp)

    def learned_thresholds(self) -> dict[str, float]:
        return uce_thresholds(float(self.bias.detach()), self.s, self.num_classes)

    def classifier_loss(self, cos: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
        return LF.threshold_bce_loss(cos, local, self.bias, self.s, self.m, self.neg_weight, self.clamp)

    prototype_loss = classifier_loss  # the same b and fixed m on top of the adaptive margin (§5.4)
