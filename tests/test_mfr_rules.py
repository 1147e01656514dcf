"""`unitsface check-onnx` and `export --check-mfr`: each MFR model rule met, not met or unknown, on our exports,
the real third-party SFace graph, and small graphs built to break one rule each."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from deploy_helpers import make_checkpoint, onnx_sface
from onnx import TensorProto, helper, numpy_helper

from unitsface.cli import main
from unitsface.export import export_onnx
from unitsface.export.mfr_rules import MET, NOT_MET, UNKNOWN, check_mfr_rules


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "model.pt")


def statuses(path) -> dict[str, str]:
    return {c.rule: c.status for c in check_mfr_rules(path)}


def tiny_graph(path, *, batch="N", outputs=1, weight_type=TensorProto.FLOAT, first="Conv", flip=None, size=112):
    """A one-conv face 'model' N×3×S×S -> N×4, with knobs that break one rule each."""
    x = helper.make_tensor_value_info("data", TensorProto.FLOAT, [batch, 3, size, size])
    w = numpy_helper.from_array(np.full((4, 3, size, size), 0.01, np.float32), "w")
    nodes, inits, source = [], [w], "data"
    if flip == "slice":
        inits += [numpy_helper.from_array(np.array([v], np.int64), n)
                  for n, v in (("s", -1), ("e", -(2**63) + 1), ("a", 3), ("st", -1))]
        nodes.append(helper.make_node("Slice", ["data", "s", "e", "a", "st"], ["flipped"]))
        source = "flipped"
    elif flip == "gather":
        inits.append(numpy_helper.from_array(np.arange(size - 1, -1, -1, dtype=np.int64), "rev"))
        nodes.append(helper.make_node("Gather", ["data", "rev"], ["flipped"], axis=3))
        source = "flipped"
    if first == "Sub":
        inits.append(numpy_helper.from_array(np.array(127.5, np.float32), "mean"))
        nodes.append(helper.make_node("Sub", [source, "mean"], ["centred"]))
        source = "centred"
    if weight_type == TensorProto.FLOAT16:
        inits[0] = numpy_helper.from_array(np.full((4, 3, size, size), 0.01, np.float16), "w16")
        nodes.append(helper.make_node("Cast", ["w16"], ["w"], to=TensorProto.FLOAT))
    nodes += [helper.make_node("Conv", [source, "w"], ["c"]), helper.make_node("Flatten", ["c"], ["emb"])]
    outs = [helper.make_tensor_value_info("emb", TensorProto.FLOAT, [batch, 4])]
    if outputs == 2:
        nodes.append(helper.make_node("Identity", ["emb"], ["copy"]))
        outs.append(helper.make_tensor_value_info("copy", TensorProto.FLOAT, [batch, 4]))
    model = helper.make_model(helper.make_graph(nodes, "tiny", [x], outs, inits),
                              opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(path))
    return path


def test_a_unitsface_export_meets_every_rule(tmp_path, checkpoint):
    export_onnx(checkpoint, tmp_path / "m.onnx")  # a dynamic batch by default
    assert set(statuses(tmp_path / "m.onnx").values()) == {MET}


def test_fixed_batch_and_flip_sum_are_reported(tmp_path, checkpoint):
    export_onnx(checkpoint, tmp_path / "fixed.onnx", static_batch=1)
    export_onnx(checkpoint, tmp_path / "flip.onnx", flip_sum=True)
    fixed, flip = statuses(tmp_path / "fixed.onnx"), statuses(tmp_path / "flip.onnx")
    assert fixed["dynamic batch"] == NOT_MET and flip["dynamic batch"] == MET
    assert flip["no flip inside the graph"] == NOT_MET and fixed["no flip inside the graph"] == MET
    # Without its metadata the flip is still found in the graph: torch.flip is a Slice with step -1.
    model = onnx.load(str(tmp_path / "flip.onnx"))
    del model.metadata_props[:]
    onnx.save(model, str(tmp_path / "anonymous.onnx"))
    check = {c.rule: c for c in check_mfr_rules(tmp_path / "anonymous.onnx")}
    assert check["no flip inside the graph"].status == NOT_MET and "Slice" in check["no flip inside the graph"].detail
    assert check["RGB channel order"].status == UNKNOWN


def test_sface_a_real_third_party_graph(shared_dir):
    check = {c.rule: c for c in check_mfr_rules(onnx_sface(shared_dir))}
    assert check["ONNX format"].status == MET and check["exactly one output"].status == MET
    assert check["one input N×3×112×112"].status == NOT_MET and "29 more declared inputs" in \
        check["one input N×3×112×112"].detail  # weights listed as inputs (shared/models/README.md)
    assert check["dynamic batch"].status == NOT_MET and "fixed at 1" in check["dynamic batch"].detail
    assert check["no fp16 weights"].status == MET and check["size ≤ 1 GB"].status == MET
    assert check["no flip inside the graph"].status == UNKNOWN
    norm = check["input (x − 127.5)/127.5 or normalised inside"]
    assert norm.status == MET and "(Sub)" in norm.detail  # SFace subtracts and scales inside (raw 0-255 in)


@pytest.mark.parametrize("knobs, rule, status", [
    ({}, "dynamic batch", MET),
    ({"batch": 1}, "dynamic batch", NOT_MET),
    ({"outputs": 2}, "exactly one output", NOT_MET),
    ({"weight_type": TensorProto.FLOAT16}, "no fp16 weights", NOT_MET),
    ({"flip": "slice"}, "no flip inside the graph", NOT_MET),
    ({"flip": "gather"}, "no flip inside the graph", NOT_MET),
    ({}, "no flip inside the graph", UNKNOWN),
    ({"first": "Sub"}, "input (x − 127.5)/127.5 or normalised inside", MET),
    ({}, "input (x − 127.5)/127.5 or normalised inside", UNKNOWN),
    ({"size": 96}, "one input N×3×112×112", NOT_MET),
])
def test_each_rule_on_a_graph_built_to_meet_or_break_it(tmp_path, knobs, rule, status):
    assert statuses(tiny_graph(tmp_path / "t.onnx", **knobs))[rule] == status


def test_check_onnx_cli_and_export_check_mfr(tmp_path, checkpoint, capsys):
    assert main(["check-onnx", str(tiny_graph(tmp_path / "ok.onnx")), "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert (record["not_met"], record["unknown"], len(record["mfr_rules"])) == (0, 3, 9)
    assert main(["check-onnx", str(tiny_graph(tmp_path / "two.onnx", outputs=2))]) == 1
    out = capsys.readouterr().out
    assert "  not met  exactly one output" in out and out.rstrip().endswith("1 not met, 3 unknown")
    assert main(["export", str(checkpoint), "--onnx", str(tmp_path / "e.onnx"), "--check-mfr"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("wrote ") and "MFR submission rules for" in out and "0 not met" in out
    static = ["export", str(checkpoint), "--onnx", str(tmp_path / "s.onnx"), "--static-batch", "1", "--check-mfr"]
    assert main(static) == 0
    assert "not met  dynamic batch" in capsys.readouterr().out
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    assert main(["check-onnx", str(tmp_path / "junk.onnx")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "is not a valid ONNX model" in err and "\n" not in err
    assert main(["export", str(checkpoint), "--torchscript", str(tmp_path / "t.pt"), "--check-mfr"]) == 2
    assert "--check-mfr checks an ONNX export" in capsys.readouterr().err
