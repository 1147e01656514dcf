"""FaceVerifier, threshold resolution and calibration, and the embed / calibrate / verify commands."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from deploy_helpers import HELDOUT_POINT, att_bin, att_face, make_checkpoint, onnx_sface, random_faces

from unitsface import FaceVerifier
from unitsface.cli import main
from unitsface.errors import UnitsfaceError
from unitsface.evaluation.embed import to_input
from unitsface.evaluation.threshold import calibrate
from unitsface.export import export_onnx, load_onnx
from unitsface.models import load_backbone
from unitsface.verifier import sidecar_path


@pytest.fixture()
def checkpoint(tmp_path):
    return make_checkpoint(tmp_path / "model.pt")


@pytest.fixture(scope="module")
def onnx_pair(tmp_path_factory):
    """A checkpoint and its ONNX export with flip-sum inside (shared: exporting takes seconds)."""
    folder = tmp_path_factory.mktemp("onnx")
    ckpt = make_checkpoint(folder / "model.pt")
    export_onnx(ckpt, folder / "model.onnx", flip_sum=True)
    return ckpt, folder / "model.onnx"


def unit_rows(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_checkpoint_embeddings_are_normalised_flip_sums(checkpoint, shared_dir):
    verifier = FaceVerifier.load(checkpoint)
    faces = random_faces(3)
    model, _ = load_backbone(checkpoint)
    x = to_input(faces)
    with torch.no_grad():
        expected = unit_rows((model(x) + model(x.flip(3))).numpy())
    got = verifier.embed(faces)
    assert got.shape == (3, 32) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=1e-5)
    # A path and its decoded, resized array give the same embedding (92×112 PGM padded to 112×112).
    path = att_face(shared_dir, 1, 1)
    np.testing.assert_allclose(verifier.embed(path), verifier.embed([verifier.prepare(path)[0]]), atol=1e-6)


def test_threshold_sources_and_decision(checkpoint, tmp_path):
    learned = FaceVerifier.load(checkpoint)
    assert (learned.threshold, learned.threshold_source) == (0.31, "learned b/s")
    a, b = random_faces(2, seed=5)
    same, score = learned.verify(a, b)
    assert -1 <= score <= 1 and same == (score >= 0.31)
    assert learned.score(a, a) == pytest.approx(1.0, abs=1e-6)
    assert learned.verify(a, a)[0] is True

    assert learned.describe_threshold() == ("threshold 0.3100 (learned b/s); expected FAR 0.0018, TAR 0.625, "
                                            "measured on heldout (316800 impostor pairs)")

    given = FaceVerifier.load(checkpoint, threshold=score + 1e-3)
    assert given.threshold_source == "given by hand" and given.verify(a, b) == (False, pytest.approx(score))
    assert given.describe_threshold().endswith("(given by hand); expected FAR and TAR unknown")

    bare = FaceVerifier.load(make_checkpoint(tmp_path / "bare.pt", threshold=None))
    assert bare.threshold is None and bare.threshold_source == "none"
    with pytest.raises(UnitsfaceError, match="no threshold for .*bare.pt.*unitsface calibrate"):
        bare.verify(a, b)


def test_calibrated_far_meets_the_target_at_the_lowest_threshold():
    rng = np.random.default_rng(0)
    scores = np.r_[rng.normal(0.6, 0.1, 2_000), rng.normal(0.0, 0.1, 50_000)]
    issame = np.r_[np.ones(2_000, bool), np.zeros(50_000, bool)]
    point = calibrate(scores, issame, far=1e-3, measured_on="cal")
    impostors, genuine = scores[~issame], scores[issame]
    assert point.source == "calibrated at FAR=0.001" and (point.measured_on, point.impostor_pairs) == ("cal", 50_000)
    assert point.far == np.mean(impostors >= point.threshold) <= 1e-3
    assert point.tar == np.mean(genuine >= point.threshold) and point.frr == pytest.approx(1 - point.tar)
    # Lowest such threshold: the next impostor score below it would accept one impostor too many.
    below = impostors[impostors < point.threshold].max()
    assert np.mean(impostors >= below) > 1e-3
    assert 0.25 < point.threshold < 0.40  # the 0.999 quantile of N(0, 0.1) is 0.309
    with pytest.raises(UnitsfaceError, match="target FAR must be in"):
        calibrate(scores, issame, far=0.0, measured_on="cal")


def test_onnx_with_flip_inside_matches_the_checkpoint(onnx_pair):
    ckpt, onnx_path = onnx_pair
    from_ckpt, from_onnx = FaceVerifier.load(ckpt), FaceVerifier.load(onnx_path)
    assert from_onnx.flip_outside is False and from_onnx.threshold_source == "learned b/s"
    assert from_onnx.operating_point == from_ckpt.operating_point  # the export carries where t operates
    faces = random_faces(3, seed=1)
    np.testing.assert_allclose(from_onnx.embed(faces), from_ckpt.embed(faces), atol=1e-5)


def test_colour_order_and_per_channel_normalisation(onnx_pair):
    _, onnx_path = onnx_pair
    faces = random_faces(2, seed=2)
    rgb = FaceVerifier.load(onnx_path)
    bgr = FaceVerifier.load(onnx_path, color="bgr")
    np.testing.assert_allclose(bgr.embed(faces), rgb.embed(faces[..., ::-1].copy()), atol=1e-6)
    assert np.abs(bgr.embed(faces) - rgb.embed(faces)).max() > 1e-3
    per_channel = FaceVerifier.load(onnx_path, normalize=([127.5] * 3, [127.5] * 3))
    np.testing.assert_allclose(per_channel.embed(faces), rgb.embed(faces), atol=1e-6)
    with pytest.raises(UnitsfaceError, match="std must be one number or three"):
        FaceVerifier.load(onnx_path, normalize=(0, 0))


def test_sface_third_party_onnx_tells_people_apart(shared_dir):
    """The SFace quirk (weights listed as inputs, batch fixed at 1) on real AT&T faces."""
    graph = load_onnx(onnx_sface(shared_dir))
    assert (graph.fixed_batch, graph.input_size, graph.metadata) == (1, 112, None)
    verifier = FaceVerifier.load(onnx_sface(shared_dir), normalize=(0.0, 1.0))  # raw 0..255 in, per its README
    people, shots = (1, 2, 3), (1, 2)
    emb = verifier.embed([att_face(shared_dir, p, i) for p in people for i in shots])
    assert emb.shape == (6, 128)
    cos = emb @ emb.T
    ids = np.repeat(people, len(shots))
    upper = np.triu(np.ones_like(cos, bool), 1)
    genuine, impostor = cos[upper & (ids[:, None] == ids)], cos[upper & (ids[:, None] != ids)]
    assert genuine.mean() > impostor.mean() + 0.2, (genuine.mean(), impostor.mean())


def test_missing_and_corrupt_models_are_named(tmp_path):
    with pytest.raises(UnitsfaceError, match="model not found"):
        FaceVerifier.load(tmp_path / "nope.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a protobuf at all")
    with pytest.raises(UnitsfaceError, match="bad.onnx is not a readable ONNX model"):
        FaceVerifier.load(bad)


# ----------------------------------------------------------------------------------------------- commands
def run_cli(capsys, *argv: str) -> tuple[int, list[dict], str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, [json.loads(line) for line in captured.out.splitlines()], captured.err


def test_verify_prints_one_json_line(checkpoint, shared_dir, capsys):
    a, b = att_face(shared_dir, 1, 1), att_face(shared_dir, 2, 1)
    code, lines, _ = run_cli(capsys, "verify", a, b, "--model", checkpoint)
    expected = FaceVerifier.load(checkpoint).score(a, b)
    assert code == 0 and len(lines) == 1
    assert lines[0] == {"a": str(a), "b": str(b), "score": pytest.approx(expected, abs=1e-6), "threshold": 0.31,
                        "same": expected >= 0.31, "threshold_source": "learned b/s",
                        "threshold_far": HELDOUT_POINT["far"], "threshold_tar": HELDOUT_POINT["tar"]}
    code, lines, err = run_cli(capsys, "verify", a, b, "--model", checkpoint, "--threshold", "-1")
    assert lines[0]["same"] is True and lines[0]["threshold_source"] == "given by hand"
    assert (lines[0]["threshold_far"], lines[0]["threshold_tar"]) == (None, None)
    assert "expected FAR and TAR unknown" in err


def test_verify_refuses_a_model_without_any_threshold(tmp_path, shared_dir, capsys):
    a, b = att_face(shared_dir, 1, 1), att_face(shared_dir, 2, 1)
    assert main(["verify", str(a), str(b), "--model", str(onnx_sface(shared_dir)), "--normalize", "0,1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "has no unitsface metadata and no calibration: pass --threshold" in err
    bare = make_checkpoint(tmp_path / "bare.pt", threshold=None)
    assert main(["verify", str(a), str(b), "--model", str(bare)]) == 2
    assert "bare.pt has no learned threshold and no calibration" in capsys.readouterr().err
    code, lines, _ = run_cli(capsys, "verify", a, b, "--model", bare, "--threshold", "0.5")
    assert code == 0 and lines[0]["threshold_source"] == "given by hand"


def test_verify_pairs_file_reports_each_pair_and_bad_ones(checkpoint, shared_dir, tmp_path, capsys):
    att = shared_dir / "data" / "att_faces"
    pairs = tmp_path / "pairs.txt"
    pairs.write_text(f"# a comment\n{att}/s1/1.pgm {att}/s1/2.pgm\n\n{att}/s1/1.pgm missing.pgm\n")
    code, lines, _ = run_cli(capsys, "verify", "--pairs", pairs, "--model", checkpoint)
    assert code == 1 and len(lines) == 2
    assert set(lines[0]) == {"a", "b", "score", "threshold", "same", "threshold_source", "threshold_far",
                             "threshold_tar"}
    assert lines[1]["b"] == str(tmp_path / "missing.pgm") and "cannot read image" in lines[1]["error"]


def test_verify_usage_errors(checkpoint, capsys):
    assert main(["verify", "only-one.jpg", "--model", str(checkpoint)]) == 2
    assert "exactly two images" in capsys.readouterr().err
    assert main(["verify", "a", "b", "--model", str(checkpoint), "--normalize", "1,2,3"]) == 2
    assert "--normalize must be" in capsys.readouterr().err


def test_embed_skips_and_counts_unreadable_files(checkpoint, shared_dir, tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    sources = [att_face(shared_dir, 1, i) for i in (1, 2, 3)]
    for i, src in enumerate(sources):
        (images / f"{i}.pgm").write_bytes(src.read_bytes())
    (images / "1b_broken.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    out = tmp_path / "emb.npy"
    code, lines, err = run_cli(capsys, "embed", "--model", checkpoint, "--images", images, "--out", out,
                               "--batch-size", "2")
    assert code == 0 and lines == [{"out": str(out), "list": str(tmp_path / "emb.txt"), "embedded": 3,
                                    "skipped": 1, "dim": 32}]
    assert "1b_broken.jpg" in err and "skipped 1 unreadable file(s) of 4" in err
    listed = (tmp_path / "emb.txt").read_text().splitlines()
    assert listed == [str(images / f"{i}.pgm") for i in range(3)]
    np.testing.assert_allclose(np.load(out), FaceVerifier.load(checkpoint).embed(sources), atol=1e-6)


def test_calibrate_stores_and_reports_the_threshold(checkpoint, shared_dir, tmp_path, capsys):
    val = att_bin(shared_dir, tmp_path / "val.bin")
    code, (report,), _ = run_cli(capsys, "calibrate", "--model", checkpoint, "--bin", val, "--far", "0.2", "--json")
    assert code == 0 and report["pairs"] == 12 and report["written"] == str(sidecar_path(checkpoint))
    in_use = report["in_use"]
    assert in_use["source"] == "calibrated at FAR=0.2" and in_use["far"] <= 0.2
    assert report["learned"]["source"] == "learned b/s" and report["learned"]["threshold"] == 0.31

    verifier = FaceVerifier.load(checkpoint)
    assert (verifier.threshold, verifier.threshold_source) == (in_use["threshold"], "calibrated at FAR=0.2")
    code, (measured,), _ = run_cli(capsys, "calibrate", "--model", checkpoint, "--bin", val, "--json")
    assert measured["in_use"] == in_use and measured["written"] is None

    make_checkpoint(checkpoint, seed=1)  # retrained in place: the stored calibration is stale now
    with pytest.raises(UnitsfaceError, match="stale threshold file .*re-run `unitsface calibrate`"):
        FaceVerifier.load(checkpoint)
    code, (fresh,), _ = run_cli(capsys, "calibrate", "--model", checkpoint, "--bin", val, "--far", "0.2", "--json")
    assert code == 0 and FaceVerifier.load(checkpoint).threshold == fresh["in_use"]["threshold"]


def test_calibrate_without_any_threshold_asks_for_a_target(tmp_path, shared_dir, capsys):
    bare = make_checkpoint(tmp_path / "bare.pt", threshold=None)
    val = att_bin(shared_dir, tmp_path / "val.bin", people=2)
    assert main(["calibrate", "--model", str(bare), "--bin", str(val)]) == 2
    assert "no learned threshold and no calibration: pass --far" in capsys.readouterr().err
