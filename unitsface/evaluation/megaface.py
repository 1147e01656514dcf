"""MegaFace Challenge 1 (evaluation.md §6): rank-k identification and TAR@FAR=1e-6 in bounded memory.

One million 512-d distractors are 2 GB and 3,530 probes against them are 3.5e9 scores, so distractors
are streamed in chunks: per probe only its k best distractor scores are kept (identification), and
globally only the floor(far * n_impostor) + 1 best impostor scores (verification).
"""

from __future__ import annotations

import math
from typing import Iterator, Optional, Sequence, Union

import numpy as np

from unitsface.errors import UnitsfaceError
from unitsface.evaluation.verification import LargestScores, l2_normalize

Distractors = Union[np.ndarray, Sequence[np.ndarray]]
SCORE_BLOCK = 1 << 24  # probe x distractor scores held at once (64 MiB in float32)


def clean_probes(probe_feats: np.ndarray, probe_ids: np.ndarray, noisy: np.ndarray) -> np.ndarray:
    """The refined protocol's probe cleaning: each noisy probe becomes the L2-normalised mean of its
    identity's clean (normalised) features, as insightface's remove_noises.py does."""
    p, ids, noisy = l2_normalize(np.asarray(probe_feats)), np.asarray(probe_ids), np.asarray(noisy, dtype=bool)
    if noisy.shape != ids.shape:
        raise UnitsfaceError(f"probe noise mask must have one entry per probe ({len(ids)}), got {noisy.shape}")
    for ident in np.unique(ids[noisy]):
        clean = (ids == ident) & ~noisy
        if not clean.any():
            raise UnitsfaceError(f"probe identity {ident.item()!r}: every image is on the noise list")
        p[(ids == ident) & noisy] = l2_normalize(p[clean].mean(0, keepdims=True))
    return p


def _distractor_chunks(distractors: Distractors, step: int, drop: Optional[np.ndarray]) -> Iterator[np.ndarray]:
    """Normalised distractor blocks of at most `step` rows, noisy rows removed; works on memmaps."""
    parts = [distractors] if isinstance(distractors, np.ndarray) else list(distractors)
    offset = 0
    for part in parts:
        for a in range(0, len(part), step):
            block = np.asarray(part[a : a + step])
            if drop is not None:
                block = block[~drop[offset + a : offset + a + len(block)]]
            if not np.isfinite(block).all():
                raise UnitsfaceError(f"distractor features contain NaN or infinite values (rows {offset + a}+)")
            yield l2_normalize(block)
        offset += len(part)


def evaluate_megaface(
    probe_feats: np.ndarray,
    probe_ids: np.ndarray,
    distractors: Distractors,
    ranks: Sequence[int] = (1,),
    far: float = 1e-6,
    probe_noise: Optional[np.ndarray] = None,
    distractor_noise: Optional[np.ndarray] = None,
) -> dict:
    """MegaFace identification and verification for any features (normalised here; cosine scores).

    distractors: an (n, d) array (np.memmap is fine) or a sequence of such blocks. Identification:
    for each identity and ordered pair (i, j), i != j, the gallery is distractors + image i and probe j
    succeeds at rank k when s(j, i) >= its k-th best distractor score (ties succeed, as FaceX-Zoo).
    Verification: genuine = same-identity probe pairs, impostors = all probe-distractor pairs, TAR at
    the lowest threshold with FAR <= far (accept s >= t). Passing noise masks runs the refined variant
    (noisy probes substituted, noisy distractors dropped).
    """
    p = np.asarray(probe_feats)
    ids = np.asarray(probe_ids)
    if p.ndim != 2 or len(p) < 2 or ids.shape != (len(p),):
        raise UnitsfaceError(f"probe_feats must be (n >= 2, d) with one id per row; got {p.shape} and {ids.shape}")
    if not np.isfinite(p).all():
        raise UnitsfaceError("probe features contain NaN or infinite values")
    dtype = np.float64 if p.dtype == np.float64 else np.float32
    p = (clean_probes(p, ids, probe_noise) if probe_noise is not None else l2_normalize(p)).astype(dtype)
    sizes = [len(distractors)] if isinstance(distractors, np.ndarray) else [len(d) for d in distractors]
    drop = None if distractor_noise is None else np.asarray(distractor_noise, dtype=bool)
    if drop is not None and drop.shape != (sum(sizes),):
        raise UnitsfaceError(f"distractor noise mask must have {sum(sizes)} entries, got shape {drop.shape}")
    n_dis = sum(sizes) - (0 if drop is None else int(drop.sum()))
    n_imp = len(p) * n_dis
    k_imp = math.floor(far * n_imp * (1 + 1e-12)) + 1  # allowed false accepts + 1
    kmax = max(ranks)
    best = np.full((len(p), kmax), -np.inf, dtype=dtype)
    top = LargestScores(k_imp)
    for block in _distractor_chunks(distractors, max(1, SCORE_BLOCK // len(p)), drop):
        if block.shape[1] != p.shape[1]:
            raise UnitsfaceError(f"distractor dim {block.shape[1]} differs from probe dim {p.shape[1]}")
        s = p @ block.astype(dtype).T
        top.add(s)
        both = np.hstack([best, s])
        best = -np.partition(-both, kmax - 1, axis=1)[:, :kmax]
    best = -np.sort(-best, axis=1)  # per probe, distractor scores in descending order
    thr = top.kth()
    hits, trials, genuine = dict.fromkeys(ranks, 0), 0, []
    for ident in np.unique(ids):
        members = np.flatnonzero(ids == ident)
        if len(members) < 2:
            continue
        g = p[members] @ p[members].T  # g[j, i] = s(probe j, gallery image i)
        off = ~np.eye(len(members), dtype=bool)
        for k in ranks:
            hits[k] += int(np.sum((g >= best[members, k - 1][:, None]) & off))
        trials += int(off.sum())
        genuine.append(g[np.triu_indices(len(members), 1)])
    if trials == 0:
        raise UnitsfaceError("no probe identity has two or more images; MegaFace needs probe pairs")
    gen = np.concatenate(genuine)
    return {
        "variant": "raw" if probe_noise is None and distractor_noise is None else "refined",
        "n_probes": len(p),
        "n_identities": int(len(np.unique(ids))),
        "n_distractors": n_dis,
        "n_trials": trials,
        "identification": {k: hits[k] / trials for k in ranks},
        "tar_at_far": {far: float(np.mean(gen > thr))},
        "threshold": thr,
        "n_genuine": len(gen),
        "n_impostor": n_imp,
    }
