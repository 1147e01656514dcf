"""VPL: variational prototype learning (Deng et al., CVPR 2021), insightface `recognition/vpl/vpl.py`.

Each class proxy is mixed with the most recent normalised feature of its class (a queue),
while that feature is fresh:

    λ_j = λ if T > T_0 and T − τ_j <= Δ else 0
    W̃_j = normalize((1 − λ_j)·Ŵ_j + λ_j·q_j)
    loss = ArcFace (s=64, m=0.5) or CosFace (s=64, m=0.4) on cos(x_i, W̃_j)

with T the training-forward counter and τ_j the iteration of class j's last queue write.
After the loss, q_y <- normalize(sg(x)) and τ_y <- T for the global batch, the last
occurrence of a label winning (methods.md §7.1). Defaults λ=0.15, T_0=8000, Δ=200.
Unlike the reference, the queue and counters are checkpointed and Partial-FC sampling is
allowed (only the sampled rows are mixed).
"""

from __future__ import annotations

import torch

from unitsface.heads.base import Head, register
from unitsface.heads.components import ClassProxies, FeatureQueue
from unitsface.losses import columns as LC
from unitsface.losses import functional as LF


@register("vpl")
class VPLHead(Head):
    """VPL on an ArcFace or CosFace base; the queue component holds `features`, `written`, `iteration`."""

    renamed = {"start_iter": "vpl_start_step"}

    def __init__(self, num_classes: int, embedding_size: int, base: str = "arcface", s: float = 64.0,
                 m: float | None = None, gradient: str = "exact", fallback: str = "hard",
                 vpl_lambda: float = 0.15, vpl_start_step: int = 8000, staleness: int = 200,
                 weight_init: str = "normal_001", sample_rate: float = 1.0) -> None:
        super().__init__(num_classes, embedding_size, sample_rate)
        if base not in ("arcface", "cosface"):
            raise ValueError(f"base must be 'arcface' or 'cosface', got {base!r}")
        if not 0.0 <= vpl_lambda <= 1.0:
            raise ValueError(f"vpl_lambda must be in [0, 1], got {vpl_lambda}")
        LF.arcface_target(torch.zeros(1), 0.0, gradient, fallback)  # validates the modes up front
        self.base, self.s, self.gradient, self.fallback = base, float(s), gradient, fallback
        self.m = float(m) if m is not None else (0.5 if base == "arcface" else 0.4)
        self.vpl_lambda, self.vpl_start_step, self.staleness = float(vpl_lambda), int(vpl_start_step), int(staleness)
        self.proxies = ClassProxies(self.shard, embedding_size, weight_init)
        self.queue = FeatureQueue(self.shard, embedding_size)
        self.spec = LC.ColumnSpec("softmax", self.s)

    def target(self, c: torch.Tensor) -> torch.Tensor:
        if self.base == "arcface":
            return LF.arcface_target(c, self.m, self.gradient, self.fallback)
        return LF.cosface_target(c, self.m)

    def compute_loss(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.queue.iteration += 1
        sample = self.columns_for(labels)  # one Partial FC draw for the proxies and the queue alike
        lam = self.queue.mixing(sample, self.vpl_lambda, self.vpl_start_step, self.staleness)
        # The engine mixes a chunk of rows at a time and is done with the queue when it returns: the write below
        # cannot reach this step's loss.
        mixture = LC.RowMixture(self.queue.rows(sample), lam)
        proxies = self.proxies.rows(sample)
        unit = LF.normalize(x)
        c_y = LC.target_cosine(unit, proxies, sample.labels, mixture=mixture)
        loss = LC.column_loss(unit, proxies, sample.labels, self.target(c_y), self.spec, mixture=mixture)
        if self.training:
            self.queue.write(x.detach(), labels)
        return loss
