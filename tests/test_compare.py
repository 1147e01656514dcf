"""The loss-comparison bench: its threshold metrics by hand, and a tiny end-to-end comparison."""

from __future__ import annotations

import json

import numpy as np
import pytest

from unitsface.config import for_head, load_config
from unitsface.errors import UnitsfaceError
from unitsface.evaluation.threshold import balanced_threshold
from unitsface.training.compare import all_pairs, balanced_accuracy, compare_heads, results_table


def test_threshold_metrics_by_hand():
    scores = np.array([0.9, 0.8, 0.4, 0.5, 0.2, 0.1])
    issame = np.array([True, True, True, False, False, False])
    # t = 0.5 accepts 0.9, 0.8 (TAR 2/3) and the impostor 0.5 (TNR 2/3)
    assert balanced_accuracy(scores, issame, 0.5) == pytest.approx(2 / 3)
    # t = 0.4 accepts all genuine and the 0.5 impostor: ½(1 + 2/3) is the best reachable
    assert balanced_threshold(scores, issame) == pytest.approx(0.4)
    assert balanced_accuracy(scores, issame, 0.4) == pytest.approx(5 / 6)


def test_all_pairs_counts_and_labels():
    emb = np.array([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0]])
    scores, same = all_pairs(emb, np.array([0, 0, 1]))
    assert same.tolist() == [True, False, False]
    assert scores[2] == pytest.approx(0.1 / np.sqrt(1.01))


def test_compare_two_heads_end_to_end(tmp_path):
    base = load_config("bench_losses", [
        "data.synthetic.identities=12", "data.synthetic.images_per_identity=6", "data.synthetic.val_pairs=40",
        "data.synthetic.heldout_identities=4", "data.synthetic.heldout_images=3",
        f"data.cache={tmp_path / 'cache'}", "train.batch_size=12", "train.epochs=2", "train.workers=0",
        "model.embedding_size=32",
    ])
    # a head with a learned threshold and one without (AnchorFace: its S and pair terms through the trainer)
    runs = compare_heads(base, ["cosface_anchor", "uss"], [0], tmp_path / "out", test_identities=6, test_images=4)
    assert set(runs) == {"cosface_anchor", "uss"}
    assert runs["uss"][0]["threshold_source"] == "learned b/s"
    assert runs["cosface_anchor"][0]["threshold_source"] == "best on calibration identities"
    for rs in runs.values():
        r = rs[0]
        assert 0.0 <= r["fixed_threshold_accuracy"] <= 1.0
        assert set(r["tar_at_far"]) == {1e-3, 1e-4}
    table = results_table(runs)
    assert table.count("\n") == 3 and "| uss |" in table and "learned b/s" in table
    assert (tmp_path / "out" / "uss-seed0" / "last.pt").is_file()
    logged = [json.loads(line) for line in (tmp_path / "out" / "cosface_anchor-seed0" / "metrics.jsonl").open()]
    steps = [r for r in logged if "loss" in r]
    assert steps and all(-1 <= r["anchor_threshold"] <= 1 and 0 <= r["far_soft"] <= 1 for r in steps)


def test_head_overrides_reach_every_compared_head_or_stop_before_training(tmp_path):
    """`bench losses head.m=0.3`: every head trains with m = 0.3; a head without an `m` stops the comparison with
    one error naming it before any run (it used to be dropped silently)."""
    base = load_config("bench_losses", ["head.m=0.3", f"data.cache={tmp_path / 'cache'}"])
    assert for_head(base, "arcface")["head"] == {"name": "arcface", "m": 0.3}
    with pytest.raises(UnitsfaceError, match="head 'softmax' has no parameter 'm'"):
        compare_heads(base, ["cosface", "softmax"], [0], tmp_path / "out")
    assert not (tmp_path / "out").exists()
