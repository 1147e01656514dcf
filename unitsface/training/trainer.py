"""The training loop (arcface_torch style: short, linear, readable).

One optimiser step = `train.grad_accumulation` forward/backward calls ("micro-batches").
Each micro-loss is divided by the accumulation count; the lr schedule, gradient clipping,
PReLU clamping and logging happen once per optimiser step. Head state (memories,
prototypes, running statistics) follows forward calls, as in the references (D7).

Resuming is exact: the data order, the flips and the mask augmentation are functions of
(seed, epoch, position), the global RNG states are checkpointed, and a resumed run skips the
micro-batches it had already consumed, so the loss curve continues as if never interrupted.
"""

from __future__ import annotations

import json
import random
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from unitsface import __version__, heads, models, optim, parallel
from unitsface.data.dataset import RecordDataset, make_loader, normalize_batch
from unitsface.errors import UnitsfaceError
from unitsface.training import distributed
from unitsface.training.checkpoint import FORMAT, VERSION
from unitsface.training.schedule import lr_factor


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UnitsfaceError(f"train.device {name!r} is not a device name") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UnitsfaceError("train.device is cuda but no CUDA device is available")
    return device


def resolve_data(config: dict[str, Any]) -> tuple[Path, list[Path]]:
    """The training folder and the validation .bin files (the synthetic set is made once, cached)."""
    data = config["data"]
    val = [Path(p) for p in data["val"]]
    if data["train"] == "synthetic":
        from unitsface.data.cache import cached_synthetic_dataset

        folder = cached_synthetic_dataset(cache=data["cache"], **data["synthetic"])
        val = val + [folder / "val.bin"]
    else:
        folder = Path(data["train"]).expanduser()
        if not folder.is_dir():
            raise UnitsfaceError(f"data.train folder not found: {folder}")
        for name in ("train.rec", "train.idx"):
            if not (folder / name).is_file():
                raise UnitsfaceError(f"data.train folder {folder} has no {name}")
    for path in val:
        if not path.is_file():
            raise UnitsfaceError(f"data.val file not found: {path}")
    return folder, val


def capture_rng() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    state["numpy"] = torch.from_numpy(np.random.get_state()[1].astype(np.int64))
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(int(v) for v in state["python"]), None))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), 624, 0, 0.0))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def flip_batch(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random horizontal flip of half the uint8 NCHW images, decided by `generator`."""
    n = images.shape[0]  # the mask is drawn for the global batch, so flips do not depend on the world size
    mask = torch.rand(n * parallel.world_size(), generator=generator)[parallel.rank() * n :][:n] < 0.5
    if mask.any():
        images = images.clone()
        images[mask] = images[mask].flip(-1)
    return images


class Trainer:
    """Builds everything from a validated config and runs `fit()`."""

    def __init__(self, config: dict[str, Any], resume: str | Path | None = None) -> None:
        self.config = config
        self.cfg = config["train"]
        self.out = Path(config["output"]).expanduser()
        self.device = distributed.setup(resolve_device(self.cfg["device"]))  # joins torchrun's process group
        self.main = parallel.is_main_process()
        torch.manual_seed(self.cfg["seed"])
        random.seed(self.cfg["seed"])
        np.random.seed(self.cfg["seed"] % 2**32)
        if self.cfg["amp"] == "fp16" and self.device.type != "cuda":
            raise UnitsfaceError("train.amp=fp16 needs a CUDA device; use bf16 or none on CPU")

        folder, self.val_paths = resolve_data(config)
        self.dataset = RecordDataset(folder, train=True, flip=False,
                                     max_bad_fraction=config["data"]["max_bad_fraction"],
                                     mask_prob=float(config["data"]["augment"]["mask_prob"]))
        self.num_classes = self.dataset.num_classes
        mcfg, hcfg = config["model"], dict(config["head"])
        self.model = models.build(mcfg["backbone"], embedding_size=mcfg["embedding_size"]).to(self.device)
        if mcfg["sync_batchnorm"]:  # global-batch BatchNorm statistics; no-op in one process
            self.model = distributed.sync_batchnorm(self.model, self.device)
        self.net = distributed.wrap_model(self.model, self.device)  # DDP (summed gradients) when distributed
        distributed.seed_rank(self.cfg["seed"])
        self.head_name = hcfg.pop("name")
        self.head = heads.build(self.head_name, self.num_classes, mcfg["embedding_size"], **hcfg).to(self.device)

        batch = self.cfg["batch_size"]
        per_rank = len(self.dataset) // parallel.world_size()
        self.micro_per_epoch = per_rank // batch
        self.steps_per_epoch = self.micro_per_epoch // self.cfg["grad_accumulation"]
        if self.steps_per_epoch < 1:
            raise UnitsfaceError(
                f"train.batch_size={batch} × grad_accumulation={self.cfg['grad_accumulation']} is larger than "
                f"the {per_rank} training images per rank"
            )
        self.total_steps = self.steps_per_epoch * self.cfg["epochs"]
        if self.cfg["max_steps"] is not None:
            self.total_steps = min(self.total_steps, self.cfg["max_steps"])

        params = [p for p in list(self.model.parameters()) + list(self.head.parameters()) if p.requires_grad]
        self.params = params
        lazy = [self.head.weight] if self.cfg["sparse_update"] and hasattr(self.head, "weight") else []
        self.optimizer = optim.SGD(params, lr=self.cfg["lr"], momentum=self.cfg["momentum"],
                                   weight_decay=self.cfg["weight_decay"], lazy=lazy)
        self.grad_sync = distributed.GradientSync(self.model.parameters(), self.head)
        factor = lr_factor(self.cfg["schedule"], self.steps_per_epoch, self.cfg["epochs"], self.cfg["milestones"],
                           self.cfg["gamma"], self.cfg["warmup_epochs"], self.cfg["power"])
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, factor)
        self.scaler = distributed.grad_scaler(self.cfg["amp"] == "fp16")
        self.step = 0
        self.skipped_steps = 0
        self._val_cache: dict[Path, tuple[np.ndarray, np.ndarray]] = {}
        resume = distributed.auto_resume(self.out, resume)  # after a torchrun restart: output/last.pt
        if resume is not None:
            self.load_state(distributed.load_checkpoint(resume, self.head, self.optimizer))

    # ------------------------------------------------------------------ state

    @property
    def epoch(self) -> int:
        return self.step // self.steps_per_epoch

    def meta(self) -> dict[str, Any]:
        threshold = getattr(self.head, "threshold", None)
        return {
            "backbone": self.config["model"]["backbone"],
            "embedding_size": self.config["model"]["embedding_size"],
            "head": self.head_name,
            "num_classes": self.num_classes,
            "threshold": None if threshold is None else float(threshold),
            "input": models.input_contract(self.model),
            "unitsface_version": __version__,
        }

    def state(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "config": self.config,
            "meta": self.meta(),
            "model": self.model.state_dict(),
            "head": self.head.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": capture_rng(),
            "epoch": self.epoch,
            "step": self.step,
            "skipped_steps": self.skipped_steps,
        }

    def load_state(self, ckpt: dict[str, Any]) -> None:
        meta = ckpt["meta"]
        if models.family(meta["backbone"]) != models.family(self.config["model"]["backbone"]):
            raise UnitsfaceError(
                f"checkpoint backbone {meta['backbone']!r} cannot be loaded into {self.config['model']['backbone']!r}"
            )
        if meta["num_classes"] != self.num_classes:
            raise UnitsfaceError(
                f"checkpoint has {meta['num_classes']} classes but the training data has {self.num_classes}"
            )
        try:
            self.model.load_state_dict(ckpt["model"])
            self.head.load_state_dict(ckpt["head"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise UnitsfaceError(f"checkpoint does not match this config: {str(exc).splitlines()[0]}") from None
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.step = int(ckpt["step"])
        self.skipped_steps = int(ckpt.get("skipped_steps", 0))
        restore_rng(ckpt["rng"])

    def save(self, name: str = "last.pt") -> Path:
        """Every rank calls this: with several ranks each writes its class shard (distributed.py)."""
        path = self.out / name
        self.optimizer.catch_up()  # lazily updated rows are written in their dense state
        distributed.save_checkpoint(self.state(), path, self.head, self.optimizer)
        return path

    # ------------------------------------------------------------------ loop

    def loader(self, epoch: int, start_micro: int) -> DataLoader:
        return make_loader(self.dataset, self.cfg["batch_size"], self.cfg["workers"], self.cfg["seed"], epoch,
                           start_batch=start_micro, pin_memory=self.device.type == "cuda")

    def autocast(self):
        if self.cfg["amp"] == "none":
            return nullcontext()
        dtype = torch.bfloat16 if self.cfg["amp"] == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def micro_step(self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator,
                   sync: bool = True) -> float:
        """One forward/backward; `sync=False` on accumulation micro-steps skips DDP's all-reduce."""
        if self.cfg["flip"]:
            images = flip_batch(images, generator)
        x = normalize_batch(images.to(self.device, non_blocking=True))
        labels = labels.to(self.device, non_blocking=True)
        with distributed.no_sync(self.net, skip=not sync):
            with self.autocast():
                embeddings = self.net(x)
            loss = self.head(embeddings.float(), labels)
            if not torch.isfinite(loss):
                raise UnitsfaceError(f"loss became {loss.item()} at step {self.step}; lower train.lr or check the data")
            self.scaler.scale(loss / self.cfg["grad_accumulation"]).backward()
        return float(loss.detach())

    def optimizer_step(self) -> None:
        self.grad_sync.reduce_head()  # replicated head parameters: sum of the class shards' parts
        self.scaler.unscale_(self.optimizer)
        if self.cfg["grad_clip"] > 0:
            self.grad_sync.clip_(self.cfg["grad_clip"])  # the global norm, the same on every rank
        scale_before = self.scaler.get_scale()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.scaler.is_enabled() and self.scaler.get_scale() < scale_before:
            self.skipped_steps += 1  # N6: GradScaler skipped a step with inf/NaN gradients
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        if self.cfg["clamp_prelu"] is not None:
            models.clamp_prelu_(self.model, self.cfg["clamp_prelu"])
        self.step += 1

    def fit(self) -> dict[str, Any]:
        """Train to `train.epochs` (or `train.max_steps`), validating after every epoch and at the end."""
        from unitsface.training.logging import RunLogger

        self.out.mkdir(parents=True, exist_ok=True)
        log = RunLogger(self.out, enabled=self.main, total_steps=self.total_steps,
                        tensorboard=self.cfg["tensorboard"], resumed_at=self.step)
        if self.main:
            (self.out / "config.json").write_text(json.dumps(self.config, indent=2))
        accum = self.cfg["grad_accumulation"]
        results: dict[str, Any] = {}
        self.model.train()
        self.head.train()
        try:
            while self.step < self.total_steps:
                epoch = self.epoch
                self.head.set_epoch(epoch)
                first_micro = (self.step - epoch * self.steps_per_epoch) * accum
                micro = first_micro
                losses: list[float] = []
                tick = time.perf_counter()
                for images, labels in self.loader(epoch, first_micro):
                    seed = (self.cfg["seed"] * 1_000_003 + epoch) * 1_000_003 + micro
                    losses.append(self.micro_step(images, labels, torch.Generator().manual_seed(seed),
                                                  sync=(micro + 1) % accum == 0))
                    micro += 1
                    if micro % accum:
                        continue
                    self.optimizer_step()
                    now = time.perf_counter()
                    log.step(self.step, epoch, sum(losses) / len(losses), self.scheduler.get_last_lr()[0],
                             len(losses) * self.cfg["batch_size"] * parallel.world_size() / max(now - tick, 1e-9),
                             self.head_stats(), every=self.cfg["log_every"])
                    losses, tick = [], now
                    if self.cfg["checkpoint_every"] and self.step % self.cfg["checkpoint_every"] == 0:
                        self.save()
                    if self.step >= self.total_steps or micro >= self.steps_per_epoch * accum:
                        break
                if self.step % self.steps_per_epoch == 0 or self.step >= self.total_steps:
                    self.save()
                    results = self.validate()
                    log.validation(self.step, self.epoch, results)
        finally:
            log.close()
        if self.main:
            self.write_report(results)
        return results

    def head_stats(self) -> dict[str, float]:
        """Scalars worth logging each step: the learned threshold t = b/s and bias b where present."""
        stats: dict[str, float] = {}
        threshold = getattr(self.head, "threshold", None)
        if threshold is not None:
            stats["threshold"] = float(threshold)
        if self.skipped_steps:
            stats["skipped_steps"] = float(self.skipped_steps)
        return stats

    # ------------------------------------------------------------------ evaluation

    def validate(self) -> dict[str, Any]:
        """10-fold verification on every data.val set (rank 0; flip-sum embeddings)."""
        from unitsface.evaluation.verification import evaluate_pairs

        results: dict[str, Any] = {}
        if not self.main:
            return results
        for path in self.val_paths:
            emb1, emb2, issame = self.embed_bin(path)
            results[path.stem] = evaluate_pairs(emb1, emb2, issame)
        self.model.train()
        return results

    def embed_bin(self, path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        from unitsface.evaluation.embed import embed_images

        if path not in self._val_cache:
            self._val_cache[path] = load_bin_images(path)
        images, issame = self._val_cache[path]
        emb = embed_images(self.model, images, batch_size=128, device=self.device)
        return emb[0::2], emb[1::2], issame

    def write_report(self, results: dict[str, Any]) -> None:
        from unitsface.evaluation.report import write_report

        threshold = getattr(self.head, "threshold", None)
        extra = {
            "backbone": self.config["model"]["backbone"],
            "head": self.head_name,
            "classes": self.num_classes,
            "steps": self.step,
            "learned threshold (b/s)": "—" if threshold is None else f"{float(threshold):.4f}",
            "checkpoint": str(self.out / "last.pt"),
        }
        write_report(self.out, results, extra)


def load_bin_images(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Decode every image of an insightface .bin into one uint8 N×112×112×3 array."""
    from unitsface.data.bins import load_bin
    from unitsface.data.images import decode, to_face_image

    encoded, issame = load_bin(path)
    images = np.stack([to_face_image(decode(b), 112) for b in encoded])
    return images, issame


def train(config: dict[str, Any], resume: str | Path | None = None) -> dict[str, Any]:
    """Build a Trainer from a validated config and run it; returns the final validation results."""
    try:
        return Trainer(config, resume=resume).fit()
    finally:
        distributed.teardown()
