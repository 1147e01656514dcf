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

from unitsface.heads.base import Head, clamp_mode, register
from unitsface.heads.components import ClassProxies, ColumnSample, IdentityMemory, LearnedBias
from unitsface.losses import columns as LC
from unitsface.losses import functional as LF


class SampleToSampleHead(Head):
    """The schedule every UniTSFace head follows (methods.md §2.5–2.6): a sample-to-class warm-up, then the
    sample-to-sample loss against a full memory.

    Until epoch `s2s_start_epoch`, and until the filled fraction of the memory reaches `min_fill`
    (iteration-based schedules), whichever is later, the loss is CosFace (s, m_class) on the class proxies
    while the memory fills: a sample-to-sample loss against an empty memory is 0, and a bias set from it
    would come from a few filled slots. Once active, L = weights[0]·CosFace + weights[1]·S2S(M): the
    UniTSFace objective is the code's plain sum (1, 1); the standalone heads are (0, 1), the code's
    combine=False. The memory is written after every training forward (write-after-loss, §2.1); with
    `sample_rate` < 1 every term reads one Partial FC sample of the columns of the proxies and the memory.

    `bias_init=None` (heads with a threshold bias) starts b at 0, to be set once to b0 = mean_i
    LSE_{j≠y_i} s·n_ij over the filled negatives at the first sample-to-sample call — for a unified bias
    b = b0, per-class biases are all shifted by b0 (the S2S-BCE rule); a float fixes the start.
    """

    def __init__(self, num_classes: int, embedding_size: int, kind: str, per_class_bias: bool | None, s: float,
                 m_class: float, m_sample: float, bias_init: float | None, clamp: bool | str, s2s_start_epoch: int,
                 min_fill: float, weights: Sequence[float], weight_init: str, sample_rate: float,
                 memory_dtype: str) -> None:
        super().__init__(num_classes, embedding_size, sample_rate)
        if not isinstance(weights, (list, tuple)) or len(weights) != 2:
            raise ValueError(f"weights must be two numbers (CosFace, sample-to-sample), got {weights!r}")
        if not 0.0 <= min_fill <= 1.0:
            raise ValueError(f"min_fill must be in [0, 1], got {min_fill}")
        self.s, self.m_class, self.m_sample = float(s), float(m_class), float(m_sample)
        self.s2s_start_epoch, self.min_fill = int(s2s_start_epoch), float(min_fill)
        self.weights = (float(weights[0]), float(weights[1]))
        self.proxies = ClassProxies(self.shard, embedding_size, weight_init)
        self.memory = IdentityMemory(self.shard, embedding_size, memory_dtype)
        self.bias = None if per_class_bias is None else LearnedBias(self.shard, per_class_bias, bias_init, self.s)
        self.class_spec = LC.ColumnSpec("softmax", self.s)
        self.sample_spec = LC.ColumnSpec(kind, self.s, clamp=clamp_mode(clamp))
        self._memory_ready = False

    def sample_to_sample_active(self) -> bool:
        """Past `s2s_start_epoch` and the memory filled to `min_fill`. The fill check is an all-reduce;
        training never empties a slot, so once reached it is remembered (until a state dict is loaded)."""
        if self.epoch < self.s2s_start_epoch:
            return False
        if not self._memory_ready:
            self._memory_ready = self.memory.filled_fraction() >= self.min_fill
        return self._memory_ready

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # type: ignore[override]
        self._memory_ready = False  # the loaded memory may be less filled
        super()._load_from_state_dict(*args, **kwargs)

    @property
    def clamp(self) -> bool:
        return self.sample_spec.clamp

    def class_loss(self, x: torch.Tensor, sample: ColumnSample) -> torch.Tensor:
        rows = self.proxies.rows(sample)
        unit, c_y = self.target_cosines(x, rows, sample)
        return LC.column_loss(unit, rows, sample.labels, LF.cosface_target(c_y, self.m_class), self.class_spec)

    def sample_loss(self, x: torch.Tensor, sample: ColumnSample) -> torch.Tensor:
        """The sample-to-sample term against the step's memory columns, unfilled slots left out (§2.1–2.5).
        The data-driven b0 sums the same columns, so with Partial FC it sits ≈ log r lower, as UniFace's
        log(10·C·r) does (§2.8, §3.2)."""
        rows, valid = self.memory.rows(sample), self.memory.valid(sample)
        unit, p = self.target_cosines(x, rows, sample)
        bias = None
        if self.bias is not None:
            if not self.bias.ready:
                b0 = LF.mean_finite(LC.negative_lse(unit, rows, sample.labels, self.s, valid)) if self.training \
                    else None
                if b0 is None:  # no filled negative (evaluation, or min_fill=0 on an empty memory): no loss yet
                    return x.sum() * 0.0 + self.bias.unused()
                self.bias.initialise(b0)
            bias = self.bias.columns(sample)
        return LC.column_loss(unit, rows, sample.labels, LF.cosface_target(p, self.m_sample), self.sample_spec,
                              bias=bias, valid=valid)

    def compute_loss(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        sample = self.columns_for(labels)  # one Partial FC draw for the proxies and the memory alike
        active = self.sample_to_sample_active()
        class_weight, s2s_weight = self.weights if active else (1.0, 0.0)
        loss = class_weight * self.class_loss(x, sample) if class_weight else x.sum() * 0.0
        if active:
            loss = loss + s2s_weight * self.sample_loss(x, sample)
        elif self.bias is not None:
            loss = loss + self.bias.unused()
        if self.training:
            self.memory.remember(x, labels)
        return loss


@register("ss_softmax")
class SampleSoftmaxHead(SampleToSampleHead):
    """Sample-to-sample softmax over the memory, s=64, m_sample=0.1, unfilled slots masked (§2.3), after
    the CosFace warm-up."""

    renamed = {"m": "m_sample"}  # the standalone heads' margin, before they gained the CosFace warm-up

    def __init__(self, num_classes: int, embedding_size: int, s: float = 64.0, m_class: float = 0.4,
                 m_sample: float = 0.1, s2s_start_epoch: int = 1, min_fill: float = 0.99,
                 weight_init: str = "normal", sample_rate: float = 1.0, memory_dtype: str = "float32") -> None:
        super().__init__(num_classes, embedding_size, "softmax", None, s, m_class, m_sample, None, False,
                         s2s_start_epoch, min_fill, (0.0, 1.0), weight_init, sample_rate, memory_dtype)


@register("uss")
class USSHead(SampleToSampleHead):
    """USS alone after the warm-up: one scalar b, s=64, m_sample=0.1 (§2.2); t = b/s."""

    renamed = {"m": "m_sample"}
    per_class_bias = False

    def __init__(self, num_classes: int, embedding_size: int, s: float = 64.0, m_class: float = 0.4,
                 m_sample: float = 0.1, bias_init: float | None = None, clamp: bool | str = False,
                 s2s_start_epoch: int = 1, min_fill: float = 0.99, weight_init: str = "normal",
                 sample_rate: float = 1.0, memory_dtype: str = "float32") -> None:
        super().__init__(num_classes, embedding_size, "bce", self.per_class_bias, s, m_class, m_sample, bias_init,
                         clamp, s2s_start_epoch, min_fill, (0.0, 1.0), weight_init, sample_rate, memory_dtype)


@register("ss_bce")
class SampleBCEHead(USSHead):
    """Sample-to-sample BCE with one bias per class, sharded (and sampled) with the memory (§2.4);
    t_j = b_j/s. The same loss, parameters and defaults as USS otherwise."""

    per_class_bias = True


@register("unitsface")
class UniTSFaceHead(SampleToSampleHead):
    """UniTSFace: CosFace (s, m_class) on the proxies plus USS (s, m_sample) on the memory (§2.6); t = b/s.
    `weights=(0, 1)` is USS alone after the warm-up (the `uss` head)."""

    renamed = {"warmup_epochs": "s2s_start_epoch"}

    def __init__(self, num_classes: int, embedding_size: int, s: float = 64.0, m_class: float = 0.4,
                 m_sample: float = 0.1, bias_init: float | None = None, clamp: bool | str = False,
                 s2s_start_epoch: int = 1, min_fill: float = 0.99,
                 weights: Sequence[float] = (1.0, 1.0), weight_init: str = "normal",
                 sample_rate: float = 1.0, memory_dtype: str = "float32") -> None:
        super().__init__(num_classes, embedding_size, "bce", False, s, m_class, m_sample, bias_init, clamp,
                         s2s_start_epoch, min_fill, weights, weight_init, sample_rate, memory_dtype)
