"""EPL: empirical prototype learning (arXiv 2405.12447), official code WakingHours-GitHub/EPL
`head_EPL.py`, `train_with_stepLR.py` (methods.md §5).

A bank Q (C×d, no gradient) tracks each identity's features. On every training forward,
before the loss, for each sample (global batch, all rows reading the old Q):

    ẽ = normalize(sg(x)),  a = <Q_y, ẽ>,  α = g(a) (softsign by default)
    Q_y <- normalize(α·Q_y + (1 − α)·ẽ)            (last occurrence of a label wins)

From epoch index `ep_start_epoch` (3) the EP rows v_ij = <e_i, sg(Q̂_j)>, with the adaptive
target v'_iy = v_iy − k·sg(v_iy), are stacked under the classifier rows:

    L = ½(L_W + L_EP)   (stack_weight="half", the reference's mean over 2B rows)

Variants: `cosface_epl` (CosFace rows, EP rows without fixed margin), `arcface_epl`
(straight-through ArcFace, m=0.4, the margin also on the EP rows), `uce_epl` (UCE with one
shared scalar bias on both blocks, the reference's [−s, s] clamp). Every row has one
positive, so the EPL criterion log(1 + Σ_neg e^z · Σ_pos e^−z) is exactly CE, computed as
LSE − target (the stable form of §5.5). Both blocks go through the column-loss engine.
"""

from __future__ import annotations

import torch

from unitsface.heads.base import Head, clamp_mode, register
from unitsface.heads.components import ClassProxies, LearnedBias, PrototypeBank, uniface_bias_start
from unitsface.losses import columns as LC
from unitsface.losses import functional as LF


class PrototypeHead(Head):
    """The EPL machinery: the prototype bank, its update, the EP rows and their stacking."""

    renamed = {"start_epoch": "ep_start_epoch"}

    def __init__(self, num_classes: int, embedding_size: int, s: float, m: float, k: float, ep_start_epoch: int,
                 alpha: str, bank_init: str, update: str, stack_weight: str, weight_init: str,
                 sample_rate: float, spec: LC.ColumnSpec) -> None:
        super().__init__(num_classes, embedding_size, sample_rate)
        for name, value, allowed in (("update", update, ("before_loss", "after_loss")),
                                     ("stack_weight", stack_weight, ("half", "sum"))):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
        self.s, self.m, self.k, self.ep_start_epoch = float(s), float(m), float(k), int(ep_start_epoch)
        self.update, self.stack_weight, self.spec = update, stack_weight, spec
        self.proxies = ClassProxies(self.shard, embedding_size, weight_init)
        self.prototypes = PrototypeBank(self.shard, embedding_size, alpha, bank_init)

    def classifier_target(self, c: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def prototype_target(self, v: torch.Tensor) -> torch.Tensor:
        """The EP target: the adaptive margin v − k·sg(v) (§5.3), and the variant's fixed margin on top."""
        raise NotImplementedError

    def block_loss(self, x: torch.Tensor, rows: torch.Tensor, sample, target) -> torch.Tensor:  # noqa: ANN001
        bias = self.bias.columns(sample) if isinstance(getattr(self, "bias", None), LearnedBias) else None
        unit, c_y = self.target_cosines(x, rows, sample)
        return LC.column_loss(unit, rows, sample.labels, target(c_y), self.spec, bias=bias)

    def compute_loss(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        sample = self.columns_for(labels)  # one Partial FC draw for the proxies and the prototypes alike
        if self.training and self.update == "before_loss":
            self.prototypes.update(x, labels)  # the real rows, sampled or not
        loss = self.block_loss(x, self.proxies.rows(sample), sample, self.classifier_target)
        if self.epoch >= self.ep_start_epoch:
            ep = self.block_loss(x, self.prototypes.rows(sample), sample, self.prototype_target)
            loss = 0.5 * (loss + ep) if self.stack_weight == "half" else loss + ep
        if self.training and self.update == "after_loss":
            self.prototypes.update(x, labels)
        return loss


@register("cosface_epl")
class CosFaceEPLHead(PrototypeHead):
    """`CosFace_EPL`, the reference's default head: s=64, m=0.4, k=0.7, EP from epoch index 3."""

    def __init__(self, num_classes: int, embedding_size: int, s: float = 64.0, m: float = 0.4, k: float = 0.7,
                 ep_start_epoch: int = 3, alpha: str = "softsign", bank_init: str = "reference",
                 update: str = "before_loss", stack_weight: str = "half", weight_init: str = "normal",
                 sample_rate: float = 1.0) -> None:
        super().__init__(num_classes, embedding_size, s, m, k, ep_start_epoch, alpha, bank_init, update,
                         stack_weight, weight_init, sample_rate, LC.ColumnSpec("softmax", float(s)))

    def classifier_target(self, c: torch.Tensor) -> torch.Tensor:
        return LF.cosface_target(c, self.m)

    def prototype_target(self, v: torch.Tensor) -> torch.Tensor:
        return LF.adaptive_margin_target(v, self.k)  # the adaptive margin only, no fixed m


@register("arcface_epl")
class ArcFaceEPLHead(PrototypeHead):
    """`Arcface_EPL`: straight-through ArcFace (m=0.4, no fallback) on both blocks."""

    def __init__(self, num_classes: int, embedding_size: int, s: float = 64.0, m: float = 0.4, k: float = 0.7,
                 ep_start_epoch: int = 3, alpha: str = "softsign", bank_init: str = "reference",
                 update: str = "before_loss", stack_weight: str = "half", gradient: str = "straight_through",
                 fallback: str = "none", weight_init: str = "normal", sample_rate: float = 1.0) -> None:
        super().__init__(num_classes, embedding_size, s, m, k, ep_start_epoch, alpha, bank_init, update,
                         stack_weight, weight_init, sample_rate, LC.ColumnSpec("softmax", float(s)))
        LF.arcface_target(torch.zeros(1), m, gradient, fallback)  # validates the modes up front
        self.gradient, self.fallback = gradient, fallback

    def classifier_target(self, c: torch.Tensor) -> torch.Tensor:
        return LF.arcface_target(c, self.m, self.gradient, self.fallback)

    def prototype_target(self, v: torch.Tensor) -> torch.Tensor:
        return self.classifier_target(LF.adaptive_margin_target(v, self.k))  # adaptive and angular margin


@register("uce_epl")
class UCEEPLHead(PrototypeHead):
    """`Uniface_EPL`: UCE with one learnable scalar bias shared by both blocks, b0 = log(10·C·r)."""

    renamed = {"start_epoch": "ep_start_epoch", "neg_weight": "lam"}

    def __init__(self, num_classes: int, embedding_size: int, s: float = 64.0, m: float = 0.4, k: float = 0.7,
                 ep_start_epoch: int = 3, alpha: str = "softsign", bank_init: str = "reference",
                 update: str = "before_loss", stack_weight: str = "half", bias_init: float | None = None,
                 lam: float = 1.0, clamp: bool | str = True, weight_init: str = "normal",
                 sample_rate: float = 1.0) -> None:
        spec = LC.ColumnSpec("bce", float(s), lam=float(lam), clamp=clamp_mode(clamp))
        super().__init__(num_classes, embedding_size, s, m, k, ep_start_epoch, alpha, bank_init, update,
                         stack_weight, weight_init, sample_rate, spec)
        self.lam = float(lam)
        self.bias = LearnedBias(self.shard, False, uniface_bias_start(num_classes, self.sample_rate, bias_init),
                                self.s)

    @property
    def clamp(self) -> bool:
        return self.spec.clamp

    def learned_thresholds(self) -> dict[str, float]:
        return self.bias.uce_conventions(self.num_classes)

    def classifier_target(self, c: torch.Tensor) -> torch.Tensor:
        return LF.cosface_target(c, self.m)

    def prototype_target(self, v: torch.Tensor) -> torch.Tensor:
        return self.classifier_target(LF.adaptive_margin_target(v, self.k))  # the same b and m, adaptive margin
