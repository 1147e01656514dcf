"""Real faces end to end: a third-party ONNX model reproduces its published AT&T numbers through
`unitsface eval`, and real Extended Yale B / AT&T images go import -> pack -> train -> eval."""

from __future__ import annotations

import json

import pytest
from deploy_helpers import onnx_sface

from unitsface.cli import main
from unitsface.models import load_backbone


def _json(capsys, *argv) -> dict:
    assert main([*map(str, argv), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_sface_on_att_faces_matches_its_published_baseline(capsys, shared_dir):
    """shared/models/README.md: SFace on the 400 AT&T faces, all 79,800 pairs, images resized whole to
    112×112 (no alignment, one pass, no flip), raw 0-255 RGB in: AUC 0.997, EER 2.8 %, TAR 0.88 at FAR
    1e-3, leave-one-out rank-1 100 %."""
    r = _json(capsys, "eval", "--onnx", onnx_sface(shared_dir), "--input-size", "112", "--normalize", "0,1",
              "--color", "rgb", "--images-root", shared_dir / "data" / "att_faces", "--resize", "stretch",
              "--no-flip")["att_faces"]
    assert (r["n_images"], r["n_identities"], r["n_pairs"], r["n_genuine"]) == (400, 40, 79800, 1800)
    assert r["auc"] == pytest.approx(0.997, abs=0.003)
    assert r["eer"] == pytest.approx(0.028, abs=0.01)
    assert r["tar_at_far"]["0.001"] == pytest.approx(0.88, abs=0.05)
    assert r["rank1"] == 1.0


def test_yale_train_att_validate_pipeline(capsys, shared_dir, tmp_path):
    """Real Yale B faces (24×24 greyscale) become a 112×112 RGB training set, real AT&T faces a .bin; a
    few training steps later, `eval` on the checkpoint gives exactly the trainer's own validation."""
    yale = shared_dir / "data" / "extended_yaleb_cropped_24x24" / "CroppedYale"
    faces, rec, val, run = tmp_path / "yale", tmp_path / "rec", tmp_path / "att.bin", tmp_path / "run"
    assert main(["data", "import", str(yale), str(faces), "--workers", "2"]) == 0
    assert "identities: 38\nimages: 2452\n" in capsys.readouterr().out
    assert main(["data", "pack", str(faces), str(rec), "--workers", "2"]) == 0
    assert "images: 2452\nidentities: 38\n" in capsys.readouterr().out
    assert main(["data", "make-bin", str(val), "--from-folder", str(shared_dir / "data" / "att_faces"),
                 "--pairs", "200"]) == 0
    assert main(["train", "--config", "demo", f"data.train={rec}", f"data.val=[{val}]", "model.embedding_size=32",
                 "train.max_steps=3", "train.batch_size=16", "train.workers=0", f"output={run}"]) == 0
    capsys.readouterr()
    _, meta = load_backbone(run / "last.pt")
    assert (meta["num_classes"], meta["embedding_size"]) == (38, 32)
    trained = json.loads((run / "metrics.json").read_text())["results"]["att"]
    r = _json(capsys, "eval", "--checkpoint", run / "last.pt", "--bin", val, "--batch-size", "128")["att"]
    assert (r["n_pairs"], r["n_genuine"]) == (200, 100)
    for key in ("accuracy", "auc", "eer", "best_threshold"):
        assert r[key] == pytest.approx(trained[key], abs=1e-6), key
    assert r["fold_accuracies"] == pytest.approx(trained["fold_accuracies"])
    assert r["tar_at_far"] == pytest.approx(trained["tar_at_far"], abs=1e-6)


def test_sface_on_att_faces_mfr_protocol_with_rendered_masks(capsys, shared_dir):
    """docs/results.md: SFace on the 400 AT&T faces aligned by YuNet's landmarks, single pass, one rendered
    mask per identity (seed 0): Mask 99.44 % (358 of 360 genuine pairs) against 100 % with the probes
    unmasked, All 99.89 % at FAR 1e-4 and 99.39 % with no false accept at all (FAR <= 1e-6)."""
    yunet = shared_dir / "models" / "face_detection_yunet_2023mar_int8bq.onnx"
    r = _json(capsys, "eval", "mfr", "--onnx", onnx_sface(shared_dir), "--normalize", "0,1", "--no-flip",
              "--images-root", shared_dir / "data" / "att_faces", "--align", yunet)
    assert r["faces"] == {"aligned": 400, "no_face_found": 0}
    assert (r["mask"]["n_genuine"], r["mask"]["n_impostor"]) == (360, 14040)
    assert (r["all"]["n_genuine"], r["all"]["n_impostor"]) == (1800, 78000)
    assert r["mask"]["tar_at_far"]["0.0001"] == pytest.approx(358 / 360, abs=2 / 360)
    assert r["unmasked"]["tar_at_far"]["0.0001"] == pytest.approx(1.0, abs=1 / 360)
    assert r["all"]["tar_at_far"]["0.0001"] == pytest.approx(0.9989, abs=0.002)
    assert r["all"]["tar_at_far"]["1e-06"] == pytest.approx(0.9939, abs=0.004)
    assert r["all"]["false_accepts"]["1e-06"] == 0
    assert r["mask"]["tar_at_far"]["0.0001"] <= r["unmasked"]["tar_at_far"]["0.0001"]
