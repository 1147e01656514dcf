"""IJB-B / IJB-C: meta-file readers, vectorised template pooling, 1:1 TAR@FAR and 1:N identification.

The computations follow insightface `eval_ijbc.py` / `ijb_evals.py` exactly (evaluation.md §5), including
their float32 image -> media -> template accumulation, but replace the per-template Python loops (a
`np.where` over all images for each of 23k templates) by one sort plus segment sums, and score pairs
with dense BLAS blocks when pairs are dense enough. At IJB-C size (469k images, 15.7M pairs) the cost is
one float64 GEMM, one sort of the scores and one pass over the features; past that, fresh memory costs
more than arithmetic, so big arrays are few and buffers are reused (bench/ijb_speed.py measures it
against eval_ijbc.py's stages; docs/evaluation.md has the numbers).
"""

from __future__ import annotations

import csv
import functools
import io
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence, Union

import numpy as np

from unitsface.errors import UnitsfaceError, one_line
from unitsface.evaluation.verification import (
    LargestScores,
    auc,
    l2_normalize,
    roc_corners,
    roc_counts,
    roc_rates,
    tar_at_far,
)

IJB_FAR_TARGETS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
IMAGE_CHUNK = 32768  # images per pooling chunk; its buffers hold one row per media (<= 32k x 1024 float32)
PAIR_CHUNK = 1 << 22  # pairs per group: an IJB-C group block is 900 x 19.6k float64 (141 MB), 4 BLAS calls
PAIR_WINDOW = 1 << 20  # pairs whose indices are handled at once (8 MB temporaries, reused rather than fresh)
GATHER_CHUNK = 8192  # pairs per row gather when pairs are sparse (2 x 8192 x 512 float64 = 64 MiB)
DENSE_RATIO = 8  # score a pair chunk as a dense block when block size <= DENSE_RATIO x pairs

_LETTER = re.compile(r"([NDF])([01])")
_EFFECT = {"flip": {"sum": True, "none": False}, "image_norm": {"keep": True, "l2": False},
           "faceness": {"on": True, "off": False}}
_EFFECT_ARG = {"flip": "flip", "image_norm": "norm_score", "faceness": "detector_score"}


# ------------------------------------------------------------------------------------------ test modes
def ijb_mode(spec: str) -> dict[str, bool]:
    """Parse a test mode: eval_ijbc letters ("N1D1F1", any order) or effect names
    ("flip=sum,image_norm=keep,faceness=on"). Returns evaluate_ijb keyword arguments.

    The letters follow eval_ijbc.py, where N1 KEEPS image norms (ijb_evals.py inverts N; §5.1).
    """
    spec = spec.replace(" ", "")
    letters = _LETTER.findall(spec)
    if "".join(a + b for a, b in letters) == spec and len({a for a, _ in letters}) == len(letters) == 3:
        m = {a: b == "1" for a, b in letters}
        return {"flip": m["F"], "norm_score": m["N"], "detector_score": m["D"]}
    out: dict[str, bool] = {}
    for item in filter(None, spec.split(",")):
        key, _, val = item.partition("=")
        if key not in _EFFECT or val not in _EFFECT[key]:
            raise UnitsfaceError(f"bad IJB mode item {item!r} in {spec!r}; use letters like N1D1F1 or "
                                 "flip=sum|none,image_norm=keep|l2,faceness=on|off")
        out[_EFFECT_ARG[key]] = _EFFECT[key][val]
    if len(out) != 3:
        raise UnitsfaceError(f"IJB mode {spec!r} must set flip, image_norm and faceness (or N, D and F)")
    return out


def describe_ijb_mode(flip: bool, norm_score: bool, detector_score: bool) -> str:
    """Effect names plus the eval_ijbc letters, for printing next to every IJB number."""
    return (f"flip={'sum' if flip else 'none'}, image_norm={'keep' if norm_score else 'l2'}, "
            f"faceness={'on' if detector_score else 'off'} (eval_ijbc N{norm_score:d}D{detector_score:d}F{flip:d})")


# ------------------------------------------------------------------------------------------ meta files
@dataclass(frozen=True)
class IJBMeta:
    """The 1:1 meta data of one IJB set; row i of the image arrays describes loose_crop/image_names[i]."""

    image_dir: Path
    image_names: list[str]
    templates: np.ndarray
    medias: np.ndarray
    landmarks: np.ndarray  # (n, 5, 2) float32, loose-crop pixels
    faceness: np.ndarray  # (n,) float32
    p1: np.ndarray
    p2: np.ndarray
    labels: np.ndarray


def _meta_dir(root: Union[str, Path], name: str) -> Path:
    root = Path(root)
    for cand in (root / name / "meta", root / "meta"):
        if cand.is_dir():
            return cand
    raise UnitsfaceError(f"IJB meta folder not found: expected {root / name / 'meta'}")


def _read_text(path: Path, what: str = "IJB meta file") -> str:
    if not path.is_file():
        raise UnitsfaceError(f"{what} missing: {path}")
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UnitsfaceError(f"{path}: not UTF-8 text (byte {exc.start})") from None


def _read_rows(path: Path, n_fields: int) -> list[list[str]]:
    rows = [ln.split() for ln in _read_text(path).splitlines() if ln.strip()]
    for i, r in enumerate(rows):
        if len(r) != n_fields:
            raise UnitsfaceError(f"{path}: line {i + 1} has {len(r)} fields, expected {n_fields}")
    return rows


def _read_int_table(path: Path, n_cols: int) -> np.ndarray:
    """Space-separated integer table via numpy's C parser (15.7M pair lines in a few seconds)."""
    if not path.is_file():
        raise UnitsfaceError(f"IJB meta file missing: {path}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # empty file: reported below
        try:
            table = np.loadtxt(path, dtype=np.int64, ndmin=2)
        except ValueError as exc:
            raise UnitsfaceError(f"{path}: {one_line(exc).split(';')[0]}") from None
    if table.shape[0] == 0 or table.shape[1] != n_cols:
        raise UnitsfaceError(f"{path}: expected rows of {n_cols} integers, got a table of shape {table.shape}")
    return table


def read_ijb_meta(root: Union[str, Path], name: str = "IJBC") -> IJBMeta:
    """Read `<root>/<name>/meta/{tid_mid, template_pair_label, name_5pts_score}` (formats.md §7).

    Checks that the image lists of the two per-image files line up (insightface trusts row order; a
    reordered file silently scrambles templates) and that every pair template exists.
    """
    meta, pre = _meta_dir(root, name), name.lower()
    tid_path, pts_path = meta / f"{pre}_face_tid_mid.txt", meta / f"{pre}_name_5pts_score.txt"
    tid, pts = _read_rows(tid_path, 3), _read_rows(pts_path, 12)
    if len(tid) != len(pts):
        raise UnitsfaceError(f"{tid_path.name} has {len(tid)} rows but {pts_path.name} has {len(pts)}")
    for i, (a, b) in enumerate(zip(tid, pts)):
        if a[0] != b[0]:
            raise UnitsfaceError(f"line {i + 1}: {tid_path.name} names {a[0]!r} but {pts_path.name} names {b[0]!r}")
    try:
        tm = np.array([r[1:] for r in tid], dtype=np.int64)
        nums = np.array([r[1:] for r in pts], dtype=np.float32)
    except (ValueError, OverflowError) as exc:
        raise UnitsfaceError(f"{meta}: non-numeric or out-of-range template/media/landmark value ({exc})") from None
    pairs = _read_int_table(meta / f"{pre}_template_pair_label.txt", 3)
    known = np.unique(tm[:, 0])
    missing = np.setdiff1d(pairs[:, :2], known)
    if len(missing):
        raise UnitsfaceError(f"{pre}_template_pair_label.txt uses template {missing[0]} absent from {tid_path.name}")
    if not np.isin(pairs[:, 2], (0, 1)).all():
        raise UnitsfaceError(f"{pre}_template_pair_label.txt: labels must be 0 or 1")
    return IJBMeta(meta.parent / "loose_crop", [r[0] for r in tid], tm[:, 0], tm[:, 1],
                   nums[:, :10].reshape(-1, 5, 2), nums[:, 10], pairs[:, 0], pairs[:, 1], pairs[:, 2].astype(bool))


def read_ijb_1n_meta(root: Union[str, Path], name: str = "IJBC") -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Read the 1:N CSVs: {"G1"/"S1": (templates, subjects), "G2"/"S2": ..., "probe": ...}.

    Rows are per image; templates are de-duplicated (sorted, subject of first occurrence, as
    insightface), and a template listed with two subjects is an error.
    """
    meta, pre = _meta_dir(root, name), name.lower()
    gal = ("S1", "S2") if pre == "ijbb" else ("G1", "G2")
    files = {g: meta / f"{pre}_1N_gallery_{g}.csv" for g in gal} | {"probe": meta / f"{pre}_1N_probe_mixed.csv"}
    out = {}
    for key, path in files.items():
        try:
            rows = list(csv.reader(io.StringIO(_read_text(path, "IJB 1:N file"), newline="")))[1:]
            tids = np.array([int(r[0]) for r in rows if r], dtype=np.int64)
            sids = np.array([int(r[1]) for r in rows if r], dtype=np.int64)
        except (ValueError, IndexError, OverflowError, csv.Error) as exc:
            raise UnitsfaceError(f"{path}: expected integer TEMPLATE_ID,SUBJECT_ID columns ({one_line(exc)})") from None
        u, first, inv = np.unique(tids, return_index=True, return_inverse=True)
        clash = np.flatnonzero(sids != sids[first][inv])
        if len(clash):
            raise UnitsfaceError(f"{path}: template {tids[clash[0]]} is listed with two subject ids")
        out[key] = (u, sids[first])
    return out


# ---------------------------------------------------------------------------------------------- pooling
def image_features(
    features: np.ndarray, faceness: Optional[np.ndarray], flip: bool, norm_score: bool, detector_score: bool,
    out: Optional[np.ndarray] = None,
) -> np.ndarray:
    """Per-image features after the test-mode switches of §5.1, in float32 as insightface computes them.

    features rows are [f(image) | f(flipped image)] (2d columns); `out`, a float32 buffer of the result's
    shape, saves the allocation.
    """
    d = features.shape[1] // 2
    if flip:
        g = np.add(features[:, :d], features[:, d:], dtype=np.float32, out=out)
    elif out is None:
        g = features[:, :d].astype(np.float32)
    else:
        g = out
        g[...] = features[:, :d]
    if not norm_score:
        with np.errstate(invalid="ignore", divide="ignore"):  # zero rows: caught by the caller's check
            g /= np.sqrt(np.sum(g**2, -1, keepdims=True))
    if detector_score:
        g *= faceness[:, None]
    return g


def _segments(keys: np.ndarray) -> np.ndarray:
    """Start index of each run of equal rows in a sorted key array (1-D or columns)."""
    change = np.any(keys[1:] != keys[:-1], axis=1) if keys.ndim == 2 else keys[1:] != keys[:-1]
    return np.flatnonzero(np.r_[True, change])


def _segment_sums(rows: Callable[[np.ndarray, np.ndarray], np.ndarray], starts: np.ndarray, counts: np.ndarray,
                  acc: np.ndarray, scratch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(order, sums): the sum of each segment of rows (segment i = rows starts[i] .. starts[i] + counts[i] - 1),
    added one row at a time in order, in the rows' dtype, listed in `order` (segment indices, longest first).

    Adds the k-th row of every segment longer than k in one vectorised step, so the float32 sums are
    bit-identical to insightface's sequential np.mean/np.sum and far faster than np.add.reduceat along
    axis 0 (which walks columns with a large stride). `rows(positions, out=)` writes the rows at those
    positions into `out` and returns it: rows are asked for once each, so they can be computed on demand.
    `acc` and `scratch` are buffers of at least len(starts) rows, reused from call to call: a fresh
    array per step would fault in gigabytes of new memory at IJB-C size.
    """
    order = np.argsort(-counts, kind="stable")
    s_starts, s_counts = starts[order], counts[order]
    sums = rows(s_starts, out=acc[: len(starts)])
    for k in range(1, int(s_counts[0]) if len(s_counts) else 0):
        m = int(np.searchsorted(-s_counts, -k, "left"))  # segments longer than k come first
        sums[:m] += rows(s_starts[:m] + k, out=scratch[:m])
    return order, sums


def _check_ijb_inputs(
    features, faceness, templates, medias, detector_score: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    f = np.asarray(features)
    if f.ndim != 2 or f.shape[0] == 0 or f.shape[1] % 2:
        raise UnitsfaceError(f"IJB features must be N x 2d ([image | flipped image]), got shape {f.shape}")
    n = len(f)
    arrs = []
    if faceness is None:
        if detector_score:
            raise UnitsfaceError("detector_score=True (faceness=on) needs the faceness scores")
        faceness = np.ones(n, dtype=np.float32)
    for name, a, dt in (("faceness", faceness, np.float32), ("templates", templates, np.int64),
                        ("medias", medias, np.int64)):
        a = np.asarray(a)
        if a.shape != (n,):
            raise UnitsfaceError(f"{name} must have one entry per image ({n}), got shape {a.shape}")
        arrs.append(a.astype(dt, copy=False))
    if not np.isfinite(arrs[0]).all():
        raise UnitsfaceError("faceness contains NaN or infinite values")
    return f, arrs[0], arrs[1], arrs[2]


def template_features(
    features: np.ndarray,
    faceness: Optional[np.ndarray],
    templates: np.ndarray,
    medias: np.ndarray,
    flip: bool = True,
    norm_score: bool = True,
    detector_score: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """(sorted unique template ids, L2-normalised float64 template features), insightface pooling:
    media feature = mean of its images, template feature = sum of its media features (§5.2).

    Templates are visited sorted, in chunks of about IMAGE_CHUNK images, so memory stays bounded (no table
    of all media, no sorted copy of the features): an image's feature is computed from its row of
    `features` as the media sums need it, and each media/template sum accumulates in the same order and
    precision as insightface's loops.
    """
    f, faceness, templates, medias = _check_ijb_inputs(features, faceness, templates, medias, detector_score)
    order = np.lexsort((medias, templates))
    key = np.stack([templates[order], medias[order]], axis=1)
    m_start = _segments(key)
    m_count = np.diff(np.r_[m_start, len(order)])

    t_start = _segments(key[m_start, 0])
    t_count = np.diff(np.r_[t_start, len(m_start)])
    d = f.shape[1] // 2
    chunks, first_image = [0], m_start[t_start]  # whole templates holding about IMAGE_CHUNK images each
    while chunks[-1] < len(t_start):
        chunks.append(int(np.searchsorted(first_image, first_image[chunks[-1]] + IMAGE_CHUNK, "left")))
    t_bounds = np.r_[t_start, len(m_start)][chunks]  # each chunk's range of media
    most = int(np.diff(t_bounds).max())
    gathered = np.empty((most, 2 * d), dtype=f.dtype)
    acc, scratch, means = (np.empty((most, d), dtype=np.float32) for _ in "abc")

    def media_rows(positions: np.ndarray, out: np.ndarray) -> np.ndarray:
        """Image features of the images at these sorted positions, from their rows of `features`."""
        images = order[positions]
        rows = np.take(f, images, axis=0, out=gathered[: len(images)], mode="clip")  # "clip": unbuffered
        return image_features(rows, faceness[images], flip, norm_score, detector_score, out=out)

    tfeats = np.empty((len(t_start), d))
    for t0, t1, m0, m1 in zip(chunks[:-1], chunks[1:], t_bounds[:-1], t_bounds[1:]):
        by_size, sums = _segment_sums(media_rows, m_start[m0:m1], m_count[m0:m1], acc, scratch)
        # the float64 quotient rounded to float32, as assigning x / count to a float32 array does
        np.divide(sums, m_count[m0 + by_size, None], out=sums, casting="unsafe")
        means[by_size] = sums
        _check_finite(means[: m1 - m0], m0, f, faceness, order, m_start, m_count, flip, norm_score, detector_score)
        rows = functools.partial(np.take, means, axis=0, mode="clip")
        by_size, sums = _segment_sums(rows, t_start[t0:t1] - m0, t_count[t0:t1], acc, scratch)
        tfeats[t0 + by_size] = sums
    return key[m_start[t_start], 0], l2_normalize(tfeats, out=tfeats)


def _check_finite(means: np.ndarray, m0: int, f, faceness, order, m_start, m_count, *mode: bool) -> None:
    """Media means m0.. must be finite: a sum with a NaN or infinite term is not, so checking them rather than
    each image reads 5x fewer rows; the image to blame is looked for only when one is not."""
    finite = np.isfinite(means).all(1)
    if finite.all():
        return
    bad = m0 + np.flatnonzero(~finite)[0]
    images = order[m_start[bad] : m_start[bad] + m_count[bad]]
    ok = np.isfinite(image_features(f[images], faceness[images], *mode)).all(1)
    culprit = images[np.flatnonzero(~ok)[0]] if not ok.all() else images[0]
    raise UnitsfaceError(f"image {culprit}: non-finite feature (NaN input, a zero vector with image_norm=l2, "
                         "or a media sum beyond float32)")


def _rows_of(unique_templates: np.ndarray, ids: np.ndarray, what: str) -> np.ndarray:
    """Row of each template id in the sorted `unique_templates`; a lookup table when ids are compact
    (IJB ids are), binary search otherwise. Ids are range-checked first, so no subtraction can overflow,
    and non-negative ids index the table directly: one pass over 15.7M pair ids, not three."""
    ids = np.asarray(ids, dtype=np.int64)
    lo, hi = int(unique_templates[0]), int(unique_templates[-1])
    outside = len(ids) and (ids.min() < lo or ids.max() > hi)
    if not outside and hi - lo <= 8 * len(unique_templates) + (1 << 20):
        base = min(lo, 0)
        table = np.full(hi - base + 1, -1, dtype=np.intp)  # intp: numpy converts any other index type first
        table[unique_templates - base] = np.arange(len(unique_templates))
        pos = table[ids if base == 0 else ids - base]
        bad = len(ids) and pos.min() < 0
    else:
        pos = np.minimum(np.searchsorted(unique_templates, ids), len(unique_templates) - 1)
        bad = np.any(unique_templates[pos] != ids)
    if bad:
        missing = np.flatnonzero(~np.isin(ids, unique_templates))[0]
        raise UnitsfaceError(f"{what}: template {ids[missing]} has no images")
    return pos


def _used_rows(unique_templates: np.ndarray, ids: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    """(the sorted rows of `unique_templates` that `ids` name, a table: row -> position among them)."""
    used = np.zeros(len(unique_templates), dtype=bool)
    for w in range(0, len(ids), PAIR_WINDOW):  # window by window: no array as long as `ids`
        used[_rows_of(unique_templates, ids[w : w + PAIR_WINDOW], what)] = True
    rows = np.flatnonzero(used)
    rank = np.zeros(len(unique_templates), dtype=np.intp)
    rank[rows] = np.arange(len(rows))
    return rows, rank


def _block_rows(template_feats: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """template_feats[rows]; a view when the rows are consecutive (IJB probes are), not an 80 MB copy."""
    if len(rows) and rows[-1] - rows[0] + 1 == len(rows):
        return template_feats[rows[0] : rows[-1] + 1]
    return template_feats[rows]


def pair_scores(template_feats: np.ndarray, unique_templates: np.ndarray, p1: np.ndarray, p2: np.ndarray) -> np.ndarray:
    """Cosine score of every template pair, float64, in bounded memory.

    Pairs are grouped by ranges of first template holding about PAIR_CHUNK pairs each (15.7M pairs are
    never sorted: a group's pairs are found by scanning one byte per pair, a window of PAIR_WINDOW pairs
    at a time). A group whose (first templates) x (second templates) block is at most DENSE_RATIO times
    its pair count is one BLAS product: IJB pairs are gallery x probe, so every group meets all probes,
    whose rows are gathered once, and each pair reads its score at its cell of the block. Sparser groups
    gather the two feature rows of each pair, GATHER_CHUNK pairs at a time. Fresh memory costs more than
    the arithmetic here, so arrays as long as the pair list are few, and every other temporary is small
    enough to be reused.
    """
    p1, p2 = np.asarray(p1), np.asarray(p2)
    if p1.shape != p2.shape or p1.ndim != 1:
        raise UnitsfaceError(f"p1 and p2 must be 1-D of equal length, got {p1.shape} and {p2.shape}")
    firsts, first_rank = _used_rows(unique_templates, p1, "pair list")
    seconds, second_rank = _used_rows(unique_templates, p2, "pair list")
    cell = first_rank[_rows_of(unique_templates, p1, "pair list")]  # for now: each pair's first's position
    cum = np.cumsum(np.bincount(cell, minlength=len(firsts)))
    group_of = np.searchsorted(np.arange(PAIR_CHUNK, cum[-1] + PAIR_CHUNK, PAIR_CHUNK), cum, "left")
    small = np.uint8 if group_of[-1] < 1 << 8 else np.uint16 if group_of[-1] < 1 << 16 else np.int64
    group = group_of.astype(small)[cell]
    cell *= len(seconds)  # each pair's cell in the (firsts x seconds) matrix
    for w in range(0, len(cell), PAIR_WINDOW):
        cell[w : w + PAIR_WINDOW] += second_rank[_rows_of(unique_templates, p2[w : w + PAIR_WINDOW], "pair list")]
    counts = np.bincount(group, minlength=group_of[-1] + 1)
    first_bounds = np.searchsorted(group_of, np.arange(group_of[-1] + 2))  # each group's range of `firsts`
    block_size = np.diff(first_bounds) * len(seconds)
    dense = block_size <= DENSE_RATIO * counts
    if dense.any():  # gathered once, and one buffer for every block
        second_feats, block = _block_rows(template_feats, seconds), np.empty(block_size[dense].max())
    out = np.empty(len(p1), dtype=np.float64)
    for g in np.flatnonzero(counts):
        f0, f1 = first_bounds[g], first_bounds[g + 1]
        if dense[g]:
            np.matmul(template_feats[firsts[f0:f1]], second_feats.T, out=block[: block_size[g]].reshape(f1 - f0, -1))
        for w in range(0, len(group), PAIR_WINDOW):
            sel = w + np.flatnonzero(group[w : w + PAIR_WINDOW] == g)  # this group's pairs, in pair order
            at = cell[sel]
            if dense[g]:
                at -= f0 * len(seconds)
                out[sel] = block.take(at)
                continue
            for a in range(0, len(sel), GATHER_CHUNK):
                first, second = np.divmod(at[a : a + GATHER_CHUNK], len(seconds))
                out[sel[a : a + GATHER_CHUNK]] = np.einsum("ij,ij->i", template_feats[firsts[first]],
                                                           template_feats[seconds[second]])
    return out


# --------------------------------------------------------------------------------------------- 1:1
def evaluate_ijb(
    features: np.ndarray,
    faceness: np.ndarray,
    templates: np.ndarray,
    medias: np.ndarray,
    p1: np.ndarray,
    p2: np.ndarray,
    labels: np.ndarray,
    flip: bool = True,
    norm_score: bool = True,
    detector_score: bool = True,
    far_targets: Sequence[float] = IJB_FAR_TARGETS,
) -> dict:
    """IJB 1:1 verification from per-image features (N x 2d, [image | flipped image]).

    `tar_at_far` is insightface's closest-point reading on the thinned ROC (equals eval_ijbc.py);
    `tar_at_far_strict` the best TAR with FAR <= target on the exact ROC; `tar_at_far_interp` the
    linear interpolation (§5.3). `mode` names the test mode; always print it with the numbers.
    """
    uniq, tf = template_features(features, faceness, templates, medias, flip, norm_score, detector_score)
    scores = pair_scores(tf, uniq, p1, p2)
    n_pairs = len(scores)
    # Fresh memory costs more than arithmetic here: each dead IJB-C-sized array is freed before the next is
    # allocated, and the steps run in the order that keeps the fewest alive at once.
    fps, tps = roc_counts(scores, np.asarray(labels), overwrite=True)[:2]  # sorted in place: no copy
    del scores
    corners = np.r_[0, roc_corners(fps, tps) + 1]  # the thinned curve, taken from the full one below
    n_gen = int(tps[-1])
    fpr, tpr = roc_rates(fps, tps)
    del fps, tps
    fpr_t, tpr_t = fpr[corners], tpr[corners]
    return {
        "mode": describe_ijb_mode(flip, norm_score, detector_score),
        "pooling": "media mean, template sum, L2 (insightface)",
        "n_templates": len(uniq),
        "n_pairs": n_pairs,
        "n_genuine": n_gen,
        "n_impostor": n_pairs - n_gen,
        "tar_at_far": tar_at_far(fpr_t, tpr_t, far_targets, "closest"),
        "tar_at_far_strict": tar_at_far(fpr, tpr, far_targets, "strict"),
        "tar_at_far_interp": tar_at_far(fpr, tpr, far_targets, "interp"),
        "auc": auc(fpr, tpr),
        "roc": {"fpr": fpr_t, "tpr": tpr_t},
    }


# --------------------------------------------------------------------------------------------- 1:N
def _rank_and_tpir(
    sim: np.ndarray, mate: np.ndarray, ranks: Sequence[int], fpirs: Sequence[float], name: str
) -> dict:
    """Open-set metrics of one gallery (ijb_evals.py after its 2021 fix).

    sim: probes x gallery; mate[i] = gallery column of probe i's mate, -1 for non-mated probes.
    Rank of a mate = 1 + number of non-mate entries scoring >= it (ties count against the probe).
    """
    mated = mate >= 0
    if not mated.any() or mated.all():
        raise UnitsfaceError(f"gallery {name}: open-set TPIR needs mated and non-mated probes "
                             f"({int(mated.sum())} mated of {len(mate)})")
    sm = sim[mated]
    pos = sm[np.arange(len(sm)), mate[mated]]
    sm[np.arange(len(sm)), mate[mated]] = -np.inf
    rank = 1 + np.sum(sm >= pos[:, None], axis=1)
    nonmated_best = np.sort(sim[~mated].max(1))[::-1]
    tpir = {}
    for f in fpirs:
        thr = nonmated_best[max(int(len(nonmated_best) * f) - 1, 0)]
        tpir[f] = float(np.sum((rank == 1) & (pos > thr)) / len(pos))
    return {"hits": {k: int(np.sum(rank <= k)) for k in ranks}, "tpir_at_fpir": tpir,
            "n_mated": int(mated.sum()), "n_non_mated": int((~mated).sum())}


def _mates(probe_subjects: np.ndarray, gallery_subjects: np.ndarray) -> np.ndarray:
    """Column of the first gallery entry with the probe's subject, -1 if none."""
    order = np.argsort(gallery_subjects, kind="stable")
    gs = gallery_subjects[order]
    pos = np.minimum(np.searchsorted(gs, probe_subjects), len(gs) - 1)
    return np.where(gs[pos] == probe_subjects, order[pos], -1)


def evaluate_ijb_identification(
    template_feats: np.ndarray,
    unique_templates: np.ndarray,
    galleries: Mapping[str, tuple[np.ndarray, np.ndarray]],
    probes: tuple[np.ndarray, np.ndarray],
    ranks: Sequence[int] = (1, 5, 10),
    fpirs: Sequence[float] = (1e-2, 1e-1),
    protocol: str = "insightface",
) -> dict:
    """IJB 1:N from template features (e.g. `template_features(...)` in insightface's 1:N mode N1D1F1).

    galleries: name -> (template ids, subject ids), one template per subject (read_ijb_1n_meta);
    probes: (template ids, subject ids). protocol "insightface" is open-set per gallery (§5.4): rank-k
    pooled over galleries / all probes, TPIR at each FPIR averaged over galleries. "insightface-legacy"
    is ijb_1n.py's closed set over the concatenated galleries; its "TPIR" is not open-set TPIR@FPIR.
    """
    pt, ps = (np.asarray(a, dtype=np.int64) for a in probes)
    empty = [name for name, (gt, _) in galleries.items() if len(gt) == 0] + (["probe list"] if len(pt) == 0 else [])
    if empty or not galleries:
        raise UnitsfaceError(f"1:N needs a non-empty probe list and galleries; empty: "
                             f"{', '.join(empty) or 'galleries'}")
    pf = template_feats[_rows_of(unique_templates, pt, "probe list")]
    if protocol == "insightface":
        per, hits = {}, dict.fromkeys(ranks, 0)
        for name, (gt, gs) in galleries.items():
            gf = template_feats[_rows_of(unique_templates, gt, f"gallery {name}")]
            if len(np.unique(gs)) != len(gs):
                raise UnitsfaceError(f"gallery {name}: a subject has several templates; expected one per subject")
            per[name] = _rank_and_tpir(pf @ gf.T, _mates(ps, np.asarray(gs)), ranks, fpirs, name)
            for k in ranks:
                hits[k] += per[name]["hits"][k]
        return {"protocol": protocol, "n_probes": len(pt),
                "rank": {k: hits[k] / len(pt) for k in ranks},
                "tpir_at_fpir": {f: float(np.mean([p["tpir_at_fpir"][f] for p in per.values()])) for f in fpirs},
                "per_gallery": per}
    if protocol == "insightface-legacy":
        gt = np.concatenate([np.asarray(g[0], dtype=np.int64) for g in galleries.values()])
        gs = np.concatenate([np.asarray(g[1], dtype=np.int64) for g in galleries.values()])
        gt, first = np.unique(gt, return_index=True)
        gs = gs[first]
        mate = _mates(ps, gs)
        if (mate < 0).any() or len(np.unique(gs)) != len(gs):
            raise UnitsfaceError("insightface-legacy 1:N needs every probe subject exactly once in the galleries")
        return _legacy_closed_set(pf, template_feats[_rows_of(unique_templates, gt, "gallery")], mate, ranks, fpirs)
    raise UnitsfaceError(f"unknown 1:N protocol {protocol!r}; expected insightface or insightface-legacy")


def _legacy_closed_set(pf: np.ndarray, gf: np.ndarray, mate: np.ndarray, ranks, fpirs) -> dict:
    """ijb_1n.py: rank-k, and the fraction of probes whose mate beats the ceil(f * Q)-th largest non-mate
    score (Q = number of probes), with no rank condition."""
    q = len(pf)
    need = max(int(np.ceil(q * f)) for f in fpirs)
    top = LargestScores(need)
    rank = np.empty(q, dtype=np.int64)
    pos = np.empty(q)
    step = max(1, (1 << 22) // max(len(gf), 1))
    for a in range(0, q, step):
        sim = pf[a : a + step] @ gf.T
        rows = np.arange(len(sim))
        pos[a : a + step] = sim[rows, mate[a : a + step]]
        sim[rows, mate[a : a + step]] = -np.inf
        rank[a : a + step] = 1 + np.sum(sim >= pos[a : a + step, None], axis=1)
        top.add(sim[np.isfinite(sim)])
    ordered = np.sort(top.values)[::-1]
    return {"protocol": "insightface-legacy", "n_probes": q,
            "rank": {k: float(np.mean(rank <= k)) for k in ranks},
            "tpir_at_far_legacy": {f: float(np.sum(pos > ordered[int(np.ceil(q * f)) - 1]) / q) for f in fpirs}}
