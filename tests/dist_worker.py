"""Process-side helpers of tests/test_distributed.py: spawn targets and the torchrun entry point.

Runs as `python -m torch.distributed.run … tests/dist_worker.py train RUN.json` (the torchrun
restart test) and is imported by torch.multiprocessing.spawn children (the equivalence tests).
"""

from __future__ import annotations

import copy
import json
import os
import socket
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # torchrun runs this file as a script
    sys.path.insert(0, str(ROOT))

from unitsface import heads, models, parallel  # noqa: E402
from unitsface.training import distributed, trainer  # noqa: E402

DEVICE = torch.device(os.environ.get("UNITSFACE_TEST_DEVICE", "cpu"))


# --------------------------------------------------------------------------- launching


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, tasks: list[tuple[str, tuple]]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        for task, args in tasks:
            TASKS[task](*args)
    finally:
        dist.destroy_process_group()


def spawn(world: int, tasks: list[tuple[str, tuple]]) -> None:
    """Run each TASKS[name](*args) in turn on `world` fresh gloo ranks (one start-up for all: importing
    torch is most of the cost); raises if any rank fails."""
    torch.multiprocessing.spawn(_entry, args=(world, free_port(), tasks), nprocs=world)


# --------------------------------------------------------------------------- head equivalence


def shard_state(full: dict[str, torch.Tensor], head: nn.Module) -> dict[str, torch.Tensor]:
    """This rank's part of a one-process head state."""
    names = distributed.sharded_names(head)
    lo, hi = head.shard.start, head.shard.end
    return {k: (v[lo:hi] if k in names else v).clone() for k, v in full.items()}


def run_head(name: str, params: dict[str, Any], init: dict[str, torch.Tensor],
             steps: list[tuple[torch.Tensor, torch.Tensor, int]], num_classes: int) -> list[dict[str, Any]]:
    """Forward/backward/SGD step of head `name` on each global batch; this rank's slice of everything.

    `init` is the one-process state; this rank feeds its contiguous part of each global batch.
    """
    head = heads.build(name, num_classes, steps[0][0].shape[1], **params).to(DEVICE).train()
    head.load_state_dict(shard_state(init, head))
    sync = distributed.GradientSync([], head)
    trained = list(head.parameters())  # ss_softmax has none
    opt = torch.optim.SGD(trained, lr=0.1, momentum=0.9, weight_decay=5e-4) if trained else None
    world, rank = parallel.world_size(), parallel.rank()
    records = []
    for x_global, labels_global, epoch in steps:
        n = x_global.shape[0] // world
        x = x_global[rank * n:(rank + 1) * n].clone().to(DEVICE).requires_grad_()
        head.set_epoch(epoch)
        loss = head(x, labels_global[rank * n:(rank + 1) * n].to(DEVICE))
        loss.backward()
        sync.reduce_head()
        grads = {k: p.grad.detach().cpu().clone() for k, p in head.named_parameters() if p.grad is not None}
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        records.append({"loss": loss.detach().cpu(), "x_grad": x.grad.cpu(), "grads": grads,
                        "state": {k: v.detach().cpu().clone() for k, v in head.state_dict().items()}})
    return records


def heads_task(infile: str, outdir: str) -> None:
    """Every head case of `infile` on this rank; writes rank<r>.pt with the records and class range."""
    cases = torch.load(infile, weights_only=False)
    out: dict[str, Any] = {}
    for case in cases:
        try:
            records = run_head(case["name"], case["params"], case["init"], case["steps"], case["num_classes"])
            head = heads.build(case["name"], case["num_classes"], case["steps"][0][0].shape[1], **case["params"])
            out[case["name"]] = {"records": records, "start": head.shard.start, "end": head.shard.end,
                                 "sharded": sorted(distributed.sharded_names(head))}
        except Exception as exc:  # reported per head by the test; other heads still run
            out[case["name"]] = {"error": f"{type(exc).__name__}: {exc}"}
    torch.save(out, Path(outdir) / f"rank{parallel.rank()}.pt")


def sampling_task(outdir: str, num_classes: int, rate: float) -> None:
    """Partial FC on 2 ranks: the columns each shard keeps for a global batch, for the weight and the
    (full, active) memory of the unitsface head, and the memory rows the step writes."""
    torch.manual_seed(parallel.rank())
    head = heads.build("unitsface", num_classes, 8, sample_rate=rate, s2s_start_epoch=0, min_fill=0.0).train()
    head.memory.normal_()
    head.filled.fill_(True)
    memory = head.memory.clone()
    kept: list[torch.Tensor] = []
    original = head.sampled_columns

    def recording(local: torch.Tensor) -> torch.Tensor | None:
        kept.append(original(local))
        return kept[-1]

    head.sampled_columns = recording  # type: ignore[method-assign]
    g = torch.Generator().manual_seed(7)
    labels = torch.randint(0, num_classes, (2 * 6,), generator=g)
    x = torch.randn(2 * 6, 8, generator=g)
    n, r = 6, parallel.rank()
    loss = head(x[r * n:(r + 1) * n], labels[r * n:(r + 1) * n])
    loss.backward()
    torch.save({"columns": kept[0], "draws": len(kept), "labels": labels, "start": head.shard.start,
                "size": head.shard.size, "loss": loss.detach(), "bias": head.bias.detach(),
                "grad_rows": (head.weight.grad.abs().sum(1) > 0).nonzero().flatten(),
                "written": (head.memory != memory).any(1).nonzero().flatten()},
               Path(outdir) / f"sampling{r}.pt")


# --------------------------------------------------------------------------- BatchNorm over the global batch


def run_batchnorm(module: nn.Module, steps: list[tuple[torch.Tensor, torch.Tensor]], rows: slice) -> dict[str, Any]:
    """Training steps of `module` on rows `rows` of each global batch, then one eval forward.

    The loss sum(y·g) sends back the upstream gradient g, which stands for the gradient of one global
    loss (what the trainer's heads give every rank). Per step: output, input gradient, this rank's
    parameter gradients and the state after the step.
    """
    records = []
    module.train()
    for x_global, g_global in steps:
        x = x_global[rows].clone().requires_grad_()
        y = module(x)
        (y * g_global[rows]).sum().backward()
        records.append({"y": y.detach(), "x_grad": x.grad,
                        "grads": {k: p.grad.clone() for k, p in module.named_parameters() if p.grad is not None},
                        "state": {k: v.clone() for k, v in module.state_dict().items()}})
        module.zero_grad(set_to_none=True)
    module.eval()
    with torch.no_grad():
        evaluated = module(steps[-1][0][rows])
    return {"steps": records, "eval": evaluated}


def batchnorm_task(infile: str, outdir: str) -> None:
    """Each case of `infile` (a BatchNorm module, global batches, the row bounds of the ranks) through
    `distributed.sync_batchnorm` on this rank, on CPU (GlobalBatchNorm); writes batchnorm<r>.pt."""
    r = parallel.rank()
    out: dict[str, Any] = {}
    for name, case in torch.load(infile, weights_only=False).items():
        module = distributed.sync_batchnorm(copy.deepcopy(case["module"]), torch.device("cpu"))
        out[name] = {"type": type(module).__name__, "keys": list(module.state_dict()),
                     "frozen": sorted(k for k, p in module.named_parameters() if not p.requires_grad),
                     **run_batchnorm(module, case["steps"], slice(case["bounds"][r], case["bounds"][r + 1]))}
    torch.save(out, Path(outdir) / f"batchnorm{r}.pt")


# --------------------------------------------------------------------------- trainer runs


_BUILD = models.build  # the unpatched builder: the tasks of one spawned process patch it in turn


def _group_norm_like(bn: nn.Module) -> nn.Module:
    return nn.GroupNorm(1, bn.num_features)


def without_batch_statistics(build: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """`models.build` with every BatchNorm replaced by a per-sample GroupNorm: a backbone whose output
    for a sample does not depend on the rest of its batch, so R ranks can match one process exactly."""
    def patched(*args: Any, **kwargs: Any) -> nn.Module:
        model = build(*args, **kwargs)
        for module in list(model.modules()):
            for child_name, child in module.named_children():
                if isinstance(child, nn.modules.batchnorm._BatchNorm):
                    setattr(module, child_name, _group_norm_like(child))
        return model
    return patched


def trainer_patches(batch_statistics: bool = False) -> list[tuple[Any, str, Any]]:
    """(object, attribute, value): backbones without batch statistics, unless `batch_statistics` (runs
    that synchronise them); no validation or report (not the subject of these tests)."""
    return [(models, "build", _BUILD if batch_statistics else without_batch_statistics(_BUILD)),
            (trainer.Trainer, "validate", lambda self: {}),
            (trainer.Trainer, "write_report", lambda self, results: None)]


def patch_trainer(batch_statistics: bool = False) -> None:
    for obj, name, value in trainer_patches(batch_statistics):
        setattr(obj, name, value)


def train_task(config: dict[str, Any], resume: str | None) -> None:
    """A trainer run; a backbone keeps its BatchNorm when the config synchronises it."""
    patch_trainer(batch_statistics=config["model"]["sync_batchnorm"])
    trainer.Trainer(config, resume=resume).fit()


def make_record_dataset(folder: Path, classes: int, per_class: int, seed: int = 0) -> Path:
    """A tiny train.rec/train.idx of random 112×112 JPEGs (fast to write and decode)."""
    from unitsface.data.images import encode_jpeg
    from unitsface.data.recordio import write_face_dataset

    rng = np.random.default_rng(seed)
    items = [(c, encode_jpeg(rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)))
             for c in range(classes) for _ in range(per_class)]
    folder.mkdir(parents=True, exist_ok=True)
    write_face_dataset(folder, items, name="train")
    return folder


TASKS: dict[str, Callable[..., None]] = {"heads": heads_task, "sampling": sampling_task, "train": train_task,
                                         "batchnorm": batchnorm_task}


def main(argv: list[str]) -> int:
    """torchrun entry: `dist_worker.py train RUN.json` with {"config", "resume", "crash_rank", "crash_at_step",
    "crash_marker"}.

    The first time any attempt gets there, rank `crash_rank` dies before optimiser step
    `crash_at_step` + 1 (and leaves `crash_marker`), simulating a lost worker; torchrun then
    restarts every rank.
    """
    torch.set_num_threads(1)
    run = json.loads(Path(argv[2]).read_text())
    patch_trainer()
    marker = Path(run["crash_marker"])
    if int(os.environ["RANK"]) == run["crash_rank"]:
        step = trainer.Trainer.optimizer_step

        def crashing_step(self: trainer.Trainer) -> None:
            if self.step == run["crash_at_step"] and not marker.exists():
                marker.touch()
                os._exit(17)  # a dead worker: no clean-up, no exception handling
            step(self)

        trainer.Trainer.optimizer_step = crashing_step  # type: ignore[method-assign]
    trainer.train(run["config"], resume=run["resume"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
