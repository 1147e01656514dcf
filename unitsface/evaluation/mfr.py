"""The MFR protocol (ICCV 2021 Masked Face Recognition, evaluation.md §7) on any labelled face set.

The official sets are private and the server is offline, so this runs the protocol's structure on
the user's data (`unitsface eval mfr`):
- **Mask**: one masked probe per identity (a rendered mask on one of its images) against the
  unmasked other images of every identity; TAR at FAR ≤ 1e-4 over those pairs only.
- **All** (MR-All): every image against every other, unmasked; TAR at FAR ≤ 1e-6 (and 1e-4), and
  the same for each group of identities (the official parts: African, Caucasian, ..., Children).
- **score** = 0.25 · TAR(Mask) + 0.75 · TAR(All), the leaderboard's ranking number.

Exact at any size. 10⁵ images make 5·10⁹ pairs (MR-All 2.6·10¹²): no score matrix or score list
is ever held. The similarity matrix is computed in tiles of float32 cosines; TAR at FAR ≤ f needs
only the (k+1)-th largest impostor score v, k = ⌊f · n_impostor⌋ (then TAR = share of genuine
scores > v, the strict reading of `verification.tar_at_far`). It is found exactly by a histogram
pass plus a refinement: scores map to order-preserving 32-bit keys; pass 1 counts the top 16 bits
of every impostor key at or above a running floor (the lower edge of the bin where the count from
the top reaches k+1, which only rises, so most tiles contribute almost nothing) and keeps those
scores while they fit in a buffer; the bin holding rank k+1 is then searched exactly — in the
buffer, or, when it overflowed, by a second pass that counts the low 16 bits of the keys in that
bin. Genuine pairs are read from the same tiles, so every pair has one score.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from unitsface.errors import UnitsfaceError
from unitsface.evaluation.verification import _as_embeddings, l2_normalize, rates_from_counts

MASK_FAR = 1e-4
ALL_FARS = (1e-6, 1e-4)
MASK_WEIGHT = 0.25  # ranking score = 0.25 · TAR(Mask @ 1e-4) + 0.75 · TAR(All @ 1e-6)
TILE_ROWS, TILE_COLS = 2048, 4096  # 32 MiB of float32 scores per tile
BUFFER_CAP = 1 << 25  # tail scores kept in memory (128 MiB) before the refinement needs a second pass
_BINS = 1 << 16
_NEG_INF_BIN = 0x007F  # the bin of -inf's key: masked-out tile entries, never a score


# ------------------------------------------------------------------------------------------ float keys
def _keys(values: np.ndarray) -> np.ndarray:
    """Order-preserving uint32 keys of float32 values (larger value, larger key)."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    flip = (bits >> np.uint32(31)) * np.uint32(0x7FFFFFFF)
    flip |= np.uint32(0x80000000)
    return bits ^ flip


def _value(key: int) -> np.float32:
    """The float32 whose key is `key`."""
    bits = key ^ 0x80000000 if key >> 31 else ~key & 0xFFFFFFFF
    return np.array([bits], dtype=np.uint32).view(np.float32)[0]


def allowed_false_accepts(far: float, n_impostor: int) -> int:
    """The largest k with k / n_impostor <= far, compared in float64 exactly as the ROC's fpr is."""
    k = int(far * n_impostor)
    while k + 1 <= n_impostor and (k + 1) / n_impostor <= far:
        k += 1
    while k > 0 and k / n_impostor > far:
        k -= 1
    return k


class _TailSelect:
    """Exact r-th largest values (r counted from the top) of a float32 stream in bounded memory."""

    def __init__(self, ranks: Sequence[int], buffer_cap: int) -> None:
        self.ranks, self.top = tuple(ranks), max(ranks)
        self.hist = np.zeros(_BINS, np.int64)
        self.floor = np.float32(-np.inf)
        self.buffer: list[np.ndarray] | None = []
        self.buffered, self.cap, self.next_prune = 0, buffer_cap, 1 << 20
        self.low: dict[int, np.ndarray] = {}

    def add(self, values: np.ndarray) -> None:
        """Pass 1: float32 values (any below the current floor are ignored)."""
        values = values[values >= self.floor] if np.isfinite(self.floor) else values
        if not len(values):
            return
        self.hist += np.bincount(_keys(values) >> 16, minlength=_BINS)
        cum = np.cumsum(self.hist[::-1])
        i = int(np.searchsorted(cum, self.top))
        if i < _BINS:
            self.floor = max(self.floor, _value((_BINS - 1 - i) << 16))
        if self.buffer is None:
            return
        self.buffer.append(values)
        self.buffered += len(values)
        if self.buffered > min(self.next_prune, self.cap):
            kept = np.concatenate(self.buffer)
            kept = kept[kept >= self.floor]
            self.buffer, self.buffered = [kept], len(kept)
            self.next_prune = max(2 * len(kept), 1 << 20)
            if len(kept) > self.cap:
                self.buffer = None  # the refinement will take a second pass

    def _bin_of(self, rank: int) -> tuple[int, int]:
        """(bin holding the rank-th largest value, how many values lie in higher bins)."""
        cum = np.cumsum(self.hist[::-1])
        i = int(np.searchsorted(cum, rank))
        if i == _BINS:
            raise UnitsfaceError(f"internal: rank {rank} asked of {int(cum[-1])} counted scores")
        b = _BINS - 1 - i
        return b, int(cum[i] - self.hist[b])

    def needs_second_pass(self) -> bool:
        return self.buffer is None

    def refinement_floor(self) -> np.float32:
        return min(_value(self._bin_of(r)[0] << 16) for r in self.ranks)

    def refine(self, values: np.ndarray) -> None:
        """Pass 2 (only after an overflow): count the low 16 key bits of the values in each wanted bin."""
        keys = _keys(values)
        high = keys >> 16
        for b in {self._bin_of(r)[0] for r in self.ranks}:  # ranks may share a bin: count it once
            counts = self.low.setdefault(b, np.zeros(_BINS, np.int64))
            counts += np.bincount(keys[high == b] & 0xFFFF, minlength=_BINS)

    def result(self) -> dict[int, tuple[np.float32, int]]:
        """rank -> (the rank-th largest value, how many values are strictly larger)."""
        out = {}
        pool = np.concatenate(self.buffer) if self.buffer else np.zeros(0, np.float32)
        pool_high = _keys(pool) >> 16
        for r in self.ranks:
            b, above = self._bin_of(r)
            within = r - above  # rank inside bin b, from its top
            if self.buffer is not None:
                members = pool[pool_high == b]
                value = np.partition(members, len(members) - within)[len(members) - within]
                out[r] = (value, above + int((members > value).sum()))
                continue
            low = self.low[b]
            if int(low.sum()) != int(self.hist[b]):
                raise UnitsfaceError("scores differed between the two passes (non-deterministic BLAS?)")
            cum = np.cumsum(low[::-1])
            j = int(np.searchsorted(cum, within))
            out[r] = (_value((b << 16) | (_BINS - 1 - j)), above + int(cum[j] - low[_BINS - 1 - j]))
        return out


# ------------------------------------------------------------------------------------------ score tiles
class _PairTiles:
    """The pairs of one set as tiles of float32 cosines: query rows × gallery columns, or the upper
    triangle (i < j) of one set. Rows and columns are sorted by identity, so the genuine pairs of a
    tile are a few rectangles, read and then blanked to -inf; what is left are impostor scores."""

    def __init__(self, query: np.ndarray, q_codes: np.ndarray, gallery: np.ndarray, g_codes: np.ndarray,
                 triangle: bool, rows: int, cols: int) -> None:
        self.q, self.g, self.q_codes, self.triangle = query, gallery, q_codes, triangle
        self.rows, self.cols = rows, cols
        ids = np.arange(max(q_codes.max(), g_codes.max()) + 1)
        self.q_start, self.q_end = np.searchsorted(q_codes, ids), np.searchsorted(q_codes, ids, "right")
        self.g_start, self.g_end = np.searchsorted(g_codes, ids), np.searchsorted(g_codes, ids, "right")

    def tiles(self, floor: Callable[[], np.float32], full: bool = False
              ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
        """Per tile: (impostor scores >= floor(), genuine scores, impostor key histogram if `full`)."""
        nq, ng = len(self.q), len(self.g)
        for r0 in range(0, nq, self.rows):
            r1 = min(nq, r0 + self.rows)
            ids = np.arange(self.q_codes[r0], self.q_codes[r1 - 1] + 1)
            for c0 in range(r0 if self.triangle else 0, ng, self.cols):
                c1 = min(ng, c0 + self.cols)
                sim = self.q[r0:r1] @ self.g[c0:c1].T
                if self.triangle and c0 < r1:  # the tile reaches the diagonal: keep j > i
                    sim[np.arange(c0, c1)[None, :] <= np.arange(r0, r1)[:, None]] = -np.inf
                genuine = []
                for c in ids[(self.g_start[ids] < c1) & (self.g_end[ids] > c0)]:
                    block = sim[max(self.q_start[c], r0) - r0:min(self.q_end[c], r1) - r0,
                                max(self.g_start[c], c0) - c0:min(self.g_end[c], c1) - c0]
                    genuine.append(block[block > -np.inf])
                    block[...] = -np.inf
                flat = sim.ravel()
                hist = None
                if full:
                    flat += np.float32(0.0)  # -0.0 -> +0.0: one key per value
                    hist = np.bincount(_keys(flat) >> 16, minlength=_BINS)
                    hist[_NEG_INF_BIN] = 0
                bound = floor()
                tail = flat[flat >= bound] if np.isfinite(bound) else flat[flat > -np.inf]
                tail += np.float32(0.0)
                yield tail, (np.concatenate(genuine) if genuine else np.zeros(0, np.float32)), hist


def _sorted_set(emb: np.ndarray, labels: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    """L2-normalised float32 rows sorted by identity code (stable), and the sorted codes."""
    e = _as_embeddings(emb, name)
    y = np.asarray(labels)
    if y.shape != (len(e),):
        raise UnitsfaceError(f"{name} labels must be one per row ({len(e)}), got shape {y.shape}")
    order = np.argsort(y, kind="stable")
    return np.ascontiguousarray(l2_normalize(e[order]), dtype=np.float32), y[order]


def exact_tar_at_far(query: np.ndarray, query_labels: np.ndarray, gallery: np.ndarray | None = None,
                     gallery_labels: np.ndarray | None = None, far_targets: Sequence[float] = (MASK_FAR,),
                     roc: bool = False, tile_rows: int = TILE_ROWS, tile_cols: int = TILE_COLS,
                     buffer_cap: int = BUFFER_CAP) -> dict[str, Any]:
    """Exact TAR at FAR <= each target over every pair, in tiles (module docstring).

    Without a gallery: all unordered pairs i < j of `query` (All sets); with one: every query row
    against every gallery row (the Mask set). Genuine = same label. Scores are float32 cosines of the
    L2-normalised rows, accept s >= t. Returns tar_at_far, threshold (the lowest accepting cosine),
    false_accepts (impostors accepted there), n_genuine, n_impostor; with `roc`, the exact ROC at the
    65,536 histogram bin edges (about 2-3 significant digits of threshold) for plots.
    """
    if not far_targets or not all(0 < f < 1 for f in far_targets):
        raise UnitsfaceError(f"FAR targets must be in (0, 1), got {list(far_targets)}")
    triangle = gallery is None
    q, q_labels = _sorted_set(query, query_labels, "query")
    if triangle:
        g, g_labels = q, q_labels
    else:
        g, g_labels = _sorted_set(gallery, gallery_labels, "gallery")
        if g.shape[1] != q.shape[1]:
            raise UnitsfaceError(f"gallery dim {g.shape[1]} differs from query dim {q.shape[1]}")
    names, codes = np.unique(np.r_[q_labels, g_labels], return_inverse=True)
    q_codes, g_codes = codes[: len(q)], codes[len(q):]
    q_count = np.bincount(q_codes, minlength=len(names))
    g_count = np.bincount(g_codes, minlength=len(names))
    if triangle:
        n_genuine = int((q_count * (q_count - 1) // 2).sum())
        n_pairs = len(q) * (len(q) - 1) // 2
    else:
        n_genuine, n_pairs = int((q_count * g_count).sum()), len(q) * len(g)
    n_impostor = n_pairs - n_genuine
    if n_genuine == 0 or n_impostor == 0:
        raise UnitsfaceError(f"the pair set has {n_genuine} genuine and {n_impostor} impostor pairs; "
                             "TAR at FAR needs both (2+ images of some identity, 2+ identities)")
    allowed = {f: allowed_false_accepts(f, n_impostor) for f in far_targets}
    select = _TailSelect(sorted({k + 1 for k in allowed.values()}), buffer_cap)
    pairs = _PairTiles(q, q_codes, g, g_codes, triangle, tile_rows, tile_cols)
    genuine, full = [], np.zeros(_BINS, np.int64) if roc else None
    for tail, gen, hist in pairs.tiles(lambda: select.floor, roc):
        select.add(tail)
        genuine.append(gen)
        if full is not None:
            full += hist
    if select.needs_second_pass():
        lowest = select.refinement_floor()
        for tail, _, _ in pairs.tiles(lambda: lowest):
            select.refine(tail)
    kth = select.result()
    gen = np.sort(np.concatenate(genuine))
    if len(gen) != n_genuine:
        raise UnitsfaceError(f"internal: read {len(gen)} genuine scores, expected {n_genuine}")
    out: dict[str, Any] = {"tar_at_far": {}, "threshold": {}, "false_accepts": {},
                           "n_genuine": n_genuine, "n_impostor": n_impostor}
    for f, k in allowed.items():
        value, greater = kth[k + 1]
        out["tar_at_far"][f] = float(len(gen) - np.searchsorted(gen, value, "right")) / n_genuine
        out["threshold"][f] = float(np.nextafter(value, np.float32(np.inf)))
        out["false_accepts"][f] = greater
    if full is not None:
        out["roc"] = _binned_roc(full, gen, n_impostor)
    return out


def _binned_roc(hist: np.ndarray, genuine_sorted: np.ndarray, n_impostor: int) -> dict[str, np.ndarray]:
    """ROC points at every non-empty bin's lower edge (exact there), thresholds descending, closed by
    the accept-everything point."""
    bins = np.flatnonzero(hist)[::-1]
    edges = np.array([_value(int(b) << 16) for b in bins], dtype=np.float32)
    fp = np.r_[np.cumsum(hist[bins]), n_impostor]
    tp = np.r_[len(genuine_sorted) - np.searchsorted(genuine_sorted, edges, "left"), len(genuine_sorted)]
    fpr, tpr, thresholds = rates_from_counts(fp, tp, np.r_[edges, -np.inf])
    return {"fpr": fpr, "tpr": tpr, "thresholds": thresholds}


# ------------------------------------------------------------------------------------------ protocol
def check_sets(labels: np.ndarray, groups: Mapping[str, Sequence] | None = None) -> np.ndarray:
    """The distinct identities, after the checks the MFR sets need (cheap: run before embedding)."""
    names, counts = np.unique(np.asarray(labels), return_counts=True)
    if (counts < 2).any():
        raise UnitsfaceError(f"identity {names[counts < 2].tolist()[0]!r} has 1 image; the MFR sets need at least "
                             "2 images per identity")
    if len(names) < 2:
        raise UnitsfaceError("the MFR sets need at least 2 identities")
    known = set(names.tolist())
    for group, members in (groups or {}).items():
        unknown = [m for m in members if m not in known]
        if unknown:
            raise UnitsfaceError(f"group {group!r} names identity {unknown[0]!r}, which is not in the evaluated set")
        if len(set(members)) < 2:
            raise UnitsfaceError(f"group {group!r} has fewer than 2 identities; it cannot have impostor pairs")
    return names


def evaluate_mfr(features: np.ndarray, labels: np.ndarray, probe_rows: np.ndarray, masked_probes: np.ndarray,
                 groups: Mapping[str, Sequence] | None = None, roc: bool = False, **tiles: int) -> dict[str, Any]:
    """The Mask set, its unmasked twin, the All set and per-group All sets of one labelled face set.

    `features`: N×d unmasked embeddings with `labels`; `probe_rows`: for each identity, the row its
    masked probe was rendered from (left out of the Mask set's gallery); `masked_probes`: those
    probes' embeddings, masked. `unmasked` scores the same Mask-set pairs with the probes unmasked:
    what the mask costs. `groups`: group name -> identity labels (each group an All set of its own).
    """
    e = _as_embeddings(features, "features")
    y = np.asarray(labels)
    if y.shape != (len(e),):
        raise UnitsfaceError(f"labels must be one per feature row ({len(e)}), got shape {y.shape}")
    names = check_sets(y, groups)
    rows = np.asarray(probe_rows, dtype=np.int64)
    if rows.shape != (len(names),) or not np.array_equal(np.sort(y[rows]), names):
        raise UnitsfaceError(f"probe_rows must name one image of each of the {len(names)} identities")
    gallery = np.ones(len(e), bool)
    gallery[rows] = False
    results: dict[str, Any] = {
        "n_images": len(e), "n_identities": len(names),
        "mask": exact_tar_at_far(masked_probes, y[rows], e[gallery], y[gallery], (MASK_FAR,), roc, **tiles),
        "unmasked": exact_tar_at_far(e[rows], y[rows], e[gallery], y[gallery], (MASK_FAR,), roc, **tiles),
        "all": exact_tar_at_far(e, y, far_targets=ALL_FARS, roc=roc, **tiles),
        "groups": {},
    }
    for group, members in (groups or {}).items():
        inside = np.isin(y, list(members))
        result = exact_tar_at_far(e[inside], y[inside], far_targets=ALL_FARS, roc=roc, **tiles)
        results["groups"][group] = {**result, "n_identities": int(len(np.unique(y[inside])))}
    results["score"] = (MASK_WEIGHT * results["mask"]["tar_at_far"][MASK_FAR]
                        + (1 - MASK_WEIGHT) * results["all"]["tar_at_far"][ALL_FARS[0]])
    return results
