"""The per-class state a head holds, one small component each: class proxies, identity memory, learned
bias, prototype bank, feature queue, negative-pair miner, AnchorFace's feature set.

A head is composed of the components its method needs (methods.md §1.0, §2.1, §2.5, §3.1, §5.1, §6, §7.1,
§7.2).
Each component
- owns its tensors for this rank's class shard `[start, start + size)` (a `ClassShard`, methods.md D2):
  a shard-sized tensor is sharded, a scalar or (1,)-shaped one replicated (D5);
- is checkpointed through its own `state_dict` (D6);
- reads its rows through the step's Partial FC `ColumnSample`, so that every per-class state of a head
  sees the same columns (§1.0, §2.8, §3.2), and writes at the real rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from unitsface.losses import functional as LF
from unitsface.parallel import ClassShard, sum_over_shards

ROW_READER = "read_rows"  # a lazily updated parameter carries `read_rows(columns)` (set by `optim.SGD`)
MEMORY_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
        """The kept rows of per-class state (C_r×…), `rows` itself when all are kept. A parameter that an
        optimiser updates lazily is read through its `read_rows`, which brings the rows up to date and gives
        it a sparse gradient."""
        if self.columns is None:
            return rows
        reader = getattr(rows, ROW_READER, None)
        return rows[self.columns] if reader is None else reader(self.columns)


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


@torch.no_grad()
def write_rows(buffer: torch.Tensor, local_labels: torch.Tensor, rows: torch.Tensor) -> None:
    """buffer[y_i] <- rows[i] for this shard's labels (-1: another shard's), the last occurrence of a label
    winning (methods.md §2.1 "last writer wins"), with no device-to-host round trip.

    Every row writes the value its slot ends with — the last occurrence's row — so duplicate indices in one
    `index_copy_` agree and the result is deterministic; rows of other shards write slot 0's final value to
    slot 0 rather than being filtered out (filtering would need their count on the host).
    """
    n, order = buffer.shape[0], torch.arange(local_labels.numel(), device=local_labels.device)
    valid = local_labels >= 0
    slot = torch.where(valid, local_labels, torch.full_like(local_labels, n))  # n: a spare entry for other shards
    last = torch.full((n + 1,), -1, dtype=torch.long, device=local_labels.device)
    last.scatter_reduce_(0, slot, order, reduce="amax")
    values = rows[last[slot].clamp(min=0)].to(buffer.dtype)
    first_slot = torch.where(last[0] >= 0, rows[last[0].clamp(min=0)].to(buffer.dtype), buffer[0])
    values = torch.where(valid.view(-1, *[1] * (values.dim() - 1)), values, first_slot)
    buffer.index_copy_(0, torch.where(valid, local_labels, torch.zeros_like(local_labels)), values)


class ClassProxies(nn.Module):
    """`weight`: this shard's C_r×d class proxies, a trained parameter (§1.0)."""

    def __init__(self, shard: ClassShard, embedding_size: int, init: str = "normal") -> None:
        super().__init__()
        self.weight = nn.Parameter(init_class_rows(shard.size, embedding_size, init))

    def rows(self, sample: ColumnSample) -> torch.Tensor:
        return sample.take(self.weight)


class IdentityMemory(nn.Module):
    """One feature per identity of this shard (`features`) and a `filled` mask (methods.md §2.1).

    A head reads the memory before its forward call writes the batch's detached raw features (last
    occurrence of a label wins), in training mode only. The column-loss engine reads the rows in its forward
    pass only, so the write may come before backward(). With Partial FC the loss reads the step's columns;
    the writes reach every label of the batch.

    `dtype` "bfloat16" or "float16" stores the features at half the memory (4 GB → 2 GB at 2M identities,
    d = 512); they are rounded when written and read into fp32 chunk by chunk. Not in the reference code,
    which keeps fp32; bench/head_scaling.py measures the loss change.
    """

    def __init__(self, shard: ClassShard, embedding_size: int, dtype: str = "float32") -> None:
        super().__init__()
        if dtype not in MEMORY_DTYPES:
            raise ValueError(f"memory_dtype must be one of {', '.join(MEMORY_DTYPES)}, got {dtype!r}")
        self.shard = shard
        self.register_buffer("features", torch.zeros(shard.size, embedding_size, dtype=MEMORY_DTYPES[dtype]))
        self.register_buffer("filled", torch.zeros(shard.size, dtype=torch.bool))

    def rows(self, sample: ColumnSample) -> torch.Tensor:
        return sample.take(self.features)

    def valid(self, sample: ColumnSample) -> torch.Tensor:
        """The step's fill mask, a copy: the loss must not see `remember`'s writes of this call."""
        return sample.take(self.filled).clone()

    def remember(self, x: torch.Tensor, labels: torch.Tensor) -> None:
        """Write-after-loss: M[y_i] <- sg(x_i) for this shard's (global) labels, the real rows."""
        local = self.shard.local_labels(labels)
        write_rows(self.features, local, x.detach())
        write_rows(self.filled, local, torch.ones_like(local, dtype=torch.bool))

    def filled_fraction(self) -> float:
        """Filled slots over all C identities, summed over class shards."""
        return float(sum_over_shards(self.filled.sum().double())) / self.shard.num_classes


class LearnedBias(nn.Module):
    """The threshold bias b of the BCE-type losses, subtracted from every logit: one unified `value` (1,)
    (replicated, its gradient summed over shards) or one per class (C_r,) (sharded), with t = b/s the
    learned threshold in cosine units (methods.md §2.7, §3.1, §3.3).

    `start=None`: b starts at 0 with `initialised` False, to be set once from data (§2.5, `initialise`);
    the flag is a buffer, so a resumed run does not re-initialise.
    """

    def __init__(self, shard: ClassShard, per_class: bool, start: float | None, s: float) -> None:
        super().__init__()
        self.s = float(s)
        self.value = nn.Parameter(torch.full((shard.size if per_class else 1,), 0.0 if start is None else start))
        self.register_buffer("initialised", torch.tensor(start is not None))
        self.ready = start is not None  # `initialised` on the host: asked every step, never read off the device

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # type: ignore[override]
        super()._load_from_state_dict(*args, **kwargs)
        self.ready = bool(self.initialised)

    @property
    def unified(self) -> bool:
        return self.value.numel() == 1

    def columns(self, sample: ColumnSample) -> torch.Tensor:
        return self.value if self.unified else sample.take(self.value)

    @property
    def threshold(self) -> float | None:
        """b/s once set; None for per-class biases, which have no single threshold, and before the start."""
        return float(self.value.detach()) / self.s if self.unified and self.ready else None

    @property
    def thresholds(self) -> torch.Tensor:
        """t_j = b_j/s for this shard's classes (one value for a unified bias)."""
        return self.value.detach() / self.s

    @torch.no_grad()
    def initialise(self, b0: torch.Tensor) -> None:
        """b += b0 (b is still exactly its start value 0: until now its loss term was 0), once."""
        self.value.add_(b0)
        self.initialised.fill_(True)
        self.ready = True

    def unused(self) -> torch.Tensor:
        """0·b, for steps without the bias's loss term: DDP expects a gradient for every parameter, and a
        zero one leaves b and its optimizer state unmoved."""
        return self.value.sum() * 0.0


    def uce_conventions(self, num_classes: int) -> dict[str, float]:
        """Both UCE conventions of a unified bias (methods.md §3.1, §8 #8): t_raw = b/s, the UniTSFace one and
        the primary, and t_uce = (b − log(C − 1))/s from UniFace's b̃ = s·t + log(N − 1); the paper does not
        say which it reports. Empty before the bias is set."""
        t = self.threshold
        return {} if t is None else {"b/s": t, "(b - log(C-1))/s": t - math.log(num_classes - 1) / self.s}


def uniface_bias_start(num_classes: int, sample_rate: float, bias_init: float | None) -> float:
    """UniFace's b0 = log(10·C·r) unless given: the negatives of an all-zero cosine matrix start at about
    0.1 nat in total; r because only C·r columns are summed (UniFace code; methods.md §3.1, §3.2)."""
    return math.log(10.0 * num_classes * sample_rate) if bias_init is None else float(bias_init)


class PrototypeBank(nn.Module):
    """EPL's empirical prototypes Q (C_r×d, no gradient) and their gated update (methods.md §5.1–5.2).

    The reference bank is N(0, 1), not normalised (`init="reference"`): the first write to a row is
    dominated by it; `init="unit"` normalises it.
    """

    def __init__(self, shard: ClassShard, embedding_size: int, gate: str, init: str) -> None:
        super().__init__()
        LF.prototype_gate(torch.zeros(1), gate)  # validates the gate name up front
        if init not in ("reference", "unit"):
            raise ValueError(f"bank_init must be one of reference, unit, got {init!r}")
        self.shard, self.gate = shard, gate
        bank = torch.randn(shard.size, embedding_size)
        self.register_buffer("bank", LF.normalize(bank) if init == "unit" else bank)

    def rows(self, sample: ColumnSample) -> torch.Tensor:
        return sample.take(self.bank)

    @torch.no_grad()
    def update(self, x: torch.Tensor, labels: torch.Tensor) -> None:
        """Q_y <- normalize(α·Q_y + (1 − α)·ẽ), α = g(<Q_y, ẽ>): a parallel read of the old rows, last
        writer wins, the real rows (§5.2)."""
        local = self.shard.local_labels(labels)
        e = LF.normalize(x)
        old = self.bank[local.clamp(min=0)]
        gate = LF.prototype_gate((old * e).sum(dim=1), self.gate).unsqueeze(1)
        write_rows(self.bank, local, LF.normalize(gate * old + (1.0 - gate) * e))


class FeatureQueue(nn.Module):
    """VPL's most recent normalised feature per class (`features`), the training-forward counter
    (`iteration`) and the iteration of each class's last write (`written`) (methods.md §7.1); checkpointed,
    unlike the reference's queue."""

    def __init__(self, shard: ClassShard, embedding_size: int) -> None:
        super().__init__()
        self.shard = shard
        self.register_buffer("features", LF.normalize(torch.randn(shard.size, embedding_size)))
        self.register_buffer("written", torch.zeros(shard.size, dtype=torch.long))
        self.register_buffer("iteration", torch.zeros((), dtype=torch.long))

    def rows(self, sample: ColumnSample) -> torch.Tensor:
        return sample.take(self.features)

    def mixing(self, sample: ColumnSample, lam: float, start: int, staleness: int) -> torch.Tensor:
        """λ_j per kept column: λ for classes written within `staleness` iterations once past `start`."""
        written = sample.take(self.written)
        active = (self.iteration > start) & (self.iteration - written <= staleness)
        return torch.where(active, lam, 0.0).float()

    @torch.no_grad()
    def write(self, x: torch.Tensor, labels: torch.Tensor) -> None:
        """q_y <- normalize(sg(x)), τ_y <- T for the global batch, the last occurrence winning."""
        local = self.shard.local_labels(labels)
        write_rows(self.features, local, LF.normalize(x))
        write_rows(self.written, local, self.iteration.expand(local.shape))


class NegativePairs(nn.Module):
    """UNPG's miner: the negative pairs of the batch filtered by Tukey fences (methods.md §6.1–6.3), as one
    extra logit per step, LSE_{v ∈ S'_n} s·v, with its gradient counted once over ranks (D1). No state but
    the last step's counts `last_num_pairs` |S_n| and `last_num_kept` |S'_n|, for logs."""

    def __init__(self, whisker: float) -> None:
        super().__init__()
        if whisker < 0:
            raise ValueError(f"whisker must be >= 0, got {whisker}")
        self.whisker = float(whisker)
        self.last_num_pairs = 0
        self.last_num_kept = 0

    def extra_logit(self, x: torch.Tensor, labels: torch.Tensor, s: float) -> torch.Tensor:
        """The pair block's LSE (a scalar shared by every row), −inf without a negative pair."""
        kept, self.last_num_pairs = LF.tukey_negative_pairs(x, labels, self.whisker)
        self.last_num_kept = kept.numel()
        if not kept.numel():
            return x.new_tensor(float("-inf"))
        return LF.count_once(torch.logsumexp(s * kept, dim=0))


class FeatureSet(nn.Module):
    """AnchorFace's online feature set S (docs/methods.md "AnchorFace"): up to K unit features per identity of
    this shard, each valid for M training forward calls after the one that wrote it.

    `features` (C_r×K×d, fp32), `filled` and `written` (C_r×K: the `step` of the write) and `cursor` (C_r: the
    slot the identity writes next) are sharded, `step` (training forward calls so far) replicated; all are
    checkpointed. A feature written at step T pairs at steps T+1 … T+M and is ignored from T+M+1 on. Written after
    the loss (`remember`): a sample never pairs with itself. A class with n samples in the global batch fills
    min(n, K) slots in ring order, batch order deciding, so the last K of its samples are kept.
    """

    def __init__(self, shard: ClassShard, embedding_size: int, per_identity: int, valid_steps: int) -> None:
        super().__init__()
        if per_identity < 1 or valid_steps < 1:
            raise ValueError(f"features_per_identity and valid_steps must be >= 1, got {per_identity}, {valid_steps}")
        self.shard, self.per_identity, self.valid_steps = shard, int(per_identity), int(valid_steps)
        self.register_buffer("features", torch.zeros(shard.size, per_identity, embedding_size))
        self.register_buffer("filled", torch.zeros(shard.size, per_identity, dtype=torch.bool))
        self.register_buffer("written", torch.zeros(shard.size, per_identity, dtype=torch.long))
        self.register_buffer("cursor", torch.zeros(shard.size, dtype=torch.long))
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    def rows(self, sample: ColumnSample) -> torch.Tensor:
        """The step's columns' features as (C_s·K)×d rows, row j belonging to column j // K."""
        features = sample.take(self.features)
        return features.reshape(-1, features.shape[-1])

    def valid(self, sample: ColumnSample) -> torch.Tensor:
        """(C_s·K,) rows that hold a feature written at most `valid_steps` steps ago (a fresh tensor: `remember`
        cannot change what the loss reads)."""
        return (sample.take(self.filled) & (self.step - sample.take(self.written) <= self.valid_steps)).reshape(-1)

    @torch.no_grad()
    def remember(self, unit: torch.Tensor, labels: torch.Tensor) -> None:
        """Write the global batch's unit features (detached) into their identities' next slots, then count the step."""
        local = self.shard.local_labels(labels)
        mine = local >= 0
        ids, order = torch.sort(local[mine], stable=True)  # batch order within each identity
        rows = unit.detach()[mine][order]
        first = torch.searchsorted(ids, ids)
        count = torch.searchsorted(ids, ids, right=True) - first  # samples of the identity in the batch
        rank = torch.arange(ids.numel(), device=ids.device) - first  # occurrence index within the identity
        dropped = (count - self.per_identity).clamp(min=0)  # the earliest of more than K samples are not kept
        keep = rank >= dropped
        slot = (self.cursor[ids] + rank - dropped) % self.per_identity
        self.features[ids[keep], slot[keep]] = rows[keep].to(self.features.dtype)
        self.filled[ids[keep], slot[keep]] = True
        self.written[ids[keep], slot[keep]] = self.step
        once = rank == 0
        self.cursor[ids[once]] = (self.cursor[ids[once]] + count[once].clamp(max=self.per_identity)) % self.per_identity
        self.step += 1
