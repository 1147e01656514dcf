"""UniTSFace heads: sample-to-sample losses against an identity memory, and their combination.

    ss_softmax: L_i = CE(s·(n_i − m·onehot_{y_i}), y_i)                     (Eq. 17, margin form)
    uss:        L_i = sp(−(s(p_i − m) − b)) + Σ_{j≠y_i} sp(s·n_ij − b)       (Eqs. 11, 24)
    ss_bce:     L_i = sp(−(s(p_i − m) − b_{y_i})) + Σ_{j≠y_i} sp(s·n_ij − b_j) (Eq. 22)
    unitsface:  L = CosFace(W) + [USS active]·USS(M)                         (code, backbone.py)
with p_i = <e_i, M̂_{y_i}>, n_ij = <e_i, M̂_j>, M one stored feature per identity; sums over
columns, means over the batch (Li et al., "UniTSFace", NeurIPS 2023; official code
CVI-SZU/UniTSFace `head.py`, `backbone.py`). Specification: methods.md §2.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from unitsface.heads.base import ClassifierHead, ColumnSample, Head, register, write_rows
from unitsface.heads.uniface import BiasThresholds, clamp_mode
from unitsface.losses import functional as LF
from unitsface.losses import rows as LR
from unitsface.parallel import sum_over_shards

MEMORY_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class IdentityMemory(Head):
    """One feature per identity of this shard (`memory`) and a `filled` mask (methods.md §2.1).

    Each forward call reads the memory as it was before the call, then writes the batch's
    detached raw features (last occurrence of a label wins), in training mode only. The losses
    read the buffers in their forward pass only (autograd keeps normalised copies, or the
    gradient itself), so writing them before backward() is safe. With `sample_rate` < 1 the
    loss reads only this step's Partial FC columns (positives always among them, §2.8
    [unverified]); the writes still reach every label of the batch.

    `memory_dtype` "bfloat16" or "float16" stores the features at half the memory (4 GB → 2 GB
    at 2M identities, d = 512); they are rounded when written and read into fp32 for the loss.
    Not in the reference code, which keeps fp32; bench/head_scaling.py measures the loss change.
    """

    def init_memory(self, memory_dtype: str) -> None:
        if memory_dtype not in MEMORY_DTYPES:
            raise ValueError(f"memory_dtype must be one of {', '.join(MEMORY_DTYPES)}, got {memory_dtype!r}")
        self.register_buffer("memory", torch.zeros(self.shard.size, self.embedding_size,
                                                   dtype=MEMORY_DTYPES[memory_dtype]))
        self.register_buffer("filled", torch.zeros(self.shard.size, dtype=torch.bool))

    def memory_cosine(self, x: torch.Tensor, sample: ColumnSample) -> tuple[torch.Tensor, torch.Tensor]:
        """(fp32 cosines against the step's memory columns, their fill mask before this call).

        The mask is a copy: the loss's backward needs it after `remember` has updated `filled`.
        """
        return LF.cosine(x, sample.take(self.memory)), sample.take(self.filled).clone()

    def remember(self, x: torch.Tensor, labels: torch.Tensor) -> None:
        """Write-after-loss: M[y_i] <- sg(x_i) for this shard's (global) labels, training mode only;
        always the real rows, sampled or not."""
        if self.training:
            slots = write_rows(self.memory, self.shard.local_labels(labels), x.detach())
            self.filled[slots] = True

    def filled_fraction(self) -> float:
        """Filled slots over all C identities, summed over class shards."""
        return float(sum_over_shards(self.filled.sum().double())) / self.num_classes


class MemoryThresholdHead(BiasThresholds, IdentityMemory):
    """Identity memory plus a threshold bias set from data at the first evaluation (methods.md §2.5).

    Subclasses set `s`, `m`, `clamp` and call `init_threshold_bias`.

    `bias_init=None` starts b at 0 with `bias_initialised` False; the first training call
    that can evaluate the loss adds b0 = mean_i LSE_{j≠y_i} s·n_ij over filled negatives to
    every entry — for a unified bias that sets b = b0, for per-class biases it shifts them
    (the S2S-BCE rule). The flag is a buffer, so a resumed run does not re-initialise. A
    float `bias_init` fixes the start and skips the data-driven step.
    """

    def init_threshold_bias(self, per_class: bool, bias_init: float | None) -> None:
        start = 0.0 if bias_init is None else float(bias_init)
        self.bias = nn.Parameter(torch.full((self.shard.size if per_class else 1,), start))
        self.register_buffer("bias_initialised", torch.tensor(bias_init is not None))

    def unused_bias(self) -> torch.Tensor:
        """0·b, for steps without the threshold loss: DDP expects a gradient for every parameter,
        and a zero one leaves b (still 0 before initialisation) and its optimizer state unmoved."""
        return self.bias.sum() * 0.0

    def threshold_loss(self, x: torch.Tensor, sample: ColumnSample, s: float, m: float, clamp: bool
                       ) -> torch.Tensor:
        """The threshold-BCE loss against the step's memory columns, unfilled slots masked (§2.1,
        §2.2, §2.4). The data-driven b0 sums the same columns, so with Partial FC it is adjusted to
        the sampled count (≈ log r lower), as UniFace's log(10·C·r) is (§2.8, §3.2). The loss reads
        the memory and the mask in its forward only, so `remember` may overwrite them before backward()."""
        rows, filled = sample.take(self.memory), sample.take(self.filled)
        if not bool(self.bias_initialised):
            b0 = LR.unified_bias_init_rows(x, rows, sample.labels, s, filled) if self.training else None
            if b0 is None:  # no filled negative yet: the loss cannot start
                return x.sum() * 0.0 + self.unused_bias()
            with torch.no_grad():
                # b is still exactly its start value 0: until now its loss term was this zero.
                self.bias.add_(b0)
            self.bias_initialised.fill_(True)
        bias = self.bias if self.bias.numel() == 1 else sample.take(self.bias)
        return LR.threshold_bce_rows_loss(x, rows, sample.labels, bias, s, m, clamp=clamp, valid_columns=filled)

    def compute_loss(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The standalone sample-to-sample loss: memory, bias, then write-after-loss."""
        loss = self.threshold_loss(x, self.columns_for(labels), self.s, self.m, self.clamp)
        self.remember(x, labels)
        return loss


@register("ss_softmax")
class SampleSoftmaxHead(IdentityMemory):
    """Sample-to-sample softmax over the memory, s=64, m=0.1; unfilled slots masked (§2.3)."""

    def __init__(self, num_classes: int, embedding_size: int, s: float = 64.0, m: float = 0.1,
                 sample_rate: float = 1.0, memory_dtype: str = "float32") -> None:
        super().__init__(num_classes, embedding_size, sample_rate=sample_rate)
        self.init_memory(memory_dtype)
        self.s, self.m = float(s), float(m)

    def compute_loss(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        sample = self.columns_for(labels)
        cos, filled = self.memory_cosine(x, sample)
        loss = LF.sample_softmax_loss(cos, sample.labels, self.s, self.m, filled)
        self.remember(x, labels)
        return loss


@register("uss")
class USSHead(MemoryThresholdHead):
    """USS: unified-threshold sample-to-sample loss, one scalar b, s=64, m=0.1 (§2.2); t = b/s."""

    per_class_bias = False

    def __init__(self, num_classes: int, embedding_size: int, s: float = 64.0, m: float = 0.1,
                 bias_init: float | None = None, clamp: bool | str = False, sample_rate: float = 1.0,
                 memory_dtype: str = "float32") -> None:
        super().__init__(num_classes, embedding_size, sample_rate=sample_rate)
        self.init_memory(memory_dtype)
        self.s, self.m, self.clamp = float(s), float(m), clamp_mode(clamp)
        self.init_threshold_bias(per_class=self.per_class_bias, bias_init=bias_init)


@register("ss_bce")
class SampleBCEHead(USSHead):
    """Sample-to-sample BCE with one bias per class, sharded (and sampled) with the memory (§2.4);
    t_j = b_j/s. The same loss as USS otherwise."""

    per_class_bias = True


@register("unitsface")
class UniTSFaceHead(ClassifierHead, MemoryThresholdHead):
    """UniTSFace: CosFace (s, m_class) on `weight` plus USS (s, m_sample) on `memory` (§2.6).

    USS is active from epoch `warmup_epochs` on, and only once the filled fraction of the
    memory reaches `min_fill` (iteration-based schedules), whichever is later. Before that
    the loss is CosFace alone; the memory is written from the first training step. Once
    active, L = weights[0]·CosFace + weights[1]·USS: the code's plain sum by default, (0, 1)
    for USS alone after the warm-up (the code's combine=False). `threshold` = b/s. With
    `sample_rate` < 1 both terms read one Partial FC sample of the columns of `weight` and `memory`.
    """

    def __init__(self, num_classes: int, embedding_size: int, s: float = 64.0, m_class: float = 0.4,
                 m_sample: float = 0.1, bias_init: float | None = None, clamp: bool | str = False,
                 warmup_epochs: int = 1, min_fill: float = 0.99,
                 weights: Sequence[float] = (1.0, 1.0), weight_init: str = "normal",
                 sample_rate: float = 1.0, memory_dtype: str = "float32") -> None:
        super().__init__(num_classes, embedding_size, weight_init, sample_rate)
        self.init_memory(memory_dtype)
        if not isinstance(weights, (list, tuple)) or len(weights) != 2:
            raise ValueError(f"weights must be two numbers (CosFace, USS), got {weights!r}")
        if not 0.0 <= min_fill <= 1.0:
            raise ValueError(f"min_fill must be in [0, 1], got {min_fill}")
        self.s, self.m_class, self.m_sample = float(s), float(m_class), float(m_sample)
        self.clamp = clamp_mode(clamp)
        self.warmup_epochs, self.min_fill = int(warmup_epochs), float(min_fill)
        self.weights = (float(weights[0]), float(weights[1]))
        self._memory_ready = False
        self.init_threshold_bias(per_class=False, bias_init=bias_init)

    def sample_to_sample_active(self) -> bool:
        """Past the warm-up epochs and the memory filled to `min_fill`. The fill check is an all-reduce;
        training never empties a slot, so once reached it is remembered (until a state dict is loaded)."""
        if self.epoch < self.warmup_epochs:
            return False
        if not self._memory_ready:
            self._memory_ready = self.filled_fraction() >= self.min_fill
        return self._memory_ready

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # type: ignore[override]
        self._memory_ready = False  # the loaded memory may be less filled
        super()._load_from_state_dict(*args, **kwargs)

    def compute_loss(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        sample = self.columns_for(labels)  # one Partial FC draw for `weight` and `memory` alike
        loss = LR.cosface_rows_loss(x, sample.take(self.weight), sample.labels, self.s, self.m_class)
        if self.sample_to_sample_active():
            uss = self.threshold_loss(x, sample, self.s, self.m_sample, self.clamp)
            loss = self.weights[0] * loss + self.weights[1] * uss
        else:
            loss = loss + self.unused_bias()
        self.remember(x, labels)
        return loss
