"""IJB-C-sized speed check: `evaluate_ijb` against the stages of insightface's eval_ijbc.py, both measured.

Synthetic data of IJB-C's shape (evaluation.md §5, formats.md §7): 469k images, 3,531 gallery + 19,593 probe
templates, 15.7M gallery x probe pairs (about 19.6k genuine), d=512, features stored as [image | flipped image],
test mode N1D1F1. The baseline is eval_ijbc.py's computation once the features exist, re-expressed stage by
stage in numpy below and run on the whole set (nothing is sampled or extrapolated):
  1. image features: flip sum, the norm switch and the faceness product, in float32;
  2. templates: for each template an np.where over the template ids of all images, its media by np.unique
     and np.where, the mean of every multi-image media, their sum into a float64 row; sklearn's normalize;
  3. pair scores: a template -> row table, then 100,000 pairs at a time: gather both rows, np.sum(a * b, -1);
  4. ROC and TARs: sklearn's roc_curve and auc, the curve flipped, and at each FAR target the TAR of the
     point whose FPR is closest (a Python min over (|fpr - x|, index) pairs).
Reading meta files, embedding and plotting are outside both timings. Prints stage times (wall and CPU),
the TARs of both, the largest score difference and the load average, then one JSON line.

    python bench/ijb_speed.py [--scale 1.0] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
from sklearn.metrics import auc as sk_auc
from sklearn.metrics import roc_curve as sk_roc_curve
from sklearn.preprocessing import normalize as sk_normalize

from unitsface.evaluation.ijb import IJB_FAR_TARGETS, evaluate_ijb, pair_scores, template_features

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


# ------------------------------------------------------------------------------------- the baseline
def baseline_image_features(features: np.ndarray, faceness: np.ndarray) -> np.ndarray:
    """Stage 1 in N1D1F1: the two halves added, norms kept, times the faceness score (float32 throughout)."""
    d = features.shape[1] // 2
    return (features[:, :d] + features[:, d:]) * faceness[:, np.newaxis]


def baseline_templates(img: np.ndarray, templates: np.ndarray, medias: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Stage 2: one full np.where scan per template, per-media means, their sum, sklearn's L2 normalisation."""
    ids = np.unique(templates)
    pooled = np.zeros((len(ids), img.shape[1]))
    for row, template in enumerate(ids):
        (members,) = np.where(templates == template)
        feats, media_of = img[members], medias[members]
        media_ids, media_sizes = np.unique(media_of, return_counts=True)
        parts = []
        for media, size in zip(media_ids, media_sizes):
            (in_media,) = np.where(media_of == media)
            parts.append(feats[in_media] if size == 1 else np.mean(feats[in_media], axis=0, keepdims=True))
        pooled[row] = np.sum(np.array(parts), axis=0)
    return sk_normalize(pooled), ids


def baseline_pair_scores(tfeats: np.ndarray, ids: np.ndarray, p1: np.ndarray, p2: np.ndarray) -> np.ndarray:
    """Stage 3: an (id -> row) column table filled in a Python loop, then 100k-pair batches of gathered
    (batch, 1, d) rows multiplied and summed."""
    row_of = np.zeros((max(ids) + 1, 1), dtype=int)
    for row, template in enumerate(ids):
        row_of[template] = row
    scores = np.zeros((len(p1),))
    every = np.array(range(len(p1)))  # the pair index list, built from a range as the reference does
    for batch in (every[a : a + 100_000] for a in range(0, len(p1), 100_000)):
        scores[batch] = np.sum(tfeats[row_of[p1[batch]]] * tfeats[row_of[p2[batch]]], -1).flatten()
    return scores


def baseline_tars(labels: np.ndarray, scores: np.ndarray) -> tuple[dict[float, float], float]:
    """Stage 4: sklearn's ROC and AUC; on the flipped curve, the point nearest each FAR target in FPR."""
    fpr, tpr, _ = sk_roc_curve(labels, scores)
    area = sk_auc(fpr, tpr)
    fpr, tpr = np.flipud(fpr), np.flipud(tpr)  # equal FPRs: the larger TPR comes first
    tars = {}
    for target in IJB_FAR_TARGETS:
        _, nearest = min(zip(abs(fpr - target), range(len(fpr))))
        tars[target] = float(tpr[nearest])
    return tars, float(area)


# ------------------------------------------------------------------------------------------ timing
def timed(fn, *args, **kwargs):
    """(result, wall seconds, CPU seconds of this process); CPU time shows the work when the machine is
    shared (wall time then includes waiting for a core); with 2 BLAS threads it can exceed wall time."""
    w, c = time.perf_counter(), time.process_time()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - w, time.process_time() - c


def run_baseline(data: dict) -> tuple[dict, np.ndarray, dict[float, float], float]:
    stages = {}
    img, *stages["image features"] = timed(baseline_image_features, data["features"], data["faceness"])
    (tfeats, ids), *stages["templates"] = timed(baseline_templates, img, data["templates"], data["medias"])
    scores, *stages["pair scores"] = timed(baseline_pair_scores, tfeats, ids, data["p1"], data["p2"])
    (tars, area), *stages["ROC + TARs"] = timed(baseline_tars, data["labels"], scores)
    return stages, scores, tars, area


def run_evaluate_ijb(data: dict) -> tuple[dict, dict]:
    """evaluate_ijb timed whole, then its pooling and pair scoring timed alone; ROC + readings = the rest."""
    res, wall, cpu = timed(evaluate_ijb, **data)
    stages = {}
    (uniq, tf), *stages["image features + templates"] = timed(
        template_features, data["features"], data["faceness"], data["templates"], data["medias"])
    _, *stages["pair scores"] = timed(pair_scores, tf, uniq, data["p1"], data["p2"])
    stages["ROC + TARs"] = [wall - sum(v[0] for v in stages.values()), cpu - sum(v[1] for v in stages.values())]
    return stages, res


def show(name: str, stages: dict) -> tuple[float, float]:
    wall, cpu = sum(v[0] for v in stages.values()), sum(v[1] for v in stages.values())
    parts = ", ".join(f"{k} {w:.2f}/{c:.2f}" for k, (w, c) in stages.items())
    print(f"{name}: wall {wall:.2f} s, CPU {cpu:.2f} s ({parts} s wall/CPU)")
    return wall, cpu


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", type=float, default=1.0, help="fraction of IJB-C's size (default 1 = full)")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    data, wall, _ = timed(synthetic_ijbc, args.scale, args.dim, args.seed)
    load_before = os.getloadavg()
    print(f"synthetic IJB-C x{args.scale:g}: {len(data['features'])} images, {len(np.unique(data['templates']))} "
          f"templates, {len(data['p1'])} pairs ({int(data['labels'].sum())} genuine), d={args.dim}, "
          f"generated in {wall:.1f} s; load average {load_before[0]:.1f}")
    ours, res = run_evaluate_ijb(data)
    base, base_scores, base_tars, base_auc = run_baseline(data)
    ours_wall, ours_cpu = show("evaluate_ijb", ours)
    base_wall, base_cpu = show("eval_ijbc.py stages (baseline)", base)
    uniq, tf = template_features(data["features"], data["faceness"], data["templates"], data["medias"])
    score_diff = float(np.abs(pair_scores(tf, uniq, data["p1"], data["p2"]) - base_scores).max())
    same = res["tar_at_far"] == base_tars
    print("  TAR@FAR (closest) evaluate_ijb:", {f"{k:g}": v for k, v in res["tar_at_far"].items()})
    print("  TAR@FAR (closest) baseline:    ", {f"{k:g}": v for k, v in base_tars.items()})
    print(f"  TARs identical: {same}; max |score difference| {score_diff:.1e}; "
          f"AUC {res['auc']!r} vs {base_auc!r}")
    print(f"speed-up: {base_wall / ours_wall:.1f}x wall, {base_cpu / ours_cpu:.1f}x CPU "
          f"(load average {load_before[0]:.1f} before, {os.getloadavg()[0]:.1f} after)")
    print(json.dumps({"scale": args.scale, "images": len(data["features"]), "pairs": len(data["p1"]),
                      "evaluate_ijb_s": {k: round(w, 3) for k, (w, _) in ours.items()},
                      "baseline_s": {k: round(w, 3) for k, (w, _) in base.items()},
                      "ratio_wall": round(base_wall / ours_wall, 2), "ratio_cpu": round(base_cpu / ours_cpu, 2),
                      "tars_identical": same, "max_score_diff": score_diff, "auc_diff": abs(res["auc"] - base_auc),
                      "load_average": [round(load_before[0], 2), round(os.getloadavg()[0], 2)]}))


if __name__ == "__main__":
    main()
