"""`unitsface embed`: L2-normalised flip-sum embeddings of a folder or list of face images.

    unitsface embed --model model.pt --images faces/ --out emb.npy

Writes `emb.npy` (N×d float32) and `emb.txt` beside it (the N embedded paths, row order).
Unreadable images are skipped with a warning each and counted, so one bad file does not
cost a long run; both files are written atomically.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

from unitsface.cli.verify import add_model_arguments, load_verifier
from unitsface.errors import UnitsfaceError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("embed", help="embed face images into an .npy file")
    p.add_argument("--images", required=True,
                   help="folder of images (recursive) or text file of paths (relative to its folder)")
    p.add_argument("--out", required=True, help="output .npy; the list of embedded paths goes to the same name .txt")
    add_model_arguments(p, threshold=False)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import numpy as np
    from tqdm import tqdm

    from unitsface.data.images import list_images, load_image
    from unitsface.io import atomic_write

    out = Path(args.out)
    if out.suffix != ".npy":
        raise UnitsfaceError(f"--out must end with .npy, got {out}")
    paths = list_images(args.images)
    verifier = load_verifier(args)
    embedded, chunks, skipped = [], [], 0
    with tqdm(total=len(paths), desc="embed", unit="img", file=sys.stderr, disable=None) as bar:
        for start in range(0, len(paths), verifier.batch_size):
            images = []
            for path in paths[start : start + verifier.batch_size]:
                try:
                    images.append(load_image(path))
                    embedded.append(path)
                except UnitsfaceError as exc:
                    skipped += 1
                    tqdm.write(f"warning: {exc}; skipped", file=sys.stderr)
            if images:
                chunks.append(verifier.embed(images))
            bar.update(min(verifier.batch_size, len(paths) - start))
    if not chunks:
        raise UnitsfaceError(f"none of the {len(paths)} images could be read")
    embeddings = np.concatenate(chunks)
    buffer = io.BytesIO()
    np.save(buffer, embeddings)
    listing = out.with_suffix(".txt")
    atomic_write(out, buffer.getvalue())
    atomic_write(listing, "".join(f"{p}\n" for p in embedded).encode())
    if skipped:
        print(f"warning: skipped {skipped} unreadable file(s) of {len(paths)}", file=sys.stderr)
    print(json.dumps({"out": str(out), "list": str(listing), "embedded": len(embedded), "skipped": skipped,
                      "dim": int(embeddings.shape[1])}))
    return 0
