"""AnchorFace: a margin loss plus a differentiable TAR and FAR at a chosen "anchor" FAR (Liu, Qin, Wu, Liang,
"AnchorFace: Boosting TAR@FAR for Practical Face Recognition", AAAI 2022; no public code).

    L = L_margin + λ2·(1 − TAR_soft) + λ1·max(0, FAR_soft − FAR_anchor)
    TAR_soft = mean_{positive pairs} σ((s − t̂)/τ),   FAR_soft = mean_{negative pairs} σ((s − t̂)/τ)
    t̂ = the exact (1 − FAR_anchor) quantile of the negative similarities (detached)

The pairs are the global batch against itself (i < j) and against an online feature set S (K features per
identity, each valid for M steps: `components.FeatureSet`), written after the loss. Known from the paper: the
pairs from the batch and S, the soften function, K = 5, M = 1000, τ = 0.01, λ1 = 1000, a margin loss underneath.
Everything else is a [lib] reconstruction [unverified], listed in docs/methods.md "AnchorFace": FAR_anchor = 1e-4,
λ2 = 1, t̂ detached, pooled pair means, duplicates, what happens before S holds anything, distributed behaviour.
Bases: CosFace (s=64, m=0.4) and ArcFace (s=64, m=0.5) through the column-loss engine; the pairs against S are
streamed by `columns.stored_pair_sums` (memory proportional to the shard, gradients accumulated in the forward).
"""

from __future__ import annotations

import torch

from unitsface.heads.base import Head, register
from unitsface.heads.components import ClassProxies, ColumnSample, FeatureSet
from unitsface.losses import columns as LC
from unitsface.losses import functional as LF


class AnchorHead(Head):
    """Class proxies with a margin softmax, the feature set S, and the anchor TAR/FAR terms."""

    def __init__(self, num_classes: int, embedding_size: int, s: float, far_anchor: float, lambda_far: float,
                 lambda_tar: float, tau: float, features_per_identity: int, valid_steps: int, weight_init: str,
                 sample_rate: float) -> None:
        super().__init__(num_classes, embedding_size, sample_rate)
        if not 0.0 < far_anchor < 1.0:
            raise ValueError(f"far_anchor must be in (0, 1), got {far_anchor}")
        if tau <= 0 or lambda_far < 0 or lambda_tar < 0:
            raise ValueError(f"tau must be > 0 and the lambdas >= 0, got tau={tau}, lambda_far={lambda_far}, "
                             f"lambda_tar={lambda_tar}")
        self.s, self.far_anchor, self.tau = float(s), float(far_anchor), float(tau)
        self.lambda_far, self.lambda_tar = float(lambda_far), float(lambda_tar)
        self.proxies = ClassProxies(self.shard, embedding_size, weight_init)
        self.stored = FeatureSet(self.shard, embedding_size, features_per_identity, valid_steps)
        self.spec = LC.ColumnSpec("softmax", self.s)
        # The last step's t̂, TAR_soft, FAR_soft and pair counts, left on the device until the trainer logs them.
        self.last_stats: dict[str, torch.Tensor | float] = {}

    def target(self, c: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def anchor_terms(self, unit: torch.Tensor, labels: torch.Tensor, sample: ColumnSample) -> torch.Tensor:
        """λ2·(1 − TAR_soft) + λ1·max(0, FAR_soft − FAR_anchor) over the batch's pairs and its pairs with S.

        The batch block is the same on every rank, so its gradient is counted once (D1); the S block is summed
        over the class shards. No negative pair (one identity, nothing stored): no threshold, no term. No
        positive pair: TAR_soft counts as 1 (nothing to accept)."""
        per = self.stored.per_identity
        rows, valid = self.stored.rows(sample), self.stored.valid(sample)
        similarity, same = LF.anchor_pairs(unit, labels)
        stored_pos, stored_neg = LC.stored_pair_counts(sample.labels, valid, per)
        num_pos, num_neg = int(same.sum()) + stored_pos, int((~same).sum()) + stored_neg
        if num_neg == 0:
            self.last_stats = {"positive_pairs": float(num_pos), "negative_pairs": 0.0}
            return unit.sum() * 0.0
        k = LF.far_rank(num_neg, self.far_anchor) + 1
        candidates = torch.cat([similarity.detach()[~same],
                                LC.top_stored_negatives(unit.detach(), rows, sample.labels, per, valid, k)])
        threshold = LF.anchor_threshold(candidates, self.far_anchor, num_neg)
        accept = LF.soft_accept(similarity, threshold, self.tau)
        batch_sums = LF.count_once(torch.stack([accept[same].sum(), accept[~same].sum()]))
        sums = batch_sums + LC.stored_pair_sums(unit, rows, sample.labels, valid, per, threshold, self.tau)
        tar = sums[0] / num_pos if num_pos else sums.new_ones(())
        far = sums[1] / num_neg
        self.last_stats = {"anchor_threshold": threshold.detach(), "tar_soft": tar.detach(),
                           "far_soft": far.detach(), "positive_pairs": float(num_pos),
                           "negative_pairs": float(num_neg)}
        return LF.anchor_penalty(tar, far, self.far_anchor, self.lambda_far, self.lambda_tar)

    def compute_loss(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        sample = self.columns_for(labels)  # one Partial FC draw for the proxies and S alike
        rows = self.proxies.rows(sample)
        unit, c_y = self.target_cosines(x, rows, sample)
        loss = LC.column_loss(unit, rows, sample.labels, self.target(c_y), self.spec)
        loss = loss + self.anchor_terms(unit, labels, sample)
        if self.training:
            self.stored.remember(unit, labels)  # after the loss: a sample never pairs with itself
        return loss


@register("cosface_anchor")
class CosFaceAnchorHead(AnchorHead):
    """CosFace (s=64, m=0.4) + AnchorFace: FAR_anchor 1e-4, λ1 = 1000, λ2 = 1, τ = 0.01, K = 5, M = 1000."""

    def __init__(self, num_classes: int, embedding_size: int, s: float = 64.0, m: float = 0.4,
                 far_anchor: float = 1e-4, lambda_far: float = 1000.0, lambda_tar: float = 1.0, tau: float = 0.01,
                 features_per_identity: int = 5, valid_steps: int = 1000, weight_init: str = "normal",
                 sample_rate: float = 1.0) -> None:
        super().__init__(num_classes, embedding_size, s, far_anchor, lambda_far, lambda_tar, tau,
                         features_per_identity, valid_steps, weight_init, sample_rate)
        self.m = float(m)

    def target(self, c: torch.Tensor) -> torch.Tensor:
        return LF.cosface_target(c, self.m)


@register("arcface_anchor")
class ArcFaceAnchorHead(AnchorHead):
    """ArcFace (s=64, m=0.5; §1.4 gradient modes) + AnchorFace, with the defaults of `cosface_anchor`."""

    def __init__(self, num_classes: int, embedding_size: int, s: float = 64.0, m: float = 0.5,
                 gradient: str = "exact", fallback: str = "hard", far_anchor: float = 1e-4,
                 lambda_far: float = 1000.0, lambda_tar: float = 1.0, tau: float = 0.01,
                 features_per_identity: int = 5, valid_steps: int = 1000, weight_init: str = "normal",
                 sample_rate: float = 1.0) -> None:
        super().__init__(num_classes, embedding_size, s, far_anchor, lambda_far, lambda_tar, tau,
                         features_per_identity, valid_steps, weight_init, sample_rate)
        LF.arcface_target(torch.zeros(1), m, gradient, fallback)  # validates the modes up front
        self.m, self.gradient, self.fallback = float(m), gradient, fallback

    def target(self, c: torch.Tensor) -> torch.Tensor:
        return LF.arcface_target(c, self.m, self.gradient, self.fallback)
