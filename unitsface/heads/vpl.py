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

from unitsface.heads.base import ClassifierHead, register, write_rows
from unitsface.losses import functional as LF


@register("vpl")
class VPLHead(ClassifierHead):
    """VPL on an ArcFace or CosFace base; buffers `queue`, `queue_iters`, `iteration`."""

    def __init__(self, num_classes: int, embedding_size: int, base: str = "arcface", s: float = 64.0,
                 m: float | None = None, gradient: str = "exact", fallback: str = "hard",
                 vpl_lambda: float = 0.15, start_iter: int = 8000, staleness: int = 200,
                 weight_init: str = "normal_001", sample_rate: float = 1.0) -> None:
        super().__init__(num_classes, embedding_size, weight_init, sample_rate)
        if base not in ("arcface", "cosface"):
            raise ValueError(f"base must be 'arcface' or 'cosface', got {base!r}")
        if not 0.0 <= vpl_lambda <= 1.0:
            raise ValueError(f"vpl_lambda must be in [0, 1], got {vpl_lambda}")
        LF.arcface_target(torch.zeros(1), 0.0, gradient, fallback)  # validates the modes up front
        self.base, self.s, self.gradient, self.fallback = base, float(s), gradient, fallback
        self.m = float(m) if m is not None else (0.5 if base == "arcface" else 0.4)
        self.vpl_lambda, self.start_iter, self.staleness = float(vpl_lambda), int(start_iter), int(staleness)
        self.register_buffer("queue", LF.normalize(torch.randn(self.shard.size, embedding_size)))
        self.register_buffer("queue_iters", torch.zeros(self.shard.size, dtype=torch.long))
        self.register_buffer("iteration", torch.zeros((), dtype=torch.long))

    def mixing_weights(self, written: torch.Tensor) -> torch.Tensor:
        """λ_j per class row: λ for classes written within the staleness limit once past T_0."""
        active = (self.iteration > self.start_iter) & (self.iteration - written <= self.staleness)
        return torch.where(active, self.vpl_lambda, 0.0).float()

    def compute_loss(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.iteration += 1
        sample = self.columns_for(labels)  # one Partial FC draw for `weight` and the queue alike
        lam = self.mixing_weights(sample.take(self.queue_iters)).unsqueeze(1)
        mixed = (1.0 - lam) * LF.normalize(sample.take(self.weight)) + lam * sample.take(self.queue)
        cos = LF.cosine(x, mixed)  # cosine normalises the mix
        if self.base == "arcface":
            loss = LF.arcface_loss(cos, sample.labels, self.s, self.m, self.gradient, self.fallback)
        else:
            loss = LF.cosface_loss(cos, sample.labels, self.s, self.m)
        if self.training:
            slots = write_rows(self.queue, self.shard.local_labels(labels), LF.normalize(x.detach()))
            self.queue_iters[slots] = self.iteration
        return loss
