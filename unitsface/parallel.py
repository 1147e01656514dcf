"""The one layer that knows about torch.distributed.

Heads are written once, for a *class shard*: rank r owns the contiguous class range
[start, start + size) of the classifier and of every per-identity state (memory,
prototypes, per-class bias), see methods.md D2. Heads see the *global* batch
(`gather_batch`) and reduce per-row quantities over shards with `sum_over_shards` /
`logsumexp_over_shards`. In a single process (no process group) every function here
is the identity, so the same head code is the plain single-GPU implementation.

Gradient convention (methods.md D1): a head returns the mean over the *global* batch,
the same value on every rank. `gather_batch` sends back to each chunk's owner the sum
of the gradients that all ranks computed for it, so the gradient w.r.t. local
embeddings is the exact gradient of the global loss; the trainer therefore sums (not
averages) backbone gradients across ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return rank() == 0


@dataclass(frozen=True)
class ClassShard:
    """The class range [start, start + size) of `num_classes` owned by this rank."""

    num_classes: int
    start: int
    size: int

    @classmethod
    def for_rank(cls, num_classes: int, rank_: int | None = None, world: int | None = None) -> ClassShard:
        """C_r = floor(C/R) + [r < C mod R], contiguous ranges in rank order (D2)."""
        r = rank() if rank_ is None else rank_
        w = world_size() if world is None else world
        base, extra = divmod(num_classes, w)
        start = r * base + min(r, extra)
        return cls(num_classes, start, base + (1 if r < extra else 0))

    @property
    def end(self) -> int:
        return self.start + self.size

    def local_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """Global labels -> indices into this shard, -1 where another rank owns the class."""
        inside = (labels >= self.start) & (labels < self.end)
        return torch.where(inside, labels - self.start, torch.full_like(labels, -1))


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        chunks = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(chunks, x.contiguous())
        return torch.cat(chunks, 0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        # Each rank needs the sum over ranks of its own chunk only: a reduce-scatter moves R times less data
        # than an all-reduce of the whole global batch followed by a slice.
        chunks = grad.contiguous().chunk(dist.get_world_size())
        out = torch.empty_like(chunks[0])
        dist.reduce_scatter(out, list(chunks), op=dist.ReduceOp.SUM)
        return out


def gather_batch(x: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's `x` in rank order (equal local batch sizes required).

    Differentiable: gradients flow back to each chunk's owner, summed over ranks.
    Integer tensors (labels) are gathered without autograd.
    """
    if not is_distributed():
        return x
    if not x.dtype.is_floating_point:
        chunks = [torch.empty_like(x) for _ in range(world_size())]
        dist.all_gather(chunks, x.contiguous())
        return torch.cat(chunks, 0)
    return _GatherWithGrad.apply(x)


class _SumOverShards(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        out = x.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        # Every rank holds the same total and back-propagates its own copy of the loss:
        # d(total)/d(partial_r) = 1 on each rank, so the gradient passes through unchanged.
        return grad


def sum_over_shards(x: torch.Tensor) -> torch.Tensor:
    """Sum of per-shard partial results (D4), differentiable; identity in one process."""
    return _SumOverShards.apply(x) if is_distributed() else x


def max_over_shards(x: torch.Tensor) -> torch.Tensor:
    """Elementwise max over shards, without gradient (used only as a stabiliser)."""
    if not is_distributed():
        return x.detach()
    out = x.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.MAX)
    return out


def logsumexp_over_shards(z: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Row-wise log-sum-exp over the full class range when each rank holds some columns (D3).

    `z` may contain -inf (masked columns); a row that is -inf everywhere gives -inf.
    """
    if not is_distributed():
        return torch.logsumexp(z, dim=dim)
    zmax = max_over_shards(z.max(dim=dim, keepdim=True).values)
    zmax = torch.where(torch.isfinite(zmax), zmax, torch.zeros_like(zmax))
    partial = torch.exp(z - zmax).sum(dim=dim, keepdim=True)
    return (torch.log(sum_over_shards(partial)) + zmax).squeeze(dim)


def mean_over_ranks(x: torch.Tensor) -> torch.Tensor:
    """Average a replicated statistic over data-parallel ranks (no gradient), for D5 state."""
    if not is_distributed():
        return x
    out = x.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / world_size()
