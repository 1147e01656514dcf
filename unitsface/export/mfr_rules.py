"""The MFR challenge's rules for a submitted model, checked on any ONNX file (evaluation.md §7).

insightface's submission checker wanted: an ONNX graph, one input N×3×112×112 RGB with a dynamic
batch, exactly one output, no fp16 weights, at most 1 GB, no flip inside the graph, and input
(x − 127.5)/127.5 unless the graph's first nodes normalise it themselves (it then fed raw 0–255).
Each rule is reported as "met", "not met" or "unknown" — unknown where the file cannot tell:
a third-party graph does not say its channel order, or what normalisation it was trained with.
For graphs unitsface exported, the metadata says (colour order, mean/std, flip_sum); for any graph
the structure is searched for what can be seen: a width-reversing Slice/Gather/ReverseSequence
(how exporters write a flip: torch.flip becomes Slice with step −1 on the last axis) and
Sub/Add/Mul/Div nodes with constant operands right after the input.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from unitsface.errors import UnitsfaceError, one_line

MFR_INPUT = (3, 112, 112)
MAX_BYTES = 1 << 30  # "1 GB"
HALF_TYPES = {onnx.TensorProto.FLOAT16: "fp16", onnx.TensorProto.BFLOAT16: "bf16"}
NORMALISING_OPS = ("Sub", "Add", "Mul", "Div")
MET, NOT_MET, UNKNOWN = "met", "not met", "unknown"


@dataclass(frozen=True)
class RuleCheck:
    rule: str
    status: str  # MET, NOT_MET or UNKNOWN
    detail: str

    def as_dict(self) -> dict[str, str]:
        return {"rule": self.rule, "status": self.status, "detail": self.detail}


def _constants(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Initializers and Constant-node outputs by name (the values a rule may need to read)."""
    values = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return values


def _reverses_width(node: onnx.NodeProto, constants: dict[str, np.ndarray]) -> bool:
    """Does this node reverse the last (width) axis of a 4-D tensor? The patterns exporters write."""
    if node.op_type == "ReverseSequence":
        return True
    if node.op_type == "Slice" and len(node.input) >= 5 and node.input[3] in constants and node.input[4] in constants:
        axes, steps = constants[node.input[3]].ravel(), constants[node.input[4]].ravel()
        return any(step < 0 and axis in (3, -1) for axis, step in zip(axes, steps))
    if node.op_type == "Gather" and node.input[1] in constants:
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        index = constants[node.input[1]].ravel()
        return axis in (3, -1) and len(index) > 1 and np.array_equal(index, np.arange(len(index))[::-1] + index.min())
    return False


def _size(path: Path, model: onnx.ModelProto) -> int:
    """Bytes of the file plus any external-data files it names."""
    external = {entry.value for init in model.graph.initializer for entry in init.external_data
                if entry.key == "location"}
    return path.stat().st_size + sum((path.parent / name).stat().st_size for name in external
                                     if (path.parent / name).is_file())


def _inputs(model: onnx.ModelProto) -> tuple[list[onnx.ValueInfoProto], list[str]]:
    """(declared inputs that nodes read and no initializer fills, declared inputs no node reads)."""
    weights = {init.name for init in model.graph.initializer}
    consumed = {name for node in model.graph.node for name in node.input}
    free = [inp for inp in model.graph.input if inp.name not in weights]
    return [i for i in free if i.name in consumed], [i.name for i in free if i.name not in consumed]


def _dims(value: onnx.ValueInfoProto) -> list[Any]:
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in value.type.tensor_type.shape.dim]


def check_mfr_rules(path: str | os.PathLike) -> list[RuleCheck]:
    """Every MFR model rule for the ONNX file at `path`; an unreadable file is a UnitsfaceError."""
    from unitsface.export.onnx import load_onnx, read_metadata  # lazy: unitsface.export loads torch

    path = Path(path)
    if not path.is_file():
        raise UnitsfaceError(f"ONNX model not found: {path}")
    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(str(path))
        fmt = RuleCheck("ONNX format", MET, f"opset {max((o.version for o in model.opset_import), default='?')}, "
                                           "onnx.checker passes")
    except Exception as exc:  # protobuf and checker errors have no common base class
        first = one_line(exc)
        raise UnitsfaceError(f"{path} is not a valid ONNX model: {first}") from None
    meta = read_metadata(model)
    constants = _constants(model)
    checks = [fmt]

    fed, unused = _inputs(model)
    image = fed[0] if len(fed) == 1 else None
    dims = _dims(image) if image is not None else []
    shape_ok = len(dims) == 4 and tuple(dims[1:]) == MFR_INPUT
    if image is None:
        checks.append(RuleCheck("one input N×3×112×112", NOT_MET, f"the graph reads inputs {[i.name for i in fed]}"))
    elif unused:
        checks.append(RuleCheck("one input N×3×112×112", NOT_MET,
                                f"{image.name}: {dims}, but {len(unused)} more declared inputs no node reads (e.g. "
                                f"{unused[0]!r}: weights listed as inputs; onnxruntime asks for them)"))
    else:
        checks.append(RuleCheck("one input N×3×112×112", MET if shape_ok else NOT_MET, f"{image.name}: {dims}"))

    if meta is not None:
        colour = str(meta.get("color"))
        checks.append(RuleCheck("RGB channel order", MET if colour == "rgb" else NOT_MET, f"metadata: {colour}"))
    else:
        checks.append(RuleCheck("RGB channel order", UNKNOWN, "a third-party graph does not record its channel order"))

    batch = dims[0] if dims else None
    if image is None:
        checks.append(RuleCheck("dynamic batch", NOT_MET, "no single image input"))
    elif isinstance(batch, int):
        checks.append(RuleCheck("dynamic batch", NOT_MET, f"batch fixed at {batch}"))
    elif not shape_ok:
        checks.append(RuleCheck("dynamic batch", UNKNOWN, f"declared {batch or 'unnamed'}; not run (input shape)"))
    else:
        try:
            out = load_onnx(path).run(np.zeros((2, *MFR_INPUT), np.float32))
            checks.append(RuleCheck("dynamic batch", MET, f"declared {batch or 'unnamed'}; a batch of 2 runs, "
                                                          f"output {list(out.shape)}"))
        except UnitsfaceError as exc:
            checks.append(RuleCheck("dynamic batch", NOT_MET, f"declared dynamic but a batch of 2 fails: {exc}"))

    outputs = [o.name for o in model.graph.output]
    checks.append(RuleCheck("exactly one output", MET if len(outputs) == 1 else NOT_MET, f"outputs {outputs}"))

    half = sorted({HALF_TYPES[init.data_type] for init in model.graph.initializer if init.data_type in HALF_TYPES}
                  | {HALF_TYPES[a.t.data_type] for n in model.graph.node if n.op_type == "Constant"
                     for a in n.attribute if a.name == "value" and a.t.data_type in HALF_TYPES})
    checks.append(RuleCheck("no fp16 weights", NOT_MET if half else MET,
                            f"{'/'.join(half)} tensors found" if half else "no 16-bit float tensors"))

    size = _size(path, model)
    checks.append(RuleCheck("size ≤ 1 GB", MET if size <= MAX_BYTES else NOT_MET, f"{size / 2**20:.1f} MiB"))

    flips = [n.name or n.op_type for n in model.graph.node if _reverses_width(n, constants)]
    if flips or (meta is not None and meta.get("flip_sum")):
        why = f"width-reversing node {flips[0]!r}" if flips else "metadata: flip_sum"
        checks.append(RuleCheck("no flip inside the graph", NOT_MET, why))
    elif meta is not None:
        checks.append(RuleCheck("no flip inside the graph", MET, "metadata: flip_sum false; no reversing node"))
    else:
        checks.append(RuleCheck("no flip inside the graph", UNKNOWN, "no width-reversing Slice/Gather/ReverseSequence "
                                                                      "found; other ways to flip are not recognised"))

    checks.append(_normalisation(model, image, constants, meta))
    return checks


def _normalisation(model: onnx.ModelProto, image: onnx.ValueInfoProto | None, constants: dict[str, np.ndarray],
                   meta: dict[str, Any] | None) -> RuleCheck:
    """(x − 127.5)/127.5 input, unless the first nodes normalise (the server then feeds raw 0–255)."""
    rule = "input (x − 127.5)/127.5 or normalised inside"
    consumers = [n for n in model.graph.node if image is not None and image.name in n.input]
    if consumers and all(n.op_type in NORMALISING_OPS and any(i in constants for i in n.input if i != image.name)
                         for n in consumers):
        ops = ", ".join(n.op_type for n in consumers)
        return RuleCheck(rule, MET, f"the first nodes ({ops}) normalise: the server feeds raw 0–255")
    if meta is None:
        return RuleCheck(rule, UNKNOWN, "the server will feed (x − 127.5)/127.5; a third-party graph does not say "
                                        "what it was trained on")
    mean, std = meta.get("mean"), meta.get("std")
    ok = np.allclose(np.asarray(mean, float), 127.5) and np.allclose(np.asarray(std, float), 127.5)
    return RuleCheck(rule, MET if ok else NOT_MET, f"metadata: mean {mean}, std {std}")


def format_rules(path: str | os.PathLike, checks: list[RuleCheck]) -> str:
    width = max(len(c.rule) for c in checks)
    lines = [f"MFR submission rules for {path}:"]
    lines += [f"  {c.status:<8} {c.rule:<{width}}  {c.detail}" for c in checks]
    failed = sum(c.status == NOT_MET for c in checks)
    unknown = sum(c.status == UNKNOWN for c in checks)
    lines.append(f"{len(checks) - failed - unknown} met, {failed} not met, {unknown} unknown")
    return "\n".join(lines)
