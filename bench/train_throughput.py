"""Training throughput: samples/s of backbone + head, forward + backward + optimiser step, per head.

The defaults are the GPU check's settings (bench/gpu_check.sh): iresnet50 and vit_t with a 10 572-class
head (CASIA-WebFace identities), batch 256, bf16 autocast, channels-last, on CUDA, for the unitsface
head and cosface, so that the ratio lines say what UniTSFace costs over a plain margin head in a real
training step, not only in the head (bench/head_scaling.py). Memory heads are put in their steady
state first (`make_ready`: memory filled, past the warm-up), so the full UniTSFace loss runs.

Random 112×112 images (the backbone's input size) and labels, one fixed batch; the optimiser is
`unitsface.optim.build(--optimizer)` (SGD: momentum 0.9, weight decay 5e-4, as in training; AdamW:
weight decay 0.1, arcface_torch's ViT recipe). The backbone runs under autocast, the head in float32
(as the trainer does); fp16 adds a GradScaler. Time is measured over `--steps` steps after `--warmup`
(CUDA is synchronised at both ends, so queued kernels count).

`--arcface-torch PATH` (an insightface checkout, or its recognition/arcface_torch folder) also times
the same step with arcface_torch's own vit_t (its `backbones.get_model("vit_t")`: drop path 0.1,
10 % token masking, as unitsface's vit_t defaults) in the same run, and prints the step-time ratio;
when its code cannot be imported (path absent, timm missing ...) a line says why and the rest runs.

Every measurement prints one line ending in a JSON object, then the ratio lines (also JSON).

    python bench/train_throughput.py                          # the GPU check (needs CUDA)
    python bench/train_throughput.py --device cpu --backbones tinyfacenet --batch 32 --amp none
    python bench/train_throughput.py --backbones vit_t --heads cosface --arcface-torch ~/insightface
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]  # unitsface of this checkout; head_scaling even on import

from head_scaling import make_ready  # noqa: E402

from unitsface import heads, models, optim  # noqa: E402

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The options; with none given, the GPU check's settings (checked by tests/test_bench_scripts.py)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    parser.add_argument("--backbones", nargs="+", default=["iresnet50", "vit_t"], choices=models.names())
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--classes", type=int, default=10_572, help="default: CASIA-WebFace identities")
    parser.add_argument("--dim", type=int, default=512, help="embedding size")
    parser.add_argument("--heads", nargs="+", default=["unitsface", "cosface"], choices=heads.names())
    parser.add_argument("--steps", type=int, default=30, help="timed steps")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first (cudnn autotuning, allocator)")
    parser.add_argument("--amp", default="bf16", choices=["bf16", "fp16", "none"], help="autocast of the backbone")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                        help="backbone weights and images in channels-last memory format")
    parser.add_argument("--compile", action="store_true", help="torch.compile the backbone first")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--optimizer", default="sgd", choices=optim.names())
    parser.add_argument("--arcface-torch", default=None, metavar="PATH",
                        help="insightface checkout: also time arcface_torch's vit_t, as a ratio")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.batch < 1:
        parser.error("--steps and --batch must be >= 1, --warmup >= 0")
    return args


def arcface_torch_vit_t(path: str, dim: int) -> Callable[[], nn.Module] | str:
    """A constructor of arcface_torch's vit_t from the checkout at `path`, or why there is none."""
    root = Path(path).expanduser()
    folders = [root, root / "recognition" / "arcface_torch"]
    folder = next((f for f in folders if (f / "backbones" / "vit.py").is_file()), None)
    if folder is None:
        return f"no backbones/vit.py in {' or '.join(map(str, folders))}"
    sys.path.insert(0, str(folder))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            get_model = importlib.import_module("backbones").get_model
            get_model("vit_t", num_features=dim)  # imports backbones/vit.py (and timm) now, not mid-benchmark
    except Exception as exc:  # whatever its imports raise
        return f"cannot import arcface_torch's vit_t from {folder}: {type(exc).__name__}: {exc}"
    return lambda: get_model("vit_t", num_features=dim)


def measure(args: argparse.Namespace, backbone: str, head_name: str, device: torch.device,
            build: Callable[[], nn.Module] | None = None, impl: str = "unitsface") -> dict[str, Any]:
    """Samples/s of `--steps` training steps of `backbone` (made by `build`, default unitsface's) + head
    `head_name`, after `--warmup` steps."""
    torch.manual_seed(0)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model = build() if build is not None else models.build(backbone, embedding_size=args.dim)
    model = model.to(device).to(memory_format=memory_format).train()
    if args.compile:
        model = torch.compile(model)
    head = heads.build(head_name, args.classes, args.dim).to(device).train()
    make_ready(head)  # memory filled, past the warm-up: the full UniTSFace loss
    weight_decay = 0.1 if args.optimizer == "adamw" else 5e-4
    opt = optim.build(args.optimizer, optim.param_groups(model, head, 0.01, weight_decay), lr=0.01, momentum=0.9,
                      weight_decay=weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    size = models.INPUT_CONTRACT["size"]
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
    result = {"backbone": backbone, "impl": impl, "head": head_name, "device": device.type, "batch": args.batch,
              "amp": args.amp, "channels_last": args.channels_last, "compile": args.compile, "classes": args.classes,
              "dim": args.dim,
              "optimizer": args.optimizer,
              "steps": args.steps, "warmup": args.warmup, "threads": torch.get_num_threads(),
              "samples_per_s": round(args.steps * args.batch / seconds, 1),
              "ms_per_step": round(1000 * seconds / args.steps, 2), "loss": float(loss.detach())}
    if device.type == "cuda":
        result["peak_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return result


def emit(text: str, record: dict[str, Any]) -> None:
    print(f"{text} {json.dumps(record)}", flush=True)


def run(args: argparse.Namespace, backbone: str, head: str, device: torch.device,
        build: Callable[[], nn.Module] | None = None, impl: str = "unitsface") -> dict[str, Any]:
    """One measurement, printed."""
    r = measure(args, backbone, head, device, build, impl)
    memory = f", peak {r['peak_gb']} GB" if "peak_gb" in r else ""
    name = backbone if impl == "unitsface" else f"{impl}:{backbone}"
    emit(f"train_throughput {name}+{head} batch={args.batch} amp={args.amp} optimizer={args.optimizer} "
         f"channels_last={args.channels_last} compile={args.compile} {args.device}: {r['samples_per_s']} samples/s, "
         f"{r['ms_per_step']} ms/step{memory}", r)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return r


def ratio(text: str, name: str, a: dict[str, Any], b: dict[str, Any], **extra: Any) -> None:
    """Print a's step time over b's."""
    value = a["ms_per_step"] / b["ms_per_step"]
    record = {"ratio": name, **extra, "batch": a["batch"], "amp": a["amp"], "device": a["device"]}
    emit(f"ratio {text} batch={a['batch']}: {value:.2f}", {**record, "value": round(value, 3)})


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
    results = {(backbone, head): run(args, backbone, head, device) for backbone in args.backbones
               for head in args.heads}
    for backbone in args.backbones:
        if (backbone, "unitsface") in results and (backbone, "cosface") in results:
            ratio(f"unitsface/cosface step time {backbone}", "unitsface/cosface_step_time",
                  results[backbone, "unitsface"], results[backbone, "cosface"], backbone=backbone)
    if args.arcface_torch is not None:
        build = arcface_torch_vit_t(args.arcface_torch, args.dim)
        if isinstance(build, str):
            emit(f"arcface_torch vit_t skipped: {build}", {"skipped": "arcface_torch:vit_t", "reason": build})
            return 0
        for head in args.heads:
            ours = results.get(("vit_t", head)) or run(args, "vit_t", head, device)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # its torch.cuda.amp.autocast calls are deprecated
                theirs = run(args, "vit_t", head, device, build, impl="arcface_torch")
            ratio(f"unitsface/arcface_torch vit_t+{head} step time", "unitsface/arcface_torch_step_time", ours,
                  theirs, backbone="vit_t", head=head)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
