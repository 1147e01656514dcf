"""`unitsface bench threshold --quick`: the study's machinery end to end, and its numbers cross-checked
against the trainer's own operating point (two code paths over the same held-out pairs)."""

from __future__ import annotations

import json

import pytest
import torch

from unitsface.cli import main
from unitsface.cli.bench import QUICK
from unitsface.training.threshold_study import epochs_for, far_times_c


def test_budgets_round_to_whole_epochs_with_room_for_the_warm_up():
    assert epochs_for(150, 6) == 25 and epochs_for(300, 100) == 3 and epochs_for(150, 100) == 2
    assert epochs_for(10, 100) == 2  # one warm-up epoch, one of the sample-to-sample loss


def test_quick_study_runs_measures_and_writes_the_doc(tmp_path, capsys):
    out, doc = tmp_path / "study", tmp_path / "threshold.md"
    doc.write_text("# intro\n\n<!-- study:begin -->\nold numbers\n<!-- study:end -->\n\n## conclusion\n")
    args = ["bench", "threshold", "--quick", "--out", str(out), "--doc", str(doc), f"data.cache={tmp_path / 'cache'}"]
    assert main(args) == 0
    records = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
    assert sorted({r["run"]["head"] for r in records}) == ["bce", "cosface", "uce", "unitsface", "uss"]
    assert {r["run"]["identities"] for r in records} == {8, 16} and len(records) == 10
    for r in records:
        assert r["epochs"] == 2 and r["calibrated"]["n_impostor"] == 135  # 6 identities × 3 images, all pairs
        learned = r["learned"]
        if r["run"]["head"] == "cosface":
            assert learned == {}
            continue
        convention, rates = next(iter(learned.items()))
        assert convention == {"uce": "b/s", "bce": "mean b_j/s"}.get(r["run"]["head"], "b/s")
        if r["run"]["head"] != "bce":  # the trainer measured the same threshold on the same pairs itself
            metrics = json.loads((out / r["run"]["name"] / "metrics.json").read_text())
            point = metrics["threshold_operating_point"]["heldout"]
            assert {k: point[k] for k in rates} == pytest.approx(rates)
    assert set(next(r for r in records if r["run"]["head"] == "uce")["learned"]) == {"b/s", "(b - log(C-1))/s"}
    assert [c for c, _ in far_times_c(records, "uss")] == [8, 16]

    text = doc.read_text()
    assert text.startswith("# intro") and text.endswith("## conclusion\n") and "old numbers" not in text
    assert "| unitsface | 8 |" in text and "| cosface | 16 |" in text and "(calibrated)" in text
    assert "k = median FAR × C" in text and (tmp_path / "threshold_study.png").stat().st_size > 10_000

    assert main(args) == 0  # every run is in runs.jsonl already: nothing trains again
    assert len((out / "runs.jsonl").read_text().splitlines()) == 10
    capsys.readouterr()
    doc.write_text("no markers here\n")
    assert main(args) == 2
    assert "has no <!-- study:begin --> ... <!-- study:end --> section" in capsys.readouterr().err


def test_head_overrides_reach_every_run_or_stop_the_study_before_it_trains(tmp_path, capsys):
    """`head.m_sample=0.3` trains unitsface with it (the run's checkpoint config says so); for a head that has no such
    parameter the study stops with a one-line error before the first run."""
    out = tmp_path / "study"
    common = ["bench", "threshold", "--identities", "8", "--budgets", "4", "--seeds", "1", "--out", str(out),
              *QUICK, f"data.cache={tmp_path / 'cache'}", "head.m_sample=0.3"]
    assert main([*common, "--heads", "unitsface,cosface"]) == 2
    assert "head 'cosface' has no parameter 'm_sample'" in capsys.readouterr().err and not out.exists()
    assert main([*common, "--heads", "unitsface"]) == 0
    config = torch.load(out / "unitsface-C8-S4-seed0" / "last.pt", weights_only=False)["config"]
    assert config["head"] == {"name": "unitsface", "m_sample": 0.3}


def test_study_arguments_are_checked(capsys):
    assert main(["bench", "threshold", "--identities", "100,x"]) == 2
    assert "--identities must be comma-separated positive integers" in capsys.readouterr().err
    assert main(["bench", "threshold", "--heads", "nope"]) == 2
    assert "unknown head 'nope'" in capsys.readouterr().err
    assert main(["bench", "threshold", "--seeds", "0"]) == 2
    assert "--seeds must be at least 1" in capsys.readouterr().err
