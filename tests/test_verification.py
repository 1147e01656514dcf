"""Pair verification: insightface parity, exact ROC readings against hand values and scikit-learn,
fold handling, LFW pairs.txt parsing, input errors, and the report bundle."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import roc_curve as sk_roc_curve

from unitsface.errors import UnitsfaceError
from unitsface.evaluation.report import format_table, plot_roc, write_report
from unitsface.evaluation.verification import (
    LargestScores,
    auc,
    best_single_threshold,
    eer,
    evaluate_pairs,
    far_frr_at,
    per_class_contiguous_folds,
    read_lfw_pairs,
    roc_counts,
    roc_curve,
    scores_from_pairs,
    tar_at_far,
    threshold_at_far,
)

# Hand example: 4 genuine, 5 impostor scores. ROC points (false accepts, true accepts) from the top:
# (0,0) (0,1) (0,2) (1,2) (1,3) (2,3) (2,4) (3,4) (4,4) (5,4).
GEN = [0.9, 0.8, 0.6, 0.4]
IMP = [0.7, 0.5, 0.3, 0.2, 0.1]
SCORES = np.array(GEN + IMP)
SAME = np.array([True] * 4 + [False] * 5)


@pytest.fixture(scope="module")
def ref(reference_dir):
    data = np.load(reference_dir / "verification_pairs.npz")
    expected = json.loads((reference_dir / "verification_pairs.json").read_text())
    e = data["embeddings"]
    return e[0::2], e[1::2], data["issame"], expected


@pytest.fixture(scope="module")
def ref_result(ref):
    e1, e2, same, _ = ref
    return evaluate_pairs(e1, e2, same)


# ------------------------------------------------------------------------------------------- parity
def test_insightface_protocol_is_reproduced_exactly(ref, ref_result):
    expected = ref[3]
    assert ref_result["accuracy"] == expected["accuracy_mean"]
    assert ref_result["accuracy_std"] == expected["accuracy_std"]
    assert ref_result["fold_accuracies"] == expected["fold_accuracies"]
    assert ref_result["accuracy_stderr"] == pytest.approx(np.std(expected["fold_accuracies"], ddof=1) / np.sqrt(10))
    assert ref_result["fold_counts"] == [(300, 300)] * 10


def test_exact_variant_never_fits_worse_and_stays_close(ref, ref_result):
    e1, e2, same, _ = ref
    exact = evaluate_pairs(e1, e2, same, thresholds="exact")
    grid_train, exact_train = ref_result["fold_train_accuracies"], exact["fold_train_accuracies"]
    assert all(x >= g for x, g in zip(exact_train, grid_train))  # the grid thresholds are candidates too
    diff_pairs = np.abs(np.subtract(exact["fold_accuracies"], ref_result["fold_accuracies"])) * 600
    assert diff_pairs.max() <= 6  # "at most a few pairs per fold"
    # thresholds the exact variant picks must realise its training accuracy
    s = scores_from_pairs(e1, e2)
    ids = np.repeat(np.arange(10), 600)
    for f, t in enumerate(exact["best_thresholds"]):
        tr = ids != f
        assert np.mean((s[tr] > t) == same[tr]) == pytest.approx(exact_train[f])


def _pairs_with_scores(scores):
    """Unit 2-D pairs whose cosine is exactly the given score (up to rounding)."""
    theta = np.arccos(scores)
    return np.tile([1.0, 0.0], (len(scores), 1)), np.c_[np.cos(theta), np.sin(theta)]


def test_exact_variant_breaks_ties_toward_the_middle():
    # fold 0 trains fold 1. Cuts of fold 0 (accept s >= u): all 2/4, >=.5 3/4, >=.55 2/4, >=.9 3/4, none 2/4.
    # Optimal cuts {>=.5, >=.9}: the median one is >=.9, realised by t in [.55, .9): midpoint .725.
    s = np.array([0.1, 0.5, 0.55, 0.9, 0.7, 0.8, 0.2, 0.6])
    same = np.array([0, 1, 0, 1, 1, 0, 0, 1], bool)
    e1, e2 = _pairs_with_scores(s)
    res = evaluate_pairs(e1, e2, same, folds=np.repeat([0, 1], 4), thresholds="exact")
    assert res["best_thresholds"][1] == pytest.approx(0.725)
    assert res["fold_train_accuracies"][1] == 0.75
    assert res["fold_accuracies"][1] == 0.25  # fold 1 at s > .725: only the .2 impostor is right


def test_grid_threshold_in_cosine_units_reproduces_fold_accuracy(ref, ref_result):
    e1, e2, same, _ = ref
    s = scores_from_pairs(e1, e2)
    for f, t in enumerate(ref_result["best_thresholds"]):
        te = slice(600 * f, 600 * f + 600)
        # d < t_d  <=>  s > 1 - t_d / 2, up to float rounding on a handful of pairs at most
        assert abs(np.mean((s[te] > t) == same[te]) - ref_result["fold_accuracies"][f]) <= 1 / 600


def test_pair_metrics_match_brute_force(ref, ref_result):
    e1, e2, same, _ = ref
    s = scores_from_pairs(e1, e2)
    gen, imp = s[same], s[~same]
    assert set(ref_result["tar_at_far"]) == {1e-1, 1e-2, 1e-3}  # 3000 impostors cannot resolve 1e-4
    for far, tar in ref_result["tar_at_far"].items():
        best = max(np.mean(gen >= t) for t in np.r_[s, np.inf] if np.mean(imp >= t) <= far)
        assert tar == best
    assert ref_result["auc"] == pytest.approx(np.mean(gen[:, None] > imp[None, :]), abs=1e-12)
    t, acc = ref_result["best_threshold"], ref_result["best_threshold_accuracy"]
    assert acc == max(np.mean((s >= u) == same) for u in np.unique(s))
    assert np.mean((s >= t) == same) == acc
    assert acc >= max(ref_result["fold_accuracies"][:1])  # optimistic: at least a typical fold


def _naive_val(dist, same, folds, target=1e-3):
    thresholds = np.arange(0, 4, 0.001)
    vals = []
    for f in range(10):
        te, tr = folds == f, folds != f
        imp = dist[tr][~same[tr]]
        far = np.array([np.mean(imp < t) for t in thresholds])
        t = thresholds[far <= target][-1]
        vals.append(np.mean(dist[te][same[te]] < t))
    return np.mean(vals), np.std(vals)


def test_val_at_far_follows_the_defined_rule(ref):
    e1, e2, same, _ = ref
    sub = np.r_[np.arange(0, 300, 5), np.arange(300, 600, 5)]  # one fold's worth of pairs, 10 small folds
    idx = np.concatenate([sub + 600 * k for k in range(10)])
    res = evaluate_pairs(e1[idx], e2[idx], same[idx])
    n1 = e1[idx] / np.linalg.norm(e1[idx], axis=1, keepdims=True)
    n2 = e2[idx] / np.linalg.norm(e2[idx], axis=1, keepdims=True)
    dist = np.sum((n1 - n2) ** 2, 1)
    val, val_std = _naive_val(dist, same[idx], np.repeat(np.arange(10), 120))
    assert res["val_at_far_1e-3"]["val"] == pytest.approx(val, abs=1e-9)
    assert res["val_at_far_1e-3"]["val_std"] == pytest.approx(val_std, abs=1e-9)
    assert res["val_far_interp"]["val"] >= res["val_at_far_1e-3"]["val"]  # interpolates above the rule's t


# --------------------------------------------------------------------------------------------- ROC
def test_roc_hand_example():
    fpr, tpr, thr = roc_curve(SCORES, SAME)
    np.testing.assert_array_equal(fpr * 5, [0, 0, 0, 1, 1, 2, 2, 3, 4, 5])
    np.testing.assert_array_equal(tpr * 4, [0, 1, 2, 2, 3, 3, 4, 4, 4, 4])
    assert thr[0] == np.inf and list(thr[1:]) == sorted(SCORES, reverse=True)
    assert auc(fpr, tpr) == pytest.approx(17 / 20)  # genuine-above-impostor pairs
    assert eer(fpr, tpr) == pytest.approx(0.25)  # FRR stays 1/4 while FAR goes 0.2 -> 0.4
    assert tar_at_far(fpr, tpr, [0.1, 0.2, 0.4]) == {0.1: 0.5, 0.2: 0.75, 0.4: 1.0}
    assert tar_at_far(fpr, tpr, [0.3], "interp") == {0.3: pytest.approx(0.875)}
    # closest: equal FPRs -> the largest TPR; 0.05 is nearest FPR 0, whose best TPR is 0.5
    assert tar_at_far(fpr, tpr, [0.2, 0.05], "closest") == {0.2: 0.75, 0.05: 0.5}
    with pytest.raises(UnitsfaceError, match="unknown TAR@FAR rule"):
        tar_at_far(fpr, tpr, [0.1], "nearest")


def test_thresholds_for_deployment():
    assert threshold_at_far(SCORES, SAME, 0.2) == 0.6
    assert far_frr_at(SCORES, SAME, 0.6) == (0.2, 0.25)
    assert threshold_at_far(SCORES, SAME, 0.0) == 0.8
    top_impostor = np.array([0.5, 0.9, 0.1])
    t = threshold_at_far(top_impostor, [True, False, False], 0.0)
    assert t > 0.9 and far_frr_at(top_impostor, [True, False, False], t) == (0.0, 1.0)
    assert best_single_threshold(SCORES, SAME) == (0.4, pytest.approx(7 / 9))


@pytest.mark.parametrize("drop", [False, True])
def test_roc_matches_scikit_learn_with_ties(drop):
    rng = np.random.default_rng(0)
    s = np.round(rng.normal(size=3000), 2)  # many ties
    y = rng.random(3000) < (1 / (1 + np.exp(-2 * s)))
    fpr, tpr, thr = roc_curve(s, y, drop_intermediate=drop)
    sk_fpr, sk_tpr, sk_thr = sk_roc_curve(y, s, drop_intermediate=drop)
    np.testing.assert_array_equal(fpr, sk_fpr)
    np.testing.assert_array_equal(tpr, sk_tpr)
    np.testing.assert_array_equal(thr[1:], sk_thr[1:])


def test_interp_auc_and_in_place_counts_equal_the_plain_computations():
    """The interp reading looks at two points per target, AUC runs in buffers, `overwrite` sorts in place:
    all must equal the whole-curve formulas bit for bit."""
    rng = np.random.default_rng(4)
    s = np.round(rng.normal(size=4000), 2)  # ties: vertical and horizontal segments
    y = rng.random(4000) < 0.3
    fpr, tpr, _ = roc_curve(s, y)
    top = np.r_[fpr[1:] != fpr[:-1], True]
    targets = [-0.1, 0.0, 1e-3, 0.05, 0.5, 0.999, 1.0, 1.2]
    assert tar_at_far(fpr, tpr, targets, "interp") == {x: float(np.interp(x, fpr[top], tpr[top])) for x in targets}
    assert auc(fpr, tpr) == float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2.0))
    owned = s.copy()
    for a, b in zip(roc_counts(owned, y, overwrite=True), roc_counts(s, y)):
        np.testing.assert_array_equal(a, b)


def test_closest_reading_matches_insightface_loop():
    rng = np.random.default_rng(1)
    s, y = rng.normal(size=5000), rng.random(5000) < 0.1
    s[y] += 2
    fpr, tpr, _ = roc_curve(s, y, drop_intermediate=True)
    ffpr, ftpr = np.flipud(fpr), np.flipud(tpr)
    for x in (1e-4, 1e-3, 1e-2, 1e-1):
        _, i = min(zip(abs(ffpr - x), range(len(ffpr))))
        assert tar_at_far(fpr, tpr, [x], "closest")[x] == ftpr[i]


def test_largest_scores_stream():
    rng = np.random.default_rng(2)
    chunks = [rng.normal(size=n) for n in (5, 300, 1, 2000)]
    top = LargestScores(50)
    for c in chunks:
        top.add(c)
    np.testing.assert_array_equal(np.sort(top.values), np.sort(np.concatenate(chunks))[-50:])
    assert top.kth() == np.sort(np.concatenate(chunks))[-50]


# ------------------------------------------------------------------------------------------- folds
def test_per_class_folds_recover_official_folds_from_positives_first_order(ref, ref_result):
    e1, e2, same, _ = ref
    order = np.r_[np.flatnonzero(same), np.flatnonzero(~same)]  # raw CALFW/CPLFW layout
    folds = per_class_contiguous_folds(same[order])
    res = evaluate_pairs(e1[order], e2[order], same[order], folds=folds)
    assert res["fold_accuracies"] == ref_result["fold_accuracies"]
    with pytest.warns(UserWarning, match="single class"):
        evaluate_pairs(e1[order], e2[order], same[order])


def test_lfw_pairs_txt(shared_dir, ref, ref_result):
    pairs = read_lfw_pairs(shared_dir / "data" / "lfw_pairs" / "pairs.txt")
    assert len(pairs.paths1) == 6000 and pairs.issame.sum() == 3000
    assert np.bincount(pairs.folds).tolist() == [600] * 10
    assert pairs.paths1[0] == "Abel_Pacheco/Abel_Pacheco_0001.jpg"
    assert pairs.paths2[0] == "Abel_Pacheco/Abel_Pacheco_0004.jpg"
    assert (pairs.paths1[300], pairs.paths2[300], pairs.issame[300]) == (
        "Abdel_Madi_Shabneh/Abdel_Madi_Shabneh_0001.jpg", "Dean_Barker/Dean_Barker_0001.jpg", False)
    k = pairs.paths1.index("Anthony_Hopkins/Anthony_Hopkins_0001.jpg")
    assert pairs.paths2[k] == "Anthony_Hopkins/Anthony_Hopkins_0002.jpg" and pairs.issame[k] and pairs.folds[k] == 9
    # the reference embeddings share LFW's layout: the file's folds are the contiguous folds
    e1, e2, same, _ = ref
    np.testing.assert_array_equal(pairs.issame, same)
    assert evaluate_pairs(e1, e2, same, folds=pairs.folds)["fold_accuracies"] == ref_result["fold_accuracies"]


@pytest.mark.parametrize(
    "text, match",
    [("10 300\n", "header promises"), ("ten\n", "line 1"), ("1 1\nA 1 2\nB 1 C\n", "line 3"),
     ("1 1\nA 1 B 2\nB 1 C 2\n", "line 2")],
)
def test_lfw_pairs_errors(tmp_path, text, match):
    path = tmp_path / "pairs.txt"
    path.write_text(text)
    with pytest.raises(UnitsfaceError, match=match):
        read_lfw_pairs(path)
    with pytest.raises(UnitsfaceError, match="cannot read"):
        read_lfw_pairs(tmp_path / "missing.txt")


# ------------------------------------------------------------------------------------------- errors
def test_input_validation():
    e = np.ones((4, 3), dtype=np.float32)
    y = np.array([1, 0, 1, 0])
    with pytest.raises(UnitsfaceError, match="shapes differ"):
        evaluate_pairs(e, np.ones((4, 2)), y)
    with pytest.raises(UnitsfaceError, match="non-empty"):
        evaluate_pairs(np.ones((0, 3)), np.ones((0, 3)), [])
    bad = e.copy()
    bad[2, 1] = np.nan
    with pytest.raises(UnitsfaceError, match="NaN.*row 2"):
        evaluate_pairs(e, bad, y)
    with pytest.raises(UnitsfaceError, match="4 labels"):
        evaluate_pairs(e, e, y[:3])
    with pytest.raises(UnitsfaceError, match="no impostor"):
        evaluate_pairs(e, e, np.ones(4, bool))
    with pytest.raises(UnitsfaceError, match="0/1"):
        evaluate_pairs(e, e, [1, 2, 0, 0])
    with pytest.raises(UnitsfaceError, match="thresholds"):
        evaluate_pairs(e, e, y, thresholds="grid")
    with pytest.raises(UnitsfaceError, match="folds must be between 2"):
        evaluate_pairs(e, e, y, folds=10)
    with pytest.raises(UnitsfaceError, match="NaN"):
        roc_curve([0.1, np.nan], [True, False])


# ------------------------------------------------------------------------------------------- report
def test_format_table():
    res = {"LFW": {"accuracy": 0.99783, "accuracy_std": 0.0025}, "CFP-FP": {"accuracy": 0.9, "accuracy_std": 0.01}}
    assert format_table(res) == ("| | LFW | CFP-FP |\n|---|---|---|\n"
                                 "| accuracy (%) | 99.78 ± 0.25 | 90.00 ± 1.00 |")


def test_write_report(tmp_path, ref, ref_result):
    e1, e2, same, _ = ref
    other = evaluate_pairs(e1[:1200], e2[:1200], same[:1200], folds=2, thresholds="exact")
    out = tmp_path / "run"
    path = write_report(out, {"LFW": ref_result, "small": other}, {"head": "unitsface", "learned threshold": 0.3125})
    text = path.read_text()
    overview, details = text.split("## Pair sets")
    lfw = ref_result["tar_at_far"]
    assert (f"| LFW | 10-fold pairs | 6000 (3000) | 97.93 ± 0.74 | {100 * lfw[1e-2]:.2f} | {100 * lfw[1e-3]:.2f} | – |"
            in overview)  # 3,000 impostor pairs cannot read FAR 1e-4
    assert "| LFW | 6000 | 97.93 ± 0.74 | 0.25 |" in details  # s.e. = population std / 3 for 10 folds
    assert "TAR@FAR=0.001 (%)" in details and "TAR@FAR=0.0001" not in details
    assert "Learned threshold" not in text
    assert "optimistic" in text and "| learned threshold | 0.3125 |" in text and "| head | unitsface |" in text
    with Image.open(out / "roc.png") as im:
        assert im.format == "PNG" and im.size[0] > 100
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["results"]["LFW"]["accuracy"] == ref_result["accuracy"]
    assert "roc" not in metrics["results"]["LFW"] and metrics["results"]["LFW"]["tar_at_far"]["0.1"] == 0.998
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "report.md", "roc.png"]  # no temp files


def test_plot_roc_thins_long_curves(tmp_path):
    n = 200_000
    fpr = np.linspace(0, 1, n) ** 3
    plot_roc({"a": (fpr, np.sqrt(fpr)), "b": (fpr, fpr)}, tmp_path / "r.png", title="two")
    with Image.open(tmp_path / "r.png") as im:
        assert im.format == "PNG"
