"""Base classes of every head: class-sharded state, the global batch, the registry.

A head is an `nn.Module` whose `forward(embeddings, labels)` returns the scalar training
loss. It owns per-identity state for its class shard (`unitsface.parallel.ClassShard`):
`weight` (C×d class proxies), and in subclasses `memory`, `bias`, `prototypes`. In one
process the shard is the whole class range, so `weight` is C×d.

Subclasses implement `compute_loss(x, labels)`, where `x` (B_g×d, raw embeddings) and
`labels` (B_g, global class ids) are the global batch of this step. With Partial FC
(`sample_rate` < 1) they read every per-class state through one `ColumnSample` per step
(`Head.columns_for`), and write buffers at the real rows (`write_rows`).
"""

from __future__ import annotations

import difflib
import inspect
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from unitsface.errors import UnitsfaceError
from unitsface.losses import functional as LF
from unitsface.optim import read_rows
from unitsface.parallel import ClassShard, gather_batch
from unitsface.registry import Registry

HEADS: Registry[nn.Module] = Registry("head")
register = HEADS.register


def head_parameters(name: str) -> dict[str, Any]:
    """The keyword parameters (and defaults) that head `name` accepts, for config validation."""
    sig = inspect.signature(HEADS.get(name))
    return {
        k: (None if p.default is inspect.Parameter.empty else p.default)
        for k, p in sig.parameters.items()
        if k not in ("num_classes", "embedding_size") and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
    }


def check_parameters(name: str, params: dict[str, Any], prefix: str = "") -> None:
    """A one-line UnitsfaceError for the first parameter head `name` does not accept: the new name of a
    renamed one (a head's `renamed` map), else the closest accepted name or the list of them."""
    accepted = head_parameters(name)
    renamed: dict[str, str] = getattr(HEADS.get(name), "renamed", {})
    for key in params:
        if key in accepted:
            continue
        if key in renamed:
            raise UnitsfaceError(f"head {name!r}: parameter '{prefix}{key}' is now '{prefix}{renamed[key]}'")
        hint = difflib.get_close_matches(key, list(accepted), n=1)
        raise UnitsfaceError(f"head {name!r} has no parameter {key!r}"
                             + (f" (did you mean '{prefix}{hint[0]}'?)" if hint
                                else f"; it accepts: {', '.join(sorted(accepted))}"))


def build(name: str, num_classes: int, embedding_size: int, **params: Any) -> nn.Module:
    """Build the registered head `name`; unknown parameters are a clear error."""
    check_parameters(name, params)
    if num_classes < 2:
        raise UnitsfaceError(f"num_classes must be at least 2, got {num_classes}")
    if embedding_size < 1:
        raise UnitsfaceError(f"embedding_size must be positive, got {embedding_size}")
    try:
        return HEADS.get(name)(num_classes=num_classes, embedding_size=embedding_size, **params)
    except ValueError as exc:
        raise UnitsfaceError(f"head {name!r}: {exc}") from None


@dataclass(frozen=True)
class ColumnSample:
    """The columns of the class shard that one forward call uses.

    `labels` index the kept columns (-1: the class lives on another shard); `columns` are the
    sorted kept shard rows, None when every row is kept. Writes to per-identity buffers use the
    real rows (`ClassShard.local_labels`), never these.
    """

    labels: torch.Tensor
    columns: torch.Tensor | None

    def take(self, rows: torch.Tensor) -> torch.Tensor:
        """The kept rows of per-class state (C_r×…), `rows` itself when all are kept. `read_rows`:
        plain indexing, or for a lazily updated weight its catch-up and sparse gradient."""
        return rows if self.columns is None else read_rows(rows, self.columns)


class Head(nn.Module):
    """Common machinery: shard bookkeeping, label validation, the global batch, epochs, and the
    Partial FC column sample (`sample_rate`) shared by every per-identity state of a head."""

    def __init__(self, num_classes: int, embedding_size: int, sample_rate: float = 1.0) -> None:
        super().__init__()
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        self.num_classes = int(num_classes)
        self.embedding_size = int(embedding_size)
        self.shard = ClassShard.for_rank(self.num_classes)
        self.sample_rate = float(sample_rate)
        self.epoch = 0
        self._step_sample: tuple[torch.Tensor | None] | None = None  # set inside `step_columns`

    def set_epoch(self, epoch: int) -> None:
        """Heads with schedules (UniTSFace warm-up, EPL start epoch) read `self.epoch`."""
        self.epoch = int(epoch)

    @property
    def threshold(self) -> float | None:
        """The learned unified threshold b/s in cosine units, for heads that learn one."""
        return None

    def learned_thresholds(self) -> dict[str, float]:
        """Every convention of the learned unified threshold, the primary (`threshold`) first; empty for
        heads without one (methods.md §2.7, §3.1)."""
        return {} if self.threshold is None else {"b/s": float(self.threshold)}

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if embeddings.dim() != 2 or embeddings.shape[1] != self.embedding_size:
            raise UnitsfaceError(
                f"embeddings must be B×{self.embedding_size}, got {tuple(embeddings.shape)}"
            )
        labels = labels.long()
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise UnitsfaceError(
                f"label out of range: labels span [{int(labels.min())}, {int(labels.max())}] "
                f"but the head has num_classes={self.num_classes}"
            )
        return self.compute_loss(gather_batch(embeddings.float()), gather_batch(labels))

    def compute_loss(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @contextmanager
    def step_columns(self, labels: torch.Tensor) -> Iterator[None]:
        """Draw one Partial FC column sample for a whole optimizer step, from the labels of all its
        micro-batches (this rank's; gathered here), and let every forward call inside read it.

        UniFace's code draws r-sampled columns once per optimizer step (all positives of the 512
        samples kept, methods.md §3.2), shared by the 4 accumulation micro-batches; drawing per
        forward call would give each micro-batch other negatives. Outside this context each forward
        call draws its own sample. `labels` must be on the head's device.
        """
        local = self.shard.local_labels(gather_batch(labels.long()))
        self._step_sample = (self.sampled_columns(local),)
        try:
            yield
        finally:
            self._step_sample = None

    def sampled_columns(self, local_labels: torch.Tensor) -> torch.Tensor | None:
        """Sorted indices of this step's kept columns, or None when every column is kept."""
        size = self.shard.size
        keep = max(1, int(round(self.sample_rate * size)))
        if not self.training or keep >= size:
            return None
        positives = torch.unique(local_labels[local_labels >= 0])
        keys = torch.rand(size, device=local_labels.device)
        keys[positives] = 2.0  # positives always survive the top-k
        keep = max(keep, positives.numel())
        return torch.topk(keys, keep).indices.sort().values

    def columns_for(self, labels: torch.Tensor) -> ColumnSample:
        """This step's Partial FC columns of the shard for the global `labels` (methods.md §1.0, §3.2).

        Drawn once per forward call and read through by every per-identity state of the head, so
        that `weight`, `memory`, `prototypes` and per-class `bias` see the same columns.
        """
        local = self.shard.local_labels(labels)
        columns = self.sampled_columns(local) if self._step_sample is None else self._step_sample[0]
        if columns is None:
            return ColumnSample(local, None)
        remapped = torch.searchsorted(columns, local.clamp(min=0))
        return ColumnSample(torch.where(local >= 0, remapped, torch.full_like(local, -1)), columns)


def init_class_rows(rows: int, embedding_size: int, init: str = "normal") -> torch.Tensor:
    """Class-proxy initialisations of methods.md §1.0.

    "normal": N(0, 1/d) (UniTSFace/UniFace/EPL; Kaiming normal a=1, fan-in) — the default;
    "normal_001": N(0, 0.01²) (insightface Partial FC, CurricularFace); "unit": uniform(−1, 1)
    rows rescaled to unit norm (MagFace, AdaFace); "xavier": Xavier uniform (UNPG).
    """
    w = torch.empty(rows, embedding_size)
    if init == "normal":
        nn.init.normal_(w, 0.0, 1.0 / math.sqrt(embedding_size))
    elif init == "normal_001":
        nn.init.normal_(w, 0.0, 0.01)
    elif init == "unit":
        w.uniform_(-1, 1)
        w = LF.normalize(w)
    elif init == "xavier":
        nn.init.xavier_uniform_(w)
    else:
        raise ValueError(f"weight_init must be normal, normal_001, unit or xavier, got {init!r}")
    return w


class ClassifierHead(Head):
    """A head with class proxies `weight` (this shard's C_r×d rows), optionally Partial-FC sampled.

    `sample_rate` < 1 keeps every class that is positive in the global batch and samples
    the rest uniformly without replacement, fresh every step (methods.md §1.0, §3.2).
    """

    def __init__(
        self, num_classes: int, embedding_size: int, weight_init: str = "normal", sample_rate: float = 1.0
    ) -> None:
        super().__init__(num_classes, embedding_size, sample_rate=sample_rate)
        self.weight = nn.Parameter(init_class_rows(self.shard.size, embedding_size, weight_init))

    def class_rows(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(proxies used this step, labels local to them, kept columns or None).

        Local labels index the returned rows (-1 for classes on other shards).
        """
        sample = self.columns_for(labels)
        return sample.take(self.weight), sample.labels, sample.columns

    def class_cosine(
        self, x: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(cos, local labels, kept columns): fp32 cosines against this step's proxies."""
        rows, local, columns = self.class_rows(labels)
        return LF.cosine(x, rows), local, columns


def last_occurrence(labels: torch.Tensor) -> torch.Tensor:
    """Indices i such that labels[i] >= 0 is the last occurrence of its value (batch order)."""
    n = labels.numel()
    order = torch.arange(n, device=labels.device)
    valid = labels >= 0
    if not bool(valid.any()):
        return order[:0]
    # Scatter-max of positions per label gives the last writer, deterministically.
    last = torch.full((int(labels.max()) + 1,), -1, dtype=torch.long, device=labels.device)
    last.scatter_reduce_(0, labels[valid], order[valid], reduce="amax")
    return last[last >= 0]


@torch.no_grad()
def write_rows(buffer: torch.Tensor, local_labels: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """buffer[y_i] <- rows[i] for this shard's labels, the last occurrence of a label winning
    (methods.md §2.1 "last writer wins"). Returns the written slot indices."""
    keep = last_occurrence(local_labels)
    slots = local_labels[keep]
    buffer[slots] = rows[keep].to(buffer.dtype)
    return slots
