"""Pure loss math on cosine matrices (methods.md; every formula cites its paper or code).

Two kinds of functions live here. The *target transforms* (`cosface_target`, `arcface_target`,
`magface_target`, `adaface_target`, `adaptive_margin_target`, ...) and non-target transforms
(`curricular_negatives`, `adaface_negatives`) are each head's formula, written once: the heads apply
them to their target cosines before the column-loss engine (`unitsface.losses.columns`) streams the
columns. The *dense references* (`cosface_loss`, `threshold_bce_loss`, ..., all through
`dense_column_loss`) compute the same losses on a whole B×C cosine matrix with autograd: small, exact,
and what the tests hold the engine and the authors' reference numbers to.

Every loss takes `cos` (B×C, fp32, methods.md N1) and `labels` (B,) indexing its columns, and returns
the mean over the B rows. `labels` may hold -1 for rows whose class lives on another rank's class
shard: the `unitsface.parallel` reductions then combine the shards (D3, D4), and in a single process
they are plain `logsumexp` / sums. Logits are never exponentiated directly (N2): cross-entropy is
LSE − target, BCE terms are softplus.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from unitsface.errors import UnitsfaceError
from unitsface.losses.columns import NORM_EPS, ColumnSpec, row_norms
from unitsface.parallel import is_main_process, logsumexp_over_shards, sum_over_shards

COS_EPS = 1e-7  # N3: clamp before arccos / sqrt(1 - c^2)


# --------------------------------------------------------------------------- basics


def normalize(x: torch.Tensor, eps: float = NORM_EPS) -> torch.Tensor:
    """Unit rows in fp32: x / max(|x|, eps)."""
    return F.normalize(x.float(), dim=1, eps=eps)


def cosine(embeddings: torch.Tensor, rows: torch.Tensor, eps: float = NORM_EPS) -> torch.Tensor:
    """B×C cosine matrix in fp32, outside autocast and TF32 (N1): x̂ · (rows / max(|row|, eps))ᵀ.

    Trained rows with fewer samples than dimensions (class proxies, C ≫ B) are not normalised:
    (x̂ · rowsᵀ) / max(|row|, eps) is the same function, but forward and backward then spend
    B×C operations on the division instead of several C×d passes on a normalised copy (about
    1.5× faster at B=128, d=512). Rows without a gradient (memory, prototypes) are normalised
    into a copy, so autograd never holds a buffer that the head overwrites before backward().
    """
    with torch.autocast(device_type=embeddings.device.type, enabled=False):
        x = normalize(embeddings, eps)
        if not rows.requires_grad or embeddings.shape[0] >= rows.shape[1]:
            return x @ normalize(rows, eps).t()
        return unit_cosine(x, rows.float(), eps)


def unit_cosine(unit_x: torch.Tensor, rows: torch.Tensor, eps: float = NORM_EPS) -> torch.Tensor:
    """Cosines of unit rows `unit_x` against raw `rows`: (x̂·rowsᵀ) / max(|row|, eps), no normalised copy."""
    return (unit_x @ rows.t()) / row_norms(rows, eps)


def target_mask(labels: torch.Tensor, num_columns: int) -> torch.Tensor:
    """Boolean B×C one-hot of `labels`; rows with label -1 (class on another shard) are all False."""
    cols = torch.arange(num_columns, device=labels.device)
    return labels.unsqueeze(1) == cols.unsqueeze(0)


def gather_target(matrix: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """matrix[i, labels[i]], 0 where labels[i] == -1 (the owner shard supplies it)."""
    picked = matrix.gather(1, labels.clamp(min=0).unsqueeze(1)).squeeze(1)
    return torch.where(labels >= 0, picked, torch.zeros_like(picked))


def replace_target(cos: torch.Tensor, labels: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """`cos` with column labels[i] of row i replaced by target[i] (rows with label -1 unchanged)."""
    return torch.where(target_mask(labels, cos.shape[1]), target.unsqueeze(1), cos)


def cross_entropy_rows(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-row CE = LSE_j z_ij − z_{i,y_i}, combined over class shards (D3)."""
    return logsumexp_over_shards(logits, dim=1) - sum_over_shards(gather_target(logits, labels))


def softplus(u: torch.Tensor) -> torch.Tensor:
    """sp(u) = log(1 + e^u), finite for every finite input (methods.md §3.5).

    torch's kernel is the stable form (linear above u = 20) with the exact gradient σ(u).
    """
    return F.softplus(u)


# --------------------------------------------------------------------------- the column loss, dense


def dense_column_loss(
    cos: torch.Tensor,
    labels: torch.Tensor,
    target: torch.Tensor,
    spec: ColumnSpec,
    bias: torch.Tensor | None = None,
    extra: torch.Tensor | None = None,
    valid: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """`columns.column_loss` written on the whole B×C cosine matrix with autograd: the definition the engine
    is tested against (same arguments, `cos` in place of embeddings and rows).

    z_ij = s·g(c_ij) − b_j off the target, z_i = s·φ_i − b_{y_i} on it; softmax: Σ_i w_i (LSE_i − z_i) with
    the extra logit in the LSE and no loss for a row whose own column is invalid; bce: Σ_i w_i (sp(−[z_i])
    + λ Σ_{j≠y_i} sp([z_ij])) over valid columns, [·] the optional clamp to [−s, s].
    """
    n = cos.shape[0]
    weights = torch.full((n,), 1.0 / max(1, n), device=cos.device) if weights is None else weights
    positive = target_mask(labels, cos.shape[1])
    z = spec.s * (cos if spec.negatives is None else spec.negatives(cos))
    column_bias = torch.zeros((), device=cos.device) if bias is None else bias.float()
    z = z - column_bias
    z_target = spec.s * target - (column_bias if column_bias.numel() == 1
                                  else sum_over_shards(gather_target(column_bias.expand_as(cos), labels)))
    valid_columns = torch.ones_like(positive) if valid is None else valid.expand_as(positive)
    has_target = sum_over_shards(gather_target(valid_columns.float(), labels)) > 0
    if spec.kind == "softmax":
        negatives = z.masked_fill(positive | ~valid_columns, -math.inf)
        lse = torch.logaddexp(logsumexp_over_shards(negatives, dim=1), z_target)
        if extra is not None:
            lse = torch.logaddexp(lse, extra)
        return (weights * torch.where(has_target, lse - z_target, torch.zeros_like(lse))).sum()
    u = torch.where(positive, -z_target.unsqueeze(1), z)
    if spec.clamp:
        u = u.clamp(-spec.s, spec.s)
    terms = softplus(u) * torch.where(positive, 1.0, spec.lam)  # λ on the negatives
    terms = torch.where(valid_columns, terms, torch.zeros_like(terms))
    return sum_over_shards((weights * terms.sum(dim=1)).sum())


# --------------------------------------------------------------------------- margins


def cosface_target(c: torch.Tensor, m: float) -> torch.Tensor:
    """CosFace target c − m (Wang et al. 2018; methods.md §1.3)."""
    return c - m


def arcface_target(
    c: torch.Tensor, m: float, gradient: str = "exact", fallback: str = "hard"
) -> torch.Tensor:
    """ArcFace target cos(θ + m) (methods.md §1.4).

    gradient="exact" differentiates through arccos; "straight_through" keeps the ArcFace
    value with the NormFace gradient (insightface arcface_torch). fallback: "hard" uses
    c − m·sin m where θ + m > π (keeps φ monotone), "easy" keeps c where c ≤ 0 (MagFace),
    "none" applies cos(θ + m) everywhere.
    """
    if gradient not in ("exact", "straight_through"):
        raise ValueError(f"gradient must be 'exact' or 'straight_through', got {gradient!r}")
    if fallback not in ("hard", "easy", "none"):
        raise ValueError(f"fallback must be 'hard', 'easy' or 'none', got {fallback!r}")

    def value(c_: torch.Tensor) -> torch.Tensor:
        cc = c_.clamp(-1 + COS_EPS, 1 - COS_EPS)
        phi = cc * math.cos(m) - torch.sqrt(1.0 - cc * cc) * math.sin(m)
        if fallback == "hard":
            phi = torch.where(c_ > -math.cos(m), phi, c_ - m * math.sin(m))
        elif fallback == "easy":
            phi = torch.where(c_ > 0, phi, c_)
        return phi

    if gradient == "exact":
        return value(c)
    with torch.no_grad():
        delta = value(c) - c
    return c + delta


def combined_target(
    c: torch.Tensor, m1: float, m2: float, m3: float, gradient: str = "exact"
) -> torch.Tensor:
    """cos(m1·θ + m2) − m3 (methods.md §1.5); m1·θ + m2 is clamped at π so φ saturates at −1 − m3."""
    if gradient not in ("exact", "straight_through"):
        raise ValueError(f"gradient must be 'exact' or 'straight_through', got {gradient!r}")
    if m1 == 1.0 and m2 == 0.0:  # pure CosFace: no arccos, bit-identical to cosface_loss
        return cosface_target(c, m3)

    def value(c_: torch.Tensor) -> torch.Tensor:
        theta = torch.acos(c_.clamp(-1 + COS_EPS, 1 - COS_EPS))
        return torch.cos((m1 * theta + m2).clamp(max=math.pi)) - m3

    if m1 == 1.0 and m3 == 0.0:  # pure ArcFace: bit-identical to arcface_loss (hard fallback)
        return arcface_target(c, m2, gradient, fallback="hard")
    if gradient == "exact":
        return value(c)
    with torch.no_grad():
        delta = value(c) - c
    return c + delta


# --------------------------------------------------------------------------- targets and references


def target_of(cos: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each row's target cosine from the owner shard, on every rank (the dense counterpart of
    `columns.target_cosine`)."""
    return sum_over_shards(gather_target(cos, labels))


# ------- readable references: each head's loss on a whole cosine matrix (`dense_column_loss`)


def normface_loss(cos: torch.Tensor, labels: torch.Tensor, s: float = 64.0) -> torch.Tensor:
    """NormFace: CE(s·cos) (UniFace paper Eq. 8, L_sl)."""
    return dense_column_loss(cos, labels, target_of(cos, labels), ColumnSpec("softmax", s))


def cosface_loss(cos: torch.Tensor, labels: torch.Tensor, s: float = 64.0, m: float = 0.4) -> torch.Tensor:
    """CosFace: CE(s·(cos − m·onehot)) (Wang et al. 2018; methods.md §1.3)."""
    return dense_column_loss(cos, labels, cosface_target(target_of(cos, labels), m), ColumnSpec("softmax", s))


def arcface_loss(
    cos: torch.Tensor,
    labels: torch.Tensor,
    s: float = 64.0,
    m: float = 0.5,
    gradient: str = "exact",
    fallback: str = "hard",
) -> torch.Tensor:
    """ArcFace: CE with target s·cos(θ_y + m) (Deng et al. 2019; methods.md §1.4); arccos on the targets only."""
    target = arcface_target(target_of(cos, labels), m, gradient, fallback)
    return dense_column_loss(cos, labels, target, ColumnSpec("softmax", s))


def combined_loss(
    cos: torch.Tensor,
    labels: torch.Tensor,
    s: float = 64.0,
    m1: float = 1.0,
    m2: float = 0.3,
    m3: float = 0.2,
    gradient: str = "exact",
) -> torch.Tensor:
    """Combined margin CE with target s·(cos(m1·θ + m2) − m3) (insightface; methods.md §1.5)."""
    target = combined_target(target_of(cos, labels), m1, m2, m3, gradient)
    return dense_column_loss(cos, labels, target, ColumnSpec("softmax", s))


# ------- threshold BCE family (UniFace UCE, UniTSFace USS) and uniform-classification metrics


def threshold_bce_loss(
    cos: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor,
    s: float = 64.0,
    m: float = 0.4,
    lam: float = 1.0,
    clamp: bool = False,
    valid_columns: torch.Tensor | None = None,
) -> torch.Tensor:
    """sp(−(s(c_iy − m) − b_y)) + λ·Σ_{j≠y} sp(s·c_ij − b_j), summed over columns, mean over rows.

    One formula serves UCE / per-class BCE (UniFace Eqs. 23, 31, s17) and USS / S2S BCE
    (UniTSFace Eqs. 11, 22, 24): `bias` of shape (1,) is the unified threshold, shape (C,)
    gives column j its own b_j — the positive of row i then uses b_{y_i} (methods.md §2.4).
    The bias is subtracted, so b/s is a threshold in cosine units (§3.3).

    softplus keeps every finite input finite (§3.5). `clamp=True` reproduces the references'
    clamp of each argument to [−s, s], which stops the gradient of far-out terms (§2.2).
    `valid_columns` (C,) drops unfilled memory slots: they are not negatives, and a row whose
    own column is invalid has no positive term but still counts in the mean (§2.1).
    """
    return dense_column_loss(cos, labels, cosface_target(target_of(cos, labels), m),
                             ColumnSpec("bce", s, lam=lam, clamp=clamp), bias, valid=valid_columns)


def negative_logits(cos: torch.Tensor, labels: torch.Tensor, s: float,
                    valid_columns: torch.Tensor | None = None) -> torch.Tensor:
    """s·cos with each row's own column and the invalid columns at −inf: the terms of LSE_{j≠y_i}."""
    z = (s * cos.float()).masked_fill(target_mask(labels, cos.shape[1]), -math.inf)
    return z if valid_columns is None else z.masked_fill(~valid_columns, -math.inf)


def mean_finite(values: torch.Tensor) -> torch.Tensor | None:
    """Mean of the finite entries, None when there is none."""
    finite = torch.isfinite(values)
    return values[finite].mean() if bool(finite.any()) else None


@torch.no_grad()
def unified_bias_init(
    cos: torch.Tensor, labels: torch.Tensor, s: float, valid_columns: torch.Tensor | None = None
) -> torch.Tensor | None:
    """b0 = mean_i LSE_{j≠y_i} s·c_ij over valid negatives (UniTSFace code; methods.md §2.5).

    At b0 the negatives of an average row start near one nat in total. fp32, no gradient; the
    LSE spans the class shards so every rank computes the same b0 (D5). Rows without a valid
    negative are left out; None when no row has one (the bias cannot be set from this batch).
    """
    return mean_finite(logsumexp_over_shards(negative_logits(cos, labels, s, valid_columns), dim=1))


def sample_softmax_loss(
    cos: torch.Tensor,
    labels: torch.Tensor,
    s: float = 64.0,
    m: float = 0.1,
    valid_columns: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sample-to-sample softmax CE(s·(n − m·onehot)) over memory columns (UniTSFace Eq. 17, §2.3).

    Invalid (unfilled) columns are left out. A row whose own column is invalid has no positive, so no
    cross-entropy: it contributes 0 but still counts in the mean (§2.1).
    """
    return dense_column_loss(cos, labels, cosface_target(target_of(cos, labels), m), ColumnSpec("softmax", s),
                             valid=valid_columns)


# Uniform-classification metrics (methods.md §4): evaluated once over a whole set, never per batch.


@dataclass(frozen=True)
class UniformResult:
    """Best unified threshold: every t in (low, high] reaches `correct` of `total` samples."""

    accuracy: float
    threshold: float  # midpoint of (low, high]; nan when no sample can be correct
    low: float
    high: float
    correct: int
    total: int


def _score_vectors(scores: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scores, labels = torch.as_tensor(scores).detach(), torch.as_tensor(labels).long()
    if scores.dim() != 2 or labels.shape != scores.shape[:1]:
        raise UnitsfaceError(
            f"scores must be N×C with N labels, got scores {tuple(scores.shape)} and labels {tuple(labels.shape)}"
        )
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= scores.shape[1]):
        raise UnitsfaceError(f"labels must lie in [0, {scores.shape[1]}), got [{int(labels.min())}, "
                             f"{int(labels.max())}]")
    return scores, labels


def positive_and_hardest_negative(
    scores: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(p_i, n_i) = (S_{i,y_i}, max_{j≠y_i} S_ij): all the metrics need, so callers can stream
    chunks of a large set and concatenate the two vectors (§4)."""
    scores, labels = _score_vectors(scores, labels)
    positive = target_mask(labels, scores.shape[1])
    p = scores.gather(1, labels.unsqueeze(1)).squeeze(1)
    n = scores.masked_fill(positive, -math.inf).max(dim=1).values
    return p, n


def uniform_sweep(p: torch.Tensor, n: torch.Tensor) -> UniformResult:
    """Exact max_t (1/N)·#{i: n_i < t ≤ p_i} by an O(N log N) interval sweep (methods.md §4).

    At each distinct endpoint v, #{n_i < v} − #{p_i < v} is the number of intervals (n_i, p_i]
    holding v, and it is constant on the gap just below v; so the first best v and the
    endpoint before it bound the optimal segment. Ties n_i = p_i are never correct.
    """
    p, n = torch.as_tensor(p).detach().double().flatten(), torch.as_tensor(n).detach().double().flatten()
    if p.numel() == 0 or p.shape != n.shape:
        raise UnitsfaceError(f"uniform accuracy needs equal, non-empty p and n, got {p.numel()} and {n.numel()}")
    if bool(torch.isnan(p).any() | torch.isnan(n).any()):
        raise UnitsfaceError("uniform accuracy got NaN scores")
    total = p.numel()
    keep = n < p
    if not bool(keep.any()):
        return UniformResult(0.0, math.nan, math.nan, math.nan, 0, total)
    p, n = p[keep], n[keep]
    coords = torch.unique(torch.cat([p, n]))  # sorted
    inside = torch.searchsorted(n.sort().values, coords) - torch.searchsorted(p.sort().values, coords)
    best = int(inside.argmax())  # first maximum; best >= 1 since nothing lies below the smallest endpoint
    low, high = float(coords[best - 1]), float(coords[best])
    threshold = (low + high) / 2 if math.isfinite(low) else high
    correct = int(inside[best])
    return UniformResult(correct / total, threshold, low, high, correct, total)


def uniform_accuracy(scores: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """(A_uni, t*) of an N×C metric matrix (taken before any unified bias), methods.md §4."""
    result = uniform_sweep(*positive_and_hardest_negative(scores, labels))
    return result.accuracy, result.threshold


def sample_wise_accuracy(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy as (1/N)·#{p_i > n_i}: a tie with a wrong class counts as an error."""
    p, n = positive_and_hardest_negative(scores, labels)
    if p.numel() == 0:
        raise UnitsfaceError("sample-wise accuracy needs at least one sample")
    return float((p > n).double().mean())


@dataclass(frozen=True)
class ClassWiseResult:
    """Reading (A) of methods.md §4: one threshold per class over its own samples. Unverified."""

    macro: float  # mean over the classes present of their accuracy
    micro: float  # fraction of all samples correct at their class's threshold
    thresholds: torch.Tensor  # (C,), nan for classes absent from the set
    verified: bool = False


def class_wise_uniform_accuracy(
    scores: torch.Tensor, labels: torch.Tensor, *, experimental: bool = False
) -> ClassWiseResult:
    """Per-class best threshold (the §4 sweep restricted to class k), averaged macro and micro.

    Neither reading of the BCE-uniform paper's class-wise accuracy could be verified, so the
    caller must opt in with `experimental=True`.
    """
    if not experimental:
        raise UnitsfaceError("class-wise uniform accuracy is unverified; pass experimental=True to use it")
    p, n = positive_and_hardest_negative(scores, labels)
    labels = torch.as_tensor(labels).long()
    thresholds = torch.full((scores.shape[1],), math.nan, dtype=torch.float64)
    accuracies, correct = [], 0
    for k in torch.unique(labels).tolist():
        result = uniform_sweep(p[labels == k], n[labels == k])
        thresholds[k] = result.threshold
        accuracies.append(result.accuracy)
        correct += result.correct
    return ClassWiseResult(sum(accuracies) / len(accuracies), correct / labels.numel(), thresholds)


# ------- EPL, UNPG and baselines (MagFace, AdaFace, CurricularFace, VPL)


def count_once(term: torch.Tensor) -> torch.Tensor:
    """`term` with its gradient kept on the main process only (methods.md D1).

    A term that every rank computes identically from the gathered global batch (UNPG's
    pair LSE, MagFace's regulariser) would send its gradient back once per rank, and the
    trainer sums gradients over ranks. Detaching it elsewhere keeps the value everywhere
    and the gradient exactly once. In one process this is the identity.
    """
    return term if is_main_process() else term.detach()


def tukey_negative_pairs(
    embeddings: torch.Tensor, labels: torch.Tensor, whisker: float = 1.5
) -> tuple[torch.Tensor, int]:
    """UNPG's kept negative pair cosines S'_n (ascending) and |S_n| (methods.md §6.1, §6.2).

    S_n holds the cosines of unordered pairs j < k with y_j != y_k. The Tukey fences use the
    0-based truncated-index quartiles of the sorted values, no interpolation (UNPG
    `box_and_whisker_algorithm`), are recomputed every call and carry no gradient; both
    ends are inclusive. The kept values keep their gradient to both features of a pair.
    """
    gram = cosine(embeddings, embeddings)  # fp32 outside autocast: fp16 quartiles are coarse (§6.3)
    n = labels.numel()
    upper = torch.ones(n, n, dtype=torch.bool, device=labels.device).triu(diagonal=1)
    values = gram[upper & (labels.unsqueeze(1) != labels.unsqueeze(0))]
    k = values.numel()
    if k == 0:
        return values, 0
    ordered = values.sort().values
    with torch.no_grad():
        q1, q3 = ordered[k // 4], ordered[(3 * k) // 4]
        reach = whisker * (q3 - q1)
        keep = (ordered >= q1 - reach) & (ordered <= q3 + reach)
    return ordered[keep], k


def unpg_loss(
    margin_cos: torch.Tensor,
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    s: float = 64.0,
    whisker: float = 1.5,
    class_labels: torch.Tensor | None = None,
) -> tuple[torch.Tensor, int, int]:
    """UNPG: CE over [s·margin_cos ‖ s·S'_n] in log-add-exp form (methods.md §6.3).

    `margin_cos` is the base head's cosine matrix with its margin already on the target
    column; `labels` are the global labels of the global batch `embeddings` (they decide
    which pairs are negatives); `class_labels` index the columns of `margin_cos` (local
    labels under class sharding, default `labels`). The appended block is the same in
    every row, so it enters as one LSE scalar per step, the extra logit of the column loss:
    B×K' is never built. With no negative pair the scalar is −inf and the loss is the base loss.
    Returns (loss, number of negative pairs, number kept).
    """
    kept, num_pairs = tukey_negative_pairs(embeddings, labels, whisker)
    pair_lse = count_once(torch.logsumexp(s * kept, dim=0)) if kept.numel() else margin_cos.new_tensor(-math.inf)
    columns = labels if class_labels is None else class_labels
    loss = dense_column_loss(margin_cos, columns, target_of(margin_cos, columns), ColumnSpec("softmax", s),
                             extra=pair_lse)
    return loss, num_pairs, kept.numel()


def magface_margin(a: torch.Tensor, l_margin: float, u_margin: float, l_a: float, u_a: float) -> torch.Tensor:
    """m(a) = l_m + (u_m − l_m)/(u_a − l_a)·(a − l_a), linear in the clamped magnitude (methods.md §1.7)."""
    return l_margin + (u_margin - l_margin) / (u_a - l_a) * (a - l_a)


def magface_target(c: torch.Tensor, margin: torch.Tensor) -> torch.Tensor:
    """MagFace target cos(θ + m(a)) with the easy margin: c where c <= 0 (methods.md §1.7).

    `margin` is per row and differentiable (the exact gradient reaches the feature norm).
    """
    cc = c.clamp(-1 + COS_EPS, 1 - COS_EPS)
    phi = cc * torch.cos(margin) - torch.sqrt(1.0 - cc * cc) * torch.sin(margin)
    return torch.where(c > 0, phi, c)


def magface_regularizer(a: torch.Tensor, u_a: float) -> torch.Tensor:
    """g(a) = a/u_a² + 1/a, decreasing on [l_a, u_a] (MagFace `models/magface.py`; §1.7)."""
    return a / (u_a * u_a) + 1.0 / a


def magface_lambda_bound(s: float, l_margin: float, u_margin: float, l_a: float, u_a: float) -> float:
    """Smallest λ_g for which MagFace's loss has a unique optimal norm (methods.md §1.7)."""
    k = (u_margin - l_margin) / (u_a - l_a)
    return s * k * u_a * u_a * l_a * l_a / (u_a * u_a - l_a * l_a)


def check_magface(s: float, l_margin: float, u_margin: float, l_a: float, u_a: float, lambda_g: float) -> None:
    """ValueError for magnitudes out of order or a λ_g below the feasibility bound (the reference only warns)."""
    if not 0.0 < l_a < u_a:
        raise ValueError(f"MagFace needs 0 < l_a < u_a, got l_a={l_a}, u_a={u_a}")
    bound = magface_lambda_bound(s, l_margin, u_margin, l_a, u_a)
    if lambda_g < bound:
        raise ValueError(f"lambda_g={lambda_g} is below MagFace's feasibility bound {bound:.2f} for these s, margins "
                         f"and magnitudes (methods.md §1.7)")


def adaface_target(
    c: torch.Tensor, scaler: torch.Tensor, m: float = 0.4, eps: float = 1e-3
) -> torch.Tensor:
    """AdaFace target cos(clip(θ − m·ẑ, ε, π − ε)) − (m + m·ẑ) for quality ẑ in [−1, 1] (§1.8).

    `c` must already be clamped to [−1 + ε, 1 − ε] (AdaFace `head.py`), so arccos is smooth.
    """
    theta = torch.acos(c)
    return torch.cos((theta - m * scaler).clamp(eps, math.pi - eps)) - (m + m * scaler)


@dataclass(frozen=True)
class MagFaceMagnitudes:
    """MagFace's magnitude-aware margin and regulariser (methods.md §1.7), for MagFace and MagFace + UNPG:

        a_i = clamp(|x_i|, l_a, u_a) (gradient kept inside the clamp),  target cos(θ_iy + m(a_i)) (easy margin),
        loss term λ_g·mean_i g(a_i), its gradient counted once over ranks (D1).
    """

    l_margin: float
    u_margin: float
    l_a: float
    u_a: float
    lambda_g: float

    def magnitude(self, x: torch.Tensor) -> torch.Tensor:
        return torch.linalg.vector_norm(x.float(), dim=1).clamp(self.l_a, self.u_a)  # fp32 norm (N4)

    def target(self, c: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        margin = magface_margin(self.magnitude(x), self.l_margin, self.u_margin, self.l_a, self.u_a)
        return magface_target(c, margin)

    def regularizer(self, x: torch.Tensor) -> torch.Tensor:
        return self.lambda_g * count_once(magface_regularizer(self.magnitude(x), self.u_a).mean())


ADAFACE_EPS = 1e-3  # AdaFace clamps every cosine to [−1 + ε, 1 − ε] and θ − m·ẑ to [ε, π − ε]


def adaface_quality(norms: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, h: float) -> torch.Tensor:
    """ẑ = clip(h·(n − μ)/(σ + ε), −1, 1), the feature norm n standardised by the running batch statistics (§1.8)."""
    return ((norms - mean) / (std + ADAFACE_EPS) * h).clamp(-1.0, 1.0)


def adaface_negatives(c: torch.Tensor) -> torch.Tensor:
    """AdaFace's clamp of every cosine to [−1 + ε, 1 − ε]: the non-target logits are s·clamp(c)."""
    return c.clamp(-1 + ADAFACE_EPS, 1 - ADAFACE_EPS)


def curricular_negatives(c: torch.Tensor, target_cos: torch.Tensor, t: torch.Tensor, m: float) -> torch.Tensor:
    """CurricularFace's modulation (methods.md §1.6): every non-target cosine above T_i = cos(θ_iy + m) (no fallback)
    becomes c·(t + c). `target_cos` is each row's un-margined target cosine; the hard mask and t carry no
    gradient, so a hard negative's gradient is t + 2c."""
    with torch.no_grad():
        hard = c > arcface_target(target_cos, m, "exact", "none").unsqueeze(1)
    return torch.where(hard, c * (t + c), c)


def curricularface_loss(
    cos: torch.Tensor,
    labels: torch.Tensor,
    target_cos: torch.Tensor,
    t: torch.Tensor,
    s: float = 64.0,
    m: float = 0.5,
) -> torch.Tensor:
    """CurricularFace CE (methods.md §1.6): ArcFace target with the hard fallback, hard negatives modulated
    (`curricular_negatives`). `target_cos` is each row's target cosine gathered from every shard."""
    spec = ColumnSpec("softmax", s, negatives=lambda c: curricular_negatives(c, target_cos, t, m))
    return dense_column_loss(cos, labels, arcface_target(target_of(cos, labels), m, "exact", "hard"), spec)


def adaptive_margin_target(v: torch.Tensor, k: float = 0.7) -> torch.Tensor:
    """EPL target v' = v − k·sg(v) of the prototype cosine v = <e, Q̂_y>: value (1 − k)·v, gradient of v
    (EPL `head_EPL.py`; §5.3)."""
    return v - k * v.detach()


PROTOTYPE_GATES = ("softsign", "sigmoid_shifted", "sigmoid")


def prototype_gate(a: torch.Tensor, alpha: str = "softsign") -> torch.Tensor:
    """EPL update weight g(a) of the old prototype, a = <Q_y, ẽ> (methods.md §5.2)."""
    if alpha == "softsign":
        return a / (1.0 + a.abs())
    if alpha == "sigmoid_shifted":
        return torch.sigmoid(a - 1.0)
    if alpha == "sigmoid":
        return torch.sigmoid(a)
    raise ValueError(f"alpha must be one of {', '.join(PROTOTYPE_GATES)}, got {alpha!r}")


# ------- AnchorFace (Liu et al., AAAI 2022; no public code: docs/methods.md "AnchorFace" has every choice made)


def far_rank(num_negatives: int, far: float) -> int:
    """k = ⌊FAR·N⌋: at most k of N negatives may lie above the anchor threshold (1e-9 absorbs the rounding of
    FAR·N when it is an integer)."""
    return int(math.floor(far * num_negatives + 1e-9))


@torch.no_grad()
def anchor_threshold(negatives: torch.Tensor, far: float, num_negatives: int | None = None) -> torch.Tensor:
    """t̂, the exact (1 − FAR) quantile of the negative similarities, no interpolation: the (k+1)-th largest with
    k = far_rank(N, FAR), i.e. the smallest negative t with #{n > t} ≤ FAR·N (numpy's "inverted_cdf" quantile
    at 1 − FAR). `negatives` may be only the largest ones (at least k + 1 of them, −inf padding allowed) when
    `num_negatives` gives N. No gradient: t̂ is a detached operating point."""
    values = negatives.flatten()
    n = values.numel() if num_negatives is None else num_negatives
    k = far_rank(n, far)
    if not 0 <= k < n or values.numel() <= k:
        raise ValueError(f"the anchor threshold needs more than {k} of {n} negatives, got {values.numel()}")
    return torch.topk(values, k + 1).values[-1]


def soft_accept(similarity: torch.Tensor, threshold: torch.Tensor, tau: float) -> torch.Tensor:
    """σ((s − t)/τ): AnchorFace's soften function, a differentiable "s is accepted at threshold t"."""
    return torch.sigmoid((similarity - threshold) / tau)


def anchor_penalty(tar: torch.Tensor, far: torch.Tensor, far_anchor: float, lambda_far: float,
                   lambda_tar: float) -> torch.Tensor:
    """λ2·(1 − TAR_soft) + λ1·max(0, FAR_soft − FAR_anchor): the TAR loss and the FAR loss added to the margin loss."""
    return lambda_tar * (1.0 - tar) + lambda_far * torch.clamp(far - far_anchor, min=0.0)


def anchor_pairs(unit: torch.Tensor, labels: torch.Tensor, stored: torch.Tensor | None = None,
                 stored_labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(similarity, same identity) of every pair AnchorFace counts, densely: the unordered pairs i < j of the batch
    (unit rows; a pair counted once), then, when given, every (sample, stored feature) pair. B² + B·|S| numbers:
    the head streams the stored part (`columns.stored_pair_sums`), this is its reference."""
    with torch.autocast(device_type=unit.device.type, enabled=False):
        n = labels.numel()
        upper = torch.ones(n, n, dtype=torch.bool, device=labels.device).triu(diagonal=1)
        similarity = (unit @ unit.t())[upper]
        same = (labels.unsqueeze(1) == labels.unsqueeze(0))[upper]
        if stored is None:
            return similarity, same
        cross = unit @ F.normalize(stored.to(unit.dtype), dim=1, eps=NORM_EPS).t()
        cross_same = labels.unsqueeze(1) == stored_labels.unsqueeze(0)
        return torch.cat([similarity, cross.flatten()]), torch.cat([same, cross_same.flatten()])
