"""MFR All-set speed: exact TAR at FAR <= 1e-6 over every pair of 10⁵ images (5·10⁹ pairs) in bounded
memory, against a naive chunked loop that sorts every chunk's impostor scores, in the same run.

Features are synthetic (512-d, identity centres plus noise). Both methods score the same float32
cosine tiles; the naive one keeps the running top k+1 impostor scores by fully sorting each chunk
with them, the way one would first write it; `unitsface.evaluation.mfr` counts key histograms
instead (a histogram pass plus a refinement). Both must agree to the last pair; the script says so.
`--buffer-cap 0` forces the refinement's second pass over the tiles (taken when the tail scores do not
fit the buffer, e.g. FAR 1e-4 over 10¹² pairs).
Usage: python bench/mfr_speed.py [--images 100000] [--dim 512] [--per-identity 10] [--buffer-cap N] [--skip-naive]
"""

from __future__ import annotations

import argparse
import json
import os
import time
import tracemalloc

import numpy as np

from unitsface.evaluation.mfr import ALL_FARS, BUFFER_CAP, allowed_false_accepts, exact_tar_at_far
from unitsface.evaluation.verification import l2_normalize

NOISE = 2.0  # per-dimension noise around unit-variance identity centres: TAR well inside (0, 1) at 1e-6


def synthetic_features(images: int, dim: int, per_identity: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.arange(images) // per_identity
    centres = rng.standard_normal((labels[-1] + 1, dim), dtype=np.float32)
    feats = np.empty((images, dim), np.float32)
    for a in range(0, images, 65536):
        rows = labels[a:a + 65536]
        feats[a:a + 65536] = centres[rows] + NOISE * rng.standard_normal((len(rows), dim), dtype=np.float32)
    return feats, labels


def naive_tar(features: np.ndarray, labels: np.ndarray, fars: tuple[float, ...], rows: int) -> dict[float, float]:
    """Chunked loop with a full sort: per block of rows, every pair j > i; impostors sorted together with the
    running top k+1 and cut back to it; genuine scores kept."""
    e = l2_normalize(features).astype(np.float32)
    n = len(e)
    n_gen = int(sum(c * (c - 1) // 2 for c in np.bincount(labels)))
    n_imp = n * (n - 1) // 2 - n_gen
    keep = max(allowed_false_accepts(f, n_imp) for f in fars) + 1
    top, genuine = np.zeros(0, np.float32), []
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        sim = e[r0:r1] @ e[r0:].T
        upper = np.arange(r0, n)[None, :] > np.arange(r0, r1)[:, None]
        same = labels[r0:r1, None] == labels[None, r0:]
        genuine.append(sim[upper & same])
        top = np.sort(np.concatenate([top, sim[upper & ~same]]))[-keep:]
    gen = np.concatenate(genuine)
    out = {}
    for f in fars:
        v = top[len(top) - 1 - allowed_false_accepts(f, n_imp)]  # the (k+1)-th largest impostor
        out[f] = float((gen > v).mean())
    return out


def timed(fn, *args, **kwargs):
    """(result, wall s, CPU s, peak traced MiB) of one call."""
    tracemalloc.start()
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn(*args, **kwargs)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    return out, wall, cpu, peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--per-identity", type=int, default=10)
    ap.add_argument("--naive-rows", type=int, default=256, help="rows per chunk of the naive loop")
    ap.add_argument("--buffer-cap", type=int, default=BUFFER_CAP, help="tail scores kept in memory (0: two passes)")
    ap.add_argument("--skip-naive", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    feats, labels = synthetic_features(args.images, args.dim, args.per_identity, args.seed)
    n_pairs = args.images * (args.images - 1) // 2
    print(json.dumps({"images": args.images, "dim": args.dim, "identities": int(labels[-1] + 1), "pairs": n_pairs,
                      "cpus": os.cpu_count(), "load_average": round(os.getloadavg()[0], 1)}), flush=True)
    ours, wall, cpu, peak = timed(exact_tar_at_far, feats, labels, far_targets=ALL_FARS, buffer_cap=args.buffer_cap)
    method = "histogram + refinement" + (" (second pass)" if args.buffer_cap == 0 else "")
    record = {"method": method, "wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
              "peak_mib": round(peak), "pairs_per_s": round(n_pairs / wall),
              "tar_at_far": {str(f): t for f, t in ours["tar_at_far"].items()},
              "n_impostor": ours["n_impostor"]}
    print(json.dumps(record), flush=True)
    if args.skip_naive:
        return
    naive, n_wall, n_cpu, n_peak = timed(naive_tar, feats, labels, ALL_FARS, args.naive_rows)
    print(json.dumps({"method": "naive chunked loop + full sort", "wall_s": round(n_wall, 1), "cpu_s": round(n_cpu, 1),
                      "peak_mib": round(n_peak), "tar_at_far": {str(f): t for f, t in naive.items()}}), flush=True)
    print(json.dumps({"speedup_wall": round(n_wall / wall, 2), "speedup_cpu": round(n_cpu / cpu, 2),
                      "same_tar": naive == ours["tar_at_far"]}))


if __name__ == "__main__":
    main()
