"""ONNX export of a trained backbone, and the one ONNX loader every unitsface tool uses.

The exported graph takes `data`: N×3×S×S float, RGB (or the model's colour order), already
normalised as in training, and returns `embedding`: N×d raw embeddings (flip-sum inside when
exported with `flip_sum=True`). Everything a consumer must reproduce is written into the
model's `metadata_props` (values JSON-encoded), so the file alone is enough to deploy.

The loader also runs third-party graphs: older converters list every weight as a graph input,
which onnxruntime then asks the caller to feed. Inputs that are initializers, or that no node
reads (weights replaced by quantized copies, as in the int8 SFace), are dropped from the input
list in memory first, leaving the one image input (the SFace quirk, shared/models/README.md).
Per-tensor weights written as opset-21 blocked `DequantizeLinear` (the int8 YuNet detector) are
dequantised in memory, because onnxruntime refuses to run that form.
"""

from __future__ import annotations

import io
import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import helper, numpy_helper

from unitsface.errors import UnitsfaceError, one_line
from unitsface.export.common import TOLERANCE, ExportReport, check_batches, compare, load_exportable
from unitsface.io import atomic_write

INPUT_NAME, OUTPUT_NAME = "data", "embedding"
MARKER = "unitsface_format"  # metadata key present in every graph unitsface exported
OPSETS = range(11, 21)  # 20: the ceiling of torch's TorchScript-based exporter; below 11 ops are missing


def _with_metadata(model: onnx.ModelProto, metadata: dict[str, Any]) -> onnx.ModelProto:
    del model.metadata_props[:]
    for key, value in metadata.items():
        model.metadata_props.add(key=key, value=json.dumps(value))
    return model


def read_metadata(model: onnx.ModelProto) -> dict[str, Any] | None:
    """The unitsface metadata of a graph, or None for a graph unitsface did not export."""
    props = {p.key: p.value for p in model.metadata_props}
    if MARKER not in props:
        return None
    try:
        return {key: json.loads(value) for key, value in props.items()}
    except json.JSONDecodeError as exc:
        raise UnitsfaceError(f"corrupt unitsface metadata in ONNX graph: {exc}") from None


@dataclass
class OnnxModel:
    """An onnxruntime session over one image input, with what the graph says about itself."""

    session: ort.InferenceSession
    input_name: str
    fixed_batch: int | None  # the batch size the graph insists on, None if dynamic
    input_size: int | None  # the static spatial size, None if dynamic
    metadata: dict[str, Any] | None

    def run(self, x: np.ndarray) -> np.ndarray:
        """N×3×S×S float32 -> N×d, in chunks of the graph's fixed batch size when it has one."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        step = self.fixed_batch or max(1, len(x))
        try:
            outs = [self.session.run(None, {self.input_name: x[i : i + step]})[0] for i in range(0, len(x), step)]
        except Exception as exc:  # onnxruntime's own exception types (wrong size, wrong dtype...)
            raise UnitsfaceError(f"onnxruntime failed on input of shape {list(x.shape)}: "
                                 f"{str(exc).splitlines()[0]}") from None
        out = np.concatenate(outs) if outs else np.zeros((0, 0), np.float32)
        return out.reshape(len(x), -1)


def _fold_single_block_dequantize(model: onnx.ModelProto) -> None:
    """Replace each `DequantizeLinear` that has a `block_size`, weights for inputs and ONE scale by its
    float result, computed as onnxruntime does ((x − zero point) in integers, times the scale).

    Why: such a node is per-tensor quantisation written in the blocked form of opset 21, which
    onnxruntime 1.32 refuses at run time ("block_size must be 0 for per-tensor quantization"); the
    int8 OpenCV zoo YuNet is full of them. Nodes with real blocks (SFace's) are left alone.
    """
    weights = {init.name: init for init in model.graph.initializer}
    kept, folded = [], []
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and all(name in weights for name in node.input if name):
            block = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "block_size"), 0)
            scale = numpy_helper.to_array(weights[node.input[1]])
            if block and scale.size == 1:
                x = numpy_helper.to_array(weights[node.input[0]]).astype(np.int32)
                has_zero = len(node.input) > 2 and node.input[2]
                zero = int(numpy_helper.to_array(weights[node.input[2]]).ravel()[0]) if has_zero else 0
                folded.append(numpy_helper.from_array((x - zero).astype(scale.dtype) * scale.ravel()[0],
                                                      node.output[0]))
                continue
        kept.append(node)
    if folded:
        del model.graph.node[:]
        model.graph.node.extend(kept)
        model.graph.initializer.extend(folded)


def load_onnx(source: str | Path | bytes, threads: int | None = None) -> OnnxModel:
    """Open an ONNX file (or serialized bytes) for inference on the CPU."""
    name = "ONNX bytes" if isinstance(source, bytes) else str(source)
    try:
        model = onnx.load_from_string(source) if isinstance(source, bytes) else onnx.load(str(source))
    except FileNotFoundError:
        raise UnitsfaceError(f"ONNX model not found: {source}") from None
    except Exception as exc:  # protobuf decode errors have no common base class
        raise UnitsfaceError(f"{name} is not a readable ONNX model: {type(exc).__name__}: {exc}") from None
    _fold_single_block_dequantize(model)
    weights = {init.name for init in model.graph.initializer}
    consumed = {name for node in model.graph.node for name in node.input}
    fed = [inp for inp in model.graph.input if inp.name not in weights and inp.name in consumed]
    if len(fed) != 1:
        raise UnitsfaceError(f"{name}: expected one image input, the graph needs {[i.name for i in fed]}")
    if len(fed) != len(model.graph.input):  # weights listed as inputs, some no longer even used
        del model.graph.input[:]
        model.graph.input.extend(fed)
    dims = [d.dim_value if d.HasField("dim_value") else None for d in fed[0].type.tensor_type.shape.dim]
    if len(dims) != 4 or dims[1] not in (None, 3):
        raise UnitsfaceError(f"{name}: input {fed[0].name!r} has shape {dims}; expected N×3×H×W")
    options = ort.SessionOptions()
    options.log_severity_level = 3  # no warnings about the unused initializers left by old converters
    # As many threads as torch uses (the user's setting), and no busy-waiting between runs: on a
    # shared CPU spinning threads slow everyone down, face models run a few images at a time.
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types
        raise UnitsfaceError(f"onnxruntime cannot run {name}: {str(exc).splitlines()[0]}") from None
    size = dims[2] if dims[2] is not None and dims[2] == dims[3] else None
    return OnnxModel(session, fed[0].name, dims[0], size, read_metadata(model))


def export_onnx(
    checkpoint: str | Path,
    out: str | Path,
    flip_sum: bool = False,
    opset: int = 17,
    static_batch: int | None = None,
    check_images: Sequence[np.ndarray] = (),
    tolerance: float = TOLERANCE,
) -> ExportReport:
    """Export the checkpoint's backbone to `out`, check it against PyTorch, then write it atomically.

    The batch dimension is dynamic (what insightface exports and the MFR submission checker require,
    and what embedding a gallery needs); `static_batch=N` fixes it at N for runtimes that want a
    fixed shape, and `OnnxModel.run` then loops over chunks of N. One output, float32.
    """
    if opset not in OPSETS:
        raise UnitsfaceError(f"ONNX opset must be in {OPSETS.start}..{OPSETS.stop - 1}, got {opset}")
    if static_batch is not None and static_batch < 1:
        raise UnitsfaceError(f"--static-batch must be a batch size >= 1, got {static_batch}")
    exportable = load_exportable(checkpoint, flip_sum)
    size = exportable.input_size
    dynamic = static_batch is None
    example = torch.zeros(2 if dynamic else static_batch, 3, size, size)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # The TorchScript-based exporter is deprecated upstream but needs no extra package (onnxscript).
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(
                exportable.module, (example,), buffer, dynamo=False, opset_version=opset,
                input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], do_constant_folding=True,
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}} if dynamic else None,
            )
        except Exception as exc:  # the exporter raises many types; the first line says what failed
            first = one_line(exc)
            raise UnitsfaceError(f"ONNX export of {checkpoint} at opset {opset} failed: {first}") from None
    model = _with_metadata(onnx.load_from_string(buffer.getvalue()), exportable.metadata)
    model.doc_string = f"unitsface {exportable.metadata['backbone']} embeddings; see metadata_props"
    onnx.checker.check_model(model)
    data = model.SerializeToString()
    runner = load_onnx(data)
    diffs = compare(exportable.module, lambda x: runner.run(x.numpy()),
                    check_batches(exportable, check_images), tolerance, "onnxruntime output")
    atomic_write(out, data)
    return ExportReport(str(out), "onnx", exportable.metadata, diffs, tolerance)
