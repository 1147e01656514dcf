"""IJB-C-sized speed check: vectorised `evaluate_ijb` vs insightface's per-template loops.

Synthetic data of IJB-C's shape (evaluation.md §5, formats.md §7): 469k images, 3,531 gallery +
19,593 probe templates, 15.7M gallery x probe pairs (about 19.6k genuine), d=512, features stored as
[image | flipped image]. The loop baseline (np.where over all images per template, as eval_ijbc.py)
runs on a random subset of templates and is extrapolated; its pair scoring (100k-pair batches) runs
on a subset of pairs. Usage: python bench/ijb_speed.py [--scale 0.1] [--loop-templates 200]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from unitsface.evaluation.ijb import evaluate_ijb, image_features, pair_scores, template_features
from unitsface.evaluation.verification import l2_normalize

NOISE = 12.0  # per-dimension noise vs unit-variance subject centres: TAR below 1 at low FAR
FULL = {"images": 469_000, "gallery": 3_531, "probes": 19_593, "pairs": 15_700_000, "genuine": 19_600}


def synthetic_ijbc(scale: float, dim: int, seed: int) -> dict:
    """Features clustered by subject, templates of ~20 images in a few media, gallery x probe pairs."""
    rng = np.random.default_rng(seed)
    n = {k: max(2, int(round(v * scale))) for k, v in FULL.items()}
    n_tpl = n["gallery"] + n["probes"]
    subject = np.r_[np.arange(n["gallery"]), rng.integers(0, n["gallery"], n["probes"])]
    templates = np.r_[np.arange(n_tpl), rng.integers(0, n_tpl, n["images"] - n_tpl)]
    medias = templates * 4 + rng.integers(0, 4, n["images"])  # up to 4 media (videos/stills) per template
    centers = rng.standard_normal((n["gallery"], dim), dtype=np.float32)
    feats = np.empty((n["images"], 2 * dim), dtype=np.float32)
    for a in range(0, n["images"], 65536):
        rows = slice(a, a + 65536)
        base = centers[subject[templates[rows]]]
        feats[rows, :dim] = base + NOISE * rng.standard_normal(base.shape, dtype=np.float32)
        feats[rows, dim:] = base + NOISE * rng.standard_normal(base.shape, dtype=np.float32)
    probes = n["gallery"] + np.arange(n["probes"])
    gen_p = rng.choice(probes, n["genuine"])
    p1 = np.r_[subject[gen_p], rng.integers(0, n["gallery"], n["pairs"] - n["genuine"])]
    p2 = np.r_[gen_p, rng.choice(probes, n["pairs"] - n["genuine"])]
    return {"features": feats, "faceness": rng.uniform(0.1, 1.0, n["images"]).astype(np.float32),
            "templates": templates, "medias": medias, "p1": p1, "p2": p2, "labels": subject[p2] == p1}


def loop_template_features(img_feats: np.ndarray, templates: np.ndarray, medias: np.ndarray,
                           subset: np.ndarray) -> np.ndarray:
    """insightface's image2template_feature restricted to `subset` templates (the baseline)."""
    out = np.zeros((len(subset), img_feats.shape[1]))
    for c, t in enumerate(subset):
        (ind_t,) = np.where(templates == t)
        feats, meds = img_feats[ind_t], medias[ind_t]
        media_feats = [feats[meds == u].mean(0) for u in np.unique(meds)]
        out[c] = np.sum(np.array(media_feats), 0)
    return l2_normalize(out)


def loop_pair_scores(tfeats: np.ndarray, uniq: np.ndarray, p1: np.ndarray, p2: np.ndarray) -> np.ndarray:
    """insightface's verification(): gather both template rows per pair, 100k pairs per batch."""
    t2i = np.zeros(uniq.max() + 1, dtype=np.int64)
    t2i[uniq] = np.arange(len(uniq))
    return np.concatenate([np.sum(tfeats[t2i[p1[a:a + 100_000]]] * tfeats[t2i[p2[a:a + 100_000]]], -1)
                           for a in range(0, len(p1), 100_000)])


def timed(fn, *args, **kwargs):
    """(result, wall seconds, CPU seconds of this process); CPU time shows the work when the machine is
    shared (wall time then includes waiting for a core); with 2 BLAS threads it can exceed wall time."""
    w, c = time.perf_counter(), time.process_time()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - w, time.process_time() - c


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", type=float, default=1.0, help="fraction of IJB-C's size (default 1 = full)")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--loop-templates", type=int, default=100, help="templates timed in the loop baseline")
    ap.add_argument("--loop-pairs", type=int, default=1_000_000, help="pairs timed in the loop baseline")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    data, wall, _ = timed(synthetic_ijbc, args.scale, args.dim, args.seed)
    n_pairs = len(data["p1"])
    print(f"synthetic IJB-C x{args.scale:g}: {len(data['features'])} images, {len(np.unique(data['templates']))} "
          f"templates, {n_pairs} pairs ({int(data['labels'].sum())} genuine), d={args.dim}, "
          f"generated in {wall:.1f} s; load average {os.getloadavg()[0]:.1f}")

    res, vec_wall, vec_cpu = timed(evaluate_ijb, **data)
    (uniq, tf), pool_wall, pool_cpu = timed(
        template_features, data["features"], data["faceness"], data["templates"], data["medias"])
    _, pairs_wall, pairs_cpu = timed(pair_scores, tf, uniq, data["p1"], data["p2"])
    roc_wall, roc_cpu = vec_wall - pool_wall - pairs_wall, vec_cpu - pool_cpu - pairs_cpu
    print(f"vectorised evaluate_ijb: wall {vec_wall:.2f} s, CPU {vec_cpu:.2f} s "
          f"(pooling {pool_wall:.2f}/{pool_cpu:.2f}, pair scores {pairs_wall:.2f}/{pairs_cpu:.2f}, "
          f"ROC + readings {roc_wall:.2f}/{roc_cpu:.2f} s wall/CPU)")
    print("  TAR@FAR (closest):", {f"{k:g}": round(v, 4) for k, v in res["tar_at_far"].items()})

    rng = np.random.default_rng(args.seed + 1)
    subset = np.sort(rng.choice(uniq, min(args.loop_templates, len(uniq)), replace=False))
    img, img_wall, img_cpu = timed(image_features, data["features"], data["faceness"], True, True, True)
    loop_tf, w, c = timed(loop_template_features, img, data["templates"], data["medias"], subset)
    scale_t = len(uniq) / len(subset)
    lpool_wall, lpool_cpu = w * scale_t + img_wall, c * scale_t + img_cpu
    diff = np.abs(loop_tf - tf[np.searchsorted(uniq, subset)]).max()
    m = min(args.loop_pairs, n_pairs)
    _, w, c = timed(loop_pair_scores, tf, uniq, data["p1"][:m], data["p2"][:m])
    lpairs_wall, lpairs_cpu = w * n_pairs / m, c * n_pairs / m
    loop_wall, loop_cpu = lpool_wall + lpairs_wall + roc_wall, lpool_cpu + lpairs_cpu + roc_cpu
    print(f"loop baseline (extrapolated): wall {loop_wall:.1f} s, CPU {loop_cpu:.1f} s (pooling "
          f"{lpool_wall:.1f}/{lpool_cpu:.1f} from {len(subset)} templates, pair scores {lpairs_wall:.1f}/"
          f"{lpairs_cpu:.1f} from {m} pairs, same ROC); max |template feature difference| on the subset {diff:.1e}")
    print(f"speed-up: {loop_wall / vec_wall:.1f}x wall, {loop_cpu / vec_cpu:.1f}x CPU")


if __name__ == "__main__":
    main()
