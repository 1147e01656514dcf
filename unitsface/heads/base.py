"""What every head shares: the registry, parameter checks, the global batch, the epoch, and the step's
Partial FC column sample.

A head is an `nn.Module` whose `forward(embeddings, labels)` returns the scalar training loss of the
global batch. It holds per-class state as components for its class shard (`heads.components`:
`proxies`, `memory`, `bias`, `prototypes`, `queue`, `pairs`, `stored`); in one process the shard is the whole
class range. Subclasses implement `compute_loss(x, labels)`, where `x` (B_g×d, raw embeddings) and
`labels` (B_g, global class ids) are the global batch of this step, and evaluate their loss with the
column-loss engine (`unitsface.losses.columns`). With Partial FC (`sample_rate` < 1) every component
reads through one `ColumnSample` per optimizer step (`Head.columns_for`).
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from unitsface.errors import UnitsfaceError
from unitsface.heads.components import ColumnSample, LearnedBias
from unitsface.losses import columns as LC
from unitsface.losses import functional as LF
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
        """The learned unified threshold b/s in cosine units, for heads whose `bias` is a unified
        `LearnedBias` (once set); None otherwise."""
        bias = getattr(self, "bias", None)
        return bias.threshold if isinstance(bias, LearnedBias) else None

    def learned_thresholds(self) -> dict[str, float]:
        """Every convention of the learned unified threshold, the primary (`threshold`) first; empty for
        heads without one (methods.md §2.7, §3.1)."""
        return {} if self.threshold is None else {"b/s": self.threshold}

    def proxy_weight(self) -> nn.Parameter | None:
        """The class-proxy matrix, which `train.sparse_update` lets the optimiser update row by row."""
        proxies = getattr(self, "proxies", None)
        return None if proxies is None else proxies.weight

    def target_cosines(self, x: torch.Tensor, rows: torch.Tensor, sample: ColumnSample
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """(unit embeddings, c_{i,y_i} against `rows` on every rank): what every cosine head's target and
        column loss start from."""
        unit = LF.normalize(x)
        return unit, LC.target_cosine(unit, rows, sample.labels)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor, checked: bool = False) -> torch.Tensor:
        """The loss of the global batch. Labels are checked against the class range unless `checked` (the trainer's
        come from a dataset whose range was checked when read: reading them off the device every step would stall
        it)."""
        if embeddings.dim() != 2 or embeddings.shape[1] != self.embedding_size:
            raise UnitsfaceError(
                f"embeddings must be B×{self.embedding_size}, got {tuple(embeddings.shape)}"
            )
        labels = labels.long()
        if not checked:
            self.check_labels(labels)
        return self.compute_loss(gather_batch(embeddings.float()), gather_batch(labels))

    def check_labels(self, labels: torch.Tensor) -> None:
        """UnitsfaceError when a label lies outside [0, num_classes)."""
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise UnitsfaceError(
                f"label out of range: labels span [{int(labels.min())}, {int(labels.max())}] "
                f"but the head has num_classes={self.num_classes}"
            )

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

        Drawn once per optimizer step (`step_columns`), else once per forward call, and read through by
        every component of the head, so that proxies, memory, prototypes and per-class bias see the same
        columns.
        """
        local = self.shard.local_labels(labels)
        columns = self.sampled_columns(local) if self._step_sample is None else self._step_sample[0]
        if columns is None:
            return ColumnSample(local, None)
        remapped = torch.searchsorted(columns, local.clamp(min=0))
        return ColumnSample(torch.where(local >= 0, remapped, torch.full_like(local, -1)), columns)


def clamp_mode(clamp: bool | str) -> bool:
    """The references' [−s, s] argument clamp: True / "reference", or False / "none" (methods.md §3.5)."""
    modes = {True: True, False: False, "reference": True, "none": False}
    if not isinstance(clamp, (bool, str)) or clamp not in modes:
        raise ValueError(f"clamp must be true, false, 'reference' or 'none', got {clamp!r}")
    return modes[clamp]
