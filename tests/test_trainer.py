"""The trainer end to end on a tiny synthetic set: outputs, exact resume, starting weights, W&B, CLI, bad input."""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from data_helpers import damage

from unitsface.cli import main
from unitsface.config import load_config
from unitsface.data.cache import cached_synthetic_dataset
from unitsface.data.dataset import normalize_batch
from unitsface.errors import UnitsfaceError
from unitsface.evaluation.embed import embed_images
from unitsface.models import load_backbone
from unitsface.training.checkpoint import load_checkpoint
from unitsface.training.trainer import Trainer, flip_batch

TINY = [
    "data.synthetic.identities=16",
    "data.synthetic.images_per_identity=8",
    "data.synthetic.val_pairs=40",
    "data.synthetic.heldout_identities=5",
    "data.synthetic.heldout_images=3",
    "model.embedding_size=32",
    "train.batch_size=16",
    "train.epochs=2",
    "train.workers=0",
    "train.log_every=1",
    "train.warmup_epochs=0",
]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def tiny_config(cache: Path, out: Path, *extra: str) -> dict:
    return load_config("demo", [*TINY, f"data.cache={cache}", f"output={out}", *extra])


def losses(out: Path) -> dict[int, float]:
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in lines if "loss" in r}


def test_train_writes_outputs_and_checkpoint_loads_weights_only(cache, tmp_path):
    out = tmp_path / "run"
    results = Trainer(tiny_config(cache, out, "head.name=cosface")).fit()
    assert {"val", "heldout"} == set(results)  # the synthetic set's pairs and its held-out identities
    assert results["heldout"]["n_impostor"] == 9 * 5 * 4 // 2 and results["heldout"]["protocol"] == "all pairs"
    for name in ("last.pt", "metrics.jsonl", "report.md", "roc.png", "config.json"):
        assert (out / name).is_file(), name
    assert not (out / "threshold.png").exists()  # CosFace learns no threshold
    assert "threshold_operating_point" not in json.loads((out / "metrics.json").read_text())
    ckpt = torch.load(out / "last.pt", weights_only=True)
    steps_per_epoch = (16 * 8) // 16
    assert ckpt["step"] == 2 * steps_per_epoch and ckpt["epoch"] == 2
    assert ckpt["meta"]["backbone"] == "tinyfacenet" and ckpt["meta"]["num_classes"] == 16
    assert "val" in (out / "report.md").read_text()
    assert len(losses(out)) == 2 * steps_per_epoch


@pytest.mark.parametrize("scale_out", [(), ("head.sample_rate=0.5", "train.sparse_update=true",
                                              "head.memory_dtype=bfloat16"),
                                       ("train.optimizer=adamw", "train.lr=0.002", "train.weight_decay=0.1",
                                        "train.no_decay_norm_bias=true", "train.head_lr_scale=10"),
                                       ("data.augment.mask_prob=0.5",)],
                         ids=["plain", "scale_out", "adamw_groups", "masks"])
def test_resume_continues_the_same_loss_curve(cache, tmp_path, scale_out):
    """Also with Partial FC, lazily updated rows and a bf16 memory, or AdamW's moments over four parameter
    groups: their state survives the checkpoint; and with mask augmentation, whose draws depend on (seed,
    epoch, image) only."""
    full, part = tmp_path / "full", tmp_path / "part"
    # has memory + lazily initialised bias: state matters
    head = ["head.name=unitsface", "head.s=16.0", *scale_out]
    Trainer(tiny_config(cache, full, *head)).fit()
    Trainer(tiny_config(cache, part, *head, "train.max_steps=11")).fit()
    assert load_checkpoint(part / "last.pt")["step"] == 11
    Trainer(tiny_config(cache, part, *head), resume=part / "last.pt").fit()
    a, b = losses(full), losses(part)
    assert sorted(a) == sorted(b) == list(range(1, 17))
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-6), step
    # the USS term switched on in epoch 1, after the resume point: the loss jumps
    assert a[9] > a[8]
    memory = load_checkpoint(part / "last.pt")["head"]["memory.features"]
    assert memory.dtype == (torch.bfloat16 if "head.memory_dtype=bfloat16" in scale_out else torch.float32)


def all_pair_rates(embeddings: np.ndarray, labels: np.ndarray, threshold: float) -> tuple[int, int, int, int]:
    """(true accepts, genuine, false accepts, impostor) of every unordered pair, by loops."""
    e = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    counts = [0, 0, 0, 0]
    for i in range(len(e)):
        for j in range(i + 1, len(e)):
            same, accept = labels[i] == labels[j], float(e[i] @ e[j]) >= threshold
            counts[0 if same else 2] += accept
            counts[1 if same else 3] += 1
    return tuple(counts)


def test_learned_threshold_operating_point_everywhere(cache, tmp_path):
    """Issue 10: the learned t's TAR/FAR on each held-out set, exact over all pairs, in metrics.json,
    metrics.jsonl (every validation), the checkpoint, report.md and threshold.png."""
    out = tmp_path / "uss"
    trainer = Trainer(tiny_config(cache, out, "head.name=unitsface", "head.s=16.0"))
    trainer.fit()
    ckpt = load_checkpoint(out / "last.pt")
    meta = ckpt["meta"]
    points = meta["threshold_operating_point"]
    assert set(points) == {"val", "heldout"} and meta["threshold_set"] == "heldout"  # 90 impostor pairs > 20
    t = meta["threshold"]
    assert t == pytest.approx(trainer.head.threshold) and points["heldout"]["threshold"] == t

    heldout = trainer.val_sets[1]
    emb = embed_images(trainer.model, heldout.images)
    true_accepts, genuine, false_accepts, impostor = all_pair_rates(emb, heldout.labels, t)
    point = points["heldout"]
    assert (point["n_genuine"], point["n_impostor"]) == (genuine, impostor) == (15, 90)
    assert point["tar"] == pytest.approx(true_accepts / genuine)
    assert point["far"] == (false_accepts / impostor if false_accepts else f"< 1/{impostor}")
    assert point["threshold_at_far"] == {"0.01": "not measurable", "0.001": "not measurable",
                                         "0.0001": "not measurable"}  # 90 pairs cannot read FAR 1e-2
    assert -1.0 <= point["balanced_threshold"] <= 1.0

    assert json.loads((out / "metrics.json").read_text())["threshold_operating_point"] == points
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    validations = [r for r in records if "validation" in r]
    assert [r["step"] for r in validations] == [8, 16]
    assert validations[-1]["threshold_operating_point"] == points
    report = (out / "report.md").read_text()
    assert report.index("## Learned threshold") < report.index("## Pair sets")
    assert f"the learned threshold {t:.4f} accepts {100 * point['tar']:.1f} % of genuine pairs" in report
    assert (out / "threshold.png").stat().st_size > 10_000


def test_validation_sets_from_folders_and_records(cache, tmp_path, shared_dir):
    """data.val takes .bin pair lists, folders of identities and .rec sets; too few identities is an error."""
    from unitsface.data.tools import import_images, pack

    raw, faces = tmp_path / "raw", tmp_path / "att"
    for person in ("s1", "s2", "s3"):  # 3 people, 30 images
        shutil.copytree(shared_dir / "data" / "att_faces" / person, raw / person)
    import_images(raw, faces, workers=1)
    pack(faces, tmp_path / "att_rec", workers=1)
    val_bin = next(cache.glob("synthetic-*")) / "val.bin"
    out = tmp_path / "run"
    results = Trainer(tiny_config(cache, out, f"data.val=[{val_bin}, {faces}, {tmp_path / 'att_rec'}]",
                                  "train.max_steps=2")).fit()
    assert list(results) == ["val", "att", "att_rec"]
    assert results["att"]["n_impostor"] == results["att_rec"]["n_impostor"] == 10 * 10 * 3
    assert results["att"]["auc"] == pytest.approx(results["att_rec"]["auc"], abs=1e-3)  # same faces, re-encoded
    lonely = tmp_path / "lonely"
    (lonely / "one").mkdir(parents=True)
    shutil.copy(next((faces / "s1").iterdir()), lonely / "one" / "a.jpg")
    with pytest.raises(UnitsfaceError, match="has 1 identity; all-pairs scoring needs at least 2"):
        Trainer(tiny_config(cache, tmp_path / "bad", f"data.val=[{lonely}]"))


def test_accumulation_micro_batches_share_one_column_sample(cache, tmp_path):
    """methods.md §3.2: UCE's r-sampled columns are drawn once per optimizer step from the positives of all
    its micro-batches; two micro-batches of 8 then give the gradient of one batch of 16 with those columns."""
    t = Trainer(tiny_config(cache, tmp_path / "acc", "head.name=uce", "head.sample_rate=0.25",
                            "train.batch_size=8", "train.grad_accumulation=2"))
    (_, batches), = itertools.islice(t.step_batches(0, 0), 1)
    images = torch.cat([b[0] for b in batches])
    labels = torch.cat([b[1] for b in batches])
    with torch.no_grad():
        x = t.model.eval()(normalize_batch(images))  # the head's property, free of BatchNorm's batch statistics
    torch.manual_seed(5)
    with t.head.step_columns(labels):
        for chunk, y in zip(x.split(8), labels.split(8)):
            (t.head(chunk, y) / 2).backward()
    accumulated = t.head.proxies.weight.grad.clone()
    t.optimizer.zero_grad()
    torch.manual_seed(5)
    t.head(x, labels).backward()
    kept = accumulated.abs().sum(1) > 0
    assert kept.sum() == max(round(0.25 * 16), len(labels.unique())) and kept[labels].all()
    torch.testing.assert_close(accumulated, t.head.proxies.weight.grad, rtol=1e-4, atol=1e-6)


def test_keep_best_writes_the_best_validation_and_survives_resume(cache, tmp_path):
    """train.keep_best: best.pt holds the step whose validation was best, read back from metrics.jsonl; a resumed
    run keeps comparing against it."""
    out = tmp_path / "best"
    extra = ("head.name=cosface", "train.val_every=3", "train.keep_best=heldout:auc")
    Trainer(tiny_config(cache, out, *extra, "train.max_steps=7")).fit()
    Trainer(tiny_config(cache, out, *extra), resume=out / "last.pt").fit()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    aucs = {r["step"]: r["validation"]["heldout"]["auc"] for r in records if "validation" in r}
    assert sorted(aucs) == [3, 6, 7, 9, 12, 15, 16]  # every 3 steps, and at the end of each run
    best_step = max(aucs, key=lambda step: (aucs[step], -step))  # the first of equal bests
    best = load_checkpoint(out / "best.pt")
    assert best["step"] == best_step and best["best"] == {"metric": "heldout:auc", "value": aucs[best_step],
                                                           "step": best_step}
    assert load_checkpoint(out / "last.pt")["best"] == best["best"]
    with pytest.raises(UnitsfaceError, match="train.keep_best 'loss': the metric must be one of"):
        tiny_config(cache, out, "train.keep_best=loss")


def test_weight_average_is_what_validates_deploys_and_resumes(cache, tmp_path):
    """train.ema: the average follows w̄ ← d·w̄ + (1 − d)·w after every step (from a copy of the first weights), it
    is the model validated and the backbone a checkpoint deploys, and resume continues it exactly."""
    full, part = tmp_path / "full", tmp_path / "part"
    extra = ("head.name=cosface", "train.ema=0.5")
    trainer = Trainer(tiny_config(cache, full, *extra, "train.max_steps=2"))
    weights = []
    original = trainer.optimizer_step

    def record() -> None:
        original()
        weights.append({k: v.detach().clone() for k, v in trainer.model.state_dict().items()})

    trainer.optimizer_step = record
    trainer.fit()
    ckpt = load_checkpoint(full / "last.pt")
    key = "features.weight" if "features.weight" in ckpt["model"] else next(iter(ckpt["model"]))
    expected = 0.5 * weights[0][key] + 0.5 * weights[1][key]  # n = 1 copies, n = 2 averages
    torch.testing.assert_close(ckpt["model_ema"][key], expected)
    assert ckpt["ema_updates"] == 2 and not torch.equal(ckpt["model_ema"][key], ckpt["model"][key])
    model, meta = load_backbone(full / "last.pt")
    torch.testing.assert_close(model.state_dict()[key], expected)
    assert meta["ema"] == 0.5

    Trainer(tiny_config(cache, tmp_path / "whole", *extra, "train.max_steps=5")).fit()
    Trainer(tiny_config(cache, part, *extra, "train.max_steps=3")).fit()
    Trainer(tiny_config(cache, part, *extra, "train.max_steps=5"), resume=part / "last.pt").fit()
    a, b = load_checkpoint(tmp_path / "whole" / "last.pt"), load_checkpoint(part / "last.pt")
    for name, value in a["model_ema"].items():
        torch.testing.assert_close(b["model_ema"][name], value, rtol=1e-5, atol=1e-6)


HOST_READS = [(torch.Tensor, name) for name in ("item", "tolist", "numpy", "__bool__", "__int__", "__float__",
                                                "__index__", "nonzero", "unique")]
HOST_READS += [(torch, "nonzero"), (torch, "unique")]


@pytest.mark.parametrize("head", ["cosface", "unitsface", "uce"])
def test_training_steps_read_nothing_off_the_device_between_logs(cache, tmp_path, monkeypatch, head):
    """Issue 13: between two logged steps a training step asks the device for nothing. On CUDA each of these
    calls (a Python number or bool from a tensor, a data-dependent shape) would wait for the GPU; here every
    call is counted while steps 3–5 run (log_every is beyond the run)."""
    trainer = Trainer(tiny_config(cache, tmp_path, f"head.name={head}", "train.log_every=100", "train.max_steps=6"))
    calls: list[str] = []
    counting = [False]
    for owner, name in HOST_READS:
        original = getattr(owner, name)

        def counted(*args, _original=original, _name=name, **kwargs):
            if counting[0]:
                calls.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(owner, name, counted)
    step = trainer.train_step

    def watched(epoch, micro, batches):
        counting[0] = 3 <= trainer.step + 1 <= 5
        try:
            return step(epoch, micro, batches)
        finally:
            counting[0] = False

    trainer.train_step = watched
    trainer.fit()
    assert trainer.step == 6 and calls == []


def test_non_finite_steps_are_skipped_counted_and_stop_the_run_when_they_persist(cache, tmp_path):
    """fp32 and bf16 go through the scaler too: a step whose loss is NaN changes no weight and is counted; after
    train.max_skipped_steps such steps in a row the run stops with one line naming the non-finite head state."""
    trainer = Trainer(tiny_config(cache, tmp_path / "nan", "head.name=uce", "train.max_steps=4",
                                  "train.max_skipped_steps=2", "train.log_every=1"))
    compute = trainer.head.compute_loss
    trainer.head.compute_loss = lambda x, labels: compute(x, labels) * (float("nan") if trainer.step in (1, 2) else 1)
    before = {}

    def snapshot(epoch, micro, batches, _step=trainer.train_step):
        before[trainer.step] = [p.detach().clone() for p in trainer.params]
        return _step(epoch, micro, batches)

    trainer.train_step = snapshot
    with pytest.raises(UnitsfaceError, match=r"2 optimizer steps in a row had inf/NaN gradients \(step 3, "
                                             r"train.max_skipped_steps=2\); the head state is finite"):
        trainer.fit()
    assert trainer.skipped_steps == 2
    records = [json.loads(line) for line in (tmp_path / "nan" / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in records] == [0, 1]  # logged at steps 1 and 2; step 3 stops the run
    after = [p.detach() for p in trainer.params]
    assert all(torch.equal(a, b) for a, b in zip(after, before[1]))  # steps 2 and 3 (NaN) moved nothing

    trainer = Trainer(tiny_config(cache, tmp_path / "bad_bias", "head.name=uce", "train.max_steps=3",
                                  "train.max_skipped_steps=1", "train.log_every=1"))
    with torch.no_grad():
        trainer.head.bias.value.fill_(float("inf"))
    with pytest.raises(UnitsfaceError, match="non-finite head state: bias.value"):
        trainer.fit()


def test_channels_last_and_a_failing_compile_train_the_same_steps(cache, tmp_path, monkeypatch, capsys):
    """train.channels_last changes the memory layout, not the numbers; train.compile on a platform where
    torch.compile fails at its first call says so in one line and trains eagerly."""
    plain = Trainer(tiny_config(cache, tmp_path / "plain", "head.name=cosface", "train.max_steps=2"))
    plain.fit()

    def broken(module, *args, **kwargs):
        def call(*inputs):
            raise RuntimeError("no C++ compiler found\nsecond line")
        return call

    monkeypatch.setattr(torch, "compile", broken)
    fast = Trainer(tiny_config(cache, tmp_path / "fast", "head.name=cosface", "train.max_steps=2",
                               "train.channels_last=true", "train.compile=true"))
    fast.fit()
    assert "train.compile: torch.compile cannot compile the backbone here (no C++ compiler found); training " \
           "without it" in capsys.readouterr().err
    conv = next(m for m in fast.model.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous()
    a, b = losses(tmp_path / "plain"), losses(tmp_path / "fast")
    assert b == pytest.approx(a, rel=1e-4)


def test_resuming_a_finished_run_still_reports_its_validation(cache, tmp_path):
    """A run killed after its final checkpoint but before report.md resumes with nothing left to train."""
    out = tmp_path / "done"
    Trainer(tiny_config(cache, out, "train.max_steps=2")).fit()
    (out / "report.md").unlink()
    results = Trainer(tiny_config(cache, out, "train.max_steps=2"), resume=out / "last.pt").fit()
    assert set(results) == {"val", "heldout"} and "| val |" in (out / "report.md").read_text()


def test_max_steps_caps_without_changing_the_schedule(cache, tmp_path):
    out = tmp_path / "capped"
    trainer = Trainer(tiny_config(cache, out, "train.max_steps=3", "train.schedule=step", "train.milestones=[1]"))
    trainer.fit()
    assert trainer.step == 3
    assert trainer.total_steps == 3 and trainer.steps_per_epoch == 8  # epochs still define the schedule
    lrs = [json.loads(line)["lr"] for line in (out / "metrics.jsonl").read_text().splitlines() if "lr" in line]
    assert lrs == [pytest.approx(0.1)] * 3


def test_gradient_accumulation_divides_each_micro_loss(cache, tmp_path):
    a = Trainer(tiny_config(cache, tmp_path / "a", "train.batch_size=16"))
    t = Trainer(tiny_config(cache, tmp_path / "b", "train.batch_size=8", "train.grad_accumulation=2"))
    # the schedule counts optimiser steps: same steps per epoch as one batch of 16
    assert a.steps_per_epoch == t.steps_per_epoch == 8
    images, labels, _ = next(iter(t.loader(0, 0)))
    t.micro_step(images, labels, torch.Generator().manual_seed(0))
    accumulated = t.head.proxies.weight.grad.clone()
    t.optimizer.zero_grad()
    x = normalize_batch(flip_batch(images, torch.Generator().manual_seed(0)))
    t.head(t.model(x), labels).backward()
    torch.testing.assert_close(accumulated * 2, t.head.proxies.weight.grad, rtol=1e-5, atol=1e-7)


def test_cli_train_then_eval_json(cache, tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["train", "--config", "demo", *TINY, f"data.cache={cache}", f"output={out}", "train.max_steps=4"]
    assert main(args) == 0
    val = next(cache.glob("synthetic-*")) / "val.bin"
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(out / "last.pt"), "--bin", str(val), "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("accuracy", "accuracy_std", "tar_at_far", "auc", "eer", "fold_accuracies"):
        assert key in report["val"], key


def test_cli_errors_are_one_line(cache, tmp_path, capsys):
    assert main(["train", "--config", "demo", "data.train=/nonexistent/folder", f"output={tmp_path}"]) == 2
    assert capsys.readouterr().err.strip() == "error: data.train folder not found: /nonexistent/folder"
    assert main(["train", "--config", "demo", "train.bogus=1"]) == 2
    assert "unknown config key 'train.bogus'" in capsys.readouterr().err
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    assert main(["eval", "--checkpoint", str(bad), "--bin", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: corrupt or unreadable checkpoint") and "\n" not in err


def test_resume_from_corrupt_checkpoint_is_an_error(cache, tmp_path):
    bad = tmp_path / "last.pt"
    bad.write_bytes(b"\x00" * 100)
    with pytest.raises(UnitsfaceError, match="corrupt or unreadable checkpoint"):
        Trainer(tiny_config(cache, tmp_path / "r"), resume=bad)


@pytest.fixture(scope="module")
def finished(cache, tmp_path_factory) -> Path:
    """The checkpoint of a short tiny run (tinyfacenet + cosface over 16 classes)."""
    out = tmp_path_factory.mktemp("finished")
    Trainer(tiny_config(cache, out, "train.max_steps=2")).fit()
    return out / "last.pt"


def same_state(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(value, state[key]) for key, value in module.state_dict().items())


def test_init_from_takes_backbone_and_head_then_trains_afresh(cache, tmp_path, finished, capsys):
    ckpt = load_checkpoint(finished)
    trainer = Trainer(tiny_config(cache, tmp_path / "fine", f"train.init_from={finished}", "train.optimizer=adamw"))
    assert same_state(trainer.model, ckpt["model"]) and same_state(trainer.head, ckpt["head"])
    assert trainer.step == 0 and not trainer.optimizer.state  # a new run: step 0, fresh optimiser and schedule
    out = capsys.readouterr().out
    assert f"train.init_from {finished} (backbone): {len(ckpt['model'])} tensors loaded (layout unitsface)" in out
    assert f"train.init_from {finished} (head): {len(ckpt['head'])} tensors loaded" in out
    assert out.count("missing, left as initialised: none") == 2

    other = Trainer(tiny_config(cache, tmp_path / "other", f"train.init_from={finished}", "head.name=arcface"))
    assert same_state(other.model, ckpt["model"])
    assert not torch.equal(other.head.proxies.weight, ckpt["head"]["proxies.weight"])
    assert "head not loaded (the checkpoint's is unitsface over 16 classes, this run's arcface over 16)" in \
        capsys.readouterr().out


def test_model_pretrained_loads_the_backbone_only(cache, tmp_path, finished, capsys):
    ckpt = load_checkpoint(finished)
    trainer = Trainer(tiny_config(cache, tmp_path / "pre", f"model.pretrained={finished}"))
    assert same_state(trainer.model, ckpt["model"])
    assert not torch.equal(trainer.head.proxies.weight, ckpt["head"]["proxies.weight"])
    assert f"model.pretrained {finished}: {len(ckpt['model'])} tensors loaded (layout unitsface)" in \
        capsys.readouterr().out
    with pytest.raises(UnitsfaceError, match="cannot be loaded into a mobilefacenet backbone"):
        Trainer(tiny_config(cache, tmp_path / "bad", f"model.pretrained={finished}", "model.backbone=mobilefacenet"))


def test_the_threshold_bias_decay_reaches_the_optimiser(cache, tmp_path):
    t = Trainer(tiny_config(cache, tmp_path / "b", "head.name=unitsface", "train.bias_weight_decay=0"))
    settings = {id(p): g["weight_decay"] for g in t.optimizer.param_groups for p in g["params"]}
    assert settings[id(t.head.bias.value)] == 0 and settings[id(t.head.proxies.weight)] == 5e-4


def test_a_vit_with_adamw_groups_takes_a_step(cache, tmp_path):
    """Backbone keywords reach the model; norms and biases decay-free; the head at 10× the lr."""
    t = Trainer(tiny_config(cache, tmp_path / "vit", "model.backbone=vit_t", "model.mask_ratio=0.25",
                            "model.drop_path=0.0", "train.optimizer=adamw", "train.lr=0.001", "train.weight_decay=0.1",
                            "train.no_decay_norm_bias=true", "train.head_lr_scale=10"))
    assert t.model.mask_ratio == 0.25 and isinstance(t.optimizer, torch.optim.AdamW)
    settings = {id(p): (g["lr"], g["weight_decay"]) for g in t.optimizer.param_groups for p in g["params"]}
    assert settings[id(t.model.blocks[0].norm1.weight)] == settings[id(t.model.blocks[0].attn.proj.bias)] == (0.001, 0)
    assert settings[id(t.model.blocks[0].attn.qkv.weight)] == settings[id(t.model.pos_embed)] == (0.001, 0.1)
    assert settings[id(t.head.proxies.weight)] == (0.01, 0.1)
    images, labels, _ = next(iter(t.loader(0, 0)))
    before = t.model.blocks[0].attn.qkv.weight.detach().clone()
    assert math.isfinite(t.micro_step(images, labels, torch.Generator().manual_seed(0)))
    t.optimizer_step()
    assert t.step == 1 and not torch.equal(before, t.model.blocks[0].attn.qkv.weight)


def test_a_resumed_run_keeps_its_own_weights(cache, tmp_path, finished):
    """init_from is for the start of a run: resuming never reads it (it may be gone by then)."""
    trainer = Trainer(tiny_config(cache, tmp_path / "r", "train.init_from=/gone/last.pt"), resume=finished)
    assert trainer.step == 2


def wandb_records(run_dir: Path) -> list:
    """The records of an offline W&B run file (LevelDB-style log: 7-byte header, 32 KiB blocks of chunks
    with a 7-byte header: crc32, length, type 1 full / 2 first / 3 middle / 4 last), as protobuf Records."""
    from wandb.proto import wandb_internal_pb2

    data = next(run_dir.glob("run-*.wandb")).read_bytes()
    assert data[:4] == b":W&B"
    records, pos, chunk = [], 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        chunk += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            records.append(record)
            chunk = b""
    return records


def test_wandb_offline_run_logs_what_metrics_jsonl_logs(cache, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "wandb_dir").mkdir()
    out = tmp_path / "wb"
    Trainer(tiny_config(cache, out, "train.wandb=true", "train.max_steps=3")).fit()
    Trainer(tiny_config(cache, out, "train.wandb=true", "train.max_steps=4"), resume=out / "last.pt").fit()
    runs = sorted((tmp_path / "wandb_dir" / "wandb").glob("offline-run-*"))
    run_id = (out / "wandb_run_id").read_text()
    assert len(runs) == 2 and all(r.name.endswith(f"-{run_id}") for r in runs)  # the resumed run continues it
    history = {}
    for run in runs:
        records = wandb_records(run)
        [start] = [r.run for r in records if r.WhichOneof("record_type") == "run"]
        assert (start.display_name, start.project) == ("wb", "unitsface")
        assert json.loads({c.key: c.value_json for c in start.config.update}["train"])["wandb"] is True
        for r in records:
            if r.WhichOneof("record_type") == "history":
                items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
                history.setdefault(items["_step"], {}).update(items)
    assert {step: h["train/loss"] for step, h in history.items() if "train/loss" in h} == \
        pytest.approx(losses(out), rel=1e-6)
    assert 0 <= history[4]["val/val/accuracy"] <= 1 and "val/val/auc" in history[3]


def test_wandb_is_imported_only_when_switched_on(tmp_path, monkeypatch):
    code = ("import sys; from pathlib import Path; from unitsface.training.trainer import Trainer; "
            "from unitsface.training.logging import RunLogger; "
            f"log = RunLogger(Path({str(tmp_path)!r}), True, 2); log.step(1, 0, 1.0, 0.1, 10.0, {{}}); log.close(); "
            "assert 'wandb' not in sys.modules, 'imported'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert proc.returncode == 0, proc.stderr[-2000:]
    from unitsface.training.logging import start_wandb

    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    with pytest.raises(UnitsfaceError, match=r"train.wandb=true needs the wandb package \(pip install wandb\)"):
        start_wandb(tmp_path, {})
def test_bad_records_are_replaced_counted_across_workers_and_bounded(cache, tmp_path, capsys):
    """Key 40 cannot even be scanned, key 3's JPEG does not decode: 2 bad of 128 records."""
    synthetic = cached_synthetic_dataset(cache, identities=16, images_per_identity=8, seed=0, val_pairs=40)
    data = tmp_path / "data"
    data.mkdir()
    for name in ("train.rec", "train.idx", "property"):
        shutil.copy(synthetic / name, data / name)
    damage(data, [3], "image")
    damage(data, [40], "frame")
    args = [*TINY, f"data.train={data}", f"data.val=[{synthetic / 'val.bin'}]", "train.epochs=1", "train.workers=2"]
    out = tmp_path / "run"
    with pytest.warns(UserWarning, match="replacing an unreadable record"):
        Trainer(load_config("demo", [*args, "data.max_bad_fraction=0.05", f"output={out}"])).fit()
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "loss" in r] == list(range(1, 8))  # 127 images: 7 batches of 16
    assert logged[0]["bad_records"] >= 1 and logged[0]["bad_record_ids"][0] == 40  # the scan's, from step 1
    last = [r for r in logged if "loss" in r][-1]
    assert (last["bad_records"], last["bad_record_ids"]) == (2, [40, 3])
    assert load_checkpoint(out / "last.pt")["bad_records"] == [40, 3]
    capsys.readouterr()
    assert main(["train", "--config", "demo", *args, "data.max_bad_fraction=0.01", f"output={tmp_path / 'stop'}"]) == 2
    err = capsys.readouterr().err.strip()
    err = err[err.index("error: "):]  # after the progress bar
    assert err.startswith(f"error: 2 unreadable records in {data / 'train.rec'} exceed data.max_bad_fraction "
                          "(1 of 128 records); first: ") and "key 40: bad magic" in err and "\n" not in err
