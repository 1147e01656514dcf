"""Parameters and multiply-accumulates of the backbones at 112×112, one image, 512-d embeddings.

Counted by `torch.utils.flop_counter.FlopCounterMode` on the meta device (no weights are allocated,
nothing is computed): convolutions, matmuls and attention; GMACs = counted FLOPs / 2. The "published"
column is arcface_torch's README figure (its "GFLOPs" are ptflops multiply-accumulates plus the
attention matmuls it adds by hand), where it gives one.

Every backbone prints one line ending in a JSON object.

    python bench/model_costs.py                      # every backbone
    python bench/model_costs.py --backbones vit_t vit_s
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # unitsface of this checkout

from unitsface import models  # noqa: E402

# arcface_torch README, "ViT For Face Recognition" table (WF42M-PFC-0.3).
PUBLISHED_GFLOPS = {"vit_t": 1.5, "vit_s": 5.7, "vit_b": 11.4, "vit_l": 25.3}


def costs(name: str, embedding_size: int = 512) -> dict[str, float | int | str | None]:
    """Parameters and GMACs of one forward pass of backbone `name` in eval mode."""
    with torch.device("meta"):
        model = models.build(name, embedding_size).eval()
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            model(torch.empty(1, 3, 112, 112))
    return {"backbone": name, "params": sum(p.numel() for p in model.parameters()),
            "gmacs": round(counter.get_total_flops() / 2e9, 3), "published_gflops": PUBLISHED_GFLOPS.get(name)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", nargs="+", default=models.names(), choices=models.names())
    args = parser.parse_args(argv)
    for name in args.backbones:
        r = costs(name)
        published = "" if r["published_gflops"] is None else f" (arcface_torch: {r['published_gflops']})"
        print(f"{name}: {r['params'] / 1e6:.2f} M parameters, {r['gmacs']:.2f} GMACs{published} {json.dumps(r)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
