"""UniTSFace heads: sample-to-sample losses against an identity memory, and their combination.

    ss_softmax: L_i = CE(s·(n_i − m·onehot_{y_i}), y_i)                     (Eq. 17, margin form)
    uss:        L_i = sp(−(s(p_i − m) − b)) + Σ_{j≠y_i} sp(s·n_ij − b)       (Eqs. 11, 24)
    ss_bce:     L_i = sp(−(s(p_i − m) − b_{y_i})) + Σ_{j≠y_i} sp(s·n_ij − b_j) (Eq. 22)
    unitsface:  L = CosFace(W) + [S2S active]·USS(M)                         (code, backbone.py)
with p_i = <e_i, M̂_{y_i}>, n_ij = <e_i, M̂_j>, M one stored feature per identity, m = m_sample; sums
over columns, means over the batch (Li et al., "UniTSFace", NeurIPS 2023; official code CVI-SZU/UniTSFace
`head.py`, `backbone.py`). Every head trains CosFace(W) (margin m_class) alone until the sample-to-sample
term starts (`s2s_start_epoch`, a full memory). Specification: methods.md §2.
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


class SampleToSampleHead(ClassifierHead, IdentityMemory):
    """The schedule every UniTSFace head follows (methods.md §2.5–2.6): a sample-to-class warm-up,
    then the sample-to-sample loss against a full memory.

    Until epoch `s2s_start_epoch`, and until the filled fraction of the memory reaches `min_fill`
    (iteration-based schedules), whichever is later, the loss is CosFace (s, m_class) on the class
    proxies `weight` while the memory fills: a sample-to-sample loss against an empty memory is 0,
    and a bias set from it would come from a few filled slots. Once active,
    L = weights[0]·CosFace + weights[1]·S2S(M): the UniTSFace objective is the code's plain sum (1, 1);
    the standalone heads are (0, 1), the code's combine=False. With `sample_rate` < 1 every term reads
    one Partial FC sample of the columns of `weight` and `memory`.
    """

    def __init__(self, num_classes: int, embedding_size: int, s: float, m_class: float, m_sample: float,
                 s2s_start_epoch: int, min_fill: float, weights: Sequence[float], weight_init: str,
                 sample_rate: float, memory_dtype: str) -> None:
        super().__init__(num_classes, embedding_size, weight_init, sample_rate)
        self.init_memory(memory_dtype)
        if not isinstance(weights, (list, tuple)) or len(weights) != 2:
            raise ValueError(f"weights must be two numbers (CosFace, sample-to-sample), got {weights!r}")
        if not 0.0 <= min_fill <= 1.0:
            raise ValueError(f"min_fill must be in [0, 1], got {min_fill}")
        self.s, self.m_class, self.m_sample = float(s), float(m_class), float(m_sample)
        self.s2s_start_epoch, self.min_fill = int(s2s_start_epoch), float(min_fill)
        self.weights = (float(weights[0]), float(weights[1]))
        self._memory_ready = False

    def sample_to_sample_active(self) -> bool:
        """Past `s2s_start_epoch` and the memory filled to `min_fill`. The fill check is an all-reduce;
        training never empties a slot, so once reached it is remembered (until a state dict is loaded)."""
        if self.epoch < self.s2s_start_epoch:
            return False
        if not self._memory_ready:
            self._memory_ready = self.filled_fraction() >= self.min_fill
        return self._memory_ready

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # type: ignore[override]
        self._memory_ready = False  # the loaded memory may be less filled
        super()._load_from_state_dict(*args, **kwargs)

    def sample_to_sample_loss(self, x: torch.Tensor, sample: ColumnSample) -> torch.Tensor:
        raise NotImplementedError

    def idle_terms(self) -> torch.Tensor | float:
        """What the loss adds while the sample-to-sample term is off (0·b for heads with a bias)."""
        return 0.0

    def compute_loss(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        sample = self.columns_for(labels)  # one Partial FC draw for `weight` and `memory` alike
        active = self.sample_to_sample_active()
        class_weight, s2s_weight = self.weights if active else (1.0, 0.0)
        loss = x.sum() * 0.0
        if class_weight:
            loss = class_weight * LR.cosface_rows_loss(x, sample.take(self.weight), sample.labels, self.s,
                                                       self.m_class)
        loss = loss + (s2s_weight * self.sample_to_sample_loss(x, sample) if active else self.idle_terms())
        self.remember(x, labels)
        return loss


@register("ss_softmax")
class SampleSoftmaxHead(SampleToSampleHead):
    """Sample-to-sample softmax over the memory, s=64, m_sample=0.1, unfilled slots masked (§2.3), after
    the CosFace warm-up."""

    renamed = {"m": "m_sample"}  # the standalone heads' margin, before they gained the CosFace warm-up

    def __init__(self, num_classes: int, embedding_size: int, s: float = 64.0, m_class: float = 0.4,
                 m_sample: float = 0.1, s2s_start_epoch: int = 1, min_fill: float = 0.99,
                 weight_init: str = "normal", sample_rate: float = 1.0, memory_dtype: str = "float32") -> None:
        super().__init__(num_classes, embedding_size, s, m_class, m_sample, s2s_start_epoch, min_fill, (0.0, 1.0),
                         weight_init, sample_rate, memory_dtype)

    def sample_to_sample_loss(self, x: torch.Tensor, sample: ColumnSample) -> torch.Tensor:
        cos, filled = self.memory_cosine(x, sample)
        return LF.sample_softmax_loss(cos, sample.labels, self.s, self.m_sample, filled)


class ThresholdSampleHead(BiasThresholds, SampleToSampleHead):
    """A sample-to-sample threshold-BCE head: the memory, the bias and its data-driven start (§2.2, §2.4, §2.5).

    `bias_init=None` starts b at 0 with `bias_initialised` False; the first training call of the
    sample-to-sample loss (after the warm-up, so against a full memory) adds b0 = mean_i LSE_{j≠y_i} s·n_ij
    over filled negatives to every entry — for a unified bias that sets b = b0, for per-class biases it
    shifts them (the S2S-BCE rule). The flag is a buffer, so a resumed run does not re-initialise. A
    float `bias_init` fixes the start and skips the data-driven step.
    """

    def __init__(self, num_classes: int, embedding_size: int, per_class: bool, s: float, m_class: float,
                 m_sample: float, bias_init: float | None, clamp: bool | str, s2s_start_epoch: int,
                 min_fill: float, weights: Sequence[float], weight_init: str, sample_rate: float,
                 memory_dtype: str) -> None:
        super().__init__(num_classes, embedding_size, s, m_class, m_sample, s2s_start_epoch, min_fill, weights,
                         weight_init, sample_rate, memory_dtype)
        self.clamp = clamp_mode(clamp)
        self.init_threshold_bias(per_class, bias_init)

    @property
    def threshold(self) -> float | None:
        """b/s once the bias is set; None during the warm-up, while b is only its placeholder 0."""
        return super().threshold if bool(self.bias_initialised) else None

    def init_threshold_bias(self, per_class: bool, bias_init: float | None) -> None:
        start = 0.0 if bias_init is None else float(bias_init)
        self.bias = nn.Parameter(torch.full((self.shard.size if per_class else 1,), start))
        self.register_buffer("bias_initialised", torch.tensor(bias_init is not None))

    def unused_bias(self) -> torch.Tensor:
        """0·b, for steps without the threshold loss: DDP expects a gradient for every parameter,
        and a zero one leaves b (still 0 before initialisation) and its optimizer state unmoved."""
        return self.bias.sum() * 0.0

    def sample_to_sample_loss(self, x: torch.Tensor, sample: ColumnSample) -> torch.Tensor:
        """The threshold-BCE loss against the step's memory columns, unfilled slots masked (§2.1,
        §2.2, §2.4). The data-driven b0 sums the same columns, so with Partial FC it is adjusted to
        the sampled count (≈ log r lower), as UniFace's log(10·C·r) is (§2.8, §3.2). The loss reads
        the memory and the mask in its forward only, so `remember` may overwrite them before backward()."""
        rows, filled = sample.take(self.memory), sample.take(self.filled)
        if not bool(self.bias_initialised):
            b0 = LR.unified_bias_init_rows(x, rows, sample.labels, self.s, filled) if self.training else None
            if b0 is None:  # no filled negative (evaluation, or min_fill=0 on an empty memory): no loss yet
                return x.sum() * 0.0 + self.unused_bias()
            with torch.no_grad():
                # b is still exactly its start value 0: until now its loss term was this zero.
                self.bias.add_(b0)
            self.bias_initialised.fill_(True)
        bias = self.bias if self.bias.numel() == 1 else sample.take(self.bias)
        return LR.threshold_bce_rows_loss(x, rows, sample.labels, bias, self.s, self.m_sample, clamp=self.clamp,
                                          valid_columns=filled)

    def idle_terms(self) -> torch.Tensor:
        return self.unused_bias()


@register("uss")
class USSHead(ThresholdSampleHead):
    """USS alone after the warm-up: one scalar b, s=64, m_sample=0.1 (§2.2); t = b/s."""

    renamed = {"m": "m_sample"}  # the standalone heads' margin, before they gained the CosFace warm-up

    def __init__(self, num_classes: int, embedding_size: int, s: float = 64.0, m_class: float = 0.4,
                 m_sample: float = 0.1, bias_init: float | None = None, clamp: bool | str = False,
                 s2s_start_epoch: int = 1, min_fill: float = 0.99, weight_init: str = "normal",
                 sample_rate: float = 1.0, memory_dtype: str = "float32") -> None:
        super().__init__(num_classes, embedding_size, False, s, m_class, m_sample, bias_init, clamp, s2s_start_epoch,
                         min_fill, (0.0, 1.0), weight_init, sample_rate, memory_dtype)


@register("ss_bce")
class SampleBCEHead(ThresholdSampleHead):
    """Sample-to-sample BCE with one bias per class, sharded (and sampled) with the memory (§2.4);
    t_j = b_j/s. The same loss as USS otherwise."""

    renamed = {"m": "m_sample"}  # the standalone heads' margin, before they gained the CosFace warm-up

    def __init__(self, num_classes: int, embedding_size: int, s: float = 64.0, m_class: float = 0.4,
                 m_sample: float = 0.1, bias_init: float | None = None, clamp: bool | str = False,
                 s2s_start_epoch: int = 1, min_fill: float = 0.99, weight_init: str = "normal",
                 sample_rate: float = 1.0, memory_dtype: str = "float32") -> None:
        super().__init__(num_classes, embedding_size, True, s, m_class, m_sample, bias_init, clamp, s2s_start_epoch,
                         min_fill, (0.0, 1.0), weight_init, sample_rate, memory_dtype)


@register("unitsface")
class UniTSFaceHead(ThresholdSampleHead):
    """UniTSFace: CosFace (s, m_class) on `weight` plus USS (s, m_sample) on `memory` (§2.6); t = b/s.
    `weights=(0, 1)` is USS alone after the warm-up (the `uss` head)."""

    renamed = {"warmup_epochs": "s2s_start_epoch"}

    def __init__(self, num_classes: int, embedding_size: int, s: float = 64.0, m_class: float = 0.4,
                 m_sample: float = 0.1, bias_init: float | None = None, clamp: bool | str = False,
                 s2s_start_epoch: int = 1, min_fill: float = 0.99,
                 weights: Sequence[float] = (1.0, 1.0), weight_init: str = "normal",
                 sample_rate: float = 1.0, memory_dtype: str = "float32") -> None:
        super().__init__(num_classes, embedding_size, False, s, m_class, m_sample, bias_init, clamp, s2s_start_epoch,
                         min_fill, weights, weight_init, sample_rate, memory_dtype)
