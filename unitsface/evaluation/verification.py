"""Pair verification: the insightface `.bin` 10-fold protocol, exact ROC readings, LFW `pairs.txt`.

`evaluate_pairs` reproduces insightface's `verification.py` bit for bit by default (evaluation.md §2):
the 0.01 squared-distance grid, the strict `d < t` rule, contiguous unshuffled folds and the first best
threshold are all kept, because the last digit of LFW-level accuracies depends on them. Everything that
is not a 10-fold accuracy (TAR@FAR, AUC, EER, deployment thresholds) is computed exactly on cosine
scores with the `s >= t` acceptance rule, over all pairs, so operating points are realisable thresholds.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np

from unitsface.errors import UnitsfaceError

PAIR_FAR_TARGETS = (1e-1, 1e-2, 1e-3, 1e-4)
INSIGHTFACE_GRID = np.arange(0, 4, 0.01)  # squared-distance thresholds, 4.00 excluded (§2.1 step 6)
VAL_GRID = np.arange(0, 4, 0.001)  # the finer grid of insightface's calculate_val (§2.2)
VAL_FAR_TARGET = 1e-3

Folds = Union[int, np.ndarray]


# ----------------------------------------------------------------------------------------- input checks
def _as_labels(issame: np.ndarray, n: int, what: str = "issame") -> np.ndarray:
    y = np.asarray(issame)
    if y.ndim != 1 or len(y) != n:
        raise UnitsfaceError(f"{what} must be a 1-D array of {n} labels, got shape {y.shape}")
    if y.dtype != bool:
        if not np.isin(y, (0, 1)).all():
            raise UnitsfaceError(f"{what} must hold booleans or 0/1, found value {y[~np.isin(y, (0, 1))][0]!r}")
        y = y.astype(bool)
    if y.all() or not y.any():
        kind = "impostor" if y.all() else "genuine"
        raise UnitsfaceError(f"{what} has no {kind} pairs; verification metrics need both classes")
    return y


def _as_embeddings(x: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise UnitsfaceError(f"{name} must be a non-empty 2-D array (pairs x dim), got shape {x.shape}")
    if x.dtype not in (np.float32, np.float64):
        x = x.astype(np.float32)
    if not np.isfinite(x).all():
        bad = np.flatnonzero(~np.isfinite(x).all(1))[0]
        raise UnitsfaceError(f"{name} contains NaN or infinite values (row {bad})")
    return x


def check_pairs(emb1: np.ndarray, emb2: np.ndarray, issame: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validate a pair set; returns float embeddings and boolean labels."""
    e1, e2 = _as_embeddings(emb1, "emb1"), _as_embeddings(emb2, "emb2")
    if e1.shape != e2.shape:
        raise UnitsfaceError(f"emb1 and emb2 shapes differ: {e1.shape} vs {e2.shape}")
    return e1, e2, _as_labels(issame, len(e1))


def check_scores(scores: np.ndarray, issame: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float64 finite scores and boolean labels of a pair set that holds both classes."""
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 1 or s.size == 0:
        raise UnitsfaceError(f"scores must be a non-empty 1-D array, got shape {s.shape}")
    if not np.isfinite(s).all():
        raise UnitsfaceError(f"scores contain NaN or infinite values (index {np.flatnonzero(~np.isfinite(s))[0]})")
    return s, _as_labels(issame, len(s))


# ----------------------------------------------------------------------------------------------- scores
def l2_normalize(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Row-wise L2 normalisation, numerically identical to `sklearn.preprocessing.normalize`.

    Zero rows stay zero (sklearn's rule), which keeps reproduction exact; such rows score 0 against
    everything rather than NaN. `out=x` normalises in place.
    """
    norms = np.sqrt(np.einsum("ij,ij->i", x, x))
    norms[norms == 0.0] = 1.0
    return np.divide(x, norms[:, None], out=out)


def scores_from_pairs(emb1: np.ndarray, emb2: np.ndarray) -> np.ndarray:
    """Cosine similarity of each pair (rows of emb1 vs rows of emb2), float64."""
    e1, e2 = _as_embeddings(emb1, "emb1"), _as_embeddings(emb2, "emb2")
    if e1.shape != e2.shape:
        raise UnitsfaceError(f"emb1 and emb2 shapes differ: {e1.shape} vs {e2.shape}")
    return np.einsum("ij,ij->i", l2_normalize(e1).astype(np.float64), l2_normalize(e2).astype(np.float64))


# ------------------------------------------------------------------------------------------- ROC readings
def roc_counts(scores: np.ndarray, issame: np.ndarray, overwrite: bool = False
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(false accepts, true accepts, threshold) for "accept when s >= threshold", one entry per distinct
    score, thresholds descending.

    Sorts the scores only (no argsort) and places the genuine scores by binary search, which keeps
    15.7M IJB-C pairs at about a second; the counts are built in place, since every temporary of that
    length is 100+ MB to allocate and fill. `overwrite=True` lets a caller that owns a float64 `scores`
    array have it sorted in place (its contents are lost).
    """
    s, y = check_scores(scores, issame)
    genuine = s[y]
    if overwrite and s is scores:
        s.sort()
        s_sorted = s
    else:
        s_sorted = np.sort(s)
    ends = np.empty(len(s), dtype=bool)
    np.not_equal(s_sorted[1:], s_sorted[:-1], out=ends[:-1])
    ends[-1] = True
    last = np.flatnonzero(ends)  # last index of each distinct score
    del ends
    u = np.take(s_sorted, last, out=s_sorted[: len(last)], mode="clip")  # in place: last[k] >= k
    gen_le = np.bincount(np.searchsorted(u, genuine), minlength=len(u))
    np.cumsum(gen_le, out=gen_le)  # genuine <= u[k]
    n_gen = int(gen_le[-1])
    tps = np.empty_like(last)  # genuine >= u[k]
    tps[0] = n_gen
    np.subtract(n_gen, gen_le[:-1], out=tps[1:])
    n = len(y)
    fps = gen_le  # reused: scores >= u[k] (n - last[k-1] - 1) minus genuine >= u[k]
    fps[0] = n - n_gen
    np.subtract(n - 1, last[:-1], out=fps[1:])
    fps[1:] -= tps[1:]
    return fps[::-1], tps[::-1], u[::-1]


def roc_curve(
    scores: np.ndarray, issame: np.ndarray, drop_intermediate: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact ROC for the rule "accept when s >= threshold": one point per distinct score.

    Returns (fpr, tpr, thresholds) with thresholds descending and a first point (0, 0, +inf), as
    scikit-learn does. `drop_intermediate=True` applies scikit-learn's thinning rule exactly (drop a point
    when both second differences vanish); insightface's IJB "closest" reading runs on that thinned curve.
    """
    return rates_from_counts(*roc_counts(scores, issame), drop_intermediate=drop_intermediate)


def roc_corners(fps: np.ndarray, tps: np.ndarray) -> np.ndarray:
    """Indices of the `roc_counts` points scikit-learn's drop_intermediate keeps: the ends, and every point
    where either count's second difference is non-zero. Decided on the integer counts, as scikit-learn
    does, so float rounding cannot keep or drop a point."""
    if len(fps) <= 2:
        return np.arange(len(fps))
    keep = np.empty(len(fps), dtype=bool)
    keep[0] = keep[-1] = True
    corner = np.empty(len(fps) - 2, dtype=bool)
    step = np.empty(len(fps) - 1, dtype=fps.dtype)
    for counts, out in ((fps, keep[1:-1]), (tps, corner)):  # a second difference is non-zero where a step changes
        np.subtract(counts[1:], counts[:-1], out=step)
        np.not_equal(step[1:], step[:-1], out=out)
    keep[1:-1] |= corner
    return np.flatnonzero(keep)


def roc_rates(fps: np.ndarray, tps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) of `roc_counts` counts, with the (0, 0) point first."""
    fpr, tpr = np.empty(len(fps) + 1), np.empty(len(tps) + 1)
    fpr[0] = tpr[0] = 0.0
    np.divide(fps, fps[-1], out=fpr[1:])
    np.divide(tps, tps[-1], out=tpr[1:])
    return fpr, tpr


def rates_from_counts(
    fps: np.ndarray, tps: np.ndarray, thresholds: np.ndarray, drop_intermediate: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`roc_counts` output -> (fpr, tpr, thresholds) with the (0, 0, +inf) point (`roc_corners` only with
    `drop_intermediate`). Thinning the rates of the full curve gives the same numbers (the last point,
    which both divide by, is always kept)."""
    if drop_intermediate:
        keep = roc_corners(fps, tps)
        fps, tps, thresholds = fps[keep], tps[keep], thresholds[keep]
    return (*roc_rates(fps, tps), np.r_[np.inf, thresholds])


def tar_at_far(fpr: np.ndarray, tpr: np.ndarray, targets, rule: str = "strict") -> dict[float, float]:
    """Read TAR at each FAR target from a ROC (evaluation.md §5.3).

    - "strict": largest TPR among points with FPR <= target (use the unthinned curve);
    - "closest": insightface's reading — the point whose FPR is nearest the target, largest TPR among
      equal FPRs (use the thinned curve to reproduce eval_ijbc.py); may sit above the target;
    - "interp": linear interpolation in FPR, taking the top of each vertical segment.
    """
    targets = list(targets)
    if rule == "strict":
        values = tpr[np.searchsorted(fpr, targets, side="right") - 1]
    elif rule == "closest":
        gaps = (np.abs(fpr - x) for x in targets)
        values = [tpr[np.flatnonzero(gap == gap.min())[-1]] for gap in gaps]
    elif rule == "interp":
        # np.interp over the tops of the vertical segments, read from the two tops around each target only
        # (its result depends on those two points alone): no copy of a 15M-point curve
        below = np.searchsorted(fpr, targets, side="right") - 1  # the top at or left of the target
        above = np.searchsorted(fpr, fpr[np.minimum(below + 1, len(fpr) - 1)], side="right") - 1
        values = [tpr[a] if b < 0 else tpr[b] if b == a else np.interp(x, fpr[[b, a]], tpr[[b, a]])
                  for x, b, a in zip(targets, below, above)]
    else:
        raise UnitsfaceError(f"unknown TAR@FAR rule {rule!r}; expected strict, closest or interp")
    return {x: float(v) for x, v in zip(targets, values)}


def auc(fpr: np.ndarray, tpr: np.ndarray) -> float:
    """Area under the ROC by the trapezoid rule: sum(diff(fpr) * (tpr[1:] + tpr[:-1]) / 2), computed in two
    buffers (an IJB-C curve has 14M points)."""
    width, height = np.subtract(fpr[1:], fpr[:-1]), np.add(tpr[1:], tpr[:-1])
    width *= height
    width /= 2.0
    return float(np.sum(width))


def eer(fpr: np.ndarray, tpr: np.ndarray) -> float:
    """Equal error rate: where FAR = FRR on the piecewise-linear ROC (intersection of the two segments)."""
    fnr = 1.0 - tpr
    i = int(np.argmax(fpr >= fnr))  # first point past the crossing; i >= 1 since fpr[0]=0 < fnr[0]=1
    dfp, dfn = fpr[i] - fpr[i - 1], fnr[i] - fnr[i - 1]
    a = (fnr[i - 1] - fpr[i - 1]) / (dfp - dfn)
    return float(fpr[i - 1] + a * dfp)


def threshold_at_far(scores: np.ndarray, issame: np.ndarray, far: float) -> float:
    """The lowest cosine threshold t whose FAR (accept s >= t) stays <= `far`, i.e. the highest TAR.

    Used to calibrate a deployment threshold. When no accepting threshold meets the target, returns the
    smallest float above every score (accept nothing).
    """
    fpr, _, thresholds = roc_curve(scores, issame)
    t = thresholds[np.searchsorted(fpr, far, side="right") - 1]
    return float(np.nextafter(np.max(scores), np.inf)) if np.isinf(t) else float(t)


def far_frr_at(scores: np.ndarray, issame: np.ndarray, threshold: float) -> tuple[float, float]:
    """(FAR, FRR) of the rule "accept when s >= threshold"."""
    s, y = check_scores(scores, issame)
    accept = s >= threshold
    return float(accept[~y].mean()), float((~accept[y]).mean())


class LargestScores:
    """Running k largest values of a stream of score chunks, in bounded memory.

    Why: FAR-1e-6 operating points over billions of impostor scores (MegaFace, IJB 1:N legacy) only
    need the top floor(far * n) + 1 impostor scores, never the full matrix.
    """

    def __init__(self, k: int) -> None:
        self.k = int(k)
        self.values = np.empty(0, dtype=np.float64)

    def add(self, chunk: np.ndarray) -> None:
        v = np.asarray(chunk).ravel()
        if len(self.values) == self.k:
            v = v[v > self.values.min()]  # filter before copying: most of a large chunk goes
        v = np.concatenate([self.values, v.astype(np.float64)])
        self.values = np.partition(v, len(v) - self.k)[-self.k :] if len(v) > self.k else v

    def kth(self) -> float:
        """The k-th largest value seen (-inf while fewer than k values arrived)."""
        return float(self.values.min()) if len(self.values) == self.k else -np.inf


# ------------------------------------------------------------------------------------------------ folds
def _contiguous_ids(n: int, k: int) -> np.ndarray:
    """scikit-learn KFold(shuffle=False): k contiguous blocks, the first n % k one item longer."""
    sizes = np.full(k, n // k)
    sizes[: n % k] += 1
    return np.repeat(np.arange(k), sizes)


def per_class_contiguous_folds(issame: np.ndarray, folds: int = 10) -> np.ndarray:
    """Fold ids for pair files that list all positives first (raw CALFW/CPLFW order, evaluation.md §3.2).

    Fold i = the i-th contiguous block of the positives plus the i-th block of the negatives.
    """
    y = np.asarray(issame, dtype=bool)
    ids = np.empty(len(y), dtype=np.int64)
    for cls in (True, False):
        idx = np.flatnonzero(y == cls)
        ids[idx] = _contiguous_ids(len(idx), folds)
    return ids


def _fold_ids(n: int, folds: Folds) -> np.ndarray:
    if isinstance(folds, (int, np.integer)):
        if not 2 <= folds <= n:
            raise UnitsfaceError(f"folds must be between 2 and the number of pairs ({n}), got {folds}")
        return _contiguous_ids(n, int(folds))
    ids = np.asarray(folds)
    if ids.shape != (n,):
        raise UnitsfaceError(f"folds array must have one fold id per pair ({n}), got shape {ids.shape}")
    if len(np.unique(ids)) < 2:
        raise UnitsfaceError("folds array holds fewer than 2 distinct folds")
    return ids


# --------------------------------------------------------------------------------- threshold selection
def _grid_fold(d_tr: np.ndarray, y_tr: np.ndarray, d_te: np.ndarray, y_te: np.ndarray) -> tuple[float, float, float]:
    """insightface fold: first grid t maximising training accuracy of d < t; returns (cosine t, train, test)."""
    gen, imp = np.sort(d_tr[y_tr]), np.sort(d_tr[~y_tr])
    correct = np.searchsorted(gen, INSIGHTFACE_GRID, "left") + len(imp) - np.searchsorted(imp, INSIGHTFACE_GRID, "left")
    best = int(np.argmax(correct))
    t = INSIGHTFACE_GRID[best]
    return 1.0 - t / 2.0, float(correct[best] / len(d_tr)), float(np.mean((d_te < t) == y_te))


def _cut_correct(s: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct sorted scores u and, for every cut k = 0..len(u), the correct count of "accept s >= u[k]"
    (k = len(u) accepts nothing)."""
    u = np.unique(s)
    gen, imp = np.sort(s[y]), np.sort(s[~y])
    cuts = np.r_[u, np.inf]
    correct = len(gen) - np.searchsorted(gen, cuts, "left") + np.searchsorted(imp, cuts, "left")
    return u, correct


def _exact_fold(s_tr: np.ndarray, y_tr: np.ndarray, s_te: np.ndarray, y_te: np.ndarray) -> tuple[float, float, float]:
    """True training optimum over all cuts; ties broken toward the middle of the optimal interval.

    Rule "accept s > t": the cut accepting s >= u[k] is any t in [u[k-1], u[k]); the run of optimal cuts
    i..j holding the median optimal cut is realised by any t in [u[i-1], u[j]), and we take its midpoint
    (u[-1] and u[len] read as one below the lowest and one above the highest score).
    """
    u, correct = _cut_correct(s_tr, y_tr)
    best = np.flatnonzero(correct == correct.max())
    run_of = np.cumsum(np.r_[1, np.diff(best) != 1])
    run = best[run_of == run_of[len(best) // 2]]
    edges = np.r_[u[0] - 1.0, u, u[-1] + 1.0]  # edges[k] = u[k-1]
    t = (edges[run[0]] + edges[run[-1] + 1]) / 2.0
    return float(t), float(correct.max() / len(s_tr)), float(np.mean((s_te > t) == y_te))


def _val_fold(d_tr: np.ndarray, y_tr: np.ndarray, d_te: np.ndarray, y_te: np.ndarray) -> np.ndarray:
    """VAL/FAR at FAR 1e-3 on one held-out fold for the defined rule and the de-duplicated interpolation.

    Returns [[val, far] for the "largest grid t with training FAR <= target" rule, [val, far] interp].
    """
    imp = np.sort(d_tr[~y_tr])
    far_tr = np.searchsorted(imp, VAL_GRID, "left") / max(len(imp), 1)
    t_rule = VAL_GRID[np.searchsorted(far_tr, VAL_FAR_TARGET, side="right") - 1]
    if far_tr.max() >= VAL_FAR_TARGET:
        last = np.r_[far_tr[1:] != far_tr[:-1], True]  # last threshold of each FAR plateau
        t_interp = float(np.interp(VAL_FAR_TARGET, far_tr[last], VAL_GRID[last]))
    else:
        t_interp = 0.0
    out = np.empty((2, 2))
    for row, t in enumerate((t_rule, t_interp)):
        acc = d_te < t
        out[row] = (acc[y_te].mean() if y_te.any() else np.nan, acc[~y_te].mean() if (~y_te).any() else np.nan)
    return out


def best_single_threshold(scores: np.ndarray, issame: np.ndarray) -> tuple[float, float]:
    """(threshold, accuracy) of the best observed score used as threshold over ALL pairs, s >= t.

    Optimistic by construction (evaluation.md §4): tuned on the pairs it is scored on.
    """
    s, y = check_scores(scores, issame)
    u, correct = _cut_correct(s, y)
    k = int(np.argmax(correct[:-1]))
    return float(u[k]), float(correct[k] / len(s))


# ------------------------------------------------------------------------------------------- protocol
def evaluate_pairs(
    emb1: np.ndarray, emb2: np.ndarray, issame: np.ndarray, folds: Folds = 10, thresholds: str = "insightface"
) -> dict:
    """k-fold verification accuracy plus exact ROC metrics on a pair set.

    emb1[i], emb2[i] are the (flip-summed, un-normalised is fine) embeddings of pair i. `folds` is a fold
    count (contiguous, unshuffled) or one fold id per pair (e.g. `read_lfw_pairs(...).folds`).
    `thresholds="insightface"` is the exact insightface protocol; "exact" fits the true training
    optimum over all distinct cosine scores. Per-fold thresholds are reported in cosine units for the
    rule "accept when s > t". `best_threshold_accuracy` is the optimistic single-threshold number of §4.
    """
    if thresholds not in ("insightface", "exact"):
        raise UnitsfaceError(f"thresholds must be 'insightface' or 'exact', got {thresholds!r}")
    e1, e2, y = check_pairs(emb1, emb2, issame)
    n1, n2 = l2_normalize(e1), l2_normalize(e2)
    dist = np.sum(np.square(n1 - n2), 1)  # insightface's expression, kept for bit-exact ties
    scores = np.einsum("ij,ij->i", n1.astype(np.float64), n2.astype(np.float64))
    ids = _fold_ids(len(y), folds)
    labels = list(dict.fromkeys(ids.tolist()))  # fold order = order of first appearance
    per_fold, vals, counts = [], [], []
    for f in labels:
        te = ids == f
        counts.append((int(y[te].sum()), int((~y[te]).sum())))
        if thresholds == "insightface":
            per_fold.append(_grid_fold(dist[~te], y[~te], dist[te], y[te]))
        else:
            per_fold.append(_exact_fold(scores[~te], y[~te], scores[te], y[te]))
        vals.append(_val_fold(dist[~te], y[~te], dist[te], y[te]))
    single = [f for f, (g, m) in zip(labels, counts) if g == 0 or m == 0]
    if single:
        warnings.warn(f"folds {single} hold a single class; pairs are probably not stored in fold order "
                      "(see per_class_contiguous_folds)", stacklevel=2)
    fold_acc = [a for _, _, a in per_fold]
    vals_arr = np.array(vals)  # folds x {rule, interp} x {val, far}
    fpr, tpr, _ = roc_curve(scores, y)
    n_imp = int((~y).sum())
    best_t, best_acc = best_single_threshold(scores, y)
    return {
        "protocol": f"{len(labels)}-fold, thresholds={thresholds}",
        "n_pairs": len(y),
        "n_genuine": len(y) - n_imp,
        "n_impostor": n_imp,
        "accuracy": float(np.mean(fold_acc)),
        "accuracy_std": float(np.std(fold_acc)),
        "accuracy_stderr": float(np.std(fold_acc, ddof=1) / np.sqrt(len(fold_acc))),
        "fold_accuracies": fold_acc,
        "fold_train_accuracies": [a for _, a, _ in per_fold],
        "best_thresholds": [float(t) for t, _, _ in per_fold],
        "fold_counts": counts,
        "tar_at_far": tar_at_far(fpr, tpr, [x for x in PAIR_FAR_TARGETS if x >= 1.0 / n_imp]),
        "auc": auc(fpr, tpr),
        "eer": eer(fpr, tpr),
        "best_threshold": best_t,
        "best_threshold_accuracy": best_acc,
        "val_at_far_1e-3": _val_summary(vals_arr[:, 0]),
        "val_far_interp": _val_summary(vals_arr[:, 1]),
        "roc": {"fpr": fpr, "tpr": tpr},
        "pair_scores": {"scores": scores, "issame": y},
    }


def _val_summary(v: np.ndarray) -> dict[str, float]:
    return {"val": float(np.mean(v[:, 0])), "val_std": float(np.std(v[:, 0])), "far": float(np.mean(v[:, 1]))}


# ---------------------------------------------------------------------------------------- LFW pairs.txt
@dataclass(frozen=True)
class PairList:
    """A pair list: relative image paths, labels and the official fold of every pair."""

    paths1: list[str]
    paths2: list[str]
    issame: np.ndarray
    folds: np.ndarray


def read_lfw_pairs(path: Union[str, Path]) -> PairList:
    """Parse LFW View-2 `pairs.txt` (evaluation.md §3.1): header `sets<TAB>n`, then per set n matched
    lines `name n1 n2` and n mismatched lines `name1 n1 name2 n2`; folds are the file's sets."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise UnitsfaceError(f"cannot read LFW pairs file {path}: {exc.strerror}") from exc
    head = lines[0].split() if lines else []
    if len(head) != 2 or not all(h.isdigit() for h in head):
        raise UnitsfaceError(f"{path}: line 1 must be '<sets> <pairs per class>', got {lines[:1]}")
    n_sets, n_per = int(head[0]), int(head[1])
    body = [ln for ln in lines[1:] if ln.strip()]
    if len(body) != 2 * n_sets * n_per:
        raise UnitsfaceError(f"{path}: header promises {2 * n_sets * n_per} pairs, file has {len(body)} lines")
    p1, p2 = [], []
    for i, line in enumerate(body):
        f = line.split()
        matched = (i // n_per) % 2 == 0
        if len(f) != (3 if matched else 4) or not (f[1].isdigit() and f[-1].isdigit()):
            kind = "matched 'name n1 n2'" if matched else "mismatched 'name1 n1 name2 n2'"
            raise UnitsfaceError(f"{path}: line {i + 2} should be a {kind} pair, got {line!r}")
        a, b = (f[0], f[1]), ((f[0], f[2]) if matched else (f[2], f[3]))
        p1.append(f"{a[0]}/{a[0]}_{int(a[1]):04d}.jpg")
        p2.append(f"{b[0]}/{b[0]}_{int(b[1]):04d}.jpg")
    idx = np.arange(len(body))
    return PairList(p1, p2, (idx // n_per) % 2 == 0, idx // (2 * n_per))


# ------------------------------------------------------------------------------------ all pairs of a set
ALL_PAIRS_BLOCK = 4096  # rows of the similarity matrix scored at once


def evaluate_all_pairs(emb: np.ndarray, labels: np.ndarray, far_targets=PAIR_FAR_TARGETS) -> dict:
    """Every unordered pair (i < j) of a labelled image set: exact ROC, AUC, EER, strict TAR@FAR, plus
    leave-one-out rank-1 identification.

    Why: small real sets with no official pair list (AT&T, Yale B, a folder of identities) are scored
    this way in model READMEs (SFace on AT&T: 79,800 pairs of 400 images); taking every pair leaves no
    pair-sampling noise. Rank-1: each image of an identity with 2+ images searches all other images and
    is correct when its best mate scores strictly above every non-mate (ties count against it). Holds
    the n(n-1)/2 float64 scores, so it suits sets up to some tens of thousands of images.
    """
    e = l2_normalize(_as_embeddings(emb, "emb")).astype(np.float64)
    y = np.asarray(labels)
    if y.shape != (len(e),):
        raise UnitsfaceError(f"labels must be one per embedding ({len(e)}), got shape {y.shape}")
    _, codes = np.unique(y, return_inverse=True)
    scores, same, correct, searches = [], [], 0, 0
    for a in range(0, len(e), ALL_PAIRS_BLOCK):
        sim = e[a : a + ALL_PAIRS_BLOCK] @ e.T
        rows = np.arange(a, a + len(sim))
        mate = codes[rows, None] == codes[None, :]
        upper = np.arange(len(e))[None, :] > rows[:, None]
        scores.append(sim[upper])
        same.append(mate[upper])
        sim[np.arange(len(sim)), rows] = -np.inf  # an image is not its own mate
        mate[np.arange(len(sim)), rows] = False
        best_mate = np.where(mate, sim, -np.inf).max(1)
        best_other = np.where(mate, -np.inf, sim).max(1)
        searches += int(np.isfinite(best_mate).sum())
        correct += int((best_mate > best_other).sum())
    s, g = np.concatenate(scores), np.concatenate(same)
    fpr, tpr, _ = roc_curve(s, g)
    n_imp = int((~g).sum())
    return {
        "protocol": "all pairs",
        "n_images": len(e),
        "n_identities": int(codes.max()) + 1,
        "n_pairs": len(s),
        "n_genuine": len(s) - n_imp,
        "n_impostor": n_imp,
        "tar_at_far": tar_at_far(fpr, tpr, [x for x in far_targets if x >= 1.0 / n_imp]),
        "auc": auc(fpr, tpr),
        "eer": eer(fpr, tpr),
        "rank1": correct / searches if searches else None,
        "roc": {"fpr": fpr, "tpr": tpr},
        "pair_scores": {"scores": s, "issame": g},
    }
