"""TorchScript export: the same module and metadata as the ONNX export, for PyTorch-only deployments.

The metadata travels as `_extra_files["unitsface.json"]` inside the archive; read it back with
`torch.jit.load(path, _extra_files={"unitsface.json": ""})`.
"""

from __future__ import annotations

import io
import json
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from unitsface.export.common import TOLERANCE, ExportReport, check_batches, compare, load_exportable
from unitsface.io import atomic_write

EXTRA_FILE = "unitsface.json"


def export_torchscript(
    checkpoint: str | Path,
    out: str | Path,
    flip_sum: bool = False,
    check_images: Sequence[np.ndarray] = (),
    tolerance: float = TOLERANCE,
) -> ExportReport:
    """Trace the backbone, reload the archive, check it against PyTorch, then write it atomically."""
    exportable = load_exportable(checkpoint, flip_sum)
    size = exportable.input_size
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # TorchScript's deprecation notice
        # check_trace re-runs and compares the trace; `compare` below does that on real inputs instead.
        traced = torch.jit.trace(exportable.module, torch.zeros(2, 3, size, size), check_trace=False)
        buffer = io.BytesIO()
        torch.jit.save(traced, buffer, _extra_files={EXTRA_FILE: json.dumps(exportable.metadata)})
        data = buffer.getvalue()
        loaded = torch.jit.load(io.BytesIO(data))
    diffs = compare(exportable.module, lambda x: loaded(x).numpy(), check_batches(exportable, check_images),
                    tolerance, "TorchScript output")
    atomic_write(out, data)
    return ExportReport(str(out), "torchscript", exportable.metadata, diffs, tolerance)
