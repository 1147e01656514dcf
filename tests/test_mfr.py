"""The MFR protocol: exact TAR at FAR over every pair, in tiles, against brute force to the last pair."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from unitsface.errors import UnitsfaceError
from unitsface.evaluation.mfr import ALL_FARS, MASK_FAR, allowed_false_accepts, evaluate_mfr, exact_tar_at_far
from unitsface.evaluation.verification import l2_normalize, roc_curve, tar_at_far

ROOT = Path(__file__).resolve().parents[1]


def clustered(seed: int, identities: int, per_identity: int, dim: int = 16, noise: float = 1.2,
              shuffle: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Features scattered around one centre per identity; rows in random identity order."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(identities), per_identity)
    if shuffle:
        labels = rng.permutation(labels)
    centres = rng.standard_normal((identities, dim))
    return (centres[labels] + noise * rng.standard_normal((len(labels), dim))).astype(np.float32), labels


def integer_features(seed: int, n: int, dim: int = 24) -> np.ndarray:
    """Rows of 64 unit steps (entries in {-k..k}, squared norm 64 = 8²): normalising divides by 8 and
    every cosine is a multiple of 1/64, exact in any precision — and full of ties."""
    rng = np.random.default_rng(seed)
    out = np.zeros((n, dim), np.float32)
    for row in out:
        for axis in rng.integers(0, dim, 64):
            row[axis] += rng.choice((-1.0, 1.0))
    # Adding ±1 at random can cancel; top up until the squared norm is exactly 64.
    for row in out:
        while (row @ row) != 64:
            norm2 = row @ row
            axis = rng.integers(0, dim)
            step = 1.0 if row[axis] >= 0 else -1.0
            row[axis] += step if norm2 < 64 else -step
    return out


def brute_force(query, q_labels, gallery, g_labels, fars):
    """Every pair's float32 cosine from ONE matrix product (the score definition of the tiles: float32 rows
    normalised, then multiplied), the library's exact ROC over the full score list and its strict TAR
    reading: (TAR, the ROC's threshold, accepted impostors there, genuine count, impostor count, scores,
    same)."""
    q = l2_normalize(query.astype(np.float32))
    if gallery is None:
        i, j = np.triu_indices(len(q), 1)
        scores, same = (q @ q.T)[i, j], q_labels[i] == q_labels[j]
    else:
        g = l2_normalize(gallery.astype(np.float32))
        scores, same = (q @ g.T).ravel(), (q_labels[:, None] == g_labels[None, :]).ravel()
    scores = scores.astype(np.float64)
    fpr, tpr, thresholds = roc_curve(scores, same)
    tar = tar_at_far(fpr, tpr, fars)
    picked = {f: thresholds[np.searchsorted(fpr, f, side="right") - 1] for f in fars}
    accepted = {f: int(((scores >= picked[f]) & ~same).sum()) for f in fars}
    return tar, picked, accepted, int(same.sum()), int((~same).sum()), scores, same


def check_threshold(got: dict, far: float, scores: np.ndarray, same: np.ndarray, roc_threshold: float) -> None:
    """The reported threshold is the lowest accepting cosine: it makes the same decisions on every pair as
    the ROC's threshold (an observed score), and the float32 just below it accepts one impostor more."""
    t = got["threshold"][far]
    assert t <= roc_threshold
    for threshold in (t, roc_threshold):
        assert int(((scores >= threshold) & ~same).sum()) == got["false_accepts"][far]
        assert (scores[same] >= threshold).mean() == got["tar_at_far"][far]
    below = float(np.nextafter(np.float32(t), np.float32(-np.inf)))
    assert int(((scores >= below) & ~same).sum()) > got["false_accepts"][far]


FARS = (1e-4, 1e-3, 1e-2, 0.0101, 0.1, 0.5)  # 1e-2 and 0.0101: neighbouring ranks, one histogram bin


@pytest.fixture
def passes(monkeypatch):
    """Counts the refinement passes: buffer_cap=0 must take the second pass, a large cap never."""
    from unitsface.evaluation import mfr

    calls = []
    refine = mfr._TailSelect.refine
    monkeypatch.setattr(mfr._TailSelect, "refine", lambda self, values: calls.append(1) or refine(self, values))
    return calls


@pytest.mark.parametrize("cap", [1 << 25, 0], ids=["buffered", "second_pass"])
@pytest.mark.parametrize("tiles", [(2048, 4096), (7, 13)], ids=["one_tile", "small_tiles"])
def test_all_pairs_match_brute_force_to_the_last_pair(cap, tiles, passes):
    emb, labels = clustered(0, 40, 7)
    got = exact_tar_at_far(emb, labels, far_targets=FARS, tile_rows=tiles[0], tile_cols=tiles[1], buffer_cap=cap)
    assert bool(passes) == (cap == 0)
    tar, thresholds, accepted, n_gen, n_imp, scores, same = brute_force(emb, labels, None, None, FARS)
    assert (got["n_genuine"], got["n_impostor"]) == (n_gen, n_imp) == (40 * 21, 280 * 279 // 2 - 40 * 21)
    for far in FARS:
        assert got["tar_at_far"][far] == tar[far], far
        assert got["false_accepts"][far] == accepted[far] <= far * n_imp
        check_threshold(got, far, scores, same, thresholds[far])


@pytest.mark.parametrize("cap", [1 << 25, 0], ids=["buffered", "second_pass"])
def test_probe_gallery_pairs_match_brute_force(cap, passes):
    gallery, g_labels = clustered(1, 60, 5)
    probes = gallery[:60] + 0.8 * np.random.default_rng(2).standard_normal((60, 16)).astype(np.float32)
    p_labels = g_labels[:60]
    got = exact_tar_at_far(probes, p_labels, gallery, g_labels, FARS, tile_rows=16, tile_cols=50, buffer_cap=cap)
    assert bool(passes) == (cap == 0)
    tar, thresholds, accepted, n_gen, n_imp, scores, same = brute_force(probes, p_labels, gallery, g_labels, FARS)
    assert (got["n_genuine"], got["n_impostor"]) == (n_gen, n_imp)
    for far in FARS:
        assert got["tar_at_far"][far] == tar[far]
        assert got["false_accepts"][far] == accepted[far]
        check_threshold(got, far, scores, same, thresholds[far])


@pytest.mark.parametrize("cap", [1 << 25, 0], ids=["buffered", "second_pass"])
def test_exact_scores_with_ties_match_to_the_last_pair(cap, passes):
    """Cosines that are multiples of 1/64, exact in any precision and any summation order: thousands of
    tied scores sit on the operating points."""
    emb = integer_features(3, 150)
    labels = np.arange(150) // 3
    emb[1::3] = emb[0::3]  # identical images: genuine scores of exactly 1
    got = exact_tar_at_far(emb, labels, far_targets=FARS, tile_rows=32, tile_cols=40, buffer_cap=cap)
    assert bool(passes) == (cap == 0)
    tar, thresholds, accepted, _, n_imp, scores, same = brute_force(emb, labels, None, None, FARS)
    assert len(np.unique(scores)) < 130 and (scores == 1).sum() >= 50
    for far in FARS:
        assert got["tar_at_far"][far] == tar[far]
        assert got["false_accepts"][far] == accepted[far]
        check_threshold(got, far, scores, same, thresholds[far])
        assert thresholds[far] * 64 == round(thresholds[far] * 64)  # the ROC's threshold is an exact score


def test_allowed_false_accepts_reads_fpr_as_the_roc_does():
    assert allowed_false_accepts(1e-4, 14_040) == 1
    assert allowed_false_accepts(1e-6, 78_000) == 0  # FAR <= 1e-6 below the resolution: no false accept
    assert allowed_false_accepts(0.1, 30) == 3  # 3/30 = 0.1 exactly in float64
    assert 0.29 * 100 < 29 and allowed_false_accepts(0.29, 100) == 29  # 29/100 == 0.29 though 0.29·100 < 29
    for n in (7, 100, 12_345):
        for far in (1e-4, 0.01, 0.3):
            k = allowed_false_accepts(far, n)
            assert k / n <= far and ((k + 1) / n > far or k == n)


def test_roc_points_are_exact_at_bin_edges():
    emb, labels = clustered(4, 30, 6)
    got = exact_tar_at_far(emb, labels, far_targets=(0.01,), roc=True, tile_rows=50, tile_cols=64)
    e = l2_normalize(emb.astype(np.float32))
    i, j = np.triu_indices(len(e), 1)
    scores, same = (e @ e.T)[i, j], labels[i] == labels[j]
    fpr, tpr = got["roc"]["fpr"], got["roc"]["tpr"]
    assert fpr[0] == tpr[0] == 0 and fpr[-1] == tpr[-1] == 1 and (np.diff(fpr) >= 0).all()
    # every point is the (FAR, TAR) of some threshold: a ROC point of the brute-force curve
    full_fpr, full_tpr, _ = roc_curve(scores.astype(np.float64), same)
    for f, t in zip(fpr[1:-1], tpr[1:-1]):
        hit = np.flatnonzero(np.isclose(full_fpr, f, atol=0, rtol=1e-12))
        assert len(hit) and np.isclose(full_tpr[hit], t, atol=1e-12).any()


def test_evaluate_mfr_sets_score_and_groups():
    emb, labels = clustered(5, 24, 5, noise=0.5, shuffle=False)
    probe_rows = np.arange(0, 120, 5)
    masked = emb[probe_rows] + 1.5 * np.random.default_rng(6).standard_normal((24, 16)).astype(np.float32)
    groups = {"even": list(range(0, 24, 2)), "odd": list(range(1, 24, 2))}
    r = evaluate_mfr(emb, labels, probe_rows, masked, groups)
    assert (r["n_images"], r["n_identities"]) == (120, 24)
    gallery = np.setdiff1d(np.arange(120), probe_rows)
    # Mask: 24 probes x 96 gallery images, 4 genuine per probe
    assert (r["mask"]["n_genuine"], r["mask"]["n_impostor"]) == (96, 24 * 96 - 96)
    tar, *_ = brute_force(masked, labels[probe_rows], emb[gallery], labels[gallery], (MASK_FAR,))
    assert r["mask"]["tar_at_far"][MASK_FAR] == tar[MASK_FAR]
    tar, *_ = brute_force(emb[probe_rows], labels[probe_rows], emb[gallery], labels[gallery], (MASK_FAR,))
    assert r["unmasked"]["tar_at_far"][MASK_FAR] == tar[MASK_FAR]
    tar_all, *_ = brute_force(emb, labels, None, None, ALL_FARS)
    assert r["all"]["tar_at_far"] == tar_all
    odd = np.isin(labels, groups["odd"])
    tar_odd, *_ = brute_force(emb[odd], labels[odd], None, None, ALL_FARS)
    assert r["groups"]["odd"]["tar_at_far"] == tar_odd and r["groups"]["odd"]["n_identities"] == 12
    assert r["score"] == pytest.approx(0.25 * r["mask"]["tar_at_far"][1e-4] + 0.75 * r["all"]["tar_at_far"][1e-6])
    assert r["unmasked"]["tar_at_far"][MASK_FAR] >= r["mask"]["tar_at_far"][MASK_FAR]  # masks cost accuracy


def test_bad_sets_are_one_line_errors():
    emb, labels = clustered(7, 5, 3, shuffle=False)
    rows = np.arange(0, 15, 3)
    with pytest.raises(UnitsfaceError, match="identity 4 has 1 image"):
        evaluate_mfr(emb[:13], labels[:13], rows, emb[rows])
    with pytest.raises(UnitsfaceError, match="group 'x' names identity 9"):
        evaluate_mfr(emb, labels, rows, emb[rows], {"x": [1, 9]})
    with pytest.raises(UnitsfaceError, match="fewer than 2 identities"):
        evaluate_mfr(emb, labels, rows, emb[rows], {"x": [1]})
    with pytest.raises(UnitsfaceError, match="one image of each"):
        evaluate_mfr(emb, labels, rows[:-1], emb[rows[:-1]])
    with pytest.raises(UnitsfaceError, match="both"):
        exact_tar_at_far(emb[:3], labels[:3])
    with pytest.raises(UnitsfaceError, match="FAR targets"):
        exact_tar_at_far(emb, labels, far_targets=(1.0,))
    bad = emb.copy()
    bad[2, 0] = np.nan
    with pytest.raises(UnitsfaceError, match="NaN"):
        exact_tar_at_far(bad, labels)


# ------------------------------------------------------------------------------------------ eval mfr
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from deploy_helpers import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "model.pt")


@pytest.fixture(scope="module")
def faces_folder(tmp_path_factory):
    """8 held-out synthetic identities × 4 aligned images as a folder (PNG: lossless), and the arrays."""
    from unitsface.data.images import encode_png
    from unitsface.data.synthetic import HELDOUT_SPLIT, render_identities

    faces, labels = render_identities(0, HELDOUT_SPLIT, 8, 4)
    root = tmp_path_factory.mktemp("faces")
    for i, (face, label) in enumerate(zip(faces, labels)):
        (root / f"person{label}").mkdir(exist_ok=True)
        (root / f"person{label}" / f"{i % 4}.png").write_bytes(encode_png(face))
    return root, faces, labels


def _mfr(capsys, *argv) -> dict:
    from unitsface.cli import main

    assert main(["eval", "mfr", *map(str, argv), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _mfr_fails(capsys, *argv) -> str:
    from unitsface.cli import main

    assert main(["eval", "mfr", *map(str, argv)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    return err


def expected_mfr(checkpoint, faces, labels, per_identity, seed):
    """The protocol by hand: embeddings of every face, probe = each identity's first image with the mask
    drawn from default_rng([seed, identity position]), brute-force TAR on every pair."""
    from unitsface.data.masks import render_masks, sample_masks
    from unitsface.verifier import FaceVerifier

    verifier = FaceVerifier.load(checkpoint)
    emb = verifier.raw_embeddings(faces, flip=False)
    rows = np.arange(0, len(faces), per_identity)
    masked = np.concatenate([render_masks(faces[r:r + 1], sample_masks(np.random.default_rng([seed, i]), 1))
                             for i, r in enumerate(rows)])
    probes = verifier.raw_embeddings(masked, flip=False)
    gallery = np.setdiff1d(np.arange(len(faces)), rows)
    return {"mask": brute_force(probes, labels[rows], emb[gallery], labels[gallery], (MASK_FAR,))[0],
            "unmasked": brute_force(emb[rows], labels[rows], emb[gallery], labels[gallery], (MASK_FAR,))[0],
            "all": brute_force(emb, labels, None, None, ALL_FARS)[0]}


def test_eval_mfr_synthetic_matches_the_protocol_by_hand(checkpoint, capsys):
    from unitsface.data.synthetic import HELDOUT_SPLIT, render_identities

    r = _mfr(capsys, "--checkpoint", checkpoint, "--synthetic", 10, "--synthetic-images", 5, "--no-flip",
             "--seed", 4)
    faces, labels = render_identities(0, HELDOUT_SPLIT, 10, 5)
    want = expected_mfr(checkpoint, faces, labels, 5, 4)
    assert set(r) >= {"mask", "unmasked", "all", "groups", "score"} and r["groups"] == {}
    assert (r["n_images"], r["n_identities"]) == (50, 10)
    assert (r["mask"]["n_genuine"], r["mask"]["n_impostor"]) == (40, 10 * 40 - 40)
    assert (r["all"]["n_genuine"], r["all"]["n_impostor"]) == (100, 50 * 49 // 2 - 100)
    for name in ("mask", "unmasked"):
        assert r[name]["tar_at_far"] == {"0.0001": want[name][MASK_FAR]}
    assert r["all"]["tar_at_far"] == {"1e-06": want["all"][1e-6], "0.0001": want["all"][1e-4]}
    assert r["score"] == pytest.approx(0.25 * want["mask"][1e-4] + 0.75 * want["all"][1e-6])


def test_eval_mfr_folder_rec_and_groups_agree(checkpoint, faces_folder, tmp_path, capsys):
    from unitsface.data.recordio import write_face_dataset

    root, faces, labels = faces_folder
    groups = tmp_path / "groups.txt"
    groups.write_text("# identity group\n" + "".join(f"person{i}\t{'even' if i % 2 == 0 else 'odd'}\n"
                                                    for i in range(8)))
    r = _mfr(capsys, "--checkpoint", checkpoint, "--images-root", root, "--groups", groups, "--out", tmp_path / "rep",
             "--no-flip")
    want = expected_mfr(checkpoint, faces, labels, 4, 0)
    assert r["mask"]["tar_at_far"]["0.0001"] == want["mask"][MASK_FAR]
    assert r["all"]["tar_at_far"] == {"1e-06": want["all"][1e-6], "0.0001": want["all"][1e-4]}
    assert set(r["groups"]) == {"even", "odd"} and r["groups"]["odd"]["n_identities"] == 4
    assert r["groups"]["odd"]["n_genuine"] == 4 * 6 and r["groups"]["odd"]["n_impostor"] == 16 * 15 // 2 - 24
    for name in ("report.md", "roc.png", "metrics.json"):
        assert (tmp_path / "rep" / name).is_file()
    assert "| group odd (all pairs) |" in (tmp_path / "rep" / "report.md").read_text()
    # The same faces packed as a .rec (PNG bytes kept): the same numbers, identities named by label.
    write_face_dataset(tmp_path / "rec", [(i // 4, (root / f"person{i // 4}" / f"{i % 4}.png").read_bytes())
                                          for i in range(32)])
    rec = _mfr(capsys, "--checkpoint", checkpoint, "--rec", tmp_path / "rec", "--no-flip")
    for name in ("mask", "unmasked", "all"):
        assert rec[name]["tar_at_far"] == r[name]["tar_at_far"]
        assert rec[name]["threshold"] == r[name]["threshold"]


def test_eval_mfr_table(checkpoint, faces_folder, capsys):
    from unitsface.cli import main

    assert main(["eval", "mfr", "--checkpoint", str(checkpoint), "--images-root", str(faces_folder[0]),
                 "--no-flip"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("| set | genuine pairs | impostor pairs | TAR@FAR≤0.0001 (%) | TAR@FAR≤1e-06 (%) |")
    assert "| Mask (masked probe vs unmasked) | 24 | 168 |" in out and "Score = 0.25" in out
    assert "single-pass" in out and "* FAR target below 1/(impostor pairs)" in out


def test_eval_mfr_bad_input_is_one_line(checkpoint, faces_folder, tmp_path, capsys):
    from unitsface.data.images import encode_png

    root = faces_folder[0]
    groups = tmp_path / "g.txt"
    groups.write_text("person1 a\nnobody a\n")
    assert "group 'a' names identity 'nobody'" in _mfr_fails(capsys, "--checkpoint", checkpoint, "--images-root",
                                                             root, "--groups", groups)
    groups.write_text("person1\n")
    assert "line 1: expected 'identity group'" in _mfr_fails(capsys, "--checkpoint", checkpoint, "--images-root",
                                                             root, "--groups", groups)
    lonely = tmp_path / "lonely"
    shutil.copytree(root, lonely)
    for extra in ("1", "2", "3"):
        (lonely / "person5" / f"{extra}.png").unlink()
    assert "identity 'person5' has 1 image" in _mfr_fails(capsys, "--checkpoint", checkpoint, "--images-root", lonely)
    wrong = tmp_path / "wrong"
    (wrong / "a").mkdir(parents=True)
    (wrong / "b").mkdir()
    for person in "ab":
        for i in range(2):
            (wrong / person / f"{i}.png").write_bytes(encode_png(np.zeros((100, 90, 3), np.uint8)))
    assert "is 90×100, not a 112×112 aligned face; pass --align" in _mfr_fails(
        capsys, "--checkpoint", checkpoint, "--images-root", wrong)
    assert "one face set" in _mfr_fails(capsys, "--checkpoint", checkpoint, "--images-root", root, "--synthetic", 4)
    assert "one face set" in _mfr_fails(capsys, "--checkpoint", checkpoint)
    assert "detector model not found" in _mfr_fails(capsys, "--checkpoint", checkpoint, "--images-root", root,
                                                    "--align", tmp_path / "none.onnx")


# ------------------------------------------------------------------------------------------ bench
def test_mfr_speed_bench_agrees_with_its_naive_baseline():
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "mfr_speed.py"), "--images", "400", "--dim", "32"],
                          capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OPENBLAS_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert lines[0]["pairs"] == 400 * 399 // 2 and lines[1]["method"].startswith("histogram + refinement")
    assert lines[-1]["same_tar"] is True and {"speedup_wall", "speedup_cpu"} <= set(lines[-1])
