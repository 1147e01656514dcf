"""Shared fixtures: the ../shared folder (reference numbers, real faces) and small helpers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

SHARED = Path(os.environ.get("UNITSFACE_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """../shared (reference numbers, real faces). On a developer's machine without it the tests that need it
    are skipped; in CI (`CI` set) they fail: a CI run that silently skipped the parity checks would pass
    with nothing checked."""
    if not SHARED.is_dir():
        message = f"shared folder not found at {SHARED}"
        if os.environ.get("CI"):
            pytest.fail(f"{message}, and CI is set: the parity and real-face tests must run in CI")
        pytest.skip(message)
    return SHARED


@pytest.fixture(scope="session")
def reference_dir(shared_dir: Path) -> Path:
    return shared_dir / "reference"
