"""Losses of embeddings against the class rows of a shard, streamed in column chunks.

    CosFace (Wang et al. 2018; methods.md §1.3), trained rows W:
        L_i = LSE_j z_ij − z_{i,y_i},   z_ij = s·(x̂_i·W_j/‖W_j‖ − m·[j = y_i])
    threshold BCE against rows without a gradient, the identity memory M (UniTSFace USS,
    Li et al. NeurIPS 2023, Eqs. 11, 22, 24; methods.md §2.2, §2.4):
        L_i = sp(−(s(p_i − m) − b_{y_i})) + λ·Σ_{j≠y_i} sp(s·n_ij − b_j),   n_ij = x̂_i·M_j/‖M_j‖
    and the data-driven unified bias b0 = mean_i LSE_{j≠y_i} s·n_ij (methods.md §2.5).
Both losses return the mean over the global batch; `unitsface.parallel` combines the shards (D3, D4).

Why not autograd on the B×C cosine matrix (`functional.py`): autograd keeps several B×C_r
matrices (product, logits, their gradients) alive at once, and with class sharding each rank's
B_global×C_r is as large as one process's B×C, so they would not shrink with the rank count.
Here a chunk of columns holds at most 1/CHUNK_FRACTION as many numbers as the rows it is
computed from, so every buffer of a step is proportional to the rank's shard, and the gradients
are written out by hand (no autograd graph of a chunk):

- CosFace keeps only the row LSE in the forward; the backward recomputes each chunk's logits
  and applies the exact gradient dz = g·(softmax − onehot) through c = x̂·Wᵀ/‖W‖ (3 products).
- The threshold-BCE terms are independent of one another, so their gradients (embeddings and
  bias) are accumulated in the same pass as the loss (2 products) and the memory is read once:
  it may be overwritten before backward() (the head's write-after-loss).
Rows are never normalised into a copy: c = (x̂·Wᵀ)/max(‖W‖, eps) is the same function.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from unitsface.losses.functional import NORM_EPS, mean_finite, negative_logits, normalize, row_norms
from unitsface.parallel import logsumexp_over_shards, sum_over_shards

CHUNK_FRACTION = 16  # a B×w chunk holds at most 1/16 as many numbers as the C_r×d rows it comes from
MIN_CHUNK_COLUMNS = 64  # below this width a chunk costs more in dispatch than it saves in memory


class _Chunk:
    """Columns [start, end) of the rows, with the step's positive entries that fall in them."""

    def __init__(self, start: int, end: int, labels: torch.Tensor) -> None:
        self.start, self.end = start, end
        inside = (labels >= start) & (labels < end)
        self.rows_with_positive = inside.nonzero().squeeze(1)  # batch rows whose class is a column here
        self.positive_columns = labels[self.rows_with_positive] - start

    @property
    def positives(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(batch row, chunk column) index pair of every positive entry in the chunk."""
        return self.rows_with_positive, self.positive_columns

    def rows(self, rows: torch.Tensor) -> torch.Tensor:
        """These rows in fp32: a view of fp32 rows, a chunk-sized copy of a bf16/fp16 memory."""
        return rows[self.start : self.end].float()

    def cosine(self, unit_x: torch.Tensor, rows: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
        """B×w cosines of unit `unit_x` against these raw rows (a fresh tensor, free to modify)."""
        return (unit_x @ self.rows(rows).t()).div_(norms[self.start : self.end])


def column_chunks(labels: torch.Tensor, num_columns: int, dim: int) -> Iterator[_Chunk]:
    """Chunks of w columns with B·w ≤ num_columns·dim / CHUNK_FRACTION (w ≥ MIN_CHUNK_COLUMNS).

    An empty shard still yields one (empty) chunk: its LSE is −inf, as logsumexp over no column.
    """
    width = max(MIN_CHUNK_COLUMNS, math.ceil(num_columns * dim / (CHUNK_FRACTION * max(1, labels.numel()))))
    for start in range(0, max(num_columns, 1), width):
        yield _Chunk(start, min(start + width, num_columns), labels)


# ------------------------------------------------------------------------------------- CosFace


def _cosface_logits(chunk: _Chunk, cos: torch.Tensor, s: float, m: float) -> torch.Tensor:
    """s·(cos − m·onehot), in place on `cos`."""
    z = cos.mul_(s)
    z[chunk.positives] -= s * m
    return z


class _CosFaceRows(torch.autograd.Function):
    """Sum over the global batch of LSE_j z_ij − z_{i,y_i} for unit `x` against raw trained rows."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, rows: torch.Tensor, labels: torch.Tensor, s: float,  # type: ignore[override]
                m: float) -> torch.Tensor:
        length = torch.linalg.vector_norm(rows, dim=1)
        # ‖W_j‖ is differentiated only where the eps floor is not in effect (clamp_min's rule).
        norms, unclamped = length.clamp_min(NORM_EPS), length >= NORM_EPS
        lse_parts, target = [], torch.zeros(x.shape[0], device=x.device)
        for chunk in column_chunks(labels, rows.shape[0], rows.shape[1]):
            z = _cosface_logits(chunk, chunk.cosine(x, rows, norms), s, m)
            target.index_add_(0, chunk.rows_with_positive, z[chunk.positives])
            lse_parts.append(torch.logsumexp(z, dim=1))
        lse = logsumexp_over_shards(torch.stack(lse_parts, 1), dim=1)
        ctx.save_for_backward(x, rows, labels, norms, unclamped, lse)
        ctx.s, ctx.m = s, m
        return lse - sum_over_shards(target)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        x, rows, labels, norms, unclamped, lse = ctx.saved_tensors
        s, m = ctx.s, ctx.m
        grad_x = torch.zeros_like(x) if ctx.needs_input_grad[0] else None
        grad_rows = torch.empty_like(rows) if ctx.needs_input_grad[1] else None
        for chunk in column_chunks(labels, rows.shape[0], rows.shape[1]):
            a, b = chunk.start, chunk.end
            cos = chunk.cosine(x, rows, norms)
            # dL/dc = s·g·(softmax − onehot), scaled by 1/‖W_j‖ for both products below.
            dcos = _cosface_logits(chunk, cos.clone(), s, m).sub_(lse.unsqueeze(1)).exp_()
            dcos[chunk.positives] -= 1.0
            dcos.mul_(grad.unsqueeze(1) * s).div_(norms[a:b])
            if grad_x is not None:
                grad_x.addmm_(dcos, rows[a:b])
            if grad_rows is not None:
                # ∂c_ij/∂W_j = (x̂_i − c_ij·W_j/‖W_j‖)/‖W_j‖
                radial = torch.linalg.vecdot(dcos, cos, dim=0).div_(norms[a:b]).mul_(unclamped[a:b])
                torch.mm(dcos.t(), x, out=grad_rows[a:b])
                grad_rows[a:b].addcmul_(rows[a:b], radial.unsqueeze(1), value=-1.0)
        return grad_x, grad_rows, None, None, None


def cosface_rows_loss(embeddings: torch.Tensor, rows: torch.Tensor, labels: torch.Tensor, s: float = 64.0,
                      m: float = 0.4) -> torch.Tensor:
    """`cosface_loss(cosine(embeddings, rows), labels, s, m)` for the class rows of this shard
    (`labels` local to them, −1 where another shard owns the class), in fp32 outside autocast."""
    with torch.autocast(device_type=embeddings.device.type, enabled=False):
        return _CosFaceRows.apply(normalize(embeddings), rows.float(), labels, float(s), float(m)).mean()


# ------------------------------------------------------------------------ threshold BCE, memory


def _weigh_negatives(chunk: _Chunk, values: torch.Tensor, neg_weight: float) -> None:
    """values *= λ in place, except at the positive entries."""
    if neg_weight != 1.0:
        positives = values[chunk.positives]
        values.mul_(neg_weight)[chunk.positives] = positives


class _ThresholdBCERows(torch.autograd.Function):
    """Sum over the batch and this shard's columns of the threshold-BCE terms of unit `x`
    against raw rows without a gradient; d/dx and d/db are accumulated in the forward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, rows: torch.Tensor, bias: torch.Tensor,  # type: ignore[override]
                valid: torch.Tensor | None, labels: torch.Tensor, params: tuple, differentiate: bool
                ) -> torch.Tensor:
        s, m, neg_weight, clamp = params
        want_x, want_bias = differentiate and ctx.needs_input_grad[0], differentiate and ctx.needs_input_grad[2]
        scale = row_norms(rows).reciprocal_().mul_(s)  # s/‖M_j‖: the cosine's division and s in one pass
        total = torch.zeros((), device=x.device)
        grad_x = torch.zeros_like(x) if want_x else None
        grad_bias = torch.zeros_like(bias) if want_bias else None
        for chunk in column_chunks(labels, rows.shape[0], rows.shape[1]):
            a, b = chunk.start, chunk.end
            # u = s·(c − m·onehot) − b, the argument of the negatives' softplus; positives take −u.
            u = (x @ chunk.rows(rows).t()).mul_(scale[a:b]).sub_(bias if bias.numel() == 1 else bias[a:b])
            u[chunk.positives] -= s * m
            inside = None
            if clamp:  # the references' clamp to [−s, s]: no gradient through a clamped term
                inside = (u >= -s) & (u <= s)
                u.clamp_(-s, s)
            u[chunk.positives] = -u[chunk.positives]
            terms = F.softplus(u)
            _weigh_negatives(chunk, terms, neg_weight)
            kept = None if valid is None or bool(valid[..., a:b].all()) else valid[..., a:b]
            if kept is not None:
                terms.masked_fill_(~kept, 0.0)
            total += terms.sum()
            if not (want_x or want_bias):
                continue
            # d term / d u = σ(±u)·(±1)·λ_j, 0 where clamped or masked.
            du = u.sigmoid_()
            du[chunk.positives] = -du[chunk.positives]
            _weigh_negatives(chunk, du, neg_weight)
            for mask in (inside, kept):
                if mask is not None:
                    du.masked_fill_(~mask, 0.0)
            if grad_bias is not None:  # du/db = −1
                if bias.numel() == 1:
                    grad_bias -= du.sum()
                else:
                    grad_bias[a:b] -= du.sum(0)
            if grad_x is not None:  # du/dx̂_i = s·M_j/‖M_j‖
                grad_x.addmm_(du.mul_(scale[a:b]), chunk.rows(rows))
        ctx.save_for_backward(grad_x, grad_bias)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        grad_x, grad_bias = ctx.saved_tensors
        return (None if grad_x is None else grad * grad_x, None, None if grad_bias is None else grad * grad_bias,
                None, None, None, None)


def threshold_bce_rows_loss(
    embeddings: torch.Tensor,
    rows: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor,
    s: float,
    m: float,
    neg_weight: float = 1.0,
    clamp: bool = False,
    valid_columns: torch.Tensor | None = None,
) -> torch.Tensor:
    """`functional.threshold_bce_loss(cosine(embeddings, rows), …)` (same arguments) for rows without
    a gradient (the identity memory, raw: normalised on the fly; fp32, or bf16/fp16 read chunk by
    chunk into fp32), mean over the global batch."""
    with torch.autocast(device_type=embeddings.device.type, enabled=False):
        x = normalize(embeddings)
        total = _ThresholdBCERows.apply(x, rows, bias.float(), valid_columns, labels,
                                        (float(s), float(m), float(neg_weight), bool(clamp)), torch.is_grad_enabled())
    return sum_over_shards(total) / labels.numel()


@torch.no_grad()
def unified_bias_init_rows(embeddings: torch.Tensor, rows: torch.Tensor, labels: torch.Tensor, s: float,
                           valid_columns: torch.Tensor | None = None) -> torch.Tensor | None:
    """`functional.unified_bias_init(cosine(embeddings, rows), …)` in column chunks (the first step of a
    memory head must not hold a B_global×C_r matrix either)."""
    x, norms = normalize(embeddings), row_norms(rows)
    parts = []
    for chunk in column_chunks(labels, rows.shape[0], rows.shape[1]):
        kept = None if valid_columns is None else valid_columns[..., chunk.start : chunk.end]
        z = negative_logits(chunk.cosine(x, rows, norms), labels - chunk.start, s, kept)
        parts.append(torch.logsumexp(z, dim=1))
    return mean_finite(logsumexp_over_shards(torch.stack(parts, 1), dim=1))
