"""Training on several processes: torchrun set-up, gradient conventions, sharded checkpoints.

`torchrun --nproc_per_node=N -m unitsface train …` starts N copies of the trainer; `setup`
joins them into one process group (NCCL on GPUs, gloo on CPUs) from torchrun's environment.
A single process creates no group, and every function here is then a no-op.

Gradient convention (`unitsface.parallel`, methods.md D1). Every rank's head returns the
loss of the *global* batch, and the all-gather sends each rank the summed gradient of its
own embeddings, so the gradient reaching the backbone is already the exact gradient of the
global loss, only split across ranks by sample. Backbone gradients are therefore SUMMED
across ranks (DDP with a sum comm hook; DDP's default averaging would divide by N). Head
parameters split by class (`weight`, per-class `bias`) are owned by one rank and need no
communication; replicated head parameters (a unified scalar bias) received on each rank only
the contribution of that rank's class columns, so their gradients are summed too
(`GradientSync`). Gradient clipping uses the norm of the full gradient, identical on every
rank, so that clipping cannot desynchronise the replicas.

Batch statistics (`model.sync_batchnorm`). By default every rank normalises with the statistics
of its own samples. `sync_batchnorm` makes BatchNorm use those of the global batch instead, so a
BatchNorm backbone on N ranks trains like one process on the global batch: torch's SyncBatchNorm
on CUDA, `GlobalBatchNorm` on CPU/gloo (where SyncBatchNorm refuses to run).

Checkpoints (methods.md D6). With N > 1 every rank writes its class rows (head state and
their optimiser state) to `<name>.shards/<generation>/rankR-of-N.pt`; rank 0 then writes
`<name>` — the backbone, replicated state and a manifest of the shard files — by an atomic
rename, which is the commit point: a crash before it leaves the previous checkpoint and its
shard folder untouched. Loading re-shards by class range, so a checkpoint written by N ranks
resumes on M. One process writes a single self-contained file, as before.
"""

from __future__ import annotations

import datetime
import os
import secrets
import shutil
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler
from torch.distributed.rendezvous import rendezvous
from torch.nn.parallel import DistributedDataParallel

from unitsface import parallel
from unitsface.errors import UnitsfaceError
from unitsface.training.checkpoint import atomic_save
from unitsface.training.checkpoint import load_checkpoint as read_checkpoint

SHARD_FORMAT = "unitsface-checkpoint-shard"
_OWNS_GROUP = False  # True when `setup` created the process group (and `teardown` may destroy it)


# --------------------------------------------------------------------------- process group


def setup(device: torch.device) -> torch.device:
    """Join the process group that torchrun describes (WORLD_SIZE > 1), once; return this rank's device.

    CUDA ranks each take the GPU `LOCAL_RANK` and talk over NCCL (gloo for CPU-side objects);
    CPU ranks use gloo.
    """
    global _OWNS_GROUP
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if world > 1 and not parallel.is_distributed():
        backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
        timeout = datetime.timedelta(minutes=30)
        store, rank, world = next(rendezvous("env://", timeout=timeout))
        # torchrun's agent keeps one store across worker restarts: without a namespace per attempt a
        # restarted rank can read the address a dead peer left there and fail to connect.
        store = dist.PrefixStore(f"unitsface/attempt{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
        _OWNS_GROUP = True
    return device


def teardown() -> None:
    """Leave the process group created by `setup` (not one created by the caller)."""
    global _OWNS_GROUP
    if _OWNS_GROUP and parallel.is_distributed():
        dist.destroy_process_group()
    _OWNS_GROUP = False


def rank_seed(seed: int, step: int = 0) -> int:
    """A seed distinct per (seed, step, rank), for the per-rank random streams."""
    return ((seed * 1_000_003 + step) * 1_000_003 + parallel.rank()) % 2**63


def seed_rank(seed: int) -> None:
    """Give each rank its own torch stream before the head is built, so that class shards are not
    initialised with identical rows and Partial FC samples independently per shard (no-op in one process)."""
    if parallel.world_size() > 1:
        torch.manual_seed(rank_seed(seed))


def broadcast_from_main(value: Any) -> Any:
    """Rank 0's `value` on every rank (a decision only rank 0 can make, such as writing best.pt)."""
    if not parallel.is_distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def auto_resume(out: Path, resume: str | Path | None) -> str | Path | None:
    """`out/last.pt` when torchrun has restarted the workers (TORCHELASTIC_RESTART_COUNT > 0) and it
    exists, else `resume`. Rank 0 decides, so every rank resumes from the same place."""
    last = Path(out) / "last.pt"
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0 and last.is_file()
    return broadcast_from_main(last if restarted else resume)


# --------------------------------------------------------------------------- gradients


def _sum_hook(state, bucket):  # noqa: ANN001 (DDP rejects string annotations, which `annotations` makes)
    """DDP comm hook on a `dist.GradBucket`: all-reduce SUM, without DDP's division by the world size (D1)."""
    work = dist.all_reduce(bucket.buffer(), async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


def wrap_model(model: nn.Module, device: torch.device) -> nn.Module:
    """The backbone wrapped in DDP with summed gradients (the module itself in one process).

    DDP broadcasts rank 0's weights at construction and its BatchNorm buffers before every
    forward, so all replicas stay identical and rank 0's checkpoint speaks for all of them.
    """
    if not parallel.is_distributed():
        return model
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                  broadcast_buffers=True)
    ddp.register_comm_hook(None, _sum_hook)
    return ddp


def no_sync(model: nn.Module, skip: bool) -> AbstractContextManager:
    """DDP's `no_sync()` on gradient-accumulation micro-steps (`skip`), else nothing."""
    return model.no_sync() if skip and isinstance(model, DistributedDataParallel) else nullcontext()


def grad_scaler(amp: str, device: torch.device) -> torch.amp.GradScaler:
    """The scaler every training step goes through, whatever the precision: it checks the gradients for
    inf/NaN on the device and the (fused) optimiser then skips such a step there (methods.md N6). fp16 scales
    the loss dynamically as usual; bf16 and fp32 keep the scale at 1 (`hold_scale`), so their gradients are
    bit for bit what they would be without it. Across ranks the scaler agrees on skipping a step when any
    rank saw inf/NaN (a rank skipping alone would desynchronise the backbone)."""
    scale = 65536.0 if amp == "fp16" else 1.0
    if parallel.is_distributed():
        return ShardedGradScaler(device.type, init_scale=scale)
    return torch.amp.GradScaler(device.type, init_scale=scale)


def update_scaler(scaler: torch.amp.GradScaler, amp: str) -> None:
    """End the step: fp16's dynamic scale grows or backs off; bf16 and fp32 hold the scale at 1."""
    scaler.update(None if amp == "fp16" else 1.0)


def sharded_names(head: nn.Module) -> set[str]:
    """Entries of `head.state_dict()` split by class: those whose first dimension is the shard's
    class count (weight, per-class bias, memory, fill mask, prototypes, queues, ...). Replicated
    state is scalar or (1,)-shaped by convention, which is unambiguous while a shard holds at least
    two classes."""
    rows = head.shard.size
    if parallel.world_size() > 1 and rows < 2:
        raise UnitsfaceError(
            f"num_classes={head.num_classes} is too small for {parallel.world_size()} ranks: "
            "every rank needs at least 2 classes"
        )
    return {name for name, t in head.state_dict().items() if t.dim() > 0 and t.shape[0] == rows}


class GradientSync:
    """Completes the gradients of one step before the optimiser uses them (see module docstring)."""

    def __init__(self, backbone_params: Iterable[nn.Parameter], head: nn.Module) -> None:
        names = sharded_names(head)
        trained = [(n, p) for n, p in head.named_parameters() if p.requires_grad]
        self.sharded = [p for n, p in trained if n in names]
        self.head_replicated = [p for n, p in trained if n not in names]
        self.replicated = [p for p in backbone_params if p.requires_grad] + self.head_replicated

    def reduce_head(self) -> None:
        """All-reduce SUM the replicated head gradients, in one collective. A parameter no rank
        used keeps grad None (so SGD leaves it alone); otherwise missing gradients count as zero."""
        params = self.head_replicated
        if not parallel.is_distributed() or not params:
            return
        ref = params[0]
        used = torch.tensor([float(p.grad is not None) for p in params], device=ref.device)
        flat = torch.cat([used] + [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float()
                                   for p in params])
        dist.all_reduce(flat)
        offset = len(params)
        for i, p in enumerate(params):
            n = p.numel()
            if flat[i] > 0:
                p.grad = flat[offset:offset + n].view_as(p).to(p.dtype).clone()
            offset += n

    def clip_(self, max_norm: float) -> torch.Tensor:
        """Scale all gradients so that the global 2-norm is at most `max_norm`, like
        `torch.nn.utils.clip_grad_norm_` on the whole model; returns the norm before clipping."""
        def squares(params: list[nn.Parameter]) -> list[torch.Tensor]:
            grads = [p.grad.coalesce().values() if p.grad.is_sparse else p.grad
                     for p in params if p.grad is not None]
            return [torch.linalg.vector_norm(g.float()) ** 2 for g in grads]

        replicated, sharded = squares(self.replicated), squares(self.sharded)
        device = (replicated + sharded)[0].device if replicated + sharded else torch.device("cpu")
        sharded_sq = torch.stack(sharded).sum() if sharded else torch.zeros((), device=device)
        if parallel.is_distributed():
            dist.all_reduce(sharded_sq)
        total_sq = sharded_sq + (torch.stack(replicated).sum() if replicated else 0.0)
        total = total_sq.sqrt()
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for p in self.replicated + self.sharded:
            if p.grad is not None:
                p.grad.mul_(coef.to(p.grad.device, p.grad.dtype))
        return total


# --------------------------------------------------------------------------- batch statistics


def _channel_dims(x: torch.Tensor) -> tuple[list[int], list[int]]:
    """(the dimensions a BatchNorm reduces over, the shape that broadcasts a per-channel vector over x)."""
    return [0, *range(2, x.dim())], [1, -1] + [1] * (x.dim() - 2)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float32 for half-precision inputs (as BatchNorm under autocast), else the input's own precision."""
    return torch.promote_types(x.dtype, torch.float32)


class _GlobalBatchNormFunction(torch.autograd.Function):
    """BatchNorm over the batch of all ranks together, forward and backward (see `GlobalBatchNorm`)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,  # type: ignore[override]
                running_mean: torch.Tensor | None, running_var: torch.Tensor | None, factor: float,
                eps: float) -> torch.Tensor:
        dims, shape = _channel_dims(x)
        xf = x.to(_compute_dtype(x))
        var, mean = torch.var_mean(xf, dim=dims, correction=0)
        n = xf.numel() // xf.shape[1]
        # Count, sum and sum of squares, rebuilt from this rank's centred moments and reduced in float64:
        # in float32, E[x²] − E[x]² would cancel away the variance of channels whose |mean| ≫ std.
        m = mean.double()
        sums = torch.stack([torch.full_like(m, n), n * m, n * (var.double() + m * m)])
        dist.all_reduce(sums)
        count = float(sums[0, 0])
        if count <= 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got {count:.0f} over all ranks")
        mean64 = sums[1] / count
        var64 = (sums[2] / count - mean64 * mean64).clamp(min=0)
        if running_mean is not None and running_var is not None:
            with torch.no_grad():  # as BatchNorm: the unbiased variance, weighted by `factor`
                running_mean.mul_(1 - factor).add_(mean64.to(running_mean.dtype), alpha=factor)
                running_var.mul_(1 - factor).add_((var64 * count / (count - 1)).to(running_var.dtype), alpha=factor)
        mean, invstd = mean64.to(xf.dtype), (var64 + eps).rsqrt().to(xf.dtype)
        y = (xf - mean.view(shape)) * invstd.view(shape)
        if weight is not None:
            y = y * weight.to(xf.dtype).view(shape)
        if bias is not None:
            y = y + bias.to(xf.dtype).view(shape)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.count = count
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        x, weight, mean, invstd = ctx.saved_tensors
        dims, shape = _channel_dims(x)
        xhat = (x.to(mean.dtype) - mean.view(shape)) * invstd.view(shape)
        dy = grad.to(mean.dtype)
        sum_dy, sum_dy_xhat = dy.sum(dims), (dy * xhat).sum(dims)
        grad_x = None
        if ctx.needs_input_grad[0]:
            # The mean and variance depend on every rank's samples, so the input gradient needs the global
            # sums; weight and bias get this rank's part only, which DDP then sums over ranks (D1).
            total = torch.stack([sum_dy, sum_dy_xhat])
            dist.all_reduce(total)
            scale = invstd if weight is None else invstd * weight.to(mean.dtype)
            grad_x = ((dy - (total[0] / ctx.count).view(shape) - xhat * (total[1] / ctx.count).view(shape))
                      * scale.view(shape)).to(x.dtype)
        grad_w = sum_dy_xhat.to(weight.dtype) if ctx.needs_input_grad[1] else None
        grad_b = sum_dy.to(weight.dtype) if ctx.needs_input_grad[2] else None  # affine: weight and bias alike
        return grad_x, grad_w, grad_b, None, None, None, None


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics are those of the batch of all ranks, for CPU/gloo.

    torch's SyncBatchNorm does this on CUDA only. The forward all-reduces per-channel count, sum and
    sum of squares in one collective and normalises with the global mean and biased variance; running
    statistics follow BatchNorm's rule (unbiased global variance, `momentum`, or the cumulative average
    when `momentum` is None). The backward all-reduces per-channel sum(dy) and sum(dy·x̂), giving the
    exact gradient of BatchNorm over the global batch. In eval mode, or without a process group, it is
    plain BatchNorm. Its state_dict keys are BatchNorm's, so checkpoints load either way.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not (self.training and parallel.world_size() > 1):
            return super().forward(input)
        self._check_input_dim(input)
        factor = 0.0
        if self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        return _GlobalBatchNormFunction.apply(input, self.weight, self.bias, self.running_mean, self.running_var,
                                              factor, self.eps)

    @classmethod
    def convert(cls, module: nn.Module) -> nn.Module:
        """`module` with every BatchNorm replaced by a GlobalBatchNorm holding the same parameter and
        buffer objects (a frozen gamma stays frozen; references to the parameters stay valid)."""
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, cls):
            converted = cls(module.num_features, module.eps, module.momentum, module.affine,
                            module.track_running_stats)
            if module.affine:
                converted.weight, converted.bias = module.weight, module.bias
            converted.running_mean, converted.running_var = module.running_mean, module.running_var
            converted.num_batches_tracked = module.num_batches_tracked
            converted.train(module.training)
            module = converted
        for name, child in module.named_children():
            setattr(module, name, cls.convert(child))
        return module


def sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """`model` with BatchNorm statistics taken over the global batch (`model.sync_batchnorm`); call it
    before `wrap_model`. A no-op in one process, where the local batch is the global one."""
    if parallel.world_size() <= 1:
        return model
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return GlobalBatchNorm.convert(model)


# --------------------------------------------------------------------------- checkpoints


def _positions(optimizer: torch.optim.Optimizer) -> dict[int, int]:
    """id(parameter) -> its index in `optimizer.state_dict()["state"]`."""
    order = [p for group in optimizer.param_groups for p in group["params"]]
    return {id(p): i for i, p in enumerate(order)}


def _sharded_positions(head: nn.Module, optimizer: torch.optim.Optimizer, names: set[str]) -> dict[int, int]:
    """Optimiser index -> class rows of that parameter, for the head's class-sharded parameters."""
    positions = _positions(optimizer)
    return {positions[id(p)]: p.shape[0] for n, p in head.named_parameters() if n in names and id(p) in positions}


def _row_state(state: dict[str, Any], rows: int) -> dict[str, torch.Tensor]:
    """The per-row entries of one parameter's optimiser state (momentum buffer, lazy row steps)."""
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == rows}


def _split(state: dict[str, Any], head: nn.Module, optimizer: torch.optim.Optimizer
           ) -> tuple[dict[str, Any], dict[str, Any]]:
    """(replicated part, this rank's class rows) of a trainer state with "head" and "optimizer"."""
    names = sharded_names(head)
    rows_at = _sharded_positions(head, optimizer, names)
    opt = state["optimizer"]
    rows_state = {pos: _row_state(opt["state"].get(pos, {}), rows) for pos, rows in rows_at.items()}
    replicated_opt = {pos: {k: v for k, v in s.items() if k not in rows_state.get(pos, {})}
                      for pos, s in opt["state"].items()}
    main = dict(state, head={k: v for k, v in state["head"].items() if k not in names},
                optimizer=dict(opt, state=replicated_opt))
    shard = {"head": {k: state["head"][k] for k in names}, "optimizer": rows_state}
    return main, shard


def save_checkpoint(state: dict[str, Any], path: str | Path, head: nn.Module,
                    optimizer: torch.optim.Optimizer) -> None:
    """Write a trainer state (see module docstring); every rank must call it.

    One process: `path` alone, atomically. N ranks: shard files, then the manifest file `path`.
    """
    path = Path(path)
    shards_root = path.parent / f"{path.name}.shards"
    if not parallel.is_distributed():
        atomic_save(state, path)
        shutil.rmtree(shards_root, ignore_errors=True)  # left by an earlier multi-rank run
        return
    main, shard = _split(state, head, optimizer)
    token = [f"step{int(state['step']):09d}-{secrets.token_hex(4)}"]
    dist.broadcast_object_list(token, src=0)
    entry = write_shard(shards_root / token[0], head, shard, state["rng"])
    entries: list[Any] = [None] * parallel.world_size()
    dist.all_gather_object(entries, entry)
    if parallel.is_main_process():
        commit(path, main, entries, head.num_classes)
    dist.barrier()


def write_shard(folder: Path, head: nn.Module, shard: dict[str, Any], rng: dict[str, Any]) -> dict[str, Any]:
    """Write this rank's class rows atomically into `folder`; returns its manifest entry."""
    r, world = parallel.rank(), parallel.world_size()
    name = f"rank{r:05d}-of-{world:05d}.pt"
    payload = {"format": SHARD_FORMAT, "rank": r, "world_size": world, "num_classes": head.num_classes,
               "start": head.shard.start, "size": head.shard.size, "rng": rng, **shard}
    atomic_save(payload, folder / name)
    return {"file": f"{folder.name}/{name}", "rank": r, "start": head.shard.start, "size": head.shard.size,
            "bytes": (folder / name).stat().st_size}


def commit(path: Path, main: dict[str, Any], entries: list[dict[str, Any]], num_classes: int) -> None:
    """Rank 0: write the manifest file `path` (the commit), then delete older shard generations."""
    main = dict(main, shards={"world_size": len(entries), "num_classes": num_classes, "files": entries})
    atomic_save(main, path)
    root = path.parent / f"{path.name}.shards"
    keep = {e["file"].split("/")[0] for e in entries}
    for folder in root.iterdir():
        if folder.name not in keep:
            shutil.rmtree(folder, ignore_errors=True)


@dataclass
class _Piece:
    """The class rows [start, start + size) of a checkpoint: head entries and optimiser row state."""

    start: int
    size: int
    head: dict[str, torch.Tensor]
    optimizer: dict[int, dict[str, torch.Tensor]]
    rng: dict[str, Any] | None


def _pieces(ckpt: dict[str, Any], path: Path, names: set[str], rows_at: dict[int, int],
            want: tuple[int, int]) -> Iterator[_Piece]:
    """The pieces of `ckpt` that overlap the class range `want`, in class order."""
    num_classes = int(ckpt["meta"]["num_classes"])
    manifest = ckpt.get("shards")
    if manifest is None:  # a one-process checkpoint holds every row itself
        missing = sorted(names - set(ckpt["head"]))
        if missing:
            raise UnitsfaceError(f"checkpoint {path} has no head entry {missing[0]!r}")
        opt = ckpt["optimizer"]["state"]
        yield _Piece(0, num_classes, {k: ckpt["head"][k] for k in names},
                     {pos: _row_state(opt.get(pos, {}), num_classes) for pos in rows_at}, None)
        return
    expected = 0
    for entry in manifest["files"]:
        if entry["start"] != expected:
            raise UnitsfaceError(f"checkpoint {path}: shard {entry['file']} starts at class {entry['start']}, "
                                 f"expected {expected}")
        expected += entry["size"]
        if entry["start"] >= want[1] or entry["start"] + entry["size"] <= want[0]:
            continue
        file = path.parent / f"{path.name}.shards" / entry["file"]
        if not file.is_file() or file.stat().st_size != entry["bytes"]:
            raise UnitsfaceError(f"checkpoint {path}: shard file {file} is missing or incomplete")
        shard = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        if shard.get("format") != SHARD_FORMAT or (shard["start"], shard["size"]) != (entry["start"], entry["size"]):
            raise UnitsfaceError(f"checkpoint {path}: {file} is not the shard its manifest names")
        missing = sorted(names - set(shard["head"]))
        if missing:
            raise UnitsfaceError(f"checkpoint shard {file} has no head entry {missing[0]!r}")
        yield _Piece(shard["start"], shard["size"], shard["head"], shard["optimizer"], shard["rng"])
    if expected != num_classes:
        raise UnitsfaceError(f"checkpoint {path}: shards cover {expected} of {num_classes} classes")


def _rows(pieces: list[_Piece], tensors: list[torch.Tensor], start: int, end: int) -> torch.Tensor:
    """Rows [start, end) of one tensor split over the pieces (`tensors[i]` from `pieces[i]`), as a new tensor."""
    parts = [t[max(start, p.start) - p.start: min(end, p.start + p.size) - p.start] for p, t in zip(pieces, tensors)]
    return torch.cat(parts).clone()


def head_rows(ckpt: dict[str, Any], path: str | Path, head: nn.Module) -> dict[str, torch.Tensor]:
    """The head state of a checkpoint (as read by `read_checkpoint`) with this rank's class rows, whatever
    the number of ranks that wrote it; no optimiser state (`train.init_from`)."""
    names = sharded_names(head)
    start, end = head.shard.start, head.shard.end
    pieces = list(_pieces(ckpt, Path(path), names, {}, (start, end)))
    return {**ckpt["head"], **{k: _rows(pieces, [p.head[k] for p in pieces], start, end) for k in names}}


def load_checkpoint(path: str | Path, head: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """A checkpoint written by any number of ranks, as this rank's trainer state: "head" and
    "optimizer" hold this rank's class rows, ready for `load_state_dict`."""
    path = Path(path)
    ckpt = read_checkpoint(path)
    if int(ckpt["meta"]["num_classes"]) != head.num_classes:
        raise UnitsfaceError(
            f"checkpoint has {ckpt['meta']['num_classes']} classes but the training data has {head.num_classes}"
        )
    names = sharded_names(head)
    rows_at = _sharded_positions(head, optimizer, names)
    start, end = head.shard.start, head.shard.end
    pieces = list(_pieces(ckpt, path, names, rows_at, (start, end)))
    ckpt["head"] = {**ckpt["head"], **{k: _rows(pieces, [p.head[k] for p in pieces], start, end) for k in names}}
    opt_state = ckpt["optimizer"]["state"]
    for pos in rows_at:
        keys = set(pieces[0].optimizer.get(pos, {}))
        if any(set(p.optimizer.get(pos, {})) != keys for p in pieces):
            raise UnitsfaceError(f"checkpoint {path}: shards disagree on the optimiser state of parameter {pos}")
        if keys:
            rows = {k: _rows(pieces, [p.optimizer[pos][k] for p in pieces], start, end) for k in keys}
            opt_state[pos] = {**opt_state.get(pos, {}), **rows}
    manifest = ckpt.pop("shards", None)
    same_layout = manifest is not None and manifest["world_size"] == parallel.world_size()
    if same_layout:  # exact resume: this rank's own random streams
        ckpt["rng"] = pieces[0].rng
    elif parallel.world_size() > 1:  # re-sharded: fresh, distinct streams per rank
        seed = rank_seed(int(ckpt["config"]["train"]["seed"]), int(ckpt["step"]))
        ckpt["rng"] = dict(ckpt["rng"], torch=torch.Generator().manual_seed(seed).get_state())
    return ckpt
