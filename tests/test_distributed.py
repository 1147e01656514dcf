"""Distributed training on CPU/gloo: R ranks must equal one process with the same global batch.

Covers methods.md D1–D7 and issue 5: every registered head sharded over 2 ranks against one
process (loss, input gradient, parameter gradients, state after an SGD step); a 2-rank trainer
run (DDP with summed gradients, gradient accumulation with no_sync) against one process step by
step; checkpoints re-sharded N -> M; a torchrun restart resuming by itself; Partial FC sampling
and the lazy ("sparse") optimiser against dense SGD; BatchNorm over the global batch
(`model.sync_batchnorm`) against BatchNorm in one process, alone and in a trainer run.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import dist_worker
import pytest
import torch

from unitsface import heads, models, optim, parallel
from unitsface.config import load_config
from unitsface.data.dataset import EpochSampler
from unitsface.errors import UnitsfaceError
from unitsface.training import distributed, trainer
from unitsface.training.checkpoint import load_checkpoint as read_checkpoint

C, D, B_LOCAL, WORLD = 11, 16, 8, 2  # uneven shards (6 + 5 classes); D differs from any shard size
EPOCHS = (0, 1, 3, 4)  # step k runs at epoch EPOCHS[k]: memories fill at 0, USS starts at 1, EPL at 3
PARAMS = {"vpl": {"vpl_start_step": 1}}  # heads whose defaults would keep their extra term off in 4 steps
SAMPLED_CLASSES, SAMPLE_RATE = 100, 0.25  # the Partial FC run on 2 ranks: 13 of 50 columns per shard
DEVICE = dist_worker.DEVICE


# --------------------------------------------------------------------------- heads: 2 ranks == 1 process


def global_batches() -> list[tuple[torch.Tensor, torch.Tensor, int]]:
    """Embeddings with face-like norms (~30) and labels with repeats; the first batch holds every class."""
    g = torch.Generator().manual_seed(3)
    batches = []
    for step, epoch in enumerate(EPOCHS):
        x = 8.0 * torch.randn(WORLD * B_LOCAL, D, generator=g)
        if step == 0:
            labels = torch.cat([torch.arange(C), torch.randint(0, C, (WORLD * B_LOCAL - C,), generator=g)])
            labels = labels[torch.randperm(labels.numel(), generator=g)]
        else:
            labels = torch.randint(0, C, (WORLD * B_LOCAL,), generator=g)
        batches.append((x, labels, epoch))
    return batches


# --------------------------------------------------------------------------- the runs the 2-rank tests compare


BATCH = 4  # per rank and micro-step; one process uses WORLD × BATCH. Every run accumulates 2 micro-steps:
# memory writes follow forward calls (D7), so micro-batches must be the same global batches everywhere.


def run_config(data: Path, out: Path, max_steps: int, batch: int, checkpoint_every: int = 0,
               extra: tuple[str, ...] = ()) -> dict:
    return load_config(None, [
        f"data.train={data}", "model.backbone=tinyfacenet", "model.embedding_size=32",
        "head.name=unitsface", "head.s2s_start_epoch=0", "head.min_fill=0.0",
        f"train.batch_size={batch}", "train.grad_accumulation=2", "train.epochs=1",
        f"train.max_steps={max_steps}", "train.lr=0.05", "train.workers=0", "train.device=cpu",
        "train.log_every=1", f"train.checkpoint_every={checkpoint_every}", f"output={out}", *extra,
    ])


def losses(out: Path) -> dict[int, float]:
    """step -> logged loss (a restarted run logs some steps twice: the last one counts)."""
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}


@contextmanager
def patched_trainer(batch_statistics: bool = False) -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        for obj, name, value in dist_worker.trainer_patches(batch_statistics):
            mp.setattr(obj, name, value)
        yield


def head_cases(folder: Path) -> dict:
    """Every registered head run in one process; the cases for the ranks saved to folder/cases.pt."""
    steps = global_batches()
    cases, reference = [], {}
    for name in heads.names():
        params = PARAMS.get(name, {})
        torch.manual_seed(0)
        head = heads.build(name, C, D, **params)
        init = {k: v.clone() for k, v in head.state_dict().items()}
        cases.append({"name": name, "params": params, "init": init, "steps": steps, "num_classes": C})
        reference[name] = dist_worker.run_head(name, params, init, steps, C)
    torch.save(cases, folder / "cases.pt")
    return reference


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Everything the 2-rank tests compare, with one start of 2 gloo ranks:
    - every head in one process, then sharded on the ranks, on the same global batches;
    - Partial FC sampling on the ranks;
    - a 6-step one-process trainer reference, and the same 6 steps as 1 process -> 2 ranks -> 1 process."""
    root = tmp_path_factory.mktemp("dist")
    reference = head_cases(root)
    data = dist_worker.make_record_dataset(root / "data", classes=12, per_class=8)
    one = WORLD * BATCH
    with patched_trainer():
        init = trainer.Trainer(run_config(data, root / "init", 1, one)).save("init.pt")
        trainer.Trainer(run_config(data, root / "ref", 6, one), resume=init).fit()
        trainer.Trainer(run_config(data, root / "a", 2, one), resume=init).fit()
        dist_worker.spawn(WORLD, [
            ("heads", (str(root / "cases.pt"), str(root))),
            ("sampling", (str(root), SAMPLED_CLASSES, SAMPLE_RATE)),
            ("train", (run_config(data, root / "b", 4, BATCH), str(root / "a" / "last.pt"))),
        ])
        trainer.Trainer(run_config(data, root / "c", 6, one), resume=root / "b" / "last.pt").fit()
    ranks = [torch.load(root / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    return {"root": root, "data": data, "init": init, "reference": reference, "ranks": ranks}


def rank_part(run: dict, key: str, value: torch.Tensor) -> torch.Tensor:
    """The rows of a one-process value that a rank holds (all of it for replicated state)."""
    return value[run["start"]:run["end"]] if key in run["sharded"] else value


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str, atol: float = 1e-5) -> None:
    if actual.dtype == torch.bool or not actual.is_floating_point():
        assert torch.equal(actual, expected), what
    else:
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=atol, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("name", heads.names())
def test_sharded_head_matches_one_process(runs: dict, name: str) -> None:
    reference = runs["reference"][name]
    for r, rank_runs in enumerate(runs["ranks"]):
        run = rank_runs[name]
        assert "error" not in run, f"rank {r}: {run.get('error')}"
        for step, (got, ref) in enumerate(zip(run["records"], reference)):
            where = f"{name} rank {r} step {step}"
            torch.testing.assert_close(got["loss"], ref["loss"], rtol=1e-5, atol=1e-6, msg=f"{where}: loss")
            assert_close(got["x_grad"], ref["x_grad"][r * B_LOCAL:(r + 1) * B_LOCAL], f"{where}: d loss/d x")
            assert set(got["grads"]) == set(ref["grads"]), f"{where}: parameters with a gradient"
            for key, grad in got["grads"].items():
                assert_close(grad, rank_part(run, key, ref["grads"][key]), f"{where}: gradient of {key}")
            for key, value in got["state"].items():
                assert_close(value, rank_part(run, key, ref["state"][key]), f"{where}: {key} after the step")


def test_heads_under_test_are_every_registered_head(runs: dict) -> None:
    assert set(runs["reference"]) == set(heads.names()) == set(runs["ranks"][1])
    assert {"cosface", "unitsface", "uss", "uce", "cosface_epl", "cosface_unpg"} <= set(heads.names())


# --------------------------------------------------------------------------- Partial FC


def test_partial_fc_keeps_every_positive_of_the_global_batch(runs: dict) -> None:
    """unitsface at rate 0.25: each shard draws its own sample once for weight and memory, keeps the
    positives of the whole global batch, writes the memory rows of exactly those classes, and every
    rank gets the same loss and the same data-driven USS bias (a b0 over both shards' samples)."""
    losses, biases = [], []
    for r in range(WORLD):
        got = torch.load(runs["root"] / f"sampling{r}.pt", weights_only=True)
        lo, size = got["start"], got["size"]
        positives = {int(y) - lo for y in got["labels"] if lo <= int(y) < lo + size}
        columns = set(got["columns"].tolist())
        assert got["draws"] == 1  # one sample for `weight` and `memory` alike
        assert positives <= columns  # positives of the other rank's samples too
        assert len(columns) == max(round(SAMPLE_RATE * size), len(positives))
        assert set(got["grad_rows"].tolist()) <= columns  # dense gradient: zero outside the sample
        assert set(got["written"].tolist()) == positives  # the real rows of the global batch's classes
        losses.append(float(got["loss"]))
        biases.append(float(got["bias"]))
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)  # one global loss
    assert biases[0] == pytest.approx(biases[1], rel=1e-6) and biases[0] > 0  # one b0, initialised


def sgd_pair(lazy: bool, w0: torch.Tensor) -> tuple[torch.nn.Parameter, optim.SGD]:
    p = torch.nn.Parameter(w0.clone())
    return p, optim.SGD([p], lr=0.1, momentum=0.9, weight_decay=0.05, lazy=[p] if lazy else [])


def test_lazy_update_follows_the_dense_trajectory() -> None:
    """Sampled rows, a changing lr, and a resume in the middle: forward values and the final state of
    the sparse update equal torch's dense SGD (whose unsampled rows keep moving by momentum and decay)."""
    torch.manual_seed(0)
    w0 = torch.randn(60, 8)
    dense = torch.nn.Parameter(w0.clone())
    dense_ref = torch.optim.SGD([dense], lr=0.1, momentum=0.9, weight_decay=0.05)
    lazy, lazy_opt = sgd_pair(True, w0)
    schedules = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0 / (1 + 0.3 * s)) for o in (dense_ref, lazy_opt)]
    for step in range(30):
        columns = torch.randperm(60)[:6].sort().values
        x = torch.randn(5, 8)
        out_dense = x @ dense[columns].t()
        out_lazy = x @ optim.read_rows(lazy, columns).t()
        torch.testing.assert_close(out_lazy, out_dense, rtol=1e-5, atol=1e-5)
        out_dense.square().sum().backward()
        out_lazy.square().sum().backward()
        assert lazy.grad.is_sparse and dense.grad.count_nonzero() > 0
        dense_ref.step()
        lazy_opt.step()
        dense_ref.zero_grad()
        lazy_opt.zero_grad()
        for s in schedules:
            s.step()
        if step == 14:  # checkpoint and resume the lazy optimiser mid-way, rows still lagging
            state = lazy_opt.state_dict()
            assert int((state["state"][0]["row_step"] < 15).sum()) > 0
            lazy, lazy_opt = sgd_pair(True, lazy.detach())
            lazy_opt.load_state_dict(state)
            assert lazy_opt.state[lazy]["row_step"].dtype == torch.long
            schedules[1] = torch.optim.lr_scheduler.LambdaLR(lazy_opt, lambda s: 1.0 / (1 + 0.3 * s),
                                                             last_epoch=step)
    lazy_opt.catch_up()
    torch.testing.assert_close(lazy.detach(), dense.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lazy_opt.state[lazy]["momentum_buffer"], dense_ref.state[dense]["momentum_buffer"],
                               rtol=1e-4, atol=1e-5)
    assert lazy_opt.state[lazy]["history"].shape[0] == 0


def test_sparse_update_leaves_unsampled_rows_alone_until_caught_up() -> None:
    """One dense step then one sampled step: dense SGD moves an unsampled row by exactly
    buf' = μ·buf + λ·w, w' = w − η·buf'; the lazy optimiser leaves it untouched until caught up."""
    torch.manual_seed(1)
    w0 = torch.randn(10, 4)
    for lazy in (False, True):
        p, opt = sgd_pair(lazy, w0)
        (optim.read_rows(p, torch.arange(10)) ** 2).sum().backward()  # step 1: every row
        opt.step()
        opt.zero_grad()
        w1, buf1 = p.detach().clone(), opt.state[p]["momentum_buffer"].clone()
        (optim.read_rows(p, torch.tensor([2, 5])) ** 2).sum().backward()  # step 2: rows 2 and 5
        opt.step()
        other = torch.tensor([0, 1, 3, 4, 6, 7, 8, 9])
        buf2 = 0.9 * buf1[other] + 0.05 * w1[other]
        if lazy:
            assert torch.equal(p.detach()[other], w1[other])
            assert torch.equal(opt.state[p]["momentum_buffer"][other], buf1[other])
            opt.catch_up()
        torch.testing.assert_close(opt.state[p]["momentum_buffer"][other], buf2)
        torch.testing.assert_close(p.detach()[other], w1[other] - 0.1 * buf2)


def test_trainer_sparse_update_matches_dense_and_checkpoints_the_dense_state(runs: dict, tmp_path: Path) -> None:
    """Partial FC through the trainer: the lazy update gives the dense run's losses, and its checkpoint
    holds the dense weights and momentum (unsampled rows caught up, nothing frozen)."""
    out = {}
    for mode in ("dense", "sparse"):
        config = run_config(runs["data"], tmp_path / mode, 4, WORLD * BATCH, extra=("head.sample_rate=0.5",))
        config["train"]["sparse_update"] = mode == "sparse"
        with patched_trainer():
            trainer.Trainer(config, resume=runs["init"]).fit()
        out[mode] = torch.load(tmp_path / mode / "last.pt", weights_only=True)
        assert sorted(losses(tmp_path / mode)) == [1, 2, 3, 4]
    for step, loss in losses(tmp_path / "dense").items():
        assert losses(tmp_path / "sparse")[step] == pytest.approx(loss, rel=1e-5), f"step {step}"
    torch.testing.assert_close(out["sparse"]["head"]["proxies.weight"], out["dense"]["head"]["proxies.weight"],
                               rtol=1e-4, atol=1e-6)
    weight_at = [k for k, v in out["dense"]["optimizer"]["state"].items()
                 if v["momentum_buffer"].shape == out["dense"]["head"]["proxies.weight"].shape]
    assert len(weight_at) == 1
    dense_m, sparse_m = (out[m]["optimizer"]["state"][weight_at[0]] for m in ("dense", "sparse"))
    torch.testing.assert_close(sparse_m["momentum_buffer"], dense_m["momentum_buffer"], rtol=1e-4, atol=1e-6)
    assert int(sparse_m["row_step"].min()) == int(sparse_m["steps"]) == 4  # every row brought up to date


def test_clipping_uses_the_norm_of_the_whole_gradient() -> None:
    """In one process GradientSync.clip_ is torch's clip_grad_norm_ over backbone + head, sparse rows included."""
    torch.manual_seed(2)
    backbone = torch.nn.Linear(D, D)
    head = heads.build("uce", C, D, sample_rate=0.5).train()
    _owner = optim.SGD(list(backbone.parameters()) + list(head.parameters()), lr=0.1, lazy=[head.proxies.weight])
    x, labels = global_batches()[1][:2]
    head(backbone(x), labels).backward()
    assert head.proxies.weight.grad.is_sparse
    grads = [p.grad.to_dense() if p.grad.is_sparse else p.grad.clone()
             for p in list(backbone.parameters()) + list(head.parameters())]
    norm = distributed.GradientSync(backbone.parameters(), head).clip_(0.5)
    expected = torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads]))
    torch.testing.assert_close(norm, expected)
    assert float(expected) > 0.5
    for p, g in zip(list(backbone.parameters()) + list(head.parameters()), grads):
        got = p.grad.to_dense() if p.grad.is_sparse else p.grad
        torch.testing.assert_close(got, g * 0.5 / (expected + 1e-6))


# --------------------------------------------------------------------------- trainer: sampler, flips


def test_global_batches_and_flips_do_not_depend_on_world_size(monkeypatch: pytest.MonkeyPatch) -> None:
    one = EpochSampler(50, seed=1, epoch=2, batch_size=8).indices()
    images = torch.randint(0, 256, (8, 3, 4, 4), dtype=torch.uint8)
    flipped_one = trainer.flip_batch(images, torch.Generator().manual_seed(5))
    per_rank, flipped = [], []
    for r in range(2):
        monkeypatch.setattr(parallel, "world_size", lambda: 2)
        monkeypatch.setattr(parallel, "rank", lambda r=r: r)
        per_rank.append(EpochSampler(50, seed=1, epoch=2, batch_size=4).indices())
        flipped.append(trainer.flip_batch(images[4 * r:4 * r + 4], torch.Generator().manual_seed(5)))
    assert len(per_rank[0]) == len(per_rank[1]) == len(one) // 2 == 24
    for k in range(len(one) // 8):  # the k-th global batch: rank 0's block then rank 1's
        assert one[8 * k:8 * k + 8] == per_rank[0][4 * k:4 * k + 4] + per_rank[1][4 * k:4 * k + 4]
    assert torch.equal(torch.cat(flipped), flipped_one)


# --------------------------------------------------------------------------- checkpoints N -> M


def as_rank(monkeypatch: pytest.MonkeyPatch, r: int, world: int) -> None:
    """Pretend to be rank r of `world` for building shards (no collectives are used)."""
    monkeypatch.setattr(parallel, "world_size", lambda: world)
    monkeypatch.setattr(parallel, "rank", lambda: r)


def trained_unitsface(steps: int = 2) -> tuple[torch.nn.Module, optim.SGD, dict]:
    torch.manual_seed(0)
    head = heads.build("unitsface", C, D, s2s_start_epoch=0, min_fill=0.0).train()
    opt = optim.SGD(head.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    for x, labels, _ in global_batches()[:steps]:
        head(x, labels).backward()
        opt.step()
        opt.zero_grad()
    state = {"format": "unitsface-checkpoint", "version": 1, "step": steps, "config": {"train": {"seed": 1}},
             "meta": {"num_classes": C}, "head": head.state_dict(), "optimizer": opt.state_dict(),
             "rng": trainer.capture_rng()}
    return head, opt, state


def fresh(monkeypatch: pytest.MonkeyPatch, r: int, world: int) -> tuple[torch.nn.Module, optim.SGD]:
    as_rank(monkeypatch, r, world)
    head = heads.build("unitsface", C, D, s2s_start_epoch=0, min_fill=0.0)
    return head, optim.SGD(head.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)


def write_sharded(monkeypatch: pytest.MonkeyPatch, path: Path, state: dict, world: int, commit: bool) -> None:
    """What `save_checkpoint` does on `world` ranks, one rank after the other."""
    entries = []
    for r in range(world):
        head, opt = fresh(monkeypatch, r, world)
        loaded = distributed.load_checkpoint(path.parent / "full.pt", head, opt)
        head.load_state_dict(loaded["head"])
        opt.load_state_dict(loaded["optimizer"])
        rank_state = dict(state, head=head.state_dict(), optimizer=opt.state_dict())
        main, shard = distributed._split(rank_state, head, opt)
        entries.append(distributed.write_shard(path.parent / f"{path.name}.shards" / f"gen{state['step']}",
                                               head, shard, state["rng"]))
        if r == 0:
            rank0_main = main
    if commit:
        distributed.commit(path, rank0_main, entries, C)
    monkeypatch.undo()


def test_checkpoint_reshards_between_world_sizes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    head, opt, state = trained_unitsface()
    distributed.save_checkpoint(state, tmp_path / "full.pt", head, opt)  # one process: one file
    full_head, full_momentum = head.state_dict(), opt.state[head.proxies.weight]["momentum_buffer"]
    for world in (2, 3):  # 1 -> N: each rank gets its rows of state and momentum
        for r in range(world):
            part, part_opt = fresh(monkeypatch, r, world)
            loaded = distributed.load_checkpoint(tmp_path / "full.pt", part, part_opt)
            part.load_state_dict(loaded["head"])
            part_opt.load_state_dict(loaded["optimizer"])
            lo, hi = part.shard.start, part.shard.end
            for key in ("proxies.weight", "memory.features", "memory.filled"):
                assert torch.equal(part.state_dict()[key], full_head[key][lo:hi])
            assert torch.equal(part.bias.value, head.bias.value) and bool(part.bias.initialised)
            assert torch.equal(part_opt.state[part.proxies.weight]["momentum_buffer"], full_momentum[lo:hi])
        monkeypatch.undo()
    write_sharded(monkeypatch, tmp_path / "last.pt", state, world=3, commit=True)  # 3 -> 1
    back, back_opt = fresh(monkeypatch, 0, 1)
    loaded = distributed.load_checkpoint(tmp_path / "last.pt", back, back_opt)
    back.load_state_dict(loaded["head"])
    back_opt.load_state_dict(loaded["optimizer"])
    for key, value in full_head.items():
        assert torch.equal(back.state_dict()[key], value), key
    assert torch.equal(back_opt.state[back.proxies.weight]["momentum_buffer"], full_momentum)
    assert torch.equal(back_opt.state[back.bias.value]["momentum_buffer"],
                       opt.state[head.bias.value]["momentum_buffer"])


def test_crash_during_sharded_save_keeps_the_previous_checkpoint(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    head, opt, state = trained_unitsface(steps=1)
    distributed.save_checkpoint(state, tmp_path / "full.pt", head, opt)
    write_sharded(monkeypatch, tmp_path / "last.pt", state, world=2, commit=True)
    later = dict(state, step=9)
    write_sharded(monkeypatch, tmp_path / "last.pt", later, world=2, commit=False)  # dies before the commit
    (tmp_path / "last.pt.shards" / "gen9" / ".rank00001-of-00002.pt.xyz.tmp").write_bytes(b"torn")
    back, back_opt = fresh(monkeypatch, 0, 1)
    loaded = distributed.load_checkpoint(tmp_path / "last.pt", back, back_opt)
    assert loaded["step"] == 1 and torch.equal(loaded["head"]["proxies.weight"], head.proxies.weight.detach())
    write_sharded(monkeypatch, tmp_path / "last.pt", later, world=2, commit=True)  # the next commit cleans up
    assert sorted(p.name for p in (tmp_path / "last.pt.shards").iterdir()) == ["gen9"]
    shard = tmp_path / "last.pt.shards" / "gen9" / "rank00001-of-00002.pt"
    shard.write_bytes(shard.read_bytes()[:-10])  # damaged after the commit: a clear error, not garbage
    with pytest.raises(UnitsfaceError, match="missing or incomplete"):
        distributed.load_checkpoint(tmp_path / "last.pt", *fresh(monkeypatch, 0, 1))
    monkeypatch.undo()
    other = heads.build("unitsface", C + 1, D)
    with pytest.raises(UnitsfaceError, match="classes"):
        distributed.load_checkpoint(tmp_path / "full.pt", other, optim.SGD(other.parameters(), lr=0.1))


def test_too_many_ranks_for_the_classes_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    as_rank(monkeypatch, 2, 3)
    with pytest.raises(UnitsfaceError, match="at least 2 classes"):
        distributed.sharded_names(heads.build("uce", 5, D))


# --------------------------------------------------------------------------- trainer: 2 ranks == 1 process


def test_two_ranks_train_like_one_process_and_checkpoints_reshard(runs: dict) -> None:
    root = runs["root"]
    ref = losses(root / "ref")
    assert sorted(ref) == [1, 2, 3, 4, 5, 6]
    chained = {**losses(root / "a"), **losses(root / "b"), **losses(root / "c")}  # 1 -> 2 -> 1 processes
    assert sorted(chained) == [1, 2, 3, 4, 5, 6]
    for step in ref:
        assert chained[step] == pytest.approx(ref[step], rel=1e-4, abs=1e-5), f"step {step}"
    assert len(set(round(v, 3) for v in ref.values())) > 3  # the loss actually moves
    manifest = torch.load(root / "b" / "last.pt", weights_only=True)["shards"]
    assert manifest["world_size"] == 2 and [f["size"] for f in manifest["files"]] == [6, 6]
    final = torch.load(root / "c" / "last.pt", weights_only=True)
    expected = torch.load(root / "ref" / "last.pt", weights_only=True)
    assert "shards" not in final and not (root / "c" / "last.pt.shards").exists()
    for part in ("model", "head"):  # six SGD steps of float32 rounding (sums in another order) apart
        for key, value in expected[part].items():
            assert_close(final[part][key], value, f"{part}.{key}", atol=5e-5)


def test_torchrun_restart_resumes_from_the_last_checkpoint(runs: dict, tmp_path: Path) -> None:
    out = tmp_path / "run"
    run = {"config": run_config(runs["data"], out, 4, BATCH, checkpoint_every=2),
           "resume": str(runs["init"]), "crash_rank": 1, "crash_at_step": 3, "crash_marker": str(tmp_path / "died")}
    (tmp_path / "run.json").write_text(json.dumps(run))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(dist_worker.ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "--max-restarts=1", "--monitor-interval=0.2", str(Path(dist_worker.__file__)), "train",
           str(tmp_path / "run.json")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "died").exists()
    got, ref = losses(out), losses(runs["root"] / "ref")
    assert sorted(got) == [1, 2, 3, 4]
    for step in got:
        assert got[step] == pytest.approx(ref[step], rel=1e-4, abs=1e-5), f"step {step}"
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 5  # 1-3, died; 3-4 from step 2's checkpoint
    assert len(list((out / "last.pt.shards").iterdir())) == 1  # older generations removed


# --------------------------------------------------------------------------- BatchNorm over the global batch


# A smaller step than the other runs: BatchNorm over 8 samples turns float32 rounding differences (another
# summation order) into loss differences of 1e-4 within 3 steps at lr 0.05.
SYNC = ("model.sync_batchnorm=true", "train.lr=0.005")
SYNC_STEPS = 3


def batchnorm_cases() -> dict[str, dict]:
    """A BatchNorm2d with momentum, and a BatchNorm1d with a frozen gamma (as iresnet's last layer) and
    momentum=None (the cumulative average); two steps each, inputs far from zero mean, uneven rows per rank."""
    g = torch.Generator().manual_seed(4)
    bn2d, bn1d = torch.nn.BatchNorm2d(3), torch.nn.BatchNorm1d(6, momentum=None)
    for bn in (bn2d, bn1d):
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5, generator=g)
            bn.bias.normal_(generator=g)
    bn1d.weight.requires_grad_(False)

    def steps(*shape: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(5.0 + 2.0 * torch.randn(shape, generator=g), torch.randn(shape, generator=g)) for _ in range(2)]

    return {"bn2d": {"module": bn2d, "steps": steps(8, 3, 4, 5), "bounds": (0, 5, 8)},
            "bn1d_cumulative_frozen_gamma": {"module": bn1d, "steps": steps(8, 6), "bounds": (0, 3, 8)}}


@pytest.fixture(scope="module")
def sync_runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One start of 2 gloo ranks: the `batchnorm_cases` through GlobalBatchNorm, and a trainer run of
    tinyfacenet (BatchNorm2d and 1d) with model.sync_batchnorm=true against a one-process run with the
    same global batches, both from one initial checkpoint (written by one process: plain BatchNorm)."""
    root = tmp_path_factory.mktemp("syncbn")
    cases = batchnorm_cases()
    torch.save(cases, root / "cases.pt")
    data = dist_worker.make_record_dataset(root / "data", classes=12, per_class=8)
    one = WORLD * BATCH
    with patched_trainer(batch_statistics=True):
        init = trainer.Trainer(run_config(data, root / "init", 1, one, extra=SYNC)).save("init.pt")
        trainer.Trainer(run_config(data, root / "ref", SYNC_STEPS, one, extra=SYNC), resume=init).fit()
    dist_worker.spawn(WORLD, [
        ("batchnorm", (str(root / "cases.pt"), str(root))),
        ("train", (run_config(data, root / "two", SYNC_STEPS, BATCH, extra=SYNC), str(init))),
    ])
    ranks = [torch.load(root / f"batchnorm{r}.pt", weights_only=False) for r in range(WORLD)]
    return {"root": root, "data": data, "cases": cases, "ranks": ranks}


def test_sync_batchnorm_on_two_ranks_is_batchnorm_on_the_global_batch(sync_runs: dict) -> None:
    """Output, input gradient, running statistics and eval output on each rank's rows equal nn.BatchNorm
    on the concatenated batch; the ranks' weight/bias gradients sum (as DDP does, D1) to its gradients."""
    for name, case in sync_runs["cases"].items():
        plain = case["module"]
        ref = dist_worker.run_batchnorm(copy.deepcopy(plain), case["steps"], slice(None))
        for r, rank_runs in enumerate(sync_runs["ranks"]):
            got, rows = rank_runs[name], slice(case["bounds"][r], case["bounds"][r + 1])
            assert got["type"] == "GlobalBatchNorm"
            assert got["keys"] == list(plain.state_dict())  # checkpoints load with and without the flag
            assert got["frozen"] == sorted(k for k, p in plain.named_parameters() if not p.requires_grad)
            for step, (mine, expected) in enumerate(zip(got["steps"], ref["steps"])):
                where = f"{name} rank {r} step {step}"
                assert_close(mine["y"], expected["y"][rows], f"{where}: output")
                assert_close(mine["x_grad"], expected["x_grad"][rows], f"{where}: input gradient")
                for key, value in expected["state"].items():
                    assert_close(mine["state"][key], value, f"{where}: {key}")
            assert_close(got["eval"], ref["eval"][rows], f"{name} rank {r}: eval output")
        for step, expected in enumerate(ref["steps"]):
            grads = [rank_runs[name]["steps"][step]["grads"] for rank_runs in sync_runs["ranks"]]
            assert all(set(g) == set(expected["grads"]) for g in grads), f"{name} step {step}: gradients"
            for key, value in expected["grads"].items():
                assert_close(sum(g[key] for g in grads), value, f"{name} step {step}: gradient of {key}")


def test_sync_batchnorm_is_plain_batchnorm_in_one_process() -> None:
    """Without a process group the conversion is a no-op, and a GlobalBatchNorm is nn.BatchNorm exactly."""
    model = models.build("tinyfacenet", embedding_size=8, input_size=32)
    assert distributed.sync_batchnorm(model, torch.device("cpu")) is model
    assert not any(isinstance(m, distributed.GlobalBatchNorm) for m in model.modules())
    for name, case in batchnorm_cases().items():
        ref = dist_worker.run_batchnorm(copy.deepcopy(case["module"]), case["steps"], slice(None))
        converted = distributed.GlobalBatchNorm.convert(copy.deepcopy(case["module"]))
        assert isinstance(converted, distributed.GlobalBatchNorm)
        got = dist_worker.run_batchnorm(converted, case["steps"], slice(None))
        for mine, expected in zip(got["steps"], ref["steps"]):
            for key in ("y", "x_grad"):
                assert torch.equal(mine[key], expected[key]), f"{name}: {key}"
            for part in ("grads", "state"):
                assert mine[part].keys() == expected[part].keys()
                assert all(torch.equal(mine[part][k], v) for k, v in expected[part].items()), f"{name}: {part}"
        assert torch.equal(got["eval"], ref["eval"]), f"{name}: eval output"


def test_sync_batchnorm_two_ranks_train_like_one_process(sync_runs: dict, tmp_path: Path) -> None:
    """tinyfacenet keeps its BatchNorm: 2 ranks with model.sync_batchnorm=true give the one-process losses
    step by step and the same weights and running statistics; the checkpoint loads without the flag."""
    root = sync_runs["root"]
    ref, two = losses(root / "ref"), losses(root / "two")
    assert sorted(ref) == sorted(two) == list(range(1, SYNC_STEPS + 1))
    for step in ref:
        assert two[step] == pytest.approx(ref[step], rel=1e-5, abs=1e-6), f"step {step}"
    final = torch.load(root / "two" / "last.pt", weights_only=True)["model"]
    expected = torch.load(root / "ref" / "last.pt", weights_only=True)["model"]
    assert list(final) == list(expected) and any(k.endswith("running_var") for k in expected)
    # Within float32 rounding, amplified by BatchNorm over 8 samples (1e-6 and 3e-5 measured at lr 0.005;
    # two one-process runs that differ only in torch's thread count drift 6e-4 apart at lr 0.05).
    for key, value in expected.items():
        assert_close(final[key], value, f"model.{key}", atol=3e-4)
    with patched_trainer(batch_statistics=True):
        plain = trainer.Trainer(run_config(sync_runs["data"], tmp_path, SYNC_STEPS, WORLD * BATCH),
                                resume=root / "two" / "last.pt")
    assert all(torch.equal(plain.model.state_dict()[k], v) for k, v in final.items())


def test_adamw_state_and_init_from_head_rows_reshard(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """AdamW's per-row moments follow the class rows like SGD's momentum; `head_rows` (train.init_from) gives
    each rank its rows of a checkpoint without touching optimiser state."""
    def adamw(head: torch.nn.Module) -> torch.optim.Optimizer:
        return optim.build("adamw", optim.param_groups(torch.nn.Identity(), head, 0.01, 0.1), lr=0.01)

    torch.manual_seed(0)
    head = heads.build("unitsface", C, D, s2s_start_epoch=0, min_fill=0.0).train()
    opt = adamw(head)
    for x, labels, _ in global_batches()[:2]:
        head(x, labels).backward()
        opt.step()
        opt.zero_grad()
    state = {"format": "unitsface-checkpoint", "version": 1, "step": 2, "config": {"train": {"seed": 1}},
             "meta": {"num_classes": C}, "head": head.state_dict(), "optimizer": opt.state_dict(),
             "rng": trainer.capture_rng()}
    distributed.save_checkpoint(state, tmp_path / "full.pt", head, opt)
    ckpt = read_checkpoint(tmp_path / "full.pt")
    for r in range(2):
        as_rank(monkeypatch, r, 2)
        part = heads.build("unitsface", C, D, s2s_start_epoch=0, min_fill=0.0)
        part_opt = adamw(part)
        loaded = distributed.load_checkpoint(tmp_path / "full.pt", part, part_opt)
        part_opt.load_state_dict(loaded["optimizer"])
        lo, hi = part.shard.start, part.shard.end
        for key in ("exp_avg", "exp_avg_sq"):
            full = opt.state[head.proxies.weight][key]
            assert torch.equal(part_opt.state[part.proxies.weight][key], full[lo:hi]), key
        assert torch.equal(part_opt.state[part.bias.value]["exp_avg"], opt.state[head.bias.value]["exp_avg"])
        rows = distributed.head_rows(ckpt, tmp_path / "full.pt", part)
        assert torch.equal(rows["proxies.weight"], head.proxies.weight.detach()[lo:hi])
        assert torch.equal(rows["memory.features"], head.memory.features[lo:hi])
        assert torch.equal(rows["bias.value"], head.bias.value.detach())
        monkeypatch.undo()
