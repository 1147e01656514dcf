"""Uniform-classification metrics, the linear classifier with a unified bias, and `bench uniform`."""

from __future__ import annotations

import json
import math

import pytest
import torch

from unitsface.classification import LinearClassifier
from unitsface.cli import main
from unitsface.errors import UnitsfaceError
from unitsface.losses import functional as LF


def brute_force(p: torch.Tensor, n: torch.Tensor) -> int:
    """max over candidate thresholds t ∈ {p_i} of #{i: n_i < t ≤ p_i} (methods.md §4, step 5)."""
    return max(int(((n < t) & (t <= p)).sum()) for t in p.tolist())


def count_at(p: torch.Tensor, n: torch.Tensor, t: float) -> int:
    return int(((n < t) & (t <= p)).sum())


# --------------------------------------------------------------------------- the sweep


@pytest.mark.parametrize("trial", range(40))
def test_sweep_matches_brute_force_with_ties(trial):
    g = torch.Generator().manual_seed(trial)
    size = int(torch.randint(1, 30, (1,), generator=g))
    # Small integer scores: many ties between p's, n's and across them.
    p = torch.randint(0, 6, (size,), generator=g).double()
    n = torch.randint(0, 6, (size,), generator=g).double()
    result = LF.uniform_sweep(p, n)
    best = brute_force(p, n)
    assert result.correct == best and result.accuracy == best / size and result.total == size
    if best:
        # Every threshold of the reported segment (low, high] reaches the optimum.
        for t in (result.threshold, result.high, math.nextafter(result.low, math.inf)):
            assert count_at(p, n, t) == best
        assert count_at(p, n, result.low) < best or result.low == result.high
    else:
        assert math.isnan(result.threshold)


def test_sweep_reports_the_lowest_of_equal_optima():
    p, n = torch.tensor([1.0, 3.0]), torch.tensor([0.0, 2.0])  # (0, 1] and (2, 3]: one sample each
    result = LF.uniform_sweep(p, n)
    assert (result.correct, result.low, result.high) == (1, 0.0, 1.0)


def test_sweep_by_hand_boundaries():
    # Intervals (0, 2], (2, 3], (1, 2]: t = 2 is inside the first and third (t ≤ p) but not the
    # second (n < t is strict); tie p = n = 5 is never correct.
    p = torch.tensor([2.0, 3.0, 2.0, 5.0])
    n = torch.tensor([0.0, 2.0, 1.0, 5.0])
    result = LF.uniform_sweep(p, n)
    assert (result.correct, result.low, result.high, result.threshold) == (2, 1.0, 2.0, 1.5)
    assert result.accuracy == 0.5


def test_uniform_accuracy_on_a_score_matrix():
    scores = torch.tensor([[0.9, 0.2, 0.1], [0.3, 0.8, 0.6], [0.5, 0.4, 0.45], [0.55, 0.7, 0.1]])
    labels = torch.tensor([0, 1, 0, 1])
    # (p, n) = (0.9, 0.2), (0.8, 0.6), (0.5, 0.45), (0.7, 0.55): sample-wise 4/4; the best single
    # threshold, any t in (0.6, 0.7], holds rows 0, 1 and 3 but not row 2 (positive 0.5 < 0.6).
    accuracy, threshold = LF.uniform_accuracy(scores, labels)
    assert accuracy == 0.75 and threshold == pytest.approx(0.65)
    assert LF.sample_wise_accuracy(scores, labels) == 1.0
    tie = torch.tensor([[0.5, 0.5], [0.9, 0.1]])
    assert LF.sample_wise_accuracy(tie, torch.tensor([0, 0])) == 0.5  # a tie is an error


def test_uniform_never_exceeds_sample_wise():
    g = torch.Generator().manual_seed(0)
    for _ in range(10):
        scores, labels = torch.randn(50, 7, generator=g), torch.randint(0, 7, (50,), generator=g)
        assert LF.uniform_accuracy(scores, labels)[0] <= LF.sample_wise_accuracy(scores, labels)


def test_all_samples_wrong_and_bad_input():
    result = LF.uniform_sweep(torch.tensor([0.0, 1.0]), torch.tensor([1.0, 1.0]))
    assert result.accuracy == 0.0 and math.isnan(result.threshold)
    with pytest.raises(UnitsfaceError, match="NaN"):
        LF.uniform_sweep(torch.tensor([math.nan]), torch.tensor([0.0]))
    with pytest.raises(UnitsfaceError, match="non-empty"):
        LF.uniform_sweep(torch.tensor([]), torch.tensor([]))
    with pytest.raises(UnitsfaceError, match=r"labels must lie in \[0, 3\)"):
        LF.uniform_accuracy(torch.zeros(2, 3), torch.tensor([0, 3]))
    with pytest.raises(UnitsfaceError, match="N×C"):
        LF.uniform_accuracy(torch.zeros(2, 3), torch.tensor([0]))


def test_class_wise_is_opt_in_and_per_class():
    scores = torch.tensor([[0.9, 0.2], [0.5, 0.4], [0.1, 0.3], [0.3, 0.8], [0.6, 0.4]])
    labels = torch.tensor([0, 0, 0, 1, 1])
    with pytest.raises(UnitsfaceError, match="experimental=True"):
        LF.class_wise_uniform_accuracy(scores, labels)
    result = LF.class_wise_uniform_accuracy(scores, labels, experimental=True)
    # Class 0: intervals (0.2, 0.9], (0.4, 0.5] and a miss -> 2/3; class 1: (0.3, 0.8] only -> 1/2.
    assert result.micro == pytest.approx(3 / 5) and result.macro == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert result.thresholds[0].item() == pytest.approx(0.45) and not result.verified


# --------------------------------------------------------------------------- the linear classifier


def test_unified_bias_is_a_trainable_float_scalar():
    clf = LinearClassifier(4, 3, loss="bce", bias_mode="unified")
    assert clf.bias.dtype == torch.float32 and clf.bias.shape == (1,) and clf.bias.requires_grad
    assert clf.threshold == pytest.approx(math.log(30))
    x, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 2, 1, 0])
    clf.loss(x, y).backward()
    assert clf.bias.grad is not None and clf.bias.grad.abs().item() > 0


def test_bce_loss_and_decision_scores_by_hand():
    clf = LinearClassifier(2, 3, loss="bce", bias_mode="diverse", bias_init=0.0)
    with torch.no_grad():
        clf.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
        clf.bias.copy_(torch.tensor([0.5, -1.0, 2.0]))
    x, y = torch.tensor([[2.0, -1.0]]), torch.tensor([0])
    f = [2.0, -1.0, 1.0]
    sp = lambda u: math.log1p(math.exp(u))  # noqa: E731
    expected = sp(-(f[0] - 0.5)) + sp(f[1] + 1.0) + sp(f[2] - 2.0)
    assert clf.loss(x, y).item() == pytest.approx(expected, rel=1e-6)
    torch.testing.assert_close(clf(x), torch.tensor([[1.5, 0.0, -1.0]]))  # f − b_j

    softmax = LinearClassifier(2, 3, loss="softmax")
    softmax.load_state_dict(clf.state_dict())
    assert softmax.loss(x, y).item() == pytest.approx(math.log(sum(math.exp(v) for v in (2.5, -2.0, 3.0))) - 2.5,
                                                      rel=1e-6)


def test_classifier_rejects_bad_options():
    with pytest.raises(UnitsfaceError, match="cancels in softmax"):
        LinearClassifier(4, 3, loss="softmax", bias_mode="unified")
    with pytest.raises(UnitsfaceError, match="loss must be"):
        LinearClassifier(4, 3, loss="hinge")


def test_unified_bce_learns_a_threshold_between_classes():
    # Two well separated classes: BCE with a shared bias must reach uniform accuracy 1, and its
    # learned b must itself separate every positive score from every negative one.
    torch.manual_seed(0)
    centres = torch.tensor([[3.0, 0.0], [0.0, 3.0]])
    y = torch.arange(2).repeat(64)
    x = centres[y] + 0.3 * torch.randn(128, 2)
    clf = LinearClassifier(2, 2, loss="bce", bias_mode="unified")
    p, n = LF.positive_and_hardest_negative(clf(x).detach(), y)
    assert not bool((n < clf.threshold).all() & (p >= clf.threshold).all())  # not separated at the start
    optimizer = torch.optim.SGD(clf.parameters(), lr=0.3)
    for _ in range(60):
        optimizer.zero_grad()
        clf.loss(x, y).backward()
        optimizer.step()
    scores = clf(x).detach()
    p, n = LF.positive_and_hardest_negative(scores, y)
    assert LF.uniform_accuracy(scores, y)[0] == 1.0
    assert bool((n < clf.threshold).all() & (p >= clf.threshold).all())


# --------------------------------------------------------------------------- the CLI


def test_bench_uniform_json(capsys):
    assert main(["bench", "uniform", "--seeds", "1", "--epochs", "1", "--json"]) == 0
    runs = json.loads(capsys.readouterr().out)["runs"]
    assert [run["method"] for run in runs] == ["softmax", "bce-unified", "bce-diverse"]
    for run in runs:
        assert 0.5 < run["sample_wise_accuracy"] <= 1.0  # digits are easy: one epoch beats chance (0.1) by far
        assert 0.0 <= run["uniform_accuracy"] <= run["sample_wise_accuracy"]
        assert (run["learned_bias"] is None) == (run["method"] != "bce-unified")


def test_bench_uniform_table_and_errors(capsys, monkeypatch):
    def fake_runs(seeds, epochs):
        assert list(seeds) == [0, 1] and epochs == 5
        return [
            {"method": "softmax", "sample_wise_accuracy": 0.9, "uniform_accuracy": 0.7,
             "optimal_threshold": 10.0, "learned_bias": None},
            {"method": "softmax", "sample_wise_accuracy": 1.0, "uniform_accuracy": 0.8,
             "optimal_threshold": 12.0, "learned_bias": None},
            {"method": "bce-unified", "sample_wise_accuracy": 0.9, "uniform_accuracy": 0.9,
             "optimal_threshold": math.nan, "learned_bias": 4.0},
            {"method": "bce-unified", "sample_wise_accuracy": 0.9, "uniform_accuracy": 0.9,
             "optimal_threshold": 3.0, "learned_bias": 5.0},
        ]

    monkeypatch.setattr("unitsface.classification.uniform_benchmark", fake_runs)
    assert main(["bench", "uniform", "--seeds", "2", "--epochs", "5"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "| loss | sample-wise acc | uniform acc | optimal unified t* | learned bias b |" in lines
    # mean ± sample std over seeds; a nan threshold (no correct sample) is left out; "–" for no bias.
    assert "| softmax | 0.9500 ± 0.0707 | 0.7500 ± 0.0707 | 11.000 ± 1.414 | – |" in lines
    assert "| bce-unified | 0.9000 ± 0.0000 | 0.9000 ± 0.0000 | 3.000 | 4.500 ± 0.707 |" in lines
    assert main(["bench", "uniform", "--seeds", "0"]) == 2
    assert "error: --seeds must be at least 1" in capsys.readouterr().err
    assert main(["bench"]) == 2  # the group alone prints its help
