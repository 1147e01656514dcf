"""Mask renderer throughput on one core, beside JPEG decoding of the same faces (the loader's main cost).

The goal (issue 11) is >= 2,000 masked 112×112 faces per second on one core. Rates are given per
second of wall time and per second of this process's CPU time (one thread: on a shared machine the
CPU rate is what one core does, the wall rate also counts waiting for it). Decoding is measured in
the same run as the yardstick: with `data.augment.mask_prob = 0.1`, the renderer adds
0.1 × decode_rate / mask_rate to a loader worker's decode time.
Usage: python bench/mask_speed.py [--faces 2048] [--batch 256] [--repeats 3]
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # one core, before numpy loads its BLAS

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import simplejpeg  # noqa: E402

from unitsface.data.images import encode_jpeg  # noqa: E402
from unitsface.data.masks import mask_faces, render_masks, sample_masks  # noqa: E402
from unitsface.data.synthetic import HELDOUT_SPLIT, render_identities  # noqa: E402


def best_rates(fn, count: int, repeats: int) -> tuple[float, float]:
    """(items per wall second, items per CPU second), each from the fastest of `repeats` runs."""
    wall = cpu = float("inf")
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        fn()
        wall, cpu = min(wall, time.perf_counter() - w), min(cpu, time.process_time() - c)
    return count / wall, count / max(cpu, 1e-9)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--faces", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=256, help="faces per render_masks call")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    base, _ = render_identities(0, HELDOUT_SPLIT, 64, 1)
    faces = base[np.arange(args.faces) % len(base)]
    rng = np.random.default_rng(0)
    params = [sample_masks(rng, len(faces[a:a + args.batch])) for a in range(0, args.faces, args.batch)]
    landmarks = None  # the template, as for aligned training crops

    def batched() -> None:
        for i, a in enumerate(range(0, args.faces, args.batch)):
            render_masks(faces[a:a + args.batch], params[i], landmarks)

    singles = faces[: max(1, args.faces // 8)]

    def one_by_one() -> None:  # the loader's case: one face per call, drawn from its own generator
        for i, face in enumerate(singles):
            mask_faces(face, np.random.default_rng(i))

    jpegs = [encode_jpeg(face, 95) for face in faces]

    def decode() -> None:
        for data in jpegs:
            simplejpeg.decode_jpeg(data, colorspace="RGB")

    batched_wall, batched_cpu = best_rates(batched, args.faces, args.repeats)
    single_wall, single_cpu = best_rates(one_by_one, len(singles), args.repeats)
    decode_wall, decode_cpu = best_rates(decode, len(jpegs), args.repeats)
    print(json.dumps({
        "faces": args.faces, "batch": args.batch, "threads": 1, "load_average": round(os.getloadavg()[0], 1),
        "masks_per_s_batched": round(batched_wall), "masks_per_cpu_s_batched": round(batched_cpu),
        "masks_per_s_one_by_one": round(single_wall), "masks_per_cpu_s_one_by_one": round(single_cpu),
        "jpeg_decodes_per_s": round(decode_wall), "jpeg_decodes_per_cpu_s": round(decode_cpu),
        "mask_vs_decode_ratio_batched": round(batched_cpu / decode_cpu, 3),
        "mask_vs_decode_ratio_one_by_one": round(single_cpu / decode_cpu, 3),
        "goal_2000_per_cpu_s_met": bool(batched_cpu >= 2000),
    }))


if __name__ == "__main__":
    main()
