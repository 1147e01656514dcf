"""The operating point of a learned threshold (issue 10): rates with counts, FAR bounds, thresholds at FAR,
the balanced threshold, both UCE conventions, the report section, the plot and the history it draws."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from unitsface.evaluation.report import write_report
from unitsface.evaluation.threshold import (
    ACCEPTS_NOTHING,
    NOT_MEASURABLE,
    OperatingPoint,
    balanced_threshold,
    describe,
    format_rate,
    measure,
    operating_point,
    primary_set,
    rates_at,
    thresholds_at_far,
)
from unitsface.evaluation.verification import evaluate_all_pairs
from unitsface.training.logging import RunLogger, threshold_history

SCORES = np.array([0.9, 0.8, 0.4, 0.5, 0.2, 0.1])
SAME = np.array([True, True, True, False, False, False])


def test_rates_count_accepts_with_s_greater_or_equal_t():
    r = rates_at(SCORES, SAME, 0.5)  # accepts 0.9, 0.8 (genuine) and 0.5 (impostor)
    assert r == {"threshold": 0.5, "tar": 2 / 3, "far": 1 / 3, "true_accepts": 2, "false_accepts": 1,
                 "n_genuine": 3, "n_impostor": 3}
    none = rates_at(SCORES, SAME, 0.6)
    assert none["far"] == "< 1/3" and none["false_accepts"] == 0  # an upper bound, never a plain 0
    assert format_rate(none["far"]) == "< 1/3" and format_rate(0.00184) == "0.00184" and format_rate(None) == "unknown"


def test_thresholds_at_far_need_ten_expected_false_accepts():
    rng = np.random.default_rng(0)
    impostor = rng.normal(0, 0.1, 5_000)
    scores = np.r_[rng.normal(0.6, 0.1, 500), impostor]
    same = np.r_[np.ones(500, bool), np.zeros(5_000, bool)]
    got = thresholds_at_far(scores, same)
    assert got["0.0001"] == got["0.001"] == NOT_MEASURABLE  # 5,000 pairs: 0.5 and 5 expected false accepts
    t = got["0.01"]
    assert np.mean(impostor >= t) <= 0.01 < np.mean(impostor >= impostor[impostor < t].max())  # lowest such t
    assert thresholds_at_far(scores, same, targets=(2e-3,))["0.002"] == pytest.approx(np.sort(impostor)[-10])


def test_balanced_threshold_by_hand():
    # t = 0.4 accepts every genuine pair and the 0.5 impostor: ½(1 + 2/3), the best reachable
    assert balanced_threshold(SCORES, SAME) == pytest.approx(0.4)


def test_operating_point_reports_every_convention_and_one_sentence():
    point = operating_point(SCORES, SAME, {"b/s": 0.5, "(b - log(C-1))/s": 0.15})
    assert point["convention"] == "b/s" and point["tar"] == 2 / 3 and point["far"] == 1 / 3
    assert point["threshold_at_far"] == {"0.01": NOT_MEASURABLE, "0.001": NOT_MEASURABLE, "0.0001": NOT_MEASURABLE}
    assert point["balanced_threshold"] == pytest.approx(0.4)
    other = point["other_conventions"]["(b - log(C-1))/s"]
    assert (other["tar"], other["far"]) == (1.0, 2 / 3)
    assert describe(point, "val") == ("the learned threshold 0.5000 accepts 66.7 % of genuine pairs at a FAR of "
                                      "0.33 (1 of 3 impostor pairs) on val")
    strict = operating_point(SCORES, SAME, {"b/s": 0.85})
    assert describe(strict, "val").endswith("at a FAR below 1/3 (no false accept among 3 impostor pairs) on val")
    assert primary_set({"val": strict, "heldout": {**strict, "n_impostor": 300}}) == "heldout"
    assert ACCEPTS_NOTHING not in describe(strict, "val")


def test_a_threshold_above_every_genuine_score_says_it_accepts_nothing():
    """t = 0.95 > 0.9, the best genuine score: TAR 0, and every sentence about it says so (the threshold study's
    under-trained runs land there)."""
    blind = operating_point(SCORES, SAME, {"b/s": 0.95})
    assert blind["tar"] == 0
    assert describe(blind, "val").endswith(f"on val — {ACCEPTS_NOTHING}")
    deployed = measure(OperatingPoint(0.95, "learned b/s"), SCORES, SAME, "val")
    assert deployed.describe().endswith(ACCEPTS_NOTHING)
    assert ACCEPTS_NOTHING not in measure(OperatingPoint(0.9, "learned b/s"), SCORES, SAME, "val").describe()


def test_the_validation_line_says_when_the_threshold_accepts_nothing(tmp_path, capsys):
    result = identity_set()
    pairs = result["pair_scores"]
    log = RunLogger(tmp_path, True, 2)
    for t in (0.5, float(pairs["scores"].max()) + 0.01):
        log.validation(1, 0, {"ids": result}, {"ids": operating_point(pairs["scores"], pairs["issame"], {"b/s": t})})
    log.close()
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("ids:")]
    assert len(lines) == 2 and ACCEPTS_NOTHING not in lines[0] and ACCEPTS_NOTHING in lines[1]
    assert primary_set({}) is None


def identity_set() -> dict:
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(6, 8))
    emb = np.repeat(centres, 4, axis=0) + 0.6 * rng.normal(size=(24, 8))
    return evaluate_all_pairs(emb, np.repeat(np.arange(6), 4))


def test_report_leads_with_the_overview_and_the_learned_threshold(tmp_path):
    result = identity_set()
    pairs = result["pair_scores"]
    points = {"ids": operating_point(pairs["scores"], pairs["issame"], {"b/s": 0.5})}
    write_report(tmp_path, {"ids": result}, {"head": "uss"}, points)
    text = (tmp_path / "report.md").read_text()
    assert text.index("| ids | all pairs | 276 (240) | – |") < text.index("## Learned threshold")
    assert f"- {describe(points['ids'], 'ids')}." in text
    assert text.index("## Learned threshold") < text.index("## Identity sets (all pairs)")
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["threshold_operating_point"]["ids"]["n_impostor"] == 240
    assert "pair_scores" not in metrics["results"]["ids"]  # per-pair arrays stay out of the JSON


def test_threshold_history_and_plot(tmp_path):
    """The history of a resumed run (step 20 logged twice) keeps the last record of each step."""
    point = {"threshold": 0.6, "threshold_at_far": {"0.01": 0.7, "0.001": NOT_MEASURABLE}, "balanced_threshold": 0.5}
    records = [{"step": 10, "loss": 1.0, "threshold": 0.50}, {"step": 20, "loss": 1.0, "threshold": 0.55},
               {"step": 20, "epoch": 1, "validation": {}, "threshold_operating_point": {"ids": point}},
               {"step": 20, "loss": 1.0, "threshold": 0.56}, {"step": 30, "loss": 1.0, "threshold": 0.60},
               {"step": 30, "epoch": 2, "validation": {}, "threshold_operating_point": {"other": point}}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    history = threshold_history(tmp_path / "metrics.jsonl", "ids")
    assert history == {"steps": [10, 20, 30], "threshold": [0.50, 0.56, 0.60], "validations": [(20, point)]}
    from unitsface.evaluation.report import plot_threshold

    result = identity_set()["pair_scores"]
    plot_threshold(history, result["scores"], result["issame"], 0.6, "ids", tmp_path / "threshold.png")
    with Image.open(tmp_path / "threshold.png") as im:
        assert im.format == "PNG" and im.size[0] > 2 * im.size[1]  # two panels side by side
