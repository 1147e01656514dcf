"""Speed of the synthetic face renderer: images per CPU-second on one core, 112 px, JPEG included.

The synthetic set is the project's default data (the demo, the benches, every end-to-end test), so its
generation time is part of every first run. Renders `--identities` × `--images` faces of the training
stream after warming the per-process caches; prints one line ending in a JSON object.

    python bench/synthetic_speed.py [--identities 8] [--images 25]
"""

from __future__ import annotations

import argparse
import json
import time

from unitsface.data import synthetic


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--identities", type=int, default=8)
    parser.add_argument("--images", type=int, default=25, help="images per identity")
    args = parser.parse_args()
    synthetic._render_jpegs((0, 0, 99, (0,), 112, 1.0))  # warm the per-process caches
    start, jpegs = time.process_time(), []
    for identity in range(args.identities):
        jpegs += synthetic._render_jpegs((0, synthetic.TRAIN_SPLIT, identity, tuple(range(args.images)), 112, 1.0))
    elapsed = time.process_time() - start
    rate = len(jpegs) / elapsed
    print(f"synthetic faces: {rate:.0f} images per CPU-second (one core, 112 px, JPEG included) "
          + json.dumps({"images": len(jpegs), "cpu_seconds": round(elapsed, 3), "images_per_cpu_second": round(rate)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
