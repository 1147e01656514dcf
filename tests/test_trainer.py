"""The trainer end to end on a tiny synthetic set: outputs, exact resume, CLI, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from unitsface.cli import main
from unitsface.config import load_config
from unitsface.data.dataset import normalize_batch
from unitsface.errors import UnitsfaceError
from unitsface.training.checkpoint import load_checkpoint
from unitsface.training.trainer import Trainer, flip_batch

TINY = [
    "data.synthetic.identities=16",
    "data.synthetic.images_per_identity=8",
    "data.synthetic.val_pairs=40",
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
    results = Trainer(tiny_config(cache, out)).fit()
    assert {"val"} == set(results)
    assert 0.0 <= results["val"]["accuracy"] <= 1.0
    for name in ("last.pt", "metrics.jsonl", "report.md", "roc.png", "config.json"):
        assert (out / name).is_file(), name
    ckpt = torch.load(out / "last.pt", weights_only=True)
    steps_per_epoch = (16 * 8) // 16
    assert ckpt["step"] == 2 * steps_per_epoch and ckpt["epoch"] == 2
    assert ckpt["meta"]["backbone"] == "tinyfacenet" and ckpt["meta"]["num_classes"] == 16
    assert "val" in (out / "report.md").read_text()
    assert len(losses(out)) == 2 * steps_per_epoch


@pytest.mark.parametrize("scale_out", [(), ("head.sample_rate=0.5", "train.sparse_update=true",
                                              "head.memory_dtype=bfloat16"), ("data.augment.mask_prob=0.5",)],
                         ids=["plain", "scale_out", "masks"])
def test_resume_continues_the_same_loss_curve(cache, tmp_path, scale_out):
    """Also with Partial FC, lazily updated rows and a bf16 memory: their state survives the checkpoint;
    and with mask augmentation, whose draws depend on (seed, epoch, image) only."""
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
    memory = load_checkpoint(part / "last.pt")["head"]["memory"]
    assert memory.dtype == (torch.bfloat16 if "head.memory_dtype=bfloat16" in scale_out else torch.float32)


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
    images, labels = next(iter(t.loader(0, 0)))
    t.micro_step(images, labels, torch.Generator().manual_seed(0))
    accumulated = t.head.weight.grad.clone()
    t.optimizer.zero_grad()
    x = normalize_batch(flip_batch(images, torch.Generator().manual_seed(0)))
    t.head(t.model(x), labels).backward()
    torch.testing.assert_close(accumulated * 2, t.head.weight.grad, rtol=1e-5, atol=1e-7)


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
