"""The column-loss engine: every head's loss, streamed over column chunks of a class shard.

Every head in unitsface is a loss over one embedding's logits against the columns of a class shard
(class proxies W, the identity memory M, EPL's prototypes Q). With c_ij the cosine (or the raw dot
product) of sample i and column j, the logits are

    target      z_i  = s·φ_i − b_{y_i}          φ_i: the head's target transform of c_{i,y_i}
    non-target  z_ij = s·g_i(c_ij) − b_j        g_i: identity, or a per-row transform (CurricularFace)

and the loss of sample i is one of two reductions (`ColumnSpec.kind`):

    softmax:  L_i = LSE({z_i} ∪ {z_ij}_{j≠y_i} ∪ {e_i}) − z_i          e_i: an extra logit (UNPG's pairs)
    bce:      L_i = sp(−[z_i]) + λ·Σ_{j≠y_i} sp([z_ij])                 [·]: optional clamp to [−s, s]

(UniTSFace/UniFace/EPL/UNPG/baselines; formulas per head in methods.md §1–§7.) A head computes φ_i on
its B target cosines with plain autograd (margins, MagFace's magnitude, AdaFace's quality, EPL's
adaptive margin: `target_cosine`), then `column_loss` evaluates the columns chunk by chunk and returns
Σ_i w_i·L_i. `functional.dense_column_loss` is the same function on a full cosine matrix: the readable
reference the tests hold the engine to.

Why chunks and a hand-written backward. Autograd over a B×C logit matrix keeps several B×C_r buffers
alive, and with class sharding each rank's B_global×C_r is as large as one process's B×C, so memory
would not shrink with the rank count. Here a chunk of columns holds at most 1/CHUNK_FRACTION as many
numbers as the rows it comes from, and every gradient (of the embeddings, of the rows when they are
trained, of φ, the bias and the extra logit) is accumulated during the forward: one pass for BCE,
two for softmax (its LSE first). The forward then never needs the rows again, which is what lets a
head overwrite its memory or prototypes right after the loss (write-after-loss, methods.md §2.1).

Class shards (D2–D4): the non-target LSE or sum of each shard is combined over ranks inside the
forward (all-reduce); the target logit and the extra logit are added once. Every rank returns the
loss of the whole global batch; the gradients it returns are those of its own columns, which the
gathered-embedding backward sums over ranks (D1).

Columns that are a mixture of the rows with per-class features (VPL's (1 − λ_j)·Ŵ_j + λ_j·q_j, `RowMixture`) are
formed a chunk at a time, their gradient taken back to the rows per chunk: the mixture never exists whole.

AnchorFace's pairs of the batch with its stored features (K per identity, sharded like the columns) are
streamed over the same chunks, with the same forward-accumulated gradient (end of this module).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from unitsface.parallel import is_distributed, sum_over_shards

CHUNK_FRACTION = 16  # a B×w chunk holds at most 1/16 as many numbers as the C_r×d rows it comes from
MIN_CHUNK_COLUMNS = 64  # below this width a chunk costs more in dispatch than it saves in memory (CPU)
# A GPU launches a dozen kernels per chunk: below ~1k columns their launch time outweighs their work, and a
# B×1024 chunk is a few MB of device memory.
MIN_CHUNK_COLUMNS_BY_DEVICE = {"cuda": 1024}
NORM_EPS = 1e-5  # the CVI-SZU and EPL references normalise with max(|x|, 1e-5)

NegativeTransform = Callable[[torch.Tensor], torch.Tensor]  # g(c) on a B×w chunk, elementwise, differentiable


@dataclass(frozen=True)
class ColumnSpec:
    """How a head turns cosines into its loss (module docstring).

    `kind` "softmax" or "bce"; `s` the scale; `negatives` g applied to non-target cosines (None: g(c) = c);
    `lam` λ of the BCE negatives; `clamp` the references' [−s, s] clamp of every BCE argument;
    `normalized` False for raw dot products (the plain softmax head).
    """

    kind: str
    s: float
    negatives: NegativeTransform | None = None
    lam: float = 1.0
    clamp: bool = False
    normalized: bool = True

    def __post_init__(self) -> None:
        if self.kind not in ("softmax", "bce"):
            raise ValueError(f"column loss kind must be 'softmax' or 'bce', got {self.kind!r}")


class _Chunk:
    """Columns [start, end) of the rows, with a B×w mask of the step's target entries among them (a mask, not
    indices: finding indices would cost a device-to-host round trip per chunk), and their fp32 rows when the
    pass reads rows."""

    def __init__(self, start: int, end: int, labels: torch.Tensor, rows: torch.Tensor | None = None) -> None:
        self.start, self.end, self.rows = start, end, rows
        self.targets = labels.unsqueeze(1) == torch.arange(start, end, device=labels.device)


def chunk_bounds(num_columns: int, dim: int, batch: int, device: torch.device) -> Iterator[tuple[int, int]]:
    """[start, end) of chunks of w columns with batch·w ≤ num_columns·dim / CHUNK_FRACTION (w ≥ the device's
    minimum width).

    An empty shard still yields one (empty) chunk: its LSE is −inf and its sum 0.
    """
    minimum = MIN_CHUNK_COLUMNS_BY_DEVICE.get(device.type, MIN_CHUNK_COLUMNS)
    width = max(minimum, math.ceil(num_columns * dim / (CHUNK_FRACTION * max(1, batch))))
    for start in range(0, max(num_columns, 1), width):
        yield start, min(start + width, num_columns)


def column_chunks(labels: torch.Tensor, num_columns: int, dim: int,
                  block: Callable[[int, int], torch.Tensor] | None = None) -> Iterator[_Chunk]:
    """The `chunk_bounds` of a class shard, each with its target mask and, given `block(start, end)`, its rows."""
    for start, end in chunk_bounds(num_columns, dim, labels.numel(), labels.device):
        yield _Chunk(start, end, labels, None if block is None else block(start, end))


def row_norms(rows: torch.Tensor, eps: float = NORM_EPS) -> torch.Tensor:
    """max(|row|, eps) in fp32 (whatever the rows' dtype), the denominator of every cosine against `rows`."""
    return torch.linalg.vector_norm(rows, dim=1, dtype=torch.float32).clamp_min(eps)


@dataclass(frozen=True)
class RowMixture:
    """Rows mixed with per-class features, M_j = (1 − λ_j)·W_j/max(‖W_j‖, eps) + λ_j·q_j (VPL, methods.md §7.1).

    The engine forms M a chunk at a time, so neither the C_r×d mixture nor its gradient ever exists whole; the
    gradient reaches the rows W only (q is the head's state, λ its schedule). `features`: q, C_r×d; `lam`: λ, C_r.
    """

    features: torch.Tensor
    lam: torch.Tensor

    def scale(self, norms: torch.Tensor, index: slice | torch.Tensor) -> torch.Tensor:
        """s_j = (1 − λ_j)/max(‖W_j‖, eps) of the rows W[index] whose norms are given."""
        return (1.0 - self.lam[index].float()) / norms.clamp_min(NORM_EPS)

    def mix(self, rows: torch.Tensor, index: slice | torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        """M = s·W + λ·q of the rows W[index], in fp32: with `scale` given (the engine's chunks, no autograd), or
        differentiable in `rows` through their norms (the B target rows)."""
        if scale is None:
            scale = self.scale(torch.linalg.vector_norm(rows, dim=1, dtype=torch.float32), index)
        lam = self.lam[index].float().unsqueeze(1)
        return torch.mul(rows.float(), scale.unsqueeze(1)).addcmul_(self.features[index].float(), lam)


def _all_reduce(t: torch.Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM) -> torch.Tensor:
    if is_distributed():
        dist.all_reduce(t, op=op)
    return t


class _Columns:
    """What every pass over the chunks reads: x (B×d, fp32), the rows (or their `RowMixture`), 1/‖row‖ (or 1),
    the column bias."""

    def __init__(self, x: torch.Tensor, rows: torch.Tensor, labels: torch.Tensor, spec: ColumnSpec,
                 bias: torch.Tensor | None, valid: torch.Tensor | None, mixture: RowMixture | None = None) -> None:
        self.x, self.rows, self.labels, self.spec, self.valid, self.bias = x, rows, labels, spec, valid, bias
        self.mixture = mixture
        if mixture is not None:
            # M_j = s_j·W_j + λ_j·q_j with s_j = (1 − λ_j)/max(‖W_j‖, eps); dL/dW_j = s_j·(G_j − [‖W_j‖ ≥ eps]·
            # (G_j·W_j)·W_j/‖W_j‖²), G_j = dL/dM_j (clamp_min's rule for the floor, as for the cosine's norm below)
            norms = torch.linalg.vector_norm(rows, dim=1, dtype=torch.float32)
            self.mix_scale = mixture.scale(norms, slice(None))
            self.mix_radial = norms.clamp_min(NORM_EPS).reciprocal_().square_().mul_(norms >= NORM_EPS)
        self.inverse_norms = self.unclamped = None
        if spec.normalized:
            if mixture is None:
                norms = torch.linalg.vector_norm(rows, dim=1, dtype=torch.float32)
            else:  # the mixed rows' norms, a chunk of rows at a time (no target masks needed for that)
                bounds = chunk_bounds(rows.shape[0], rows.shape[1], labels.numel(), labels.device)
                norms = torch.cat([torch.linalg.vector_norm(self.block(a, b), dim=1) for a, b in bounds])
            self.inverse_norms = norms.clamp_min(NORM_EPS).reciprocal_()
            # ‖W_j‖ is differentiated only where the eps floor is not in effect (clamp_min's rule)
            self.unclamped = norms >= NORM_EPS

    def block(self, start: int, end: int) -> torch.Tensor:
        """Rows [start, end) in fp32: a view of fp32 rows, a chunk-sized copy of bf16/fp16 ones or of the mixture."""
        rows = self.rows[start:end]
        return rows.float() if self.mixture is None else self.mixture.mix(rows, slice(start, end),
                                                                         self.mix_scale[start:end])

    def mixture_gradient(self, grad: torch.Tensor, start: int, end: int) -> None:
        """dL/dM of rows [start, end) → dL/dW, in place (the formula in __init__)."""
        rows = self.rows[start:end].float()
        radial = torch.linalg.vecdot(grad, rows).mul_(self.mix_radial[start:end])
        grad.addcmul_(rows, radial.unsqueeze(1), value=-1.0).mul_(self.mix_scale[start:end].unsqueeze(1))

    def chunks(self) -> Iterator[_Chunk]:
        return column_chunks(self.labels, self.rows.shape[0], self.rows.shape[1], self.block)

    def cosine(self, chunk: _Chunk) -> torch.Tensor:
        c = self.x @ chunk.rows.t()
        return c if self.inverse_norms is None else c.mul_(self.inverse_norms[chunk.start : chunk.end])

    def logits(self, chunk: _Chunk, c: torch.Tensor, grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(z = s·g(c) − b on the chunk, dz/dc or None when g is the identity); target entries are set to −inf,
        invalid columns too."""
        spec = self.spec
        slope = None
        if spec.negatives is None:
            z = c * spec.s
        elif grad:
            with torch.enable_grad():
                leaf = c.detach().requires_grad_(True)
                transformed = spec.negatives(leaf)
                (slope,) = torch.autograd.grad(transformed, leaf, torch.full_like(leaf, spec.s))
            z = transformed.detach().mul_(spec.s)
        else:
            z = spec.negatives(c).mul_(spec.s)
        if self.bias is not None:
            z = z.sub_(self.bias if self.bias.numel() == 1 else self.bias[chunk.start : chunk.end])
        z.masked_fill_(chunk.targets, -math.inf)
        if self.valid is not None:
            z.masked_fill_(~self.valid[chunk.start : chunk.end], -math.inf)
        return z, slope

    def accumulate(self, chunk: _Chunk, c: torch.Tensor, dz: torch.Tensor, slope: torch.Tensor | None,
                   grads: dict[str, torch.Tensor | None]) -> None:
        """Add the chunk's share of dL/dx, dL/drows and dL/dbias, given dL/dz on its B×w logits."""
        a, b = chunk.start, chunk.end
        if grads["bias"] is not None:  # dz/db = −1
            if self.bias.numel() == 1:
                grads["bias"] -= dz.sum()
            else:
                grads["bias"][a:b] -= dz.sum(0)
        dc = dz.mul_(slope) if slope is not None else dz.mul_(self.spec.s)
        if self.inverse_norms is not None:
            dc.mul_(self.inverse_norms[a:b])  # both products below carry 1/‖W_j‖
        if grads["x"] is not None:
            grads["x"].addmm_(dc, chunk.rows)
        if grads["rows"] is not None:
            rows_grad = grads["rows"][a:b]
            torch.mm(dc.t(), self.x, out=rows_grad)
            if self.inverse_norms is not None:
                # ∂c_ij/∂W_j = (x̂_i − c_ij·W_j/‖W_j‖)/‖W_j‖: the radial part, only where the eps floor is off
                radial = torch.linalg.vecdot(dc, c, dim=0).mul_(self.inverse_norms[a:b]).mul_(self.unclamped[a:b])
                rows_grad.addcmul_(chunk.rows, radial.unsqueeze(1), value=-1.0)
            if self.mixture is not None:
                self.mixture_gradient(rows_grad, a, b)


def _target_logits(target: torch.Tensor, labels: torch.Tensor, spec: ColumnSpec, bias: torch.Tensor | None,
                   owner: torch.Tensor) -> torch.Tensor:
    """z_i = s·φ_i − b_{y_i}; b_{y_i} from the owner shard (0 elsewhere, summed over shards)."""
    z = target.detach().float() * spec.s
    if bias is None:
        return z
    if bias.numel() == 1:
        return z - bias.detach()
    b_y = torch.where(owner, bias.detach()[labels.clamp(min=0)], torch.zeros_like(z))
    return z - _all_reduce(b_y)


class _ColumnLoss(torch.autograd.Function):
    """Σ_i w_i·L_i of the module docstring for one shard; every gradient accumulated in the forward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, rows: torch.Tensor, target: torch.Tensor, bias: torch.Tensor | None,  # type: ignore[override]
                extra: torch.Tensor | None, labels: torch.Tensor, weights: torch.Tensor, spec: ColumnSpec,
                valid: torch.Tensor | None, has_target: torch.Tensor, mixture: RowMixture | None) -> torch.Tensor:
        wanted = ctx.needs_input_grad
        columns = _Columns(x, rows, labels, spec, bias, valid, mixture)
        grads: dict[str, torch.Tensor | None] = {
            "x": torch.zeros_like(x) if wanted[0] else None,
            "rows": torch.zeros_like(rows, dtype=torch.float32) if wanted[1] else None,
            "bias": torch.zeros_like(bias, dtype=torch.float32) if bias is not None and wanted[3] else None,
        }
        owner = labels >= 0
        z_target = _target_logits(target, labels, spec, bias, owner)
        if spec.kind == "softmax":
            loss, d_target, d_extra = _softmax(columns, z_target, extra, weights, has_target, grads)
        else:
            loss, d_target = _bce(columns, z_target, weights, has_target & owner, grads)
            d_extra = None
        # Every rank computes the same dL/dz_i; it is returned by the owner shard only, so that whatever φ_i
        # depends on (the target row, MagFace's magnitude of x) gets it once over the ranks, like b_{y_i}.
        d_target = torch.where(owner, d_target, torch.zeros_like(d_target))
        if grads["bias"] is not None:  # dz_i/db_{y_i} = −1
            if bias.numel() == 1:
                grads["bias"] -= d_target.sum()
            else:
                grads["bias"].index_add_(0, labels[owner], -d_target[owner])
        d_target = d_target * spec.s
        ctx.save_for_backward(*(g if g is not None else torch.empty(0) for g in
                                (grads["x"], grads["rows"], d_target, grads["bias"], d_extra)))
        ctx.shapes = (x.dtype, rows.dtype, extra.shape if extra is not None else None)
        return loss

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        gx, grows, gtarget, gbias, gextra = ctx.saved_tensors
        x_dtype, rows_dtype, extra_shape = ctx.shapes
        wanted = ctx.needs_input_grad

        def scaled(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
            out = t * grad
            return out if dtype is None else out.to(dtype)

        d_extra = None
        if wanted[4] and gextra.numel():
            d_extra = scaled(gextra)
            if extra_shape is not None and len(extra_shape) == 0:
                d_extra = d_extra.sum()
        return (scaled(gx, x_dtype) if wanted[0] else None, scaled(grows, rows_dtype) if wanted[1] else None,
                scaled(gtarget) if wanted[2] else None, scaled(gbias) if wanted[3] and gbias.numel() else None,
                d_extra, None, None, None, None, None, None)


def _softmax(columns: _Columns, z_target: torch.Tensor, extra: torch.Tensor | None, weights: torch.Tensor,
             has_target: torch.Tensor, grads: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Two passes: the non-target LSE over every shard, then each chunk's softmax weights and gradients."""
    parts = [torch.logsumexp(columns.logits(chunk, columns.cosine(chunk), grad=False)[0], dim=1)
             for chunk in columns.chunks()]
    local = torch.stack(parts, 1)
    top = _all_reduce(local.max(dim=1).values, dist.ReduceOp.MAX)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    total = _all_reduce((local - top.unsqueeze(1)).exp().sum(1))
    lse = torch.logaddexp(total.log() + top, z_target)
    if extra is not None:
        lse = torch.logaddexp(lse, extra.detach().float())
    row_loss = torch.where(has_target, lse - z_target, torch.zeros_like(lse))
    weights = torch.where(has_target, weights, torch.zeros_like(weights))  # a row without its target: no loss
    for chunk in columns.chunks():
        c = columns.cosine(chunk)
        z, slope = columns.logits(chunk, c, grad=True)
        dz = z.sub_(lse.unsqueeze(1)).exp_().mul_(weights.unsqueeze(1))  # softmax · w_i; 0 at −inf
        columns.accumulate(chunk, c, dz, slope, grads)
    d_target = weights * ((z_target - lse).exp() - 1.0)
    d_extra = None if extra is None else weights * (extra.detach().float() - lse).exp()
    return (weights * row_loss).sum(), d_target, d_extra


def _bce(columns: _Columns, z_target: torch.Tensor, weights: torch.Tensor, positive: torch.Tensor,
         grads: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass: every negative term is independent, so its gradient is known as soon as it is computed."""
    spec = columns.spec
    total = torch.zeros((), device=z_target.device)
    for chunk in columns.chunks():
        c = columns.cosine(chunk)
        z, slope = columns.logits(chunk, c, grad=True)
        inside = None
        if spec.clamp:  # no gradient through a clamped term; masked (−inf) entries stay out
            masked, inside = torch.isneginf(z), (z >= -spec.s) & (z <= spec.s)
            z = z.clamp_(-spec.s, spec.s).masked_fill_(masked, -math.inf)
        terms = F.softplus(z)  # sp(−inf) = 0: target and invalid entries add nothing
        total += spec.lam * (terms.sum(1) * weights).sum()
        dz = z.sigmoid_().mul_(weights.unsqueeze(1) * spec.lam)
        if inside is not None:
            dz.mul_(inside)
        columns.accumulate(chunk, c, dz, slope, grads)
    u = -z_target  # the positive term sp(−z_i), on the owner shard only
    inside = None
    if spec.clamp:
        inside = (u >= -spec.s) & (u <= spec.s)
        u = u.clamp(-spec.s, spec.s)
    w = torch.where(positive, weights, torch.zeros_like(weights))
    total = _all_reduce(total + (w * F.softplus(u)).sum())
    d_target = -w * torch.sigmoid(u)  # d sp(−z)/dz
    if inside is not None:
        d_target = d_target * inside
    return total, d_target


def target_cosine(x: torch.Tensor, rows: torch.Tensor, labels: torch.Tensor, normalized: bool = True,
                  mixture: RowMixture | None = None) -> torch.Tensor:
    """c_{i,y_i} = <x_i, W_{y_i}>/‖W_{y_i}‖ (raw for `normalized=False`; against the mixed row M_{y_i} given a
    `mixture`) from the owner shard, summed over shards so that every rank holds it; differentiable in x and the
    target rows. B×d work, not B×C."""
    index = labels.clamp(min=0)
    picked = rows[index].float() if mixture is None else mixture.mix(rows[index], index)
    c = (x.float() * picked).sum(dim=1)
    if normalized:
        c = c / row_norms(picked)
    return sum_over_shards(torch.where(labels >= 0, c, torch.zeros_like(c)))


def column_loss(x: torch.Tensor, rows: torch.Tensor, labels: torch.Tensor, target: torch.Tensor, spec: ColumnSpec,
                bias: torch.Tensor | None = None, extra: torch.Tensor | None = None,
                valid: torch.Tensor | None = None, weights: torch.Tensor | None = None,
                mixture: RowMixture | None = None) -> torch.Tensor:
    """Σ_i w_i·L_i (module docstring) for the rows of this class shard, in fp32 outside autocast.

    `x`: B_g×d, unit rows for cosine heads (the plain softmax head passes raw embeddings with
    `spec.normalized=False`); `rows`: C_r×d raw rows (fp32, or a bf16/fp16 memory read chunk by chunk);
    `labels`: B_g local column of each row's class, −1 where another shard owns it; `target`: φ_i for every
    row (the same on every rank); `bias`: None, (1,) or (C_r,) subtracted from every logit; `extra`: the
    softmax kind's extra logit, (B_g,) or a scalar shared by all rows; `valid`: (C_r,) columns that exist
    (a memory's filled slots) — a row whose own column is invalid has no target term, and for softmax no
    loss at all; `weights`: (B_g,) row weights, 1/B_g by default (the mean over the global batch); `mixture`: the
    columns are `rows` mixed with per-class features (`RowMixture`, VPL), formed chunk by chunk.
    """
    with torch.autocast(device_type=x.device.type, enabled=False):
        x = x.float()
        if weights is None:
            weights = torch.full((x.shape[0],), 1.0 / max(1, x.shape[0]), device=x.device)
        owner = labels >= 0
        own = owner if valid is None else owner & valid[labels.clamp(min=0)]
        has_target = _all_reduce(own.float()) > 0  # some shard holds the row's (valid) target column
        return _ColumnLoss.apply(x, rows, target.float(), None if bias is None else bias.float(),
                                 None if extra is None else extra.float(), labels, weights, spec, valid, has_target,
                                 mixture)


@torch.no_grad()
def negative_lse(x: torch.Tensor, rows: torch.Tensor, labels: torch.Tensor, s: float,
                 valid: torch.Tensor | None = None) -> torch.Tensor:
    """LSE_{j≠y_i} s·c_ij over the valid columns of every shard, per row (−inf for a row with none): the
    data-driven unified bias of methods.md §2.5 is its mean."""
    columns = _Columns(x.float(), rows, labels, ColumnSpec("softmax", s), None, valid)
    parts = [torch.logsumexp(columns.logits(chunk, columns.cosine(chunk), grad=False)[0], dim=1)
             for chunk in columns.chunks()]
    local = torch.stack(parts, 1)
    top = _all_reduce(local.max(dim=1).values, dist.ReduceOp.MAX)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    return _all_reduce((local - top.unsqueeze(1)).exp().sum(1)).log() + top


# --------------------------------------------------------------------------- pairs against stored features
#
# AnchorFace (docs/methods.md "AnchorFace") scores every sample of the global batch against a set of stored
# features, up to K per identity of the shard: the rows below are that set flattened to (C_r·K)×d, row j
# belonging to column (class) j // K. The same chunks as the column loss keep memory proportional to the
# shard: one pass finds the largest negative similarities (the exact anchor threshold needs only those),
# another sums the soft acceptances σ((s − t̂)/τ) of positives and negatives with their gradient.


def _stored_chunks(x: torch.Tensor, rows: torch.Tensor, labels: torch.Tensor, per_class: int,
                   valid: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(unit rows w×d, cosines B×w, positive mask, negative mask) per chunk of the stored rows, in x's dtype; only
    `valid` rows pair. Rows are normalised like any column (max(|row|, NORM_EPS))."""
    inverse = row_norms(rows).reciprocal_().to(x.dtype)
    for start, end in chunk_bounds(rows.shape[0], rows.shape[1], x.shape[0], x.device):
        unit_rows = rows[start:end].to(x.dtype) * inverse[start:end].unsqueeze(1)
        classes = torch.arange(start, end, device=labels.device) // per_class
        same = labels.unsqueeze(1) == classes
        ok = valid[start:end]
        yield unit_rows, x @ unit_rows.t(), same & ok, ~same & ok


def stored_pair_counts(labels: torch.Tensor, valid: torch.Tensor, per_class: int) -> tuple[int, int]:
    """(positive, negative) pair counts of the batch against the valid stored rows of every shard: a sample pairs
    positively with its own class's valid rows (on the owner shard), negatively with every other valid row."""
    per_column = valid.view(-1, per_class).sum(1)
    positives = torch.where(labels >= 0, per_column[labels.clamp(min=0)], torch.zeros_like(labels)).sum()
    counts = torch.stack([positives, labels.numel() * per_column.sum() - positives])
    positive, negative = _all_reduce(counts).tolist()
    return int(positive), int(negative)


@torch.no_grad()
def top_stored_negatives(x: torch.Tensor, rows: torch.Tensor, labels: torch.Tensor, per_class: int,
                         valid: torch.Tensor, k: int) -> torch.Tensor:
    """The k largest negative similarities of the batch against the stored rows, as candidates from every shard
    (R·k values, −inf where a shard has fewer): a running top-k over the chunks, so memory stays O(k + chunk)."""
    best = x.new_empty(0)
    for _, c, _, negative in _stored_chunks(x, rows, labels, per_class, valid):
        pool = torch.cat([best, c.masked_fill_(~negative, -math.inf).flatten()])
        best = torch.topk(pool, min(k, pool.numel())).values
    best = torch.cat([best, best.new_full((k - best.numel(),), -math.inf)])
    if not is_distributed():
        return best
    gathered = [torch.empty_like(best) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, best)
    return torch.cat(gathered)


class _StoredPairSums(torch.autograd.Function):
    """[Σ_pos σ((s − t)/τ), Σ_neg σ((s − t)/τ)] of this shard; dL/dx accumulated in the forward, one B×d
    accumulator per sum, so backward is two scaled additions and the rows are never needed again."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, rows: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor,  # type: ignore[override]
                per_class: int, threshold: torch.Tensor, tau: float) -> torch.Tensor:
        sums = x.new_zeros(2)
        grads = x.new_zeros(2, *x.shape) if ctx.needs_input_grad[0] else None
        t = threshold.detach().to(x.dtype)
        for unit_rows, c, positive, negative in _stored_chunks(x, rows, labels, per_class, valid):
            accept = torch.sigmoid((c - t) / tau)
            slope = accept * (1.0 - accept) / tau  # dσ/ds; ds/dx = the unit row
            for which, mask in enumerate((positive, negative)):
                sums[which] += (accept * mask).sum()
                if grads is not None:
                    grads[which].addmm_(slope * mask, unit_rows)
        ctx.save_for_backward(grads if grads is not None else torch.empty(0))
        return sums

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (grads,) = ctx.saved_tensors
        dx = grad[0] * grads[0] + grad[1] * grads[1] if ctx.needs_input_grad[0] else None
        return dx, None, None, None, None, None, None


def stored_pair_sums(x: torch.Tensor, rows: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor,
                     per_class: int, threshold: torch.Tensor, tau: float) -> torch.Tensor:
    """[Σ_pos, Σ_neg] of σ((s_ij − t)/τ) over the pairs of the batch (unit rows `x`, B×d, differentiable) with the
    valid stored rows of this shard ((C_r·K)×d, row j of column j // K; `labels`: the column of each sample's class,
    −1 on other shards), summed over shards; computed in x's dtype (fp32 under autocast, fp64 for gradient checks)
    with no gradient to the rows or the threshold."""
    with torch.autocast(device_type=x.device.type, enabled=False):
        x = x if x.dtype == torch.float64 else x.float()
        return sum_over_shards(_StoredPairSums.apply(x, rows, labels, valid, per_class, threshold, tau))
