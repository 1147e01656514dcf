"""`unitsface eval` end to end: IJB from a release folder or features, MegaFace, LFW pairs.txt, image
folders (all pairs), ONNX flags, and bad input reported as one line with nothing half-written."""

from __future__ import annotations

import itertools
import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
from deploy_helpers import att_face, make_checkpoint
from sklearn.metrics import roc_auc_score

from unitsface.align import ARCFACE_TEMPLATE, warp_affine
from unitsface.cli import main
from unitsface.data.bins import save_bin
from unitsface.data.images import encode_jpeg, load_image, to_face_image
from unitsface.evaluation import verification
from unitsface.evaluation.megaface import evaluate_megaface
from unitsface.evaluation.verification import evaluate_all_pairs, evaluate_pairs, l2_normalize
from unitsface.export import export_onnx
from unitsface.verifier import FaceVerifier

PEOPLE, SHOTS = 4, 3  # fake IJB release: 4 AT&T people, 3 loose crops each


def _eval_json(capsys, *argv) -> dict:
    assert main(["eval", *map(str, argv), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _fails(capsys, *argv) -> str:
    """Run a command that must fail as the CLI promises: exit 2, one `error:` line, no traceback."""
    assert main(["eval", *map(str, argv)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    return err


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return l2_normalize(a) @ l2_normalize(b).T


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "model.pt")


# ------------------------------------------------------------------------------------------------ IJB
@pytest.fixture(scope="module")
def reference_root(reference_dir, tmp_path_factory) -> Path:
    """The reference ijb_small meta files in the official <root>/IJBC/meta layout (no images)."""
    root = tmp_path_factory.mktemp("ijb_ref")
    meta = root / "IJBC" / "meta"
    meta.mkdir(parents=True)
    for f in (reference_dir / "ijb_small").glob("*.txt"):
        (meta / f.name).symlink_to(f)
    return root


def test_ijb_features_reproduce_insightface_for_all_modes(capsys, reference_root, reference_dir):
    ref = reference_dir / "ijb_small"
    expected = json.loads((ref / "expected.json").read_text())
    out = _eval_json(capsys, "ijb", "--root", reference_root, "--features", ref / "features_orig_flip.npy",
                     "--all-modes")
    assert out["set"] == "IJBC" and out["n_images"] == expected["n_images"] == 5726
    assert len(out["results"]) == 8
    for key, tars in expected["tar_at_far"].items():
        m = dict(item.split("=") for item in key.split(","))
        letters = f"N{m['norm_score'] == 'True':d}D{m['detector_score'] == 'True':d}F{m['flip'] == 'True':d}"
        got = out["results"][letters]
        assert (got["n_templates"], got["n_pairs"], got["n_genuine"]) == (1417, 301186, 2037)
        assert got["tar_at_far"] == pytest.approx(tars, abs=1e-12), letters
    default = _eval_json(capsys, "ijb", "--root", reference_root, "--features", ref / "features_orig_flip.npy")
    assert list(default["results"]) == ["N1D1F1"]
    assert default["results"]["N1D1F1"]["tar_at_far"] == pytest.approx(
        expected["tar_at_far"]["flip=True,norm_score=True,detector_score=True"], abs=1e-12)


def _similarity(rng: np.random.Generator) -> np.ndarray:
    """A random 2×3 similarity (scale 1.1-1.4, ±15°) that keeps a 112 face inside a 200×190 crop."""
    angle, scale = np.deg2rad(rng.uniform(-15, 15)), rng.uniform(1.1, 1.4)
    rot = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    return np.hstack([rot, (np.array([30.0, 25.0]) + rng.uniform(-5, 5, 2))[:, None]])


@pytest.fixture(scope="module")
def fake_ijb(shared_dir, tmp_path_factory) -> tuple[Path, np.ndarray]:
    """A tiny IJB-C release: each aligned AT&T face warped into a loose crop by a known similarity, its
    landmarks the warped template. Person p has template 2p-1 (shots 1, 2: two medias) and 2p (shot 3);
    every template pair is listed. Returns (root, the aligned faces the crops were made from)."""
    root = tmp_path_factory.mktemp("ijb_fake")
    crops, meta = root / "IJBC" / "loose_crop", root / "IJBC" / "meta"
    crops.mkdir(parents=True)
    meta.mkdir()
    rng = np.random.default_rng(0)
    faces, tid, pts = [], [], []
    for k, (p, s) in enumerate(itertools.product(range(1, PEOPLE + 1), range(1, SHOTS + 1)), 1):
        face = to_face_image(load_image(att_face(shared_dir, p, s)))
        m = _similarity(rng)
        (crops / f"{k}.jpg").write_bytes(encode_jpeg(warp_affine(face, m, (200, 190))))
        landmarks = ARCFACE_TEMPLATE @ m[:, :2].T + m[:, 2]
        faces.append(face)
        tid.append(f"{k}.jpg {2 * p - (s < 3)} {10 * p + s}")
        pts.append(f"{k}.jpg " + " ".join(f"{v:.3f}" for v in landmarks.ravel()) + f" {rng.uniform(0.5, 1):.3f}")
    pairs = [f"{a} {b} {int((a + 1) // 2 == (b + 1) // 2)}"
             for a, b in itertools.combinations(range(1, 2 * PEOPLE + 1), 2)]
    (meta / "ijbc_face_tid_mid.txt").write_text("\n".join(tid) + "\n")
    (meta / "ijbc_name_5pts_score.txt").write_text("\n".join(pts) + "\n")
    (meta / "ijbc_template_pair_label.txt").write_text("\n".join(pairs) + "\n")
    return root, np.stack(faces)


def test_ijb_from_loose_crops_aligns_embeds_and_saves(capsys, fake_ijb, checkpoint, tmp_path):
    root, faces = fake_ijb
    saved = tmp_path / "feats.npy"
    out = _eval_json(capsys, "ijb", "--root", root, "--checkpoint", checkpoint, "--save-features", saved,
                     "--batch-size", "5")
    r = out["results"]["N1D1F1"]
    assert (r["n_templates"], r["n_pairs"], r["n_genuine"]) == (2 * PEOPLE, 28, PEOPLE)
    assert r["mode"].startswith("flip=sum, image_norm=keep, faceness=on")
    feats = np.load(saved)
    assert feats.shape == (PEOPLE * SHOTS, 64) and feats.dtype == np.float32
    # Aligning a loose crop undoes its warp: each image's feature is closest to the
    # direct embedding of the face it was made from (cos > 0.7); unaligned, cosines are around 0.2 here.
    verifier = FaceVerifier.load(checkpoint)
    direct = verifier.raw_embeddings(faces, flip=False)
    mirrored = verifier.raw_embeddings(np.ascontiguousarray(faces[:, :, ::-1]), flip=False)
    for half, ref in ((feats[:, :32], direct), (feats[:, 32:], mirrored)):
        cos = _cos(half, ref)
        assert (cos.argmax(1) == np.arange(len(faces))).all() and np.diag(cos).min() > 0.7
    again = _eval_json(capsys, "ijb", "--root", root, "--features", saved, "--all-modes")
    assert again["results"]["N1D1F1"] == r
    assert len(again["results"]) == 8


def test_ijb_no_flip_embeds_once_and_scores_flip_none_modes(capsys, fake_ijb, checkpoint, tmp_path):
    root, _ = fake_ijb
    saved = tmp_path / "feats.npy"
    out = _eval_json(capsys, "ijb", "--root", root, "--checkpoint", checkpoint, "--no-flip", "--all-modes",
                     "--save-features", saved)
    assert sorted(out["results"]) == ["N0D0F0", "N0D1F0", "N1D0F0", "N1D1F0"]
    feats = np.load(saved)
    np.testing.assert_array_equal(feats[:, :32], feats[:, 32:])
    flip_sum = _eval_json(capsys, "ijb", "--root", root, "--features", saved, "--mode", "N1D1F1")
    assert flip_sum["results"]["N1D1F1"]["tar_at_far"] == out["results"]["N1D1F0"]["tar_at_far"]


def _edit_lines(path: Path, edit) -> None:
    path.write_text("\n".join(edit(path.read_text().splitlines())) + "\n")


def _swap_first_and_fifth(lines: list[str]) -> list[str]:
    return [lines[4], *lines[1:4], lines[0], *lines[5:]]


TID, PTS, PAIRS = "ijbc_face_tid_mid.txt", "ijbc_name_5pts_score.txt", "ijbc_template_pair_label.txt"
BAD_RELEASES = {
    "names out of order": (lambda m: _edit_lines(m / PTS, _swap_first_and_fifth), "names '1.jpg' but"),
    "row counts differ": (lambda m: _edit_lines(m / TID, lambda lines: lines[:-1]), "11 rows but"),
    "unknown template": (lambda m: _edit_lines(m / PAIRS, lambda lines: [*lines, "1 99 0"]), "template 99 absent"),
    "short landmark row": (lambda m: _edit_lines(m / PTS, lambda lines: [lines[0].rsplit(" ", 1)[0], *lines[1:]]),
                           "line 1 has 11 fields, expected 12"),
    "non-numeric pair": (lambda m: _edit_lines(m / PAIRS, lambda lines: ["1 x 0", *lines[1:]]), PAIRS),
    "missing pair file": (lambda m: (m / PAIRS).unlink(), "meta file missing"),
    "missing image": (lambda m: (m.parent / "loose_crop" / "5.jpg").unlink(), "1 of 12 IJB images are missing"),
    "no loose_crop": (lambda m: shutil.rmtree(m.parent / "loose_crop"), "image folder not found"),
    "no meta folder": (lambda m: shutil.rmtree(m), "meta folder not found"),
}


@pytest.mark.parametrize("case", BAD_RELEASES)
def test_ijb_bad_release_is_one_line_and_writes_nothing(capsys, fake_ijb, checkpoint, tmp_path, case):
    root = tmp_path / "release"
    shutil.copytree(fake_ijb[0], root)
    damage, message = BAD_RELEASES[case]
    damage(root / "IJBC" / "meta")
    saved = tmp_path / "feats.npy"
    err = _fails(capsys, "ijb", "--root", root, "--checkpoint", checkpoint, "--save-features", saved)
    assert message in err
    assert not saved.exists() and list(tmp_path.glob("*.tmp")) == [] and list(tmp_path.glob(".*")) == []


def test_ijb_bad_arguments(capsys, fake_ijb, checkpoint, tmp_path):
    root, _ = fake_ijb
    short = tmp_path / "short.npy"
    np.save(short, np.ones((5, 64), np.float32))
    assert "has shape (5, 64) but the meta files list 12 images" in _fails(
        capsys, "ijb", "--root", root, "--features", short)
    assert "must be one of IJBB, IJBC" in _fails(capsys, "ijb", "--root", root, "--name", "IJBX", "--features", short)
    assert "IJB root folder not found" in _fails(capsys, "ijb", "--root", tmp_path / "nope", "--features", short)
    assert "needs a model" in _fails(capsys, "ijb", "--root", root, "--features", short, "--save-features", short)
    assert "folder of --save-features does not exist" in _fails(
        capsys, "ijb", "--root", root, "--checkpoint", checkpoint, "--save-features", tmp_path / "no" / "f.npy")
    assert "bad IJB mode" in _fails(capsys, "ijb", "--root", root, "--features", short, "--mode", "flip=both")
    assert "not a readable .npy" in _fails(capsys, "ijb", "--root", root, "--features", root / "IJBC" / "meta"
                                           / "ijbc_face_tid_mid.txt")


# -------------------------------------------------------------------------------------------- .bin
def test_bin_with_wrong_pair_count_fails_before_any_report(capsys, checkpoint, tmp_path, shared_dir):
    image = encode_jpeg(to_face_image(load_image(att_face(shared_dir, 1, 1))))
    good, bad = tmp_path / "good.bin", tmp_path / "bad.bin"
    save_bin(good, [image] * 40, [True, False] * 10)
    bad.write_bytes(pickle.dumps(([image] * 6, [True, False, True, False]), protocol=2))
    out = tmp_path / "report"
    err = _fails(capsys, "--checkpoint", checkpoint, "--bin", good, bad, "--out", out)
    assert "bad.bin: 6 images for 4 pairs; expected 8" in err
    assert not out.exists()


# -------------------------------------------------------------------------------------------- ONNX
def test_onnx_flags_reach_the_model(capsys, checkpoint, tmp_path):
    """A unitsface model exported to ONNX scores a colour .bin like its checkpoint when the flags give its
    true contract (RGB, 127.5/127.5); swapping channels or the normalisation changes the scores."""
    from unitsface.export.common import rendered_faces

    onnx_path = tmp_path / "model.onnx"
    export_onnx(checkpoint, onnx_path)
    faces = [encode_jpeg(f) for f in rendered_faces(112, 8)]
    pairs = list(itertools.combinations(range(8), 2))[:20]
    bin_path = tmp_path / "colour.bin"
    save_bin(bin_path, [faces[i] for pair in pairs for i in pair], [True, False] * 10)
    ref = _eval_json(capsys, "--checkpoint", checkpoint, "--bin", bin_path)["colour"]
    flags = ["--onnx", onnx_path, "--input-size", "112", "--bin", bin_path]
    same = _eval_json(capsys, *flags, "--normalize", "127.5,127.5", "--color", "rgb")["colour"]
    assert same["best_threshold"] == pytest.approx(ref["best_threshold"], abs=1e-5)
    assert same["fold_accuracies"] == ref["fold_accuracies"]
    bgr = _eval_json(capsys, *flags, "--normalize", "127.5,127.5", "--color", "bgr")["colour"]
    raw = _eval_json(capsys, *flags, "--normalize", "0,1", "--color", "rgb")["colour"]
    for other in (bgr, raw):
        assert abs(other["best_threshold"] - ref["best_threshold"]) > 1e-3
    assert "--normalize must be 'mean,std'" in _fails(capsys, *flags, "--normalize", "127.5")


# ----------------------------------------------------------------------------- LFW pairs and folders
def test_lfw_pairs_file_uses_its_sets_as_folds(capsys, checkpoint, tmp_path, shared_dir):
    root = tmp_path / "faces"
    for p in range(1, 7):
        (root / f"P{p}").mkdir(parents=True)
        for s in range(1, 4):
            shutil.copy(att_face(shared_dir, p, s), root / f"P{p}" / f"P{p}_{s:04d}.jpg")  # PGM bytes, any name
    lines = ["2\t3", "P1\t1\t2", "P2\t1\t3", "P3\t2\t3", "P1\t3\tP2\t1", "P3\t1\tP4\t2", "P5\t1\tP6\t1",
             "P4\t1\t2", "P5\t2\t3", "P6\t1\t3", "P1\t1\tP6\t2", "P2\t2\tP5\t3", "P3\t3\tP4\t3"]
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("\n".join(lines) + "\n")
    got = _eval_json(capsys, "--checkpoint", checkpoint, "--pairs", pairs, "--pairs-root", root)["faces"]
    parsed = [ln.split("\t") for ln in lines[1:]]
    paths = [(f"{f[0]}/{f[0]}_{int(f[1]):04d}.jpg", f"{f[-2] if len(f) == 4 else f[0]}/"
              f"{f[-2] if len(f) == 4 else f[0]}_{int(f[-1]):04d}.jpg") for f in parsed]
    verifier = FaceVerifier.load(checkpoint)
    e1, e2 = (verifier.embed([root / p[i] for p in paths]) for i in (0, 1))
    want = evaluate_pairs(e1, e2, np.array([len(f) == 3 for f in parsed]), folds=np.repeat([0, 1], 6))
    assert got["protocol"] == "2-fold, thresholds=insightface" and got["n_pairs"] == 12
    assert got["fold_accuracies"] == pytest.approx(want["fold_accuracies"])
    assert got["auc"] == pytest.approx(want["auc"])
    assert "--pairs and --pairs-root go together" in _fails(capsys, "--checkpoint", checkpoint, "--pairs", pairs)


def test_all_pairs_hand_computed():
    """Angles 0°, 50° (identity a) and 60°, 65° (b): scores .996 G, .985 I, .966 I, .643 G, .500 I, .423 I."""
    angles = np.deg2rad([0, 50, 60, 65])
    r = evaluate_all_pairs(np.c_[np.cos(angles), np.sin(angles)], np.array(["a", "a", "b", "b"]),
                           far_targets=(0.25, 0.5))
    assert (r["n_pairs"], r["n_genuine"], r["n_impostor"], r["n_identities"]) == (6, 2, 4, 2)
    assert r["auc"] == pytest.approx(6 / 8)  # G .996 beats 4 impostors, G .643 beats 2
    assert r["eer"] == pytest.approx(0.5)
    assert r["tar_at_far"] == pytest.approx({0.25: 0.5, 0.5: 1.0})
    assert r["rank1"] == pytest.approx(3 / 4)  # image 2 (50°) is nearer 60° than its mate at 0°


def test_all_pairs_matches_brute_force_across_blocks(monkeypatch):
    monkeypatch.setattr(verification, "ALL_PAIRS_BLOCK", 3)
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 4, 11)
    emb = rng.normal(size=(11, 5)) + 2 * np.eye(5)[labels]
    r = evaluate_all_pairs(emb, labels)
    pairs = list(itertools.combinations(range(11), 2))
    cos = _cos(emb, emb)
    s = np.array([cos[i, j] for i, j in pairs])
    y = np.array([labels[i] == labels[j] for i, j in pairs])
    assert r["n_pairs"] == 55 and r["n_genuine"] == y.sum()
    assert r["auc"] == pytest.approx(roc_auc_score(y, s))
    hits = [max(cos[i, j] for j in range(11) if j != i and labels[j] == labels[i])
            > max(cos[i, j] for j in range(11) if labels[j] != labels[i])
            for i in range(11) if (labels == labels[i]).sum() > 1]
    assert r["rank1"] == pytest.approx(np.mean(hits))


def test_images_root_cli_scores_every_pair(capsys, checkpoint, tmp_path, shared_dir):
    root = tmp_path / "att6"
    for p in range(1, 4):
        shutil.copytree(shared_dir / "data" / "att_faces" / f"s{p}", root / f"s{p}")
    got = _eval_json(capsys, "--checkpoint", checkpoint, "--images-root", root, "--no-flip")["att6"]
    verifier = FaceVerifier.load(checkpoint)  # all-pairs metrics do not depend on the image order
    paths = [root / f"s{p}" / f"{i}.pgm" for p in range(1, 4) for i in range(1, 11)]
    emb = verifier.raw_embeddings(verifier.prepare(paths), flip=False)
    want = evaluate_all_pairs(emb, np.repeat([0, 1, 2], 10))
    assert (got["n_images"], got["n_pairs"], got["n_genuine"]) == (30, 435, 135)
    assert got["auc"] == pytest.approx(want["auc"]) and got["eer"] == pytest.approx(want["eer"])
    assert "image folder not found" in _fails(capsys, "--checkpoint", checkpoint, "--images-root", tmp_path / "x")


# ----------------------------------------------------------------------------------------- MegaFace
def test_megaface_cli_hand_computed(capsys, tmp_path):
    """Probes a: 0°, 20°; b: 90°, 130°; distractors 45°, 100°. Genuine scores .940 (a), .766 (b). Rank-1:
    a's probes beat their best distractors (.707, .906), b's do not (.985, .866); rank-2: all succeed.
    Impostor scores: .985 .906 .866 .707 .707 .174 .087 -.174; FAR .25 allows 2, threshold .866."""
    deg = np.deg2rad
    vec = lambda *a: np.c_[np.cos(deg(a)), np.sin(deg(a))].astype(np.float32)  # noqa: E731
    np.save(tmp_path / "p.npy", vec(0, 20, 90, 130))
    np.save(tmp_path / "l.npy", np.array(["a", "a", "b", "b"]))
    np.save(tmp_path / "d1.npy", vec(45))
    np.save(tmp_path / "d2.npy", vec(100))
    args = ["megaface", "--probe", tmp_path / "p.npy", "--probe-labels", tmp_path / "l.npy", "--ranks", "1,2",
            "--far", "0.25", "--distractors"]
    np.save(tmp_path / "d.npy", vec(45, 100))
    for distractors in ([tmp_path / "d1.npy", tmp_path / "d2.npy"], [tmp_path / "d.npy"]):
        r = _eval_json(capsys, *args, *distractors)
        assert r["identification"] == pytest.approx({"1": 0.5, "2": 1.0})
        assert r["tar_at_far"] == pytest.approx({"0.25": 0.5})
        assert (r["n_trials"], r["n_distractors"], r["n_impostor"]) == (4, 2, 8)
    assert "needs --probe-labels" in _fails(capsys, "megaface", "--probe", tmp_path / "p.npy", "--distractors",
                                            tmp_path / "d.npy")
    assert "give a model" in _fails(capsys, "megaface", "--probe", tmp_path, "--distractors", tmp_path / "d.npy")
    np.save(tmp_path / "flat.npy", np.ones(4, np.float32))
    assert "must be a 2-D (n, d) array" in _fails(capsys, *args, tmp_path / "flat.npy")


def test_megaface_from_image_folders(capsys, checkpoint, tmp_path, shared_dir):
    probe, distractors = tmp_path / "probe", tmp_path / "distractors"
    for p in range(1, 4):
        shutil.copytree(shared_dir / "data" / "att_faces" / f"s{p}", probe / f"s{p}")
    for p in range(4, 7):
        shutil.copytree(shared_dir / "data" / "att_faces" / f"s{p}", distractors / f"s{p}")
    got = _eval_json(capsys, "megaface", "--checkpoint", checkpoint, "--probe", probe, "--distractors", distractors)
    verifier = FaceVerifier.load(checkpoint)
    p_emb = verifier.embed([probe / f"s{p}" / f"{i}.pgm" for p in range(1, 4) for i in range(1, 11)])
    d_emb = verifier.embed(sorted(distractors.rglob("*.pgm")))
    want = evaluate_megaface(p_emb, np.repeat([0, 1, 2], 10), d_emb)
    assert got["n_probes"] == 30 and got["n_distractors"] == 30 and got["n_trials"] == 270
    assert got["identification"]["1"] == pytest.approx(want["identification"][1])
    assert got["threshold"] == pytest.approx(want["threshold"], abs=1e-5)


def test_no_source_is_an_error(capsys, checkpoint):
    assert "give something to evaluate on" in _fails(capsys, "--checkpoint", checkpoint)
    assert "eval ijb needs --root" in _fails(capsys, "ijb", "--checkpoint", checkpoint)
