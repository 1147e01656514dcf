"""IJB: parity with insightface eval_ijbc.py for all eight test modes, pooling bit-identical to the loop
implementation, pair scoring paths, strict reading against brute force, meta readers and 1:N."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from unitsface.errors import UnitsfaceError
from unitsface.evaluation import ijb
from unitsface.evaluation.ijb import (
    describe_ijb_mode,
    evaluate_ijb,
    evaluate_ijb_identification,
    ijb_mode,
    image_features,
    pair_scores,
    read_ijb_1n_meta,
    read_ijb_meta,
    template_features,
)
from unitsface.evaluation.report import format_ijb_table

META = ("ijbc_face_tid_mid.txt", "ijbc_template_pair_label.txt", "ijbc_name_5pts_score.txt")


def _layout(reference_dir, root):
    """The reference set laid out as <root>/IJBC/meta (formats.md §7)."""
    meta = root / "IJBC" / "meta"
    meta.mkdir(parents=True)
    for name in META:
        shutil.copy(reference_dir / "ijb_small" / name, meta / name)
    return root


@pytest.fixture()
def ijb_root(reference_dir, tmp_path):
    return _layout(reference_dir, tmp_path)


@pytest.fixture(scope="module")
def small(reference_dir):
    src = reference_dir / "ijb_small"
    expected = json.loads((src / "expected.json").read_text())
    return np.load(src / "features_orig_flip.npy"), expected


@pytest.fixture(scope="module")
def meta(reference_dir, tmp_path_factory):
    return read_ijb_meta(_layout(reference_dir, tmp_path_factory.mktemp("ijb")), "IJBC")


MODES = [dict(flip=f, norm_score=n, detector_score=d) for f in (True, False) for n in (True, False)
         for d in (True, False)]


@pytest.mark.parametrize("mode", MODES, ids=lambda m: "F{flip:d}N{norm_score:d}D{detector_score:d}".format(**m))
def test_tar_at_far_equals_eval_ijbc(small, meta, mode):
    feats, expected = small
    res = evaluate_ijb(feats, meta.faceness, meta.templates, meta.medias, meta.p1, meta.p2, meta.labels, **mode)
    want = expected["tar_at_far"]["flip={flip},norm_score={norm_score},detector_score={detector_score}".format(**mode)]
    assert {f"{k:g}": v for k, v in res["tar_at_far"].items()} == {f"{float(k):g}": v for k, v in want.items()}
    assert (res["n_templates"], res["n_pairs"], res["n_genuine"]) == (
        expected["n_templates"], expected["n_pairs"], expected["n_genuine"])
    assert res["mode"] == describe_ijb_mode(**mode)


def test_ijb_table(small, meta):
    feats, expected = small
    res = evaluate_ijb(feats, meta.faceness, meta.templates, meta.medias, meta.p1, meta.p2, meta.labels)
    table = format_ijb_table({"r50": res}).splitlines()
    assert table[0] == "| run | 1e-06 | 1e-05 | 0.0001 | 0.001 | 0.01 | 0.1 | AUC | mode |"
    want = expected["tar_at_far"]["flip=True,norm_score=True,detector_score=True"]
    assert table[2].startswith(f"| r50 | {100 * want['1e-06']:.2f} | {100 * want['1e-05']:.2f} |")
    assert table[2].endswith("| flip=sum, image_norm=keep, faceness=on (eval_ijbc N1D1F1) |")
    assert "reading: tar_at_far_strict" in format_ijb_table({"r50": res}, "tar_at_far_strict")


def test_strict_reading_and_auc_match_brute_force(small, meta):
    feats, _ = small
    uniq, tf = template_features(feats, meta.faceness, meta.templates, meta.medias)
    s = pair_scores(tf, uniq, meta.p1, meta.p2)
    gen, imp = s[meta.labels], np.sort(s[~meta.labels])[::-1]
    res = evaluate_ijb(feats, meta.faceness, meta.templates, meta.medias, meta.p1, meta.p2, meta.labels)
    for far, tar in res["tar_at_far_strict"].items():
        allowed = int(np.floor(far * len(imp) + 1e-9))  # false accepts the target permits
        assert tar == np.mean(gen > imp[allowed])
    rank = np.searchsorted(np.sort(imp), gen)  # impostors strictly below each genuine (no ties here)
    assert res["auc"] == pytest.approx(rank.sum() / (len(gen) * len(imp)), abs=1e-12)


def _loop_templates(img, templates, medias):
    """eval_ijbc.py's image2template_feature, loop for loop."""
    uniq = np.unique(templates)
    out = np.zeros((len(uniq), img.shape[1]))
    for c, t in enumerate(uniq):
        ind = np.where(templates == t)[0]
        fm, mm = img[ind], medias[ind]
        parts = []
        for u, ct in zip(*np.unique(mm, return_counts=True)):
            rows = fm[mm == u]
            parts.append(rows if ct == 1 else np.mean(rows, 0, keepdims=True))
        out[c] = np.sum(np.array(parts), 0)
    norms = np.sqrt(np.einsum("ij,ij->i", out, out))
    return uniq, out / norms[:, None]


@pytest.mark.parametrize("mode", MODES[::3], ids=lambda m: "F{flip:d}N{norm_score:d}D{detector_score:d}".format(**m))
def test_pooling_is_bit_identical_to_the_loop(small, meta, mode, monkeypatch):
    feats, _ = small
    monkeypatch.setattr(ijb, "IMAGE_CHUNK", 1000)  # several chunks, cut at media boundaries
    uniq, tf = template_features(feats, meta.faceness, meta.templates, meta.medias, **mode)
    img = image_features(feats, meta.faceness, **mode)
    ref_uniq, ref_tf = _loop_templates(img, meta.templates, meta.medias)
    np.testing.assert_array_equal(uniq, ref_uniq)
    np.testing.assert_array_equal(tf, ref_tf)


def test_pair_score_paths_agree(monkeypatch):
    rng = np.random.default_rng(0)
    uniq = np.arange(10, 410, 2)
    tf = rng.normal(size=(len(uniq), 16))
    tf /= np.linalg.norm(tf, axis=1, keepdims=True)
    dense = (rng.choice(uniq[:20], 3000), rng.choice(uniq[20:], 3000))  # gallery x probe
    sparse = (rng.choice(uniq, 3000), rng.choice(uniq, 3000))
    monkeypatch.setattr(ijb, "PAIR_CHUNK", 500)
    monkeypatch.setattr(ijb, "PAIR_WINDOW", 700)  # a group's pairs found over several windows
    monkeypatch.setattr(ijb, "GATHER_CHUNK", 64)
    for p1, p2 in (dense, sparse):
        want = np.sum(tf[np.searchsorted(uniq, p1)] * tf[np.searchsorted(uniq, p2)], 1)
        np.testing.assert_allclose(pair_scores(tf, uniq, p1, p2), want, rtol=0, atol=1e-14)
    with pytest.raises(UnitsfaceError, match="template 11 has no images"):
        pair_scores(tf, uniq, [10, 11], [12, 14])


def test_modes():
    assert ijb_mode("N1D1F1") == dict(flip=True, norm_score=True, detector_score=True)
    assert ijb_mode("F0 N1 D0") == dict(flip=False, norm_score=True, detector_score=False)
    assert ijb_mode("flip=none,image_norm=l2,faceness=on") == dict(flip=False, norm_score=False, detector_score=True)
    assert describe_ijb_mode(True, False, True) == "flip=sum, image_norm=l2, faceness=on (eval_ijbc N0D1F1)"
    for bad in ("N1D1", "N1D1F1F0", "flip=concat,image_norm=keep,faceness=on", "flip=sum"):
        with pytest.raises(UnitsfaceError, match="IJB mode"):
            ijb_mode(bad)


def test_input_errors(small, meta):
    feats, _ = small
    args = (meta.faceness, meta.templates, meta.medias, meta.p1, meta.p2, meta.labels)
    with pytest.raises(UnitsfaceError, match="N x 2d"):
        evaluate_ijb(feats[:, :-1], *args)
    with pytest.raises(UnitsfaceError, match="faceness must have one entry per image"):
        evaluate_ijb(feats, meta.faceness[:-1], *args[1:])
    with pytest.raises(UnitsfaceError, match="needs the faceness"):
        evaluate_ijb(feats, None, *args[1:])
    zero = feats.copy()
    zero[7] = 0
    with pytest.raises(UnitsfaceError, match="image 7: non-finite"):
        evaluate_ijb(zero, *args, norm_score=False)
    # faceness off needs no scores
    res = evaluate_ijb(feats, None, *args[1:], detector_score=False)
    assert res["mode"].endswith("N1D0F1)")


# ---------------------------------------------------------------------------------------- meta files
def test_read_meta(meta, small):
    assert len(meta.image_names) == small[1]["n_images"] and meta.image_names[0] == "1.jpg"
    assert meta.landmarks.shape == (small[1]["n_images"], 5, 2) and meta.landmarks[0, 0, 0] == 50.0
    assert meta.faceness[0] == np.float32(0.465649)
    assert (meta.p1[0], meta.p2[0], meta.labels[0]) == (1, 2, True)
    assert meta.image_dir.name == "loose_crop"


def _rewrite(path, edit):
    lines = path.read_text().splitlines()
    path.write_text("\n".join(edit(lines)) + "\n")


@pytest.mark.parametrize(
    "file, edit, match",
    [
        ("ijbc_name_5pts_score.txt", lambda ls: ls[:-1], "5726 rows but ijbc_name_5pts_score.txt has 5725"),
        ("ijbc_name_5pts_score.txt", lambda ls: [ls[1], ls[0]] + ls[2:],
         "line 1: .* names '1.jpg' but .* names '2.jpg'"),
        ("ijbc_face_tid_mid.txt", lambda ls: ls[:3] + ["4.jpg 2"] + ls[4:], "line 4 has 2 fields"),
        ("ijbc_template_pair_label.txt", lambda ls: ls[:9] + ["1 x 0"] + ls[10:],
         "pair_label.txt: could not convert string 'x'"),
        ("ijbc_template_pair_label.txt", lambda ls: ls + ["1 999999 0"], "template 999999 absent"),
        ("ijbc_template_pair_label.txt", lambda ls: ls + ["1 2"], "number of columns changed from 3 to 2"),
        ("ijbc_template_pair_label.txt", lambda ls: [], "expected rows of 3 integers"),
    ],
)
def test_meta_errors(ijb_root, file, edit, match):
    _rewrite(ijb_root / "IJBC" / "meta" / file, edit)
    with pytest.raises(UnitsfaceError, match=match):
        read_ijb_meta(ijb_root)


@pytest.mark.parametrize(
    "file, line, match",
    [
        ("ijbc_face_tid_mid.txt", b"1.jpg \xff 1", r"ijbc_face_tid_mid.txt: not UTF-8 text \(byte 6\)"),
        ("ijbc_face_tid_mid.txt", b"1.jpg 99999999999999999999 1", "non-numeric or out-of-range"),
        ("ijbc_template_pair_label.txt", b"1 99999999999999999999 0", "could not convert string"),
    ],
    ids=["not-utf8", "int64-overflow", "pair-overflow"],
)
def test_meta_bytes_that_raised_other_errors(ijb_root, file, line, match):
    """Found by bench/fuzz_readers.py: UnicodeDecodeError and OverflowError escaped the readers."""
    path = ijb_root / "IJBC" / "meta" / file
    path.write_bytes(line + b"\n" + path.read_bytes().split(b"\n", 1)[1])
    with pytest.raises(UnitsfaceError, match=match):
        read_ijb_meta(ijb_root)


def test_meta_missing(ijb_root, tmp_path):
    (ijb_root / "IJBC" / "meta" / "ijbc_template_pair_label.txt").unlink()
    with pytest.raises(UnitsfaceError, match="missing: .*ijbc_template_pair_label.txt"):
        read_ijb_meta(ijb_root)
    with pytest.raises(UnitsfaceError, match="meta folder not found"):
        read_ijb_meta(tmp_path / "nowhere", "IJBB")


# ------------------------------------------------------------------------------------------------ 1:N
def _write_1n(meta_dir, name, rows):
    body = "".join(f"{t},{s},x.jpg\n" for t, s in rows)
    meta_dir.joinpath(name).write_text("TEMPLATE_ID,SUBJECT_ID,FILENAME\n" + body)


def test_read_1n_meta(tmp_path):
    meta = tmp_path / "IJBB" / "meta"
    meta.mkdir(parents=True)
    _write_1n(meta, "ijbb_1N_gallery_S1.csv", [(5, 50), (5, 50), (3, 30)])
    _write_1n(meta, "ijbb_1N_gallery_S2.csv", [(7, 70)])
    _write_1n(meta, "ijbb_1N_probe_mixed.csv", [(9, 50), (8, 99), (9, 50)])
    got = read_ijb_1n_meta(tmp_path, "IJBB")
    assert sorted(got) == ["S1", "S2", "probe"]
    assert [a.tolist() for a in got["S1"]] == [[3, 5], [30, 50]]
    assert [a.tolist() for a in got["probe"]] == [[8, 9], [99, 50]]
    _write_1n(meta, "ijbb_1N_gallery_S2.csv", [(7, 70), (7, 71)])
    with pytest.raises(UnitsfaceError, match="template 7 is listed with two subject ids"):
        read_ijb_1n_meta(tmp_path, "IJBB")
    _write_1n(meta, "ijbb_1N_gallery_S2.csv", [(7, 70)])
    (meta / "ijbb_1N_probe_mixed.csv").unlink()
    with pytest.raises(UnitsfaceError, match="1:N file missing"):
        read_ijb_1n_meta(tmp_path, "IJBB")


def test_1n_files_that_raised_other_errors(tmp_path):
    """Found by bench/fuzz_readers.py: UnicodeDecodeError, OverflowError, and an empty gallery's IndexError."""
    meta = tmp_path / "IJBB" / "meta"
    meta.mkdir(parents=True)
    _write_1n(meta, "ijbb_1N_gallery_S1.csv", [(5, 50)])
    _write_1n(meta, "ijbb_1N_probe_mixed.csv", [(9, 50), (8, 99)])
    for rows, match in (([(7, 99999999999999999999)], "expected integer TEMPLATE_ID,SUBJECT_ID columns"),
                        ([("\udcff", 70)], r"ijbb_1N_gallery_S2.csv: not UTF-8 text \(byte 32\)")):
        body = "".join(f"{t},{s},x.jpg\n" for t, s in rows)
        (meta / "ijbb_1N_gallery_S2.csv").write_bytes(f"TEMPLATE_ID,SUBJECT_ID,FILENAME\n{body}".encode(
            "utf-8", "surrogateescape"))
        with pytest.raises(UnitsfaceError, match=match):
            read_ijb_1n_meta(tmp_path, "IJBB")
    _write_1n(meta, "ijbb_1N_gallery_S2.csv", [])
    one_n = read_ijb_1n_meta(tmp_path, "IJBB")
    tids = np.array([5, 8, 9])
    with pytest.raises(UnitsfaceError, match="non-empty probe list and galleries; empty: S2"):
        evaluate_ijb_identification(np.eye(3), tids, {k: one_n[k] for k in ("S1", "S2")}, one_n["probe"])


def _naive_open_set(q, qs, g, gs, fpirs):
    """ijb_evals.py evaluation_1N, probe by probe."""
    sim = q @ g.T
    hits = {1: 0, 5: 0}
    pos, neg_max, non = [], [], []
    for i, sid in enumerate(qs):
        if sid in gs:
            lab = np.flatnonzero(gs == sid)[0]
            order = np.argsort(sim[i])[::-1]
            for k in hits:
                hits[k] += lab in order[:k]
            pos.append(sim[i, lab])
            neg_max.append(sim[i][gs != sid].max())
        else:
            non.append(sim[i].max())
    pos, neg_max, non = np.array(pos), np.array(neg_max), np.sort(non)[::-1]
    tpir = {f: np.sum((pos > neg_max) & (pos > non[max(int(len(non) * f) - 1, 0)])) / len(pos) for f in fpirs}
    return hits, tpir


def test_identification_open_set_matches_insightface_loop():
    rng = np.random.default_rng(3)
    n_sub, d = 60, 24
    centres = rng.normal(size=(n_sub, d))
    gal = {"G1": np.arange(0, 30), "G2": np.arange(30, 60)}  # subjects, disjoint galleries
    probe_subj = rng.integers(0, 80, 400)  # subjects >= 60 are enrolled nowhere
    subj_all = np.r_[np.arange(n_sub), probe_subj]
    tids = np.arange(1000, 1000 + len(subj_all)) * 3
    feats = np.where(subj_all[:, None] < n_sub, centres[np.minimum(subj_all, n_sub - 1)], 0)
    feats = feats + 0.9 * rng.normal(size=feats.shape)
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    galleries = {k: (tids[v], v) for k, v in gal.items()}
    probes = (tids[n_sub:], probe_subj)
    fpirs = (1e-2, 1e-1, 0.3)
    res = evaluate_ijb_identification(feats, tids, galleries, probes, ranks=(1, 5), fpirs=fpirs)
    total = {1: 0, 5: 0}
    tpirs = []
    for k, v in gal.items():
        hits, tpir = _naive_open_set(feats[n_sub:], probe_subj, feats[v], v, fpirs)
        assert res["per_gallery"][k]["hits"] == hits
        assert res["per_gallery"][k]["tpir_at_fpir"] == pytest.approx(tpir, abs=0)
        total = {r: total[r] + hits[r] for r in total}
        tpirs.append(tpir)
    assert res["rank"] == {r: total[r] / 400 for r in total}
    assert res["tpir_at_fpir"] == pytest.approx({f: (tpirs[0][f] + tpirs[1][f]) / 2 for f in fpirs}, abs=1e-15)
    assert 0.3 < res["rank"][1] < res["rank"][5] <= 0.76  # only 60/80 of probe subjects are enrolled

    legacy_probes = (tids[n_sub:][probe_subj < n_sub], probe_subj[probe_subj < n_sub])
    leg = evaluate_ijb_identification(feats, tids, galleries, legacy_probes, ranks=(1,), fpirs=(0.1,),
                                      protocol="insightface-legacy")
    q, qs = feats[n_sub:][probe_subj < n_sub], legacy_probes[1]
    sim = q @ feats[:n_sub].T
    pos = sim[np.arange(len(q)), qs]
    neg = np.sort(np.delete(sim.ravel(), np.arange(len(q)) * n_sub + qs))[::-1]
    assert leg["rank"][1] == np.mean(sim.argmax(1) == qs)
    assert leg["tpir_at_far_legacy"][0.1] == np.sum(pos > neg[int(np.ceil(len(q) * 0.1)) - 1]) / len(q)
    with pytest.raises(UnitsfaceError, match="every probe subject"):
        evaluate_ijb_identification(feats, tids, galleries, probes, protocol="insightface-legacy")
    with pytest.raises(UnitsfaceError, match="unknown 1:N protocol"):
        evaluate_ijb_identification(feats, tids, galleries, probes, protocol="closed")


def test_ijb_speed_bench_runs_reduced():
    """bench/ijb_speed.py at 1 % of IJB-C: both pipelines run whole and report identical TARs (the bench's
    output format; its timings are not asserted)."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "bench/ijb_speed.py", "--scale", "0.01", "--dim", "64"], cwd=root,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (summary["images"], summary["pairs"]) == (4690, 157000)
    assert set(summary["evaluate_ijb_s"]) == {"image features + templates", "pair scores", "ROC + TARs"}
    assert set(summary["baseline_s"]) == {"image features", "templates", "pair scores", "ROC + TARs"}
    assert summary["tars_identical"] and summary["max_score_diff"] < 1e-12 and summary["ratio_wall"] > 0
