"""bench/gpu_check.sh and bench/train_throughput.py, without a GPU.

The GPU check runs only on a borrowed CUDA machine, so nothing else would notice if it broke: here its
syntax, its commands (GPU_CHECK_DRY_RUN=1), every repository path it names, the device variable it
hands to tests/test_distributed.py, the GPU defaults of the throughput bench, and that bench itself
on CPU at tiny settings (fp32 as a script, bf16 autocast in process).
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
GPU_CHECK = ROOT / "bench" / "gpu_check.sh"
TINY = ["--device", "cpu", "--backbones", "tinyfacenet", "--classes", "50", "--dim", "32", "--steps", "1"]


def load_file(name: str, path: Path) -> ModuleType:
    """Import `path` as a fresh module `name` (bench/ is no package; a fresh name leaves any loaded copy alone)."""
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def throughput() -> ModuleType:
    return load_file("train_throughput_under_test", ROOT / "bench" / "train_throughput.py")


@pytest.fixture(scope="module")
def planned(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[str]]:
    """Check name -> command line, as the dry run of gpu_check.sh lists them."""
    out = tmp_path_factory.mktemp("gpu_check")
    env = dict(os.environ, GPU_CHECK_DRY_RUN="1", OUT=str(out))
    proc = subprocess.run(["bash", str(GPU_CHECK)], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    names = re.findall(r"^== (\S+)$", proc.stdout, re.M)
    commands = [shlex.split(c) for c in re.findall(r"^   would run \(limit \d+ s\):(.*)$", proc.stdout, re.M)]
    assert len(names) == len(commands) and (out / "summary.txt").read_text() == proc.stdout
    return dict(zip(names, commands))


def json_records(text: str) -> list[dict]:
    """The JSON object that ends each output line (`text {json}`)."""
    return [json.loads(line[line.index("{"):]) for line in text.splitlines() if line.strip()]


def test_gpu_check_syntax() -> None:
    proc = subprocess.run(["bash", "-n", str(GPU_CHECK)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr


def test_gpu_check_plans_the_first_gpu_checklist_with_existing_files(planned: dict[str, list[str]]) -> None:
    """Equivalence tests on CUDA, a one-rank NCCL training, the throughput matrix (3 precisions × 2 layouts ×
    compile off/on) of iresnet50 + unitsface at batch 256, the head scaling at 1M and 2M classes."""
    throughput = [name for name in planned if name.startswith("throughput_")]
    assert list(planned) == ["equivalence", "nccl", *throughput, "head_scaling"]
    matrix = itertools.product(("none", "bf16", "fp16"), ("channels-last", "no-channels-last"), ("off", "on"))
    assert sorted(throughput) == sorted(f"throughput_{amp}_{layout}_compile-{on}" for amp, layout, on in matrix)
    equivalence, nccl, head_scaling = planned["equivalence"], planned["nccl"], planned["head_scaling"]
    assert equivalence[:2] == ["env", "UNITSFACE_TEST_DEVICE=cuda"] and "tests/test_distributed.py" in equivalence
    assert nccl[1:] == ["bench/nccl_smoke.py", "--device", "cuda", "--steps", "3"]
    fp16 = planned["throughput_fp16_channels-last_compile-on"]
    assert fp16[1] == "bench/train_throughput.py" and "--compile" in fp16 and "--channels-last" in fp16
    options = dict(zip(fp16[2::2], fp16[3::2]))
    assert (options["--device"], options["--backbones"], options["--heads"], options["--batch"]) == \
        ("cuda", "iresnet50", "unitsface", "256")
    assert head_scaling[1] == "bench/head_scaling.py" and "cuda" in head_scaling
    assert {"1000000", "2000000"} <= set(head_scaling)
    for command in planned.values():
        for arg in command:
            if arg.endswith((".py", ".sh")):
                assert (ROOT / arg).is_file(), f"gpu_check.sh runs {arg}, which does not exist"


def test_gpu_check_runs_for_real_on_a_cpu(tmp_path: Path) -> None:
    """The reduced CPU form (what keeps the script from rotting without a GPU): every check runs and its JSON
    lines land in one gpu_check.json."""
    env = dict(os.environ, GPU_CHECK_MODE="cpu", OUT=str(tmp_path), PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(GPU_CHECK)], env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["mode"] == "cpu" and report["all_passed"] is True
    checks = report["checks"]
    assert set(checks) == {"nccl", "head_scaling", *(f"throughput_{amp}_{layout}_compile-off" for amp in
                                                     ("none", "bf16") for layout in ("channels-last",
                                                                                     "no-channels-last"))}
    (nccl,) = checks["nccl"]
    assert nccl["backend"] == "gloo" and nccl["steps"] == 3 and nccl["world_size"] == 1 and nccl["sharded_checkpoint"]
    for name, records in checks.items():
        if name.startswith("throughput_"):
            (r,) = records
            assert r["amp"] in name and r["channels_last"] is ("no-" not in name) and r["samples_per_s"] > 0
    assert {r["head"] for r in checks["head_scaling"] if "head" in r} == {"cosface", "unitsface"}


def test_every_path_gpu_check_names_exists() -> None:
    """Comments included: a renamed test or bench file must not leave the script (or its notes) stale."""
    paths = set(re.findall(r"\b((?:bench|tests|unitsface|scripts)/[\w./-]+\.(?:py|sh))\b", GPU_CHECK.read_text()))
    assert {"tests/test_distributed.py", "bench/train_throughput.py", "bench/head_scaling.py",
            "bench/nccl_smoke.py"} <= paths
    assert [p for p in sorted(paths) if not (ROOT / p).is_file()] == []


def test_distributed_tests_read_the_device_gpu_check_sets(planned: dict[str, list[str]],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """gpu_check.sh puts the heads of tests/test_distributed.py on the GPU through an environment
    variable, read when tests/dist_worker.py is imported (constructing torch.device("cuda") needs no GPU)."""
    name, value = planned["equivalence"][1].split("=")
    monkeypatch.setenv(name, value)
    worker = load_file("dist_worker_under_test", ROOT / "tests" / "dist_worker.py")
    assert worker.DEVICE == torch.device("cuda")


def test_train_throughput_defaults_are_the_gpu_check(throughput: ModuleType) -> None:
    args = throughput.parse_args([])
    assert (args.device, args.batch, args.classes, args.dim) == ("cuda", 256, 10_572, 512)
    assert (args.backbones, args.heads, args.amp) == (["iresnet50", "vit_t"], ["unitsface", "cosface"], "bf16")
    assert (args.channels_last, args.optimizer, args.arcface_torch) == (True, "sgd", None)
    assert args.steps >= 10 and args.warmup >= 1


def check_run(records: list[dict], batch: int, warmup: int, amp: str, channels_last: bool) -> None:
    *runs, ratio = records
    assert [r["head"] for r in runs] == ["unitsface", "cosface"]
    for r in runs:
        assert (r["backbone"], r["impl"], r["device"], r["classes"], r["amp"]) == ("tinyfacenet", "unitsface", "cpu",
                                                                                     50, amp)
        assert r["batch"] == batch
        assert r["channels_last"] is channels_last and r["steps"] == 1 and r["warmup"] == warmup
        assert r["samples_per_s"] > 0 and r["ms_per_step"] > 0 and torch.isfinite(torch.tensor(r["loss"]))
        assert "peak_gb" not in r  # CUDA only
    assert ratio["ratio"] == "unitsface/cosface_step_time" and ratio["backbone"] == "tinyfacenet" and ratio["value"] > 0


def test_train_throughput_script_on_cpu() -> None:
    """As gpu_check.sh runs it: a script from the repository root (bench/ on the path for head_scaling)."""
    proc = subprocess.run([sys.executable, "bench/train_throughput.py", *TINY, "--batch", "4", "--warmup", "1",
                           "--amp", "none", "--no-channels-last", "--threads", "1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_run(json_records(proc.stdout), 4, 1, "none", channels_last=False)


def test_train_throughput_bf16_autocast_on_cpu(throughput: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    """Channels-last, as on the GPU; batch 2 and no warm-up keep CPU bf16 (emulated on most CPUs) quick."""
    assert throughput.main([*TINY, "--batch", "2", "--warmup", "0", "--amp", "bf16"]) == 0
    check_run(json_records(capsys.readouterr().out), 2, 0, "bf16", channels_last=True)


FAKE_ARCFACE_TORCH = {
    "backbones/vit.py": "",
    "backbones/__init__.py": (
        "import torch\n"
        "def get_model(name, num_features=512, **kwargs):\n"
        "    assert name == 'vit_t'\n"
        "    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 28, 28), torch.nn.Flatten(),\n"
        "                               torch.nn.Linear(64, num_features))\n"),
}


def test_train_throughput_times_arcface_torch_vit_t_or_says_why_not(throughput: ModuleType, tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """A stand-in checkout (its get_model returns a small net) exercises the import and the ratio line; the
    unitsface vit_t is timed too, at batch 2."""
    args = ["--device", "cpu", "--backbones", "tinyfacenet", "--heads", "cosface", "--classes", "50", "--dim", "32",
            "--steps", "1", "--warmup", "0", "--batch", "2", "--amp", "none"]
    assert throughput.main([*args, "--arcface-torch", str(tmp_path / "absent")]) == 0
    *runs, skipped = json_records(capsys.readouterr().out)
    assert [r["backbone"] for r in runs] == ["tinyfacenet"]
    assert skipped["skipped"] == "arcface_torch:vit_t" and "no backbones/vit.py" in skipped["reason"]
    for name, text in FAKE_ARCFACE_TORCH.items():
        (tmp_path / "recognition" / "arcface_torch" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "recognition" / "arcface_torch" / name).write_text(text)
    try:
        assert throughput.main([*args, "--arcface-torch", str(tmp_path)]) == 0
    finally:
        sys.modules.pop("backbones", None)
    records = json_records(capsys.readouterr().out)
    assert [(r.get("impl"), r.get("backbone")) for r in records[:-1]] == [
        ("unitsface", "tinyfacenet"), ("unitsface", "vit_t"), ("arcface_torch", "vit_t")]
    assert records[-1]["ratio"] == "unitsface/arcface_torch_step_time" and records[-1]["value"] > 0


def test_vit_multiply_accumulates_match_arcface_torch() -> None:
    """torch's FLOP counter (2 per multiply-accumulate) against arcface_torch's published "GFLOPs" (ptflops
    multiply-accumulates plus the attention matmuls it adds by hand), at 512-d embeddings."""
    costs = load_file("model_costs_under_test", ROOT / "bench" / "model_costs.py").costs
    for name, published in (("vit_t", 1.5), ("vit_s", 5.7), ("vit_b", 11.4), ("vit_l", 25.3)):
        r = costs(name)
        assert r["published_gflops"] == published and round(r["gmacs"], 1) == published, r
    macs, size, cin = 112 * 112 * 64 * 27, 112, 64  # iresnet50 by hand: stem, blocks, fc
    for planes, blocks in zip((64, 128, 256, 512), (3, 4, 14, 3)):
        for i in range(blocks):
            out = size // 2 if i == 0 else size
            shortcut = out * out * planes * cin if i == 0 else 0  # the 1×1 strided conv
            macs += size * size * planes * cin * 9 + out * out * planes * planes * 9 + shortcut
            cin, size = planes, out
    assert costs("iresnet50")["gmacs"] == round((macs + 512 * 49 * 512) / 1e9, 3)


def test_model_costs_prints_a_json_line_per_backbone() -> None:
    proc = subprocess.run([sys.executable, "bench/model_costs.py", "--backbones", "tinyfacenet", "vit_t"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = json_records(proc.stdout)
    assert [(r["backbone"], r["published_gflops"]) for r in records] == [("tinyfacenet", None), ("vit_t", 1.5)]
    assert all(r["params"] > 0 and r["gmacs"] > 0 for r in records)


def test_train_throughput_without_cuda_is_a_clear_error(throughput: ModuleType, monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert throughput.main([]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_head_scaling_prints_a_json_line_per_measurement_and_the_ratios() -> None:
    """The contract of bench/head_scaling.py at a tiny size: 1 and 2 gloo ranks, dense and sparse updates."""
    common = [sys.executable, "bench/head_scaling.py", "--classes", "3000", "--batch", "8", "--dim", "16",
              "--steps", "1", "--warmup", "1"]
    records = []
    for heads, ranks in ((["unitsface", "cosface"], ["1", "2"]), (["cosface@0.5"], ["2"])):
        proc = subprocess.run([*common, "--heads", *heads, "--ranks", *ranks], cwd=ROOT, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        records += json_records(proc.stdout)
    runs = [r for r in records if "ratio" not in r]
    assert [(r["head"], r["sample_rate"], r["ranks"], r["update"]) for r in runs] == [
        ("unitsface", 1.0, 1, "dense"), ("unitsface", 1.0, 2, "dense"), ("cosface", 1.0, 1, "dense"),
        ("cosface", 1.0, 2, "dense"), ("cosface", 0.5, 2, "dense"), ("cosface", 0.5, 2, "sparse")]
    for r in runs:
        assert r["ms_per_step"] > 0 and r["peak_mb_per_rank"] >= 0 and r["memory"] == "live"
    assert runs[0]["bf16_loss_rel_change"] < 1e-2  # the memory rounded to bf16 barely moves the loss
    ratios = {(r["ratio"], r.get("ranks"), r.get("head"), r.get("sample_rate"), r.get("update"))
              for r in records if "ratio" in r}
    assert {("unitsface/cosface_time", 1, None, None, None), ("unitsface/cosface_time", 2, None, None, None),
            ("memory_1rank/2ranks", None, "unitsface", 1.0, "dense"), ("dense/sparse_time", 2, "cosface", 0.5, None)
            } <= ratios
