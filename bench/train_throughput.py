"""Training throughput: samples/s of backbone + head, forward + backward + SGD step, per head.

The defaults are the GPU check's settings (bench/gpu_check.sh): iresnet50 with a 10 572-class head
(CASIA-WebFace identities), batch 256, bf16 autocast, channels-last, on CUDA, for the unitsface head
and cosface, so that the ratio line says what UniTSFace costs over a plain margin head in a real
training step, not only in the head (bench/head_scaling.py). Memory heads are put in their steady
state first (`make_ready`: memory filled, past the warm-up), so the full UniTSFace loss runs.

Random 112×112 images (the backbone's input size) and labels, one fixed batch; the optimiser is
`unitsface.optim.SGD` (momentum 0.9, weight decay 5e-4), as in training. The backbone runs under
autocast, the head in float32 (as the trainer does); fp16 adds a GradScaler. Time is measured over
`--steps` steps after `--warmup` (CUDA is synchronised at both ends, so queued kernels count).

Every measurement prints one line ending in a JSON object, then a ratio line (also JSON).

    python bench/train_throughput.py                          # the GPU check (needs CUDA)
    python bench/train_throughput.py --device cpu --backbone tinyfacenet --batch 32 --amp none
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]  # unitsface of this checkout; head_scaling even on import

from head_scaling import make_ready  # noqa: E402

from unitsface import heads, models, optim  # noqa: E402

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The options; with none given, the GPU check's settings (checked by tests/test_bench_scripts.py)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    parser.add_argument("--backbone", default="iresnet50", choices=models.names())
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--classes", type=int, default=10_572, help="default: CASIA-WebFace identities")
    parser.add_argument("--dim", type=int, default=512, help="embedding size")
    parser.add_argument("--heads", nargs="+", default=["unitsface", "cosface"], choices=heads.names())
    parser.add_argument("--steps", type=int, default=30, help="timed steps")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first (cudnn autotuning, allocator)")
    parser.add_argument("--amp", default="bf16", choices=["bf16", "fp16", "none"], help="autocast of the backbone")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                        help="backbone weights and images in channels-last memory format")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.batch < 1:
        parser.error("--steps and --batch must be >= 1, --warmup >= 0")
    return args


def measure(args: argparse.Namespace, head_name: str, device: torch.device) -> dict[str, Any]:
    """Samples/s of `--steps` training steps of backbone + head `head_name`, after `--warmup` steps."""
    torch.manual_seed(0)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model = models.build(args.backbone, embedding_size=args.dim).to(device).to(memory_format=memory_format).train()
    head = heads.build(head_name, args.classes, args.dim).to(device).train()
    make_ready(head)  # memory filled, past the warm-up: the full UniTSFace loss
    opt = optim.SGD(list(model.parameters()) + list(head.parameters()), lr=0.01, momentum=0.9, weight_decay=5e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    size = model.input_contract["size"]
    images = torch.randn(args.batch, 3, size, size, device=device).to(memory_format=memory_format)
    labels = torch.randint(0, args.classes, (args.batch,), device=device)
    autocast = torch.autocast(device.type, dtype=AMP_DTYPES.get(args.amp, torch.bfloat16),  # dtype unused if off
                              enabled=args.amp != "none")

    def step() -> torch.Tensor:
        with autocast:
            embeddings = model(images)
        loss = head(embeddings.float(), labels)  # the head in float32, as the trainer runs it
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        return loss

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)  # this head's peak, not the previous one's
    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    result = {"backbone": args.backbone, "head": head_name, "device": device.type, "batch": args.batch,
              "amp": args.amp, "channels_last": args.channels_last, "classes": args.classes, "dim": args.dim,
              "steps": args.steps, "warmup": args.warmup, "threads": torch.get_num_threads(),
              "samples_per_s": round(args.steps * args.batch / seconds, 1),
              "ms_per_step": round(1000 * seconds / args.steps, 2), "loss": float(loss.detach())}
    if device.type == "cuda":
        result["peak_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return result


def emit(text: str, record: dict[str, Any]) -> None:
    print(f"{text} {json.dumps(record)}", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda: no CUDA device (use --device cpu)", file=sys.stderr)
        return 2
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # one input shape: cuDNN may pick its fastest convolutions
    results = {}
    for name in args.heads:
        r = measure(args, name, device)
        results[name] = r
        memory = f", peak {r['peak_gb']} GB" if "peak_gb" in r else ""
        emit(f"train_throughput {args.backbone}+{name} batch={args.batch} amp={args.amp} "
             f"channels_last={args.channels_last} {args.device}: {r['samples_per_s']} samples/s, "
             f"{r['ms_per_step']} ms/step{memory}", r)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if "unitsface" in results and "cosface" in results:
        ratio = results["unitsface"]["ms_per_step"] / results["cosface"]["ms_per_step"]
        emit(f"ratio unitsface/cosface step time {args.backbone} batch={args.batch}: {ratio:.2f}",
             {"ratio": "unitsface/cosface_step_time", "backbone": args.backbone, "batch": args.batch,
              "amp": args.amp, "device": args.device, "value": round(ratio, 3)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
