"""Crash safety, proven: `unitsface train` killed with SIGKILL (during checkpoint writes too), resumed from
last.pt, ends with a checkpoint equal bit for bit to an uninterrupted run's (bench/kill_resume.py, reduced)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_sigkill_then_resume_equals_an_uninterrupted_run(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("kill_resume_under_test", ROOT / "bench" / "kill_resume.py")
    kill_resume = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(kill_resume)
    # two kills: one at a random moment, one during a checkpoint write (the bench alternates them)
    assert kill_resume.main(["--kills", "2", "--seed", "1", "--work", str(tmp_path)]) == 0
    *kills, summary = (json.loads(line) for line in capsys.readouterr().out.strip().splitlines())
    assert summary["kills"] == len(kills) == 2 and summary["final_equal"] and summary["mismatches"] == []
    assert summary["kills_during_checkpoint_write"] >= 1 and summary["kill_modes"]["random"] >= 1
    assert summary["temp_files_left"] == []  # a write the kill interrupted leaves no temp file behind
    assert all(k["last_pt_step"] <= summary["steps"] for k in kills)
