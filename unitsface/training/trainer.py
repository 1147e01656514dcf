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
import sys
import time
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader

from unitsface import __version__, heads, models, optim, parallel
from unitsface.config import backbone_params
from unitsface.data.cache import cached_synthetic_dataset
from unitsface.data.dataset import BadRecords, EpochLoader, RecordDataset, normalize_batch
from unitsface.data.synthetic import HELDOUT_FOLDER
from unitsface.errors import UnitsfaceError, one_line
from unitsface.evaluation.embed import embed_images
from unitsface.evaluation.report import plot_threshold, write_report
from unitsface.evaluation.sets import load_validation_sets
from unitsface.evaluation.threshold import operating_point, primary_set
from unitsface.io import remove_stale_temp_files
from unitsface.training import distributed
from unitsface.training.checkpoint import FORMAT, VERSION, load_checkpoint
from unitsface.training.logging import RunLogger, threshold_history
from unitsface.training.schedule import lr_factor
from unitsface.training.selection import ValidationMetric

Batch = tuple[torch.Tensor, torch.Tensor]  # uint8 images, int64 labels


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
    """The training folder and the validation sets: data.val, or for the synthetic set (made once,
    cached) its own val.bin and held-out identities when data.val is not given."""
    data = config["data"]
    val = [Path(p).expanduser() for p in data["val"]]
    if data["train"] == "synthetic":
        folder = cached_synthetic_dataset(cache=data["cache"], **data["synthetic"])
        val = val or [folder / "val.bin", folder / HELDOUT_FOLDER]
    else:
        folder = Path(data["train"]).expanduser()
        if not folder.is_dir():
            raise UnitsfaceError(f"data.train folder not found: {folder}")
        for name in ("train.rec", "train.idx"):
            if not (folder / name).is_file():
                raise UnitsfaceError(f"data.train folder {folder} has no {name}")
    for path in val:
        if not path.exists():
            raise UnitsfaceError(f"data.val set not found: {path}")
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
    """Random horizontal flip of half the NCHW images, decided by `generator` (a CPU generator: the draw is
    the same on every device), done where the images are, with no host round trip."""
    n = images.shape[0]  # the mask is drawn for the global batch, so flips do not depend on the world size
    mask = torch.rand(n * parallel.world_size(), generator=generator)[parallel.rank() * n :][:n] < 0.5
    mask = mask.to(images.device, non_blocking=True).view(-1, *[1] * (images.dim() - 1))
    return torch.where(mask, images.flip(-1), images)


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
        self.bad_records = BadRecords(self.dataset)  # fed by each batch; stops past data.max_bad_fraction
        self._loader: EpochLoader | None = None
        self.num_classes = self.dataset.num_classes
        mcfg, hcfg = config["model"], dict(config["head"])
        self.model = models.build(mcfg["backbone"], embedding_size=mcfg["embedding_size"],
                                  **backbone_params(config)).to(self.device)
        if mcfg["sync_batchnorm"]:  # global-batch BatchNorm statistics; no-op in one process
            self.model = distributed.sync_batchnorm(self.model, self.device)
        if self.cfg["channels_last"]:
            self.model = self.model.to(memory_format=torch.channels_last)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # one input size (112×112): find the fastest kernels once
        self.net = distributed.wrap_model(self.model, self.device)  # DDP (summed gradients) when distributed
        self.eager_net = self.net
        if self.cfg["compile"]:
            self.net = torch.compile(self.net)
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

        groups = optim.param_groups(self.model, self.head, self.cfg["lr"], self.cfg["weight_decay"],
                                    self.cfg["head_lr_scale"], self.cfg["no_decay_norm_bias"],
                                    self.cfg["bias_weight_decay"])
        self.params = [p for group in groups for p in group["params"]]
        proxies = self.head.proxy_weight()
        lazy = [proxies] if self.cfg["sparse_update"] and proxies is not None else []
        self.optimizer = optim.build(self.cfg["optimizer"], groups, lr=self.cfg["lr"], momentum=self.cfg["momentum"],
                                     weight_decay=self.cfg["weight_decay"], lazy=lazy)
        self.grad_sync = distributed.GradientSync(self.model.parameters(), self.head)
        factor = lr_factor(self.cfg["schedule"], self.steps_per_epoch, self.cfg["epochs"], self.cfg["milestones"],
                           self.cfg["gamma"], self.cfg["warmup_epochs"], self.cfg["power"])
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, factor)
        self.scaler = distributed.grad_scaler(self.cfg["amp"], self.device)
        # Skipped steps (inf/NaN gradients), counted on the device: all of them, and the current run of them.
        self.skips = torch.zeros(2, device=self.device)
        # The weights validated and deployed: an exponential moving average of the backbone when train.ema is set.
        self.ema = None if self.cfg["ema"] is None else AveragedModel(
            self.model, multi_avg_fn=get_ema_multi_avg_fn(self.cfg["ema"]), use_buffers=True)
        self.keep_best = None if self.cfg["keep_best"] is None else ValidationMetric.parse(self.cfg["keep_best"])
        self.best: dict[str, Any] | None = None  # {"metric", "value", "step"} of best.pt
        self.step = 0
        # Read once, up front (a bad set fails in the first second); only rank 0 validates.
        self.val_sets = load_validation_sets(self.val_paths) if self.main else []
        self.operating_points: dict[str, dict[str, Any]] = {}  # of the learned threshold, last validation
        resume = distributed.auto_resume(self.out, resume)  # after a torchrun restart: output/last.pt
        if resume is not None:
            self.load_state(distributed.load_checkpoint(resume, self.head, self.optimizer))
        else:  # a resumed run has its own weights
            self.load_initial_weights()

    # ------------------------------------------------------------------ state

    @property
    def epoch(self) -> int:
        return self.step // self.steps_per_epoch

    def meta(self) -> dict[str, Any]:
        """What a deployment needs: the backbone, its input contract, and the learned threshold with its
        operating point on the validation sets (`threshold_set`: the set a deployment quotes)."""
        threshold = self.head.threshold
        return {
            "backbone": self.config["model"]["backbone"],
            "embedding_size": self.config["model"]["embedding_size"],
            "head": self.head_name,
            "num_classes": self.num_classes,
            "threshold": None if threshold is None else float(threshold),
            "threshold_operating_point": self.operating_points,
            "threshold_set": primary_set(self.operating_points),
            "ema": self.cfg["ema"],  # the deployed weights ("model_ema") are the moving average when set
            "input": models.input_contract(self.model),
            "unitsface_version": __version__,
        }

    def state(self) -> dict[str, Any]:
        averaged = {} if self.ema is None else {"model_ema": self.ema.module.state_dict(),
                                                "ema_updates": int(self.ema.n_averaged)}
        return {
            **averaged,
            "best": self.best,
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
            "skip_run": int(self.skips[1]),
            "bad_records": self.bad_records.state(),
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
        self.skips = torch.tensor([float(ckpt.get("skipped_steps", 0)), float(ckpt.get("skip_run", 0))],
                                  device=self.device)
        self.operating_points = dict(meta.get("threshold_operating_point") or {})
        self.best = ckpt.get("best")
        if self.ema is not None and "model_ema" in ckpt:  # else the average starts again from these weights
            self.ema.module.load_state_dict(ckpt["model_ema"])
            self.ema.n_averaged.fill_(int(ckpt["ema_updates"]))
        self.bad_records.load(ckpt.get("bad_records", ()))
        restore_rng(ckpt["rng"])

    def load_initial_weights(self) -> None:
        """`model.pretrained` (a backbone file of any known layout) or `train.init_from` (a unitsface run:
        its backbone, and its head state when head and classes are the same); prints what was loaded."""
        pretrained, init_from = self.config["model"]["pretrained"], self.cfg["init_from"]
        messages = []
        if pretrained is not None:
            messages.append(models.load_pretrained(self.model, pretrained, f"model.pretrained {pretrained}").summary())
        if init_from is not None:
            ckpt = load_checkpoint(init_from)
            source = f"train.init_from {init_from}"
            backbone = models.load_pretrained(self.model, init_from, f"{source} (backbone)", weights=ckpt)
            messages.append(backbone.summary())
            meta = ckpt["meta"]
            if (meta["head"], meta["num_classes"]) == (self.head_name, self.num_classes):
                state = distributed.head_rows(ckpt, init_from, self.head)
                messages.append(models.load_matching(self.head, state, f"{source} (head)").summary())
            else:
                messages.append(f"{source}: head not loaded (the checkpoint's is {meta['head']} over "
                                f"{meta['num_classes']} classes, this run's {self.head_name} over {self.num_classes}); "
                                "it starts fresh")
        if self.main:
            for message in messages:
                print(message, flush=True)

    def save(self, name: str = "last.pt") -> Path:
        """Every rank calls this: with several ranks each writes its class shard (distributed.py)."""
        path = self.out / name
        self.optimizer.catch_up()  # lazily updated rows are written in their dense state
        distributed.save_checkpoint(self.state(), path, self.head, self.optimizer)
        return path

    # ------------------------------------------------------------------ loop

    def loader(self, epoch: int, start_micro: int) -> DataLoader:
        """Epoch `epoch`'s batches from micro-batch `start_micro`, from one loader whose workers live as long as
        the run (built at the first call, so a Trainer that only validates starts none)."""
        if self._loader is None:
            self._loader = EpochLoader(self.dataset, self.cfg["batch_size"], self.cfg["workers"], self.cfg["seed"],
                                       pin_memory=self.device.type == "cuda", prefetch=self.cfg["prefetch_factor"])
        return self._loader(epoch, start_micro)

    def autocast(self):
        if self.cfg["amp"] == "none":
            return nullcontext()
        dtype = torch.bfloat16 if self.cfg["amp"] == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def micro_step(self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator,
                   sync: bool = True) -> torch.Tensor:
        """One forward/backward; `sync=False` on accumulation micro-steps skips DDP's all-reduce. Returns the
        loss on the device: nothing here waits for the device (the trainer reads numbers when it logs)."""
        x = normalize_batch(images.to(self.device, non_blocking=True))
        if self.cfg["flip"]:
            x = flip_batch(x, generator)
        if self.cfg["channels_last"]:
            x = x.contiguous(memory_format=torch.channels_last)
        labels = labels.to(self.device, non_blocking=True)
        with distributed.no_sync(self.eager_net, skip=not sync):
            with self.autocast():
                embeddings = self.backbone(x)
            # The loader's labels are the dataset's, whose range was checked when it was read.
            loss = self.head(embeddings.float(), labels, checked=True)
            self.scaler.scale(loss / self.cfg["grad_accumulation"]).backward()
        return loss.detach()

    def backbone(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone's forward; a compiled backbone that fails (torch.compile compiles at the first call and
        needs a working compiler tool chain for the device) falls back to eager once, with a message."""
        if self.net is self.eager_net:
            return self.net(x)
        try:
            return self.net(x)
        except Exception as exc:  # dynamo / inductor raise their own many exception types
            first = one_line(exc)
            print(f"train.compile: torch.compile cannot compile the backbone here ({first[:200]}); "
                  "training without it", file=sys.stderr, flush=True)
            self.net = self.eager_net
            return self.net(x)

    def optimizer_step(self) -> None:
        """Clip, step and count: a step with inf/NaN gradients (or loss) is skipped by the scaler and the fused
        optimiser on the device, and counted there (`skipped_steps`, methods.md N6)."""
        self.grad_sync.reduce_head()  # replicated head parameters: sum of the class shards' parts
        self.scaler.unscale_(self.optimizer)
        if self.cfg["grad_clip"] > 0:
            self.grad_sync.clip_(self.cfg["grad_clip"])  # the global norm, the same on every rank
        self.scaler.step(self.optimizer)
        found_inf = getattr(self.optimizer, "last_found_inf", None)  # the scaler's verdict, kept on the device
        if found_inf is not None:
            skipped = found_inf.to(self.skips.device, torch.float32).sum().clamp(max=1.0)  # (1,) when sharded
            self.skips[0] += skipped
            self.skips[1] = (self.skips[1] + 1.0) * skipped
        distributed.update_scaler(self.scaler, self.cfg["amp"])
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update_parameters(self.model)
        if self.cfg["clamp_prelu"] is not None:
            models.clamp_prelu_(self.model, self.cfg["clamp_prelu"])
        self.step += 1

    @property
    def skipped_steps(self) -> int:
        return int(self.skips[0])

    def check_skips(self) -> None:
        """Stop once `train.max_skipped_steps` steps in a row were skipped (read when logging, not every step),
        naming the head state that is not finite, if any."""
        run = int(self.skips[1])
        if run < self.cfg["max_skipped_steps"]:
            return
        bad = [name for name, t in self.head.state_dict().items() if t.is_floating_point() and not t.isfinite().all()]
        state = f"non-finite head state: {', '.join(bad)}" if bad else "the head state is finite"
        raise UnitsfaceError(f"{run} optimizer steps in a row had inf/NaN gradients (step {self.step}, "
                             f"train.max_skipped_steps={self.cfg['max_skipped_steps']}); {state}; lower train.lr, "
                             "use bf16 instead of fp16, or check the data")

    def step_batches(self, epoch: int, first_micro: int) -> Iterator[tuple[int, list[Batch]]]:
        """(index of the first micro-batch, the `grad_accumulation` micro-batches) of each optimizer step left in
        the epoch; an incomplete last group is dropped, as the step count assumes."""
        accum, micro, group = self.cfg["grad_accumulation"], first_micro, []
        for images, labels, bad in self.loader(epoch, first_micro):
            self.bad_records.add(bad)
            group.append((images, labels))
            if len(group) == accum:
                yield micro, group
                micro, group = micro + accum, []

    def train_step(self, epoch: int, micro: int, batches: list[Batch]) -> torch.Tensor:
        """One optimizer step over its micro-batches; they share one Partial FC column sample, drawn from the
        labels of all of them (methods.md §3.2). Returns the mean micro-batch loss, on the device."""
        if any(labels.dtype != torch.int64 for _, labels in batches):
            raise UnitsfaceError(f"labels must be int64 end to end, the loader gave {batches[0][1].dtype}")
        step_labels = torch.cat([labels for _, labels in batches]).to(self.device, non_blocking=True)
        loss = torch.zeros((), device=self.device)
        with self.head.step_columns(step_labels):
            for k, (images, labels) in enumerate(batches):
                seed = (self.cfg["seed"] * 1_000_003 + epoch) * 1_000_003 + micro + k
                loss += self.micro_step(images, labels, torch.Generator().manual_seed(seed),
                                        sync=k == len(batches) - 1)
        self.optimizer_step()
        return loss / len(batches)

    def fit(self) -> dict[str, Any]:
        """Train to `train.epochs` (or `train.max_steps`), validating every `train.val_every` steps (0: after every
        epoch) and at the end, with a checkpoint at every validation and epoch end."""
        self.out.mkdir(parents=True, exist_ok=True)
        log = RunLogger(self.out, enabled=self.main, total_steps=self.total_steps,
                        tensorboard=self.cfg["tensorboard"], resumed_at=self.step, wandb=self.cfg["wandb"],
                        config=self.config)
        if self.main:
            (self.out / "config.json").write_text(json.dumps(self.config, indent=2))
            remove_stale_temp_files(self.out)  # a killed run's half-written checkpoint or report
        accum = self.cfg["grad_accumulation"]
        results: dict[str, Any] = {}
        self.model.train()
        self.head.train()
        try:
            while self.step < self.total_steps:
                epoch = self.epoch
                self.head.set_epoch(epoch)
                tick = time.perf_counter()
                for micro, batches in self.step_batches(epoch, (self.step - epoch * self.steps_per_epoch) * accum):
                    loss = self.train_step(epoch, micro, batches)
                    now = time.perf_counter()
                    if log.due(self.step, self.cfg["log_every"]):  # the only place a step's numbers leave the device
                        self.check_skips()
                        log.step(self.step, epoch, float(loss), self.scheduler.get_last_lr()[0],
                                 accum * self.cfg["batch_size"] * parallel.world_size() / max(now - tick, 1e-9),
                                 self.head_stats())
                    else:
                        log.advance()
                    epoch_end, done = self.step % self.steps_per_epoch == 0, self.step >= self.total_steps
                    every = self.cfg["val_every"]
                    validating = done or (self.step % every == 0 if every else epoch_end)
                    improved = False
                    if validating:
                        results = self.validate()  # before the checkpoint, which then carries the operating points
                        improved = self.track_best(results)
                    if validating or epoch_end or (self.cfg["checkpoint_every"]
                                                   and self.step % self.cfg["checkpoint_every"] == 0):
                        self.save()
                    if improved:
                        self.save("best.pt")
                    if validating:
                        log.validation(self.step, epoch, results, self.operating_points)
                    tick = time.perf_counter()
                    if epoch_end or done:
                        break
        finally:
            log.close()
        if self.main:
            results = results or self.validate()  # resumed after the final checkpoint: nothing left to train
            self.write_report(results)
        return results

    def head_stats(self) -> dict[str, Any]:
        """Worth logging each step: the learned threshold t = b/s where present, a head's own last-step numbers
        (AnchorFace's anchor threshold, soft TAR and FAR), the skipped steps, the count of bad records met and
        their first ids."""
        stats: dict[str, Any] = {k: float(v) for k, v in getattr(self.head, "last_stats", {}).items()}
        if self.head.threshold is not None:
            stats["threshold"] = float(self.head.threshold)
        stats["skipped_steps"] = float(self.skipped_steps)
        stats.update(self.bad_records.stats())
        return stats

    # ------------------------------------------------------------------ evaluation

    def validate(self) -> dict[str, Any]:
        """Every validation set on rank 0 (flip-sum embeddings): its protocol's results and, for a head that
        learns a threshold, that threshold's operating point on the set (`self.operating_points`)."""
        if not self.main:
            return {}
        thresholds = self.head.learned_thresholds()
        model = self.model if self.ema is None else self.ema.module
        results, points = {}, {}
        for val_set in self.val_sets:
            emb = embed_images(model, val_set.images, batch_size=128, device=self.device)
            results[val_set.name] = result = val_set.evaluate(emb)
            if thresholds:
                pairs = result["pair_scores"]
                points[val_set.name] = operating_point(pairs["scores"], pairs["issame"], thresholds)
        self.operating_points = points
        return results

    def track_best(self, results: dict[str, Any]) -> bool:
        """Whether `train.keep_best` improved with these results (rank 0 reads them, every rank gets the answer,
        since writing best.pt is collective)."""
        if self.keep_best is None:
            return False
        improved = False
        if self.main:
            value = self.keep_best.read(results)
            if self.keep_best.better(value, None if self.best is None else self.best["value"]):
                self.best, improved = {"metric": self.cfg["keep_best"], "value": value, "step": self.step}, True
        return distributed.broadcast_from_main(improved)

    def write_report(self, results: dict[str, Any]) -> None:
        """report.md, roc.png, metrics.json, and threshold.png for a head with a learned threshold."""
        extra = {
            "backbone": self.config["model"]["backbone"],
            "head": self.head_name,
            "classes": self.num_classes,
            "steps": self.step,
            "learned threshold": "—" if self.head.threshold is None else
            ", ".join(f"{k} = {v:.4f}" for k, v in self.head.learned_thresholds().items()),
            "checkpoint": str(self.out / "last.pt"),
        }
        write_report(self.out, results, extra, self.operating_points)
        name = primary_set(self.operating_points)
        if name is not None and name in results:
            pairs = results[name]["pair_scores"]
            plot_threshold(threshold_history(self.out / "metrics.jsonl", name), pairs["scores"], pairs["issame"],
                           float(self.head.threshold), name, self.out / "threshold.png")


def train_run(config: dict[str, Any], resume: str | Path | None = None) -> tuple[Trainer, dict[str, Any]]:
    """Build a Trainer from a validated config and run it; returns it (its operating points, head, model)
    and the final validation results."""
    try:
        trainer = Trainer(config, resume=resume)
        return trainer, trainer.fit()
    finally:
        distributed.teardown()


def train(config: dict[str, Any], resume: str | Path | None = None) -> dict[str, Any]:
    """Build a Trainer from a validated config and run it; returns the final validation results."""
    return train_run(config, resume)[1]
