"""Head scaling: time per step and peak memory of a head alone, by class count and rank count.

One step is forward + backward + optimiser step (SGD, momentum 0.9, weight decay 5e-4) of the
head on random B×d embeddings, B per rank. Each measurement runs in fresh processes (R gloo
ranks on CPU, or NCCL ranks on GPUs), once for memory and once for time. Time: the fastest timed
step (other jobs only add time; the median is in the JSON), the slowest rank's. Memory, per rank
(max over ranks): the peak over the first step above the memory in use just before the head is
built: RSS on CPU, made to follow live tensors (`track_live_memory`), torch's allocation on CUDA.
One step of the head and optimiser at C = 1000 first takes the one-off library start-up out of
that baseline.
`update=sparse` reads the sampled class rows with a sparse gradient and updates only them, with
momentum and weight decay of the other rows caught up lazily (`unitsface.optim`); `dense` is
torch's SGD, whose Partial FC gradient spans all C rows. For heads with per-identity buffers
(memory, prototypes) the loss is also computed with those buffers rounded to bf16 (the memory
that storing them in bf16 would save, and its effect on the loss).

Timed steps run as in any process (`--allocator default`, as the insightface anchor was timed): at
C = 1M the page faults of fresh multi-GB tensors (a new gradient every step) are much of a step.
`--allocator caching` has glibc keep freed memory for reuse, as torch's CUDA allocator does, so
that only the arithmetic is compared.

Every measurement prints one line ending in a JSON object; ratio lines follow (also JSON).

    python bench/head_scaling.py                      # C = 10k, 100k; 1 and 2 ranks (a few minutes)
    python bench/head_scaling.py --classes 1000000 --heads cosface@0.1 --ranks 1
    python bench/head_scaling.py --allocator caching --classes 1000000 --steps 3 --warmup 1
    python bench/head_scaling.py --pairs-only --classes 1000000 --steps 2 --warmup 1
    python bench/head_scaling.py --classes 100000 --heads cosface unitsface --updates dense
    python bench/head_scaling.py --device cuda --classes 1000000 2000000 --ranks 1
    python bench/head_scaling.py --heads all --classes 100000 --strict-memory --steps 3 --warmup 1
    python bench/head_scaling.py --heads cosface uss unitsface --classes 100000 --ranks 1 --baseline ../old-checkout

`--strict-memory` requires the live-tensor memory reading (glibc) and checks what the column-loss engine
promises for every head measured: per-rank peak on 1 rank ÷ 2 ranks ≥ 1.8, and each head's peak within
1.5× cosface's at the same shape; one `check` line each, and exit status 1 if any fails. `--baseline PATH`
runs PATH's own bench/head_scaling.py (an older checkout of unitsface) with the same timing settings in
the same run, and prints this code's time per step ÷ the baseline's for every head both measured.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from unitsface import heads, optim, parallel  # noqa: E402
from unitsface.training import distributed  # noqa: E402

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4  # glibc's mallopt() parameters

# insightface PartialFC_V2 + CosFace on this kind of machine (1 gloo rank, B=128, d=512, SGD with
# momentum and weight decay), ms/step, from the issue: {sample_rate: {C: ms}}.
ANCHOR_MS = {1.0: {10_000: 137, 100_000: 2300, 1_000_000: 27_900}, 0.1: {10_000: 32, 100_000: 440, 1_000_000: 5800}}


def head_specs(texts: list[str]) -> list[str]:
    """The --heads list with `all` expanded to every registered head."""
    return [name for text in texts for name in (heads.names() if text == "all" else [text])]


def parse_head(spec: str) -> tuple[str, float]:
    """"cosface@0.1" -> ("cosface", 0.1); "unitsface" -> ("unitsface", 1.0)."""
    name, _, rate = spec.partition("@")
    if name not in heads.names():
        raise SystemExit(f"error: unknown head {name!r}; known: {', '.join(heads.names())}")
    return name, float(rate) if rate else 1.0


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def per_identity_buffers(head: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Float buffers split by class other than the trained weight: memory, prototypes, queues."""
    names = distributed.sharded_names(head)
    return {n: b for n, b in head.named_buffers() if n in names and b.is_floating_point()}


def make_ready(head: torch.nn.Module) -> None:
    """Put a memory head in its steady state: every slot filled, past its warm-up epochs."""
    for _, buf in per_identity_buffers(head).items():
        buf.normal_()
    for name, buf in head.named_buffers():
        if buf.dtype == torch.bool and buf.dim() == 1 and name in distributed.sharded_names(head):
            buf.fill_(True)
    head.set_epoch(100)


def batch(step: int, classes: int, args: argparse.Namespace, device: torch.device
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's random embeddings and labels of one step."""
    g = torch.Generator().manual_seed(1000 * step + parallel.rank())
    x = torch.randn(args.batch, args.dim, generator=g).to(device).requires_grad_()
    return x, torch.randint(0, classes, (args.batch,), generator=g).to(device)


def bf16_state_effect(head: torch.nn.Module, args: argparse.Namespace, device: torch.device
                      ) -> dict[str, Any]:
    """Loss on one batch with the per-identity buffers as they are and rounded to bf16."""
    buffers = per_identity_buffers(head)
    if not buffers:
        return {}
    saved = {k: v.clone() for k, v in head.state_dict().items()}
    losses = []
    for rounded in (False, True):
        head.load_state_dict(saved)
        if rounded:
            for buf in buffers.values():
                buf.copy_(buf.to(torch.bfloat16).float())
        torch.manual_seed(12345)  # the same Partial FC sample both times
        x, labels = batch(10_000, head.num_classes, args, device)
        with torch.no_grad():
            losses.append(float(head(x, labels)))
    head.load_state_dict(saved)
    saved_mb = sum(b.numel() * 2 for b in buffers.values()) / 2**20
    return {"bf16_state_saves_mb_per_rank": round(saved_mb, 1), "loss_fp32_state": losses[0],
            "loss_bf16_state": losses[1], "bf16_loss_rel_change": abs(losses[1] - losses[0]) / abs(losses[0])}


def make_optimizer(head: torch.nn.Module, update: str) -> optim.SGD:
    """SGD with momentum and weight decay; `sparse` updates the class weight lazily, row by row."""
    return optim.SGD(head.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4,
                     lazy=[head.proxy_weight()] if update == "sparse" else [])


def warm_libraries(args: argparse.Namespace, spec: dict[str, Any], device: torch.device) -> None:
    """One step (forward, backward, optimiser) of the same head at C = 1000, before the memory
    baseline is read.

    The first step of any head grows the RSS by about 100 MB whatever C is (kernel code pages,
    allocator arenas, gloo buffers: 101–113 MB measured at C = 1000 on 1 and 2 ranks), and building
    the first torch optimiser by another ~70 MB (the modules it imports); neither is part of the
    head's per-rank memory, which is what sharding should halve.
    """
    head = heads.build(spec["head"], 1000, args.dim, sample_rate=spec["sample_rate"]).to(device).train()
    make_ready(head)
    opt = make_optimizer(head, spec["update"])
    x, labels = batch(0, 1000, args, device)
    head(x, labels).backward()
    opt.step()


def glibc() -> ctypes.CDLL | None:
    try:
        lib = ctypes.CDLL("libc.so.6")
        return lib if hasattr(lib, "mallopt") else None
    except OSError:
        return None


def cache_freed_memory() -> bool:
    """glibc keeps every freed block for reuse (no mmap, no trimming), as torch's CUDA allocator does; at
    C = 1M a plain process instead takes fresh zero-filled pages for every new multi-GB tensor (1.2–1.4 s
    per 2 GB here), which doubles the step time of every head whatever its arithmetic."""
    lib = glibc()
    return lib is not None and bool(lib.mallopt(M_MMAP_MAX, 0)) and bool(lib.mallopt(M_TRIM_THRESHOLD, -1))


def timing_allocator(args: argparse.Namespace) -> None:
    """Set `args.allocator` for the timed steps of this process (`default`: glibc as it starts)."""
    if args.device == "cpu" and args.allocator == "caching" and not cache_freed_memory():
        raise SystemExit("error: --allocator caching needs glibc")


def track_live_memory() -> bool:
    """From here on every block of 1 MB or more is its own mmap, unmapped when freed, so that the RSS
    follows live tensors as torch.cuda's allocated bytes do. False where glibc is missing."""
    lib = glibc()
    return lib is not None and bool(lib.mallopt(M_MMAP_THRESHOLD, 1 << 20))


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class HeadStep:
    """A head of the spec with its optimiser, after the library warm-up; `base` is the memory in use
    just before the head was built."""

    def __init__(self, args: argparse.Namespace, spec: dict[str, Any]) -> None:
        self.args, self.spec = args, spec
        self.device = torch.device(args.device, parallel.rank()) if args.device == "cuda" else torch.device("cpu")
        warm_libraries(args, spec, self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            self.base = rss_bytes()
        torch.manual_seed(parallel.rank())
        self.head = heads.build(spec["head"], spec["classes"], args.dim, sample_rate=spec["sample_rate"])
        self.head.to(self.device).train()
        make_ready(self.head)
        self.opt = make_optimizer(self.head, spec["update"])
        self.sync = distributed.GradientSync([], self.head)

    def __call__(self, number: int) -> tuple[float, float]:
        """(seconds, loss) of one forward + backward + optimiser step."""
        x, labels = batch(number, self.spec["classes"], self.args, self.device)
        if parallel.is_distributed():
            dist.barrier()
        start = time.perf_counter()
        loss = self.head(x, labels)
        loss.backward()
        self.sync.reduce_head()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - start, float(loss.detach())


def measure_memory(args: argparse.Namespace, spec: dict[str, Any]) -> dict[str, Any]:
    """Peak memory of the first step above the memory in use before the head was built (its state,
    optimiser state and temporaries); with bf16 state, the loss change. A process of its own."""
    live = args.device == "cpu" and track_live_memory()
    if args.strict_memory and args.device == "cpu" and not live:
        raise SystemExit("error: --strict-memory needs glibc to read live memory")
    step = HeadStep(args, spec)
    step(0)
    if step.device.type == "cuda":
        peak, memory = torch.cuda.max_memory_allocated(step.device) - step.base, "cuda_allocated"
    else:
        peak, memory = peak_rss_bytes() - step.base, "live" if live else "rss"
    return {"peak_mb_per_rank": peak / 2**20, "memory": memory, **bf16_state_effect(step.head, args, step.device)}


def measure_time(args: argparse.Namespace, spec: dict[str, Any]) -> dict[str, Any]:
    """Warm-up and timed steps under `args.allocator`, in a process of its own."""
    timing_allocator(args)
    step = HeadStep(args, spec)
    times, losses = zip(*(step(n) for n in range(args.warmup + args.steps)))
    return {"step_ms": [1000 * t for t in times[args.warmup:]], "loss": sum(losses[args.warmup:]) / args.steps,
            "allocator": args.allocator if args.device == "cpu" else "cuda"}


PAIR = ("cosface", "unitsface")


def measure_pair(args: argparse.Namespace, spec: dict[str, Any]) -> dict[str, Any]:
    """Steps of `cosface` and `unitsface` alternated in one process, for their time ratio: a slow spell
    of a shared machine then hits both heads alike (separate runs of the two drift by ±20 % here)."""
    timing_allocator(args)
    steps = {name: HeadStep(args, dict(spec, head=name)) for name in PAIR}
    times: dict[str, list[float]] = {name: [] for name in PAIR}
    for n in range(args.warmup + args.steps):
        for name, step in steps.items():
            times[name].append(1000 * step(n)[0])
    return {"step_ms": {name: t[args.warmup:] for name, t in times.items()}}


def worker(rank: int, world: int, port: int, args: argparse.Namespace, spec: dict[str, Any], out: str,
           what: str) -> None:
    torch.set_num_threads(args.threads)
    if world > 1:
        backend = "nccl" if args.device == "cuda" else "gloo"
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        result = {"memory": measure_memory, "time": measure_time, "pair": measure_pair}[what](args, spec)
        if world > 1:
            dist.barrier()  # no rank tears the group down while a peer may still be using it
    finally:
        if world > 1:
            dist.destroy_process_group()
    Path(out, f"{what}{rank}.json").write_text(json.dumps(result))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(args: argparse.Namespace, spec: dict[str, Any], what: str) -> list[dict[str, Any]]:
    """Every rank's result of one `what` measurement, from fresh processes."""
    with tempfile.TemporaryDirectory() as out:
        torch.multiprocessing.spawn(worker, args=(spec["ranks"], free_port(), args, spec, out, what),
                                    nprocs=spec["ranks"])
        return [json.loads(Path(out, f"{what}{r}.json").read_text()) for r in range(spec["ranks"])]


def step_times(per_rank: list[list[float]]) -> tuple[float, float]:
    """(fastest, median) step in ms. A step ends when its slowest rank does; other jobs on the machine
    only ever add time, so the fastest step is the reading least disturbed by them."""
    steps = sorted(max(times) for times in zip(*per_rank))
    return steps[0], steps[len(steps) // 2]


def rounded(record: dict[str, Any]) -> dict[str, Any]:
    return {k: float(f"{v:.5g}") if isinstance(v, float) else v for k, v in record.items()}


def run(args: argparse.Namespace, spec: dict[str, Any]) -> dict[str, Any]:
    """Memory and time of one spec, each from fresh processes (the allocator settings of one would
    distort the other)."""
    memory, timed = spawn(args, spec, "memory"), spawn(args, spec, "time")
    result = dict(spec, batch_per_rank=args.batch, dim=args.dim, device=args.device, threads_per_rank=args.threads)
    result.update(memory[0])
    result.update(timed[0])
    result["ms_per_step"], result["ms_median"] = step_times([r.pop("step_ms") for r in timed])
    result["peak_mb_per_rank"] = max(r["peak_mb_per_rank"] for r in memory)
    return rounded(result)


def run_pair(args: argparse.Namespace, classes: int, ranks: int) -> dict[str, Any]:
    """The unitsface/cosface time ratio from alternated steps (`measure_pair`)."""
    spec = {"head": "pair", "sample_rate": 1.0, "classes": classes, "ranks": ranks, "update": "dense"}
    timed = spawn(args, spec, "pair")
    ms = {name: step_times([r["step_ms"][name] for r in timed])[0] for name in PAIR}
    return rounded({"classes": classes, "ranks": ranks, "cosface_ms": ms["cosface"], "unitsface_ms": ms["unitsface"],
                    "value": ms["unitsface"] / ms["cosface"], "allocator": args.allocator})


def emit(text: str, record: dict[str, Any]) -> None:
    print(f"{text} {json.dumps(record)}", flush=True)


def ratios(results: list[dict[str, Any]]) -> None:
    """1-rank/2-rank memory, dense/sparse time, ours vs the insightface anchor."""
    def find(**key: Any) -> dict[str, Any] | None:
        return next((r for r in results if all(r[k] == v for k, v in key.items())), None)

    for r in results:
        c, n = r["classes"], r["ranks"]
        if n == 1:
            two = find(head=r["head"], sample_rate=r["sample_rate"], classes=c, ranks=2, update=r["update"])
            if two:
                ratio = r["peak_mb_per_rank"] / max(two["peak_mb_per_rank"], 1e-9)
                emit(f"ratio memory 1 rank/2 ranks {r['head']}@{r['sample_rate']} {r['update']} C={c}: {ratio:.2f} "
                     "(aim ~2)", {"ratio": "memory_1rank/2ranks", "head": r["head"], "sample_rate": r["sample_rate"],
                                  "update": r["update"], "classes": c, "value": round(ratio, 3)})
        if r["update"] == "sparse":
            dense = find(head=r["head"], sample_rate=r["sample_rate"], classes=c, ranks=n, update="dense")
            if dense:
                ratio = dense["ms_per_step"] / r["ms_per_step"]
                emit(f"ratio dense/sparse time {r['head']}@{r['sample_rate']} C={c} ranks={n}: {ratio:.2f} "
                     "(aim >= 3 at 1M, rate 0.1)", {"ratio": "dense/sparse_time", "head": r["head"],
                                                    "sample_rate": r["sample_rate"], "classes": c, "ranks": n,
                                                    "value": round(ratio, 3)})
        anchor = ANCHOR_MS.get(r["sample_rate"], {}).get(c)
        if r["head"] == "cosface" and n == 1 and anchor and r["device"] == "cpu":
            ratio = anchor / r["ms_per_step"]
            emit(f"ratio insightface-anchor/ours cosface@{r['sample_rate']} {r['update']} C={c}: {ratio:.2f} "
                 f"({r['allocator']} allocator)", {"ratio": "anchor/ours_time", "sample_rate": r["sample_rate"],
                                                   "update": r["update"], "classes": c, "anchor_ms": anchor,
                                                   "allocator": r["allocator"], "value": round(ratio, 3)})


MEMORY_SHARDING, MEMORY_VS_COSFACE = 1.8, 1.5  # the column-loss engine's promises (--strict-memory)


def memory_checks(results: list[dict[str, Any]]) -> bool:
    """For every head measured on 1 and 2 ranks: 1-rank peak ÷ 2-rank peak ≥ 1.8, and its peak within 1.5× that
    of cosface at the same shape. Prints one check line per head; True when all hold."""
    def find(**key: Any) -> dict[str, Any] | None:
        return next((r for r in results if all(r[k] == v for k, v in key.items())), None)

    ok = True
    for r in results:
        if r["ranks"] != 1:
            continue
        same = {k: r[k] for k in ("sample_rate", "classes", "update")}
        two, cosface = find(head=r["head"], ranks=2, **same), find(head="cosface", ranks=1, **same)
        record = {"check": "memory", "head": r["head"], **same, "peak_mb_1rank": r["peak_mb_per_rank"]}
        if two:
            record["sharding_ratio"] = round(r["peak_mb_per_rank"] / max(two["peak_mb_per_rank"], 1e-9), 3)
        if cosface:
            record["vs_cosface"] = round(r["peak_mb_per_rank"] / max(cosface["peak_mb_per_rank"], 1e-9), 3)
        passed = record.get("sharding_ratio", MEMORY_SHARDING) >= MEMORY_SHARDING and \
            record.get("vs_cosface", 0.0) <= MEMORY_VS_COSFACE
        ok &= passed
        emit(f"check memory {r['head']} C={r['classes']}: 1/2 ranks {record.get('sharding_ratio', '–')} "
             f"(>= {MEMORY_SHARDING}), vs cosface {record.get('vs_cosface', '–')} (<= {MEMORY_VS_COSFACE}): "
             f"{'pass' if passed else 'FAIL'}", {**record, "pass": passed})
    return ok


def baseline_times(args: argparse.Namespace, path: str, names: list[str]) -> dict[tuple[str, int], float]:
    """ms/step of `names` from another checkout's own head_scaling.py, run now with this run's timing settings,
    one head at a time: a head that checkout lacks, or cannot run, is named on stderr and left out."""
    script = Path(path) / "bench" / "head_scaling.py"
    if not script.is_file():
        raise SystemExit(f"error: --baseline {path} has no bench/head_scaling.py")
    env = {**os.environ, "PYTHONPATH": str(path)}
    known = subprocess.run([sys.executable, "-c", "import unitsface.heads as h; print(' '.join(h.names()))"],
                           cwd=path, env=env, capture_output=True, text=True).stdout.split()
    times = {}
    for name in names:
        if name not in known:
            print(f"baseline {path}: no head {name!r}", file=sys.stderr)
            continue
        command = [sys.executable, str(script), "--heads", name, "--classes", *map(str, args.classes), "--ranks", "1",
                   "--updates", "dense", "--batch", str(args.batch), "--dim", str(args.dim), "--steps",
                   str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads), "--allocator",
                   args.allocator]
        done = subprocess.run(command, cwd=path, env=env, capture_output=True, text=True)
        if done.returncode:
            print(f"baseline {path}: {name} failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}", file=sys.stderr)
        for line in done.stdout.splitlines():
            if line.startswith("head_scaling "):
                record = json.loads(line[line.index("{"):])
                times[(record["head"], record["classes"])] = record["ms_per_step"]
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--heads", nargs="+", default=["cosface", "unitsface", "cosface@0.1"],
                        help="head names, NAME@RATE for Partial FC sampling")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--updates", nargs="+", default=["dense", "sparse"], choices=["dense", "sparse"],
                        help="sparse runs only for sampled heads (rate < 1)")
    parser.add_argument("--batch", type=int, default=128, help="per rank")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--steps", type=int, default=10, help="timed steps (the fastest is reported, and the median)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--allocator", choices=["default", "caching"], default="default",
                        help="CPU: 'default' times a plain process; 'caching' keeps freed memory for reuse "
                             "(cache_freed_memory), so that the OS's page faults stay out of the comparison")
    parser.add_argument("--pairs-only", action="store_true",
                        help="only the unitsface/cosface time ratios from alternated steps")
    parser.add_argument("--strict-memory", action="store_true",
                        help="require live memory readings and check sharding (1/2 ranks >= 1.8) and the peak vs "
                             "cosface (<= 1.5x) for every head; exit 1 if a check fails")
    parser.add_argument("--baseline", default=None, metavar="PATH",
                        help="an older unitsface checkout: time the same heads with its code in this run")
    args = parser.parse_args()
    args.heads = head_specs(args.heads)
    if args.pairs_only:
        args.heads = list(PAIR)
    results = []
    for classes in [] if args.pairs_only else args.classes:
        for spec_text in args.heads:
            name, rate = parse_head(spec_text)
            for ranks in args.ranks:
                for update in args.updates:
                    if update == "sparse" and rate == 1.0:
                        continue
                    spec = {"head": name, "sample_rate": rate, "classes": classes, "ranks": ranks, "update": update}
                    r = run(args, spec)
                    results.append(r)
                    emit(f"head_scaling {name}@{rate} C={classes} ranks={ranks} update={update}: "
                         f"{r['ms_per_step']:.1f} ms/step, peak {r['peak_mb_per_rank']:.0f} MB/rank", r)
    ratios(results)
    checks_ok = memory_checks(results) if args.strict_memory else True
    if args.baseline:
        baseline = baseline_times(args, args.baseline, [parse_head(h)[0] for h in args.heads if "@" not in h])
        for r in results:
            before = baseline.get((r["head"], r["classes"]))
            if r["ranks"] == 1 and r["update"] == "dense" and r["sample_rate"] == 1.0 and before:
                emit(f"ratio time this/baseline {r['head']} C={r['classes']}: {r['ms_per_step'] / before:.2f}",
                     {"ratio": "time_this/baseline", "head": r["head"], "classes": r["classes"],
                      "baseline_ms": before, "this_ms": r["ms_per_step"], "value": round(r["ms_per_step"] / before, 3)})
    if set(PAIR) <= set(args.heads) and "dense" in args.updates:
        for classes in args.classes:
            for ranks in args.ranks:
                p = run_pair(args, classes, ranks)
                emit(f"ratio unitsface/cosface time C={classes} ranks={ranks}: {p['value']:.2f} (steps alternated in "
                     "one process; aim <= 1.6)", {"ratio": "unitsface/cosface_time", **p})
    return 0 if checks_ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
