"""A one-rank process group training a few steps: the trainer's distributed path (DDP with summed gradients,
the sharded head, the reduce-scatter of the gathered embeddings, sharded checkpoints) on NCCL, which no CPU
test can reach. On a CPU it runs the same path over gloo (what bench/gpu_check.sh does in CI).

    python bench/nccl_smoke.py --device cuda [--steps 3]
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from unitsface import parallel  # noqa: E402
from unitsface.config import load_config  # noqa: E402
from unitsface.training.checkpoint import load_checkpoint  # noqa: E402
from unitsface.training.trainer import Trainer  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda: no CUDA device", file=sys.stderr)
        return 2
    backend = "nccl" if args.device == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1,
                            device_id=torch.device("cuda", 0) if backend == "nccl" else None)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            config = load_config("demo", [
                "data.synthetic={identities: 16, images_per_identity: 4, seed: 0, val_pairs: 20, "
                "heldout_identities: 3, heldout_images: 2}", f"data.cache={tmp}/cache", "model.embedding_size=32",
                "train.batch_size=16", "train.workers=0", f"train.max_steps={args.steps}",
                f"train.device={args.device}",
                "head.name=unitsface", "head.s2s_start_epoch=0", "head.min_fill=0.0", f"output={tmp}/run"])
            trainer = Trainer(config)
            assert parallel.is_distributed()
            trainer.fit()
            ckpt = load_checkpoint(Path(tmp, "run", "last.pt"))
            record = {"backend": backend, "device": args.device, "world_size": dist.get_world_size(),
                      "steps": ckpt["step"], "sharded_checkpoint": "shards" in ckpt,
                      "threshold": ckpt["meta"]["threshold"], "skipped_steps": ckpt["skipped_steps"]}
    finally:
        dist.destroy_process_group()
    print(f"nccl_smoke {backend}: {record['steps']} steps " + json.dumps(record), flush=True)
    return 0 if record["steps"] == args.steps else 1


if __name__ == "__main__":
    raise SystemExit(main())
