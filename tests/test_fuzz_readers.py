"""bench/fuzz_readers.py in a reduced form: a few hundred mutated inputs of each kind, no finding allowed.

The full run (100,000 inputs) is a bench; this keeps the harness from rotting and re-checks the readers on
fresh inputs (another seed than the documented run).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_fuzz_readers_reduced() -> None:
    proc = subprocess.run([sys.executable, "bench/fuzz_readers.py", "--inputs", "600", "--seed", "7"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    lines = proc.stdout.strip().splitlines()
    summary = json.loads(lines[-1])
    assert proc.returncode == 0 and summary["findings"] == 0, proc.stdout[-3000:]
    assert [line.split()[0] for line in lines[:-1]] == ["recordio", "bin", "image", "ijb"]
    for kind, counts in summary["per_kind"].items():
        assert sum(counts.values()) == 150 and set(counts) <= {"ok", "error"}, kind
        assert counts.get("ok", 0) > 0 and counts.get("error", 0) > 0, kind  # mutations both pass and fail
    assert summary["worker_restarts"] == 0  # no hang, crash or memory finding restarted the worker
