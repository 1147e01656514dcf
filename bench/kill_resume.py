"""Crash safety: SIGKILL `unitsface train` at random moments, resume from last.pt each time, compare the end.

One uninterrupted run gives the reference. Then runs of the same config (same seed, same steps,
`train.checkpoint_every=1`) are killed with SIGKILL — alternately at a random moment of the training phase
and the instant the temp file of a randomly chosen checkpoint write appears (a kill during the write) —
and restarted with `--resume last.pt` (from scratch while there is none), until --kills kills have
happened; each run is then left to finish. After every kill, last.pt must load (weights_only), its step
may never go back, and every loss the run logs must equal the reference's loss of that step bit for bit;
at the end the whole checkpoint (backbone, head, optimiser, scheduler, RNG states, step) must equal the
reference's, and no temp file may be left in the run folder. Prints one JSON line per kill and a JSON
summary; exit status 1 on any mismatch.

    python bench/kill_resume.py [--kills 20] [--seed 0] [--workers 0]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from unitsface.training.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TINY = ["data.synthetic.identities=16", "data.synthetic.images_per_identity=8", "data.synthetic.val_pairs=40",
        "model.embedding_size=32", "train.batch_size=16", "train.epochs=2", "train.log_every=1",
        "train.warmup_epochs=0", "train.checkpoint_every=1"]
COMPARED = ("model", "head", "optimizer", "scheduler", "scaler", "rng", "step", "epoch", "skipped_steps")


def train_command(out: Path, cache: Path, workers: int, resume: bool) -> list[str]:
    cmd = [sys.executable, "-m", "unitsface", "train", "--config", "demo", *TINY, f"train.workers={workers}",
           f"data.cache={cache}", f"output={out}"]
    return cmd + (["--resume", str(out / "last.pt")] if resume else [])


def environment() -> dict[str, str]:
    """This checkout first on the path (as the caller imports it); one thread, frugal and deterministic."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH", "")]))
    return dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1")


def differences(a: Any, b: Any, where: str = "") -> list[str]:
    """Paths at which two checkpoint values differ (tensors bit for bit)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        same = isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype and \
            a.shape == b.shape and torch.equal(a, b)
        return [] if same else [where]
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return [f"{where} (keys {sorted(set(a) ^ set(b), key=str)})"]
        return [d for k in a for d in differences(a[k], b[k], f"{where}.{k}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{where} (length)"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{where}[{i}]")]
    return [] if a == b else [where]


def logged_losses(out: Path) -> list[tuple[int, float]]:
    """(step, loss) of every training line of metrics.jsonl, repeats after a resume included."""
    path = out / "metrics.jsonl"
    if not path.is_file():
        return []
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [(r["step"], r["loss"]) for r in lines if "loss" in r]


def reference_run(out: Path, cache: Path, workers: int) -> dict[str, Any]:
    """The uninterrupted run: its final checkpoint, losses, and the timeline (start-up and step seconds)."""
    start = time.perf_counter()
    proc = subprocess.Popen(train_command(out, cache, workers, resume=False), env=environment(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    first_step = None
    while proc.poll() is None:
        if first_step is None and logged_losses(out):
            first_step = time.perf_counter() - start
        time.sleep(0.02)
    if proc.returncode != 0:
        raise SystemExit(f"the reference run failed: {proc.stderr.read()[-2000:]}")
    total = time.perf_counter() - start
    losses = dict(logged_losses(out))
    return {"checkpoint": load_checkpoint(out / "last.pt"), "losses": losses, "startup_s": first_step or total,
            "training_s": total - (first_step or total), "steps": max(losses)}


def checkpoint_temps(out: Path) -> set[str]:
    """atomic_open's temp files beside last.pt: present while a checkpoint is written (or left by a kill)."""
    return {name for name in os.listdir(out) if name.startswith(".last.pt.")} if out.is_dir() else set()


def kill_during(proc: subprocess.Popen, out: Path, mode: str, delay: float, skip: int, limit: float) -> bool | None:
    """SIGKILL `proc` after `delay` s ("random"), or the instant the temp file of its checkpoint write number
    `skip` + 1 appears ("checkpoint"). Returns whether a checkpoint was being written at the kill, None when
    the process ended first."""
    start, stale, seen = time.perf_counter(), checkpoint_temps(out), set()
    while proc.poll() is None and time.perf_counter() - start < limit:
        writing = checkpoint_temps(out) - stale
        seen |= writing
        if (mode == "random" and time.perf_counter() - start >= delay) or (mode == "checkpoint" and writing
                                                                           and len(seen) > skip):
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return bool(writing)
        time.sleep(0.0005 if mode == "checkpoint" else 0.005)
    proc.wait()
    return None


def killed_run(out: Path, cache: Path, workers: int, reference: dict[str, Any], kills: int, rng: random.Random,
               report: list[dict[str, Any]]) -> int:
    """Train in `out` until it finishes, killing it `kills` times; returns the kills done (a run can finish first
    when the kills land late)."""
    done, last_step = 0, 0
    while True:
        resume = (out / "last.pt").is_file()
        proc = subprocess.Popen(train_command(out, cache, workers, resume), env=environment(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if done == kills:
            _, err = proc.communicate()
            if proc.returncode != 0:
                raise SystemExit(f"the last resume failed: {err[-2000:]}")
            return done
        mode = ("random", "checkpoint")[len(report) % 2]  # alternate: any two kills cover both
        delay = reference["startup_s"] + rng.uniform(0, reference["training_s"])
        skip = rng.randrange(max(1, reference["steps"] - last_step))  # which of the remaining writes to hit
        during_write = kill_during(proc, out, mode, delay, skip, limit=60 + 2 * delay)
        if during_write is None:
            if proc.returncode != 0:
                raise SystemExit(f"a resumed run failed: {proc.stderr.read()[-2000:]}")
            return done
        done += 1
        step = load_checkpoint(out / "last.pt")["step"] if (out / "last.pt").is_file() else 0  # must load
        if step < last_step:
            raise SystemExit(f"last.pt went back from step {last_step} to {step}")
        last_step = step
        report.append({"kill": len(report) + 1, "mode": mode, "during_checkpoint_write": during_write,
                       "last_pt_step": step})
        print(json.dumps(report[-1]), flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0, help="seed of the kill moments (the training seed is fixed)")
    ap.add_argument("--workers", type=int, default=0, help="train.workers (loader processes)")
    ap.add_argument("--work", type=Path, default=None, help="folder for the runs and the synthetic set (temp)")
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        cache = work / "cache"
        reference = reference_run(work / "reference", cache, args.workers)
        kills: list[dict[str, Any]] = []
        runs, mismatches, leftovers = 0, [], []
        while len(kills) < args.kills:
            out = work / f"killed{runs}"
            killed_run(out, cache, args.workers, reference, args.kills - len(kills), rng, kills)
            runs += 1
            final = load_checkpoint(out / "last.pt")
            mismatches += [f"run {runs}: {d}" for key in COMPARED
                           for d in differences(final[key], reference["checkpoint"][key], key)]
            mismatches += [f"run {runs}: step {s} logged loss {loss!r}, reference {reference['losses'][s]!r}"
                           for s, loss in logged_losses(out) if loss != reference["losses"][s]]
            leftovers += [name for name in os.listdir(out) if name.endswith(".tmp")]
    summary = {"kills": len(kills), "runs": runs, "steps": reference["steps"],
               "kills_during_checkpoint_write": sum(k["during_checkpoint_write"] for k in kills),
               "kill_modes": {m: sum(k["mode"] == m for k in kills) for m in ("random", "checkpoint")},
               "final_equal": not mismatches, "mismatches": mismatches[:20], "temp_files_left": leftovers[:20],
               "workers": args.workers}
    print(json.dumps(summary))
    return 0 if not mismatches and not leftovers else 1


if __name__ == "__main__":
    sys.exit(main())
