"""ONNX / TorchScript export: parity with PyTorch, metadata round trip, refusal on mismatch, CLI."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from deploy_helpers import HELDOUT_POINT, att_face, make_checkpoint

from unitsface.cli import main
from unitsface.data.images import load_image
from unitsface.errors import UnitsfaceError
from unitsface.evaluation.embed import to_input
from unitsface.export import export_onnx, export_torchscript, load_onnx, read_metadata
from unitsface.export.torchscript import EXTRA_FILE
from unitsface.models import load_backbone
from unitsface.training.checkpoint import file_sha256


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "model.pt")


@pytest.fixture(scope="module")
def real_faces(shared_dir):
    return [load_image(att_face(shared_dir, p, 1)) for p in (1, 2, 3)]


def real_input(images) -> torch.Tensor:
    from unitsface.data.images import to_face_image

    return to_input(np.stack([to_face_image(img) for img in images]))


@pytest.fixture(scope="module")
def exported(tmp_path_factory, checkpoint, real_faces):
    out = tmp_path_factory.mktemp("onnx") / "model.onnx"
    return out, export_onnx(checkpoint, out, check_images=real_faces)


def test_onnx_matches_pytorch_and_carries_its_metadata(exported, checkpoint, real_faces):
    out, report = exported
    assert set(report.max_abs_diff) == {"random", "faces", "images"}
    assert max(report.max_abs_diff.values()) <= 1e-4

    graph = onnx.load(str(out))
    meta = read_metadata(graph)
    assert meta == {"unitsface_format": 1, "backbone": "tinyfacenet", "embedding_size": 32, "input_size": 112,
                    "color": "rgb", "mean": 127.5, "std": 127.5, "flip_sum": False, "threshold": 0.31,
                    "threshold_source": "learned b/s", "threshold_far": HELDOUT_POINT["far"],
                    "threshold_tar": HELDOUT_POINT["tar"], "threshold_pairs": {"genuine": 2800, "impostor": 316800},
                    "threshold_set": "heldout", "head": "uss", "source_sha256": file_sha256(checkpoint)}
    shape = graph.graph.input[0].type.tensor_type.shape.dim
    assert graph.graph.input[0].name == "data" and [d.dim_value for d in shape[1:]] == [3, 112, 112]
    assert shape[0].dim_param == "batch" and not shape[0].HasField("dim_value")  # a dynamic batch by default
    (output,) = graph.graph.output  # exactly one output, float32, batch × d
    assert output.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert output.type.tensor_type.shape.dim[0].dim_param == "batch"

    # Independent check on real faces: a fresh model from the checkpoint vs onnxruntime (one batch of 3).
    model, _ = load_backbone(checkpoint)
    x = real_input(real_faces)
    with torch.no_grad():
        expected = model(x).numpy()
    got = load_onnx(out).run(x.numpy())
    assert np.abs(expected).max() > 0.1  # outputs are not trivially small
    assert got.shape == (3, 32) and np.abs(got - expected).max() <= 1e-4


def test_flip_sum_inside_a_static_batch_graph(tmp_path, checkpoint, real_faces):
    out = tmp_path / "flip.onnx"
    export_onnx(checkpoint, out, flip_sum=True, static_batch=1, opset=13)
    graph = load_onnx(out)
    assert graph.fixed_batch == 1 and graph.metadata["flip_sum"] is True  # run() loops over batches of 1
    model, _ = load_backbone(checkpoint)
    x = real_input(real_faces)
    with torch.no_grad():
        expected = (model(x) + model(x.flip(3))).numpy()
    np.testing.assert_allclose(graph.run(x.numpy()), expected, atol=1e-4)
    assert onnx.load(str(out)).opset_import[0].version == 13


def test_an_export_that_differs_is_refused_and_not_written(tmp_path, checkpoint, monkeypatch):
    import unitsface.export.onnx as onnx_export

    real_load = onnx_export.load_onnx

    def drifting(source):
        runner = real_load(source)
        run = runner.run
        runner.run = lambda x: run(x) + 2e-4
        return runner

    monkeypatch.setattr(onnx_export, "load_onnx", drifting)
    out = tmp_path / "bad.onnx"
    with pytest.raises(UnitsfaceError, match=r"differs from PyTorch by 2\.0\de-04 .*nothing was written"):
        export_onnx(checkpoint, out)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_torchscript_round_trip(tmp_path, checkpoint, real_faces):
    out = tmp_path / "model.ts"
    report = export_torchscript(checkpoint, out, flip_sum=True)
    assert max(report.max_abs_diff.values()) <= 1e-4
    extra = {EXTRA_FILE: ""}
    loaded = torch.jit.load(str(out), _extra_files=extra)
    meta = json.loads(extra[EXTRA_FILE])
    assert meta["flip_sum"] is True and meta["source_sha256"] == file_sha256(checkpoint)
    model, _ = load_backbone(checkpoint)
    x = real_input(real_faces)
    with torch.no_grad():
        np.testing.assert_allclose(loaded(x).numpy(), (model(x) + model(x.flip(3))).numpy(), atol=1e-4)


def test_cli_prints_a_json_report(tmp_path, checkpoint, shared_dir, capsys):
    faces = shared_dir / "data" / "att_faces" / "s1"
    out = tmp_path / "m.onnx"
    code = main(["export", str(checkpoint), "--onnx", str(out), "--check-images", str(faces), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["format"] == "onnx" and report["path"] == str(out) and out.is_file()
    assert set(report["max_abs_diff"]) == {"random", "faces", "images"}
    assert all(0 <= v <= report["tolerance"] == 1e-4 for v in report["max_abs_diff"].values())
    assert report["metadata"]["source_sha256"] == file_sha256(checkpoint)


def test_cli_errors_are_one_line(tmp_path, checkpoint, capsys):
    assert main(["export", str(checkpoint)]) == 2
    assert "nothing to export" in capsys.readouterr().err
    assert main(["export", str(checkpoint), "--onnx", str(tmp_path / "m.onnx"), "--opset", "7"]) == 2
    assert capsys.readouterr().err.strip() == "error: ONNX opset must be in 11..20, got 7"
    assert main(["export", str(tmp_path / "missing.pt"), "--onnx", str(tmp_path / "m.onnx")]) == 2
    assert capsys.readouterr().err.strip() == f"error: checkpoint not found: {tmp_path / 'missing.pt'}"
