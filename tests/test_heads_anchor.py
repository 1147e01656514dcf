"""AnchorFace (`cosface_anchor`, `arcface_anchor`; docs/methods.md "AnchorFace"): the anchor threshold is the
empirical FAR quantile of the negatives, the streamed pairs against S give the dense loss and gradient, the soft
losses' gradients match finite differences in float64, and S keeps K features per identity for M steps.
The 2-rank and Partial FC equivalences run in tests/test_distributed.py and tests/test_partial_fc.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from head_helpers import assert_bf16_matches_fp32

from unitsface import heads
from unitsface.errors import UnitsfaceError
from unitsface.heads.components import ColumnSample, FeatureSet
from unitsface.losses import columns as LC
from unitsface.losses import functional as LF
from unitsface.parallel import ClassShard

C, D, K = 40, 16, 5  # 200 stored rows: several chunks of 64 columns at a batch of 12


def filled_head(name: str = "cosface_anchor", seed: int = 0, **params) -> torch.nn.Module:
    """A head in training mode whose S holds random unit features, some slots empty, some expired."""
    torch.manual_seed(seed)
    head = heads.build(name, C, D, **params).train()
    stored = head.stored
    with torch.no_grad():
        stored.features.copy_(LF.normalize(torch.randn(C * K, D)).view(C, K, D))
        stored.filled.copy_(torch.rand(C, K) < 0.7)
        stored.step.fill_(2000)
        stored.written.copy_(torch.randint(900, 2000, (C, K)))  # written before step 1000: expired
    return head


def valid_stored(head: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """The valid rows of S and their classes, by hand from the buffers."""
    s = head.stored
    ok = s.filled & (s.step - s.written <= s.valid_steps)
    classes = torch.arange(C).unsqueeze(1).expand(C, K)
    return s.features[ok], classes[ok]


def batch(seed: int = 1, n: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return 8.0 * torch.randn(n, D, generator=g), torch.tensor([3, 17, 17, 0, 39, 3, 22, 8, 17, 31, 0, 22])[:n]


# --------------------------------------------------------------------------- the anchor threshold


def test_anchor_threshold_by_hand() -> None:
    negatives = torch.tensor([0.1, 0.5, 0.3, 0.9, 0.7])
    # FAR 0.2 of 5 negatives: at most one may lie above t -> the 2nd largest
    assert float(LF.anchor_threshold(negatives, 0.2)) == pytest.approx(0.7)
    assert float(LF.anchor_threshold(negatives, 0.19)) == pytest.approx(0.9)  # 0.95 negatives: none above
    assert float(LF.anchor_threshold(negatives, 0.4)) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="needs more than"):
        LF.anchor_threshold(negatives[:1], 0.5, num_negatives=5)


@pytest.mark.parametrize("far", [0.3, 0.01, 0.0037, 1e-4])
def test_anchor_threshold_is_the_empirical_far_quantile(far: float) -> None:
    negatives = torch.randn(2999, generator=torch.Generator().manual_seed(4)).double()
    t = float(LF.anchor_threshold(negatives, far))
    n = negatives.numpy()
    assert t == np.quantile(n, 1.0 - far, method="inverted_cdf")
    # the definition: the smallest negative with at most FAR·N negatives above it
    assert (n > t).sum() <= far * n.size < (n >= t).sum()
    # the same from only the top candidates (padded with -inf), as the head merges its shards
    k = LF.far_rank(n.size, far) + 1
    top = torch.cat([torch.topk(negatives, k).values, torch.full((7,), -float("inf"), dtype=torch.float64)])
    assert float(LF.anchor_threshold(top, far, num_negatives=n.size)) == t


def test_head_threshold_is_the_far_quantile_of_all_its_negatives() -> None:
    """Batch pairs and every valid stored feature, streamed in 4 chunks with a running top-k: t̂ is the exact
    quantile of the negatives of the dense pair list."""
    head = filled_head(far_anchor=0.01)
    stored, stored_labels = valid_stored(head)  # what the forward reads: it writes the batch after its loss
    x, y = batch()
    head(x, y)
    similarity, same = LF.anchor_pairs(LF.normalize(x).double(), y, stored.double(), stored_labels)
    negatives = similarity[~same].numpy()
    assert len(list(LC.chunk_bounds(C * K, D, 12, torch.device("cpu")))) == 4
    assert head.last_stats["negative_pairs"] == negatives.size and head.last_stats["positive_pairs"] == int(same.sum())
    assert LF.far_rank(negatives.size, 0.01) >= 10  # a top-k of more than a few values
    expected = np.quantile(negatives, 0.99, method="inverted_cdf")
    assert head.last_stats["anchor_threshold"] == pytest.approx(expected, abs=1e-6)


# --------------------------------------------------------------------------- the loss and its gradients


@pytest.mark.parametrize("name", ["cosface_anchor", "arcface_anchor"])
def test_head_equals_the_dense_reference(name: str) -> None:
    """Loss and dL/dx of the head (engine, streamed S) against autograd over the dense pair list."""
    head = filled_head(name, far_anchor=0.01)
    stored, stored_labels = valid_stored(head)
    weight = head.proxies.weight.detach().clone()
    x, y = batch()
    x = x.requires_grad_()
    loss = head(x, y)
    loss.backward()

    xr = x.detach().clone().requires_grad_()
    unit = LF.normalize(xr)
    cos = unit @ LF.normalize(weight).t()
    base = LF.cosface_loss(cos, y) if name == "cosface_anchor" else LF.arcface_loss(cos, y)
    similarity, same = LF.anchor_pairs(unit, y, stored, stored_labels)
    t = LF.anchor_threshold(similarity[~same], 0.01)
    accept = LF.soft_accept(similarity, t, 0.01)
    expected = base + LF.anchor_penalty(accept[same].mean(), accept[~same].mean(), 0.01, 1000.0, 1.0)
    expected.backward()
    assert head.last_stats["far_soft"] > 0.01  # the FAR hinge is active, so both soft terms carry gradient
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-4, atol=1e-6)


def test_soft_loss_gradients_match_finite_differences() -> None:
    """λ2(1 − TAR_soft) + λ1·max(0, FAR_soft − FAR_a) at a fixed t̂, in float64: the batch block by autograd,
    the S block by the hand-written gradient of the streamed sums."""
    g = torch.Generator().manual_seed(5)
    stored = 3.0 * torch.randn(C * K, D, generator=g)  # fp32 like S, not unit: the rows are normalised too
    valid = torch.rand(C * K, generator=g) < 0.6
    y = torch.tensor([3, 17, 17, 0, 39, 3])
    x = torch.randn(6, D, generator=g, dtype=torch.float64)
    threshold = torch.tensor(0.3, dtype=torch.float64)  # near the upper negatives: σ′ is far from 0

    def rates(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        unit = torch.nn.functional.normalize(x, dim=1)
        similarity, same = LF.anchor_pairs(unit, y)
        accept = LF.soft_accept(similarity, threshold, 0.05)
        sums = torch.stack([accept[same].sum(), accept[~same].sum()])
        sums = sums + LC.stored_pair_sums(unit, stored, y, valid, K, threshold, 0.05)
        pos, neg = LC.stored_pair_counts(y, valid, K)
        return sums[0] / (pos + int(same.sum())), sums[1] / (neg + int((~same).sum()))

    def penalty(x: torch.Tensor) -> torch.Tensor:
        return LF.anchor_penalty(*rates(x), 1e-3, 1000.0, 2.0)

    tar, far = rates(x)
    assert 0.0 < float(tar) < 1.0 and float(far) > 2e-3  # both terms live, the FAR hinge clear of its kink
    assert torch.autograd.gradcheck(penalty, (x.requires_grad_(),), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_stored_sums_keep_the_batch_dtype_and_ignore_invalid_rows() -> None:
    stored = torch.randn(10, 4)
    x = LF.normalize(torch.randn(3, 4)).double()
    labels = torch.tensor([0, 1, -1])  # the third sample's class lives on another shard
    none = torch.zeros(10, dtype=torch.bool)
    sums = LC.stored_pair_sums(x, stored, labels, none, 2, torch.tensor(0.0), 0.01)
    assert sums.dtype == torch.float64 and float(sums.abs().sum()) == 0.0
    valid = torch.tensor([True, False] * 5)
    assert LC.stored_pair_counts(labels, valid, 2) == (2, 3 * 5 - 2)  # classes 0 and 1 hold one valid row each


def test_bf16_autocast_keeps_fp32() -> None:
    assert_bf16_matches_fp32("cosface_anchor", seed=3)


# --------------------------------------------------------------------------- the feature set S


def test_features_expire_after_valid_steps() -> None:
    """A feature written at step T pairs at steps T+1 … T+M only (M = 2); each batch holds 2 new identities."""
    head = heads.build("cosface_anchor", 20, D, valid_steps=2).train()
    negatives = []
    for step in range(5):
        head(torch.randn(2, D), torch.tensor([2 * step, 2 * step + 1]))
        negatives.append(head.last_stats["negative_pairs"])
    # 1 batch pair, plus 2 samples × the stored features of the last min(step, M) batches
    assert negatives == [1, 1 + 2 * 2, 1 + 2 * 4, 1 + 2 * 4, 1 + 2 * 4]
    head.eval()
    head(torch.randn(2, D), torch.tensor([0, 1]))
    assert int(head.stored.step) == 5  # evaluation neither writes nor counts a step


def test_ring_buffer_keeps_the_last_k_features_of_each_identity() -> None:
    stored = FeatureSet(ClassShard(4, 0, 4), 3, per_identity=2, valid_steps=10)
    rows = torch.eye(3)
    stored.remember(torch.stack([rows[0], rows[1], rows[2], rows[0]]), torch.tensor([1, 1, 1, 3]))
    assert torch.equal(stored.features[1], rows[[1, 2]])  # 3 samples of identity 1, K = 2: the last two
    assert torch.equal(stored.features[3, 0], rows[0]) and stored.filled.sum() == 3
    stored.remember(rows[[2]] * 5, torch.tensor([1]))  # the next write replaces the oldest slot
    assert torch.equal(stored.features[1], torch.stack([rows[2] * 5, rows[2]]))
    assert stored.written[1].tolist() == [1, 0] and stored.cursor.tolist() == [0, 1, 0, 1]
    everything = ColumnSample(torch.arange(4), None)
    assert stored.valid(everything).view(4, 2).sum(1).tolist() == [0, 2, 0, 1]


def test_feature_set_survives_a_checkpoint() -> None:
    head = filled_head()
    x, y = batch()
    head(x, y)
    copy = heads.build("cosface_anchor", C, D).train()
    copy.load_state_dict(head.state_dict())
    x2, y2 = batch(seed=2)
    torch.testing.assert_close(copy(x2, y2), head(x2, y2))
    assert int(copy.stored.step) == int(head.stored.step) == 2002


def test_bad_parameters_are_one_line_errors() -> None:
    for params, message in [({"far_anchor": 0.0}, "far_anchor must be in (0, 1)"),
                            ({"tau": 0.0}, "tau must be > 0"),
                            ({"features_per_identity": 0}, "features_per_identity and valid_steps must be >= 1")]:
        with pytest.raises(UnitsfaceError, match=message.replace("(", r"\(").replace(")", r"\)")):
            heads.build("cosface_anchor", C, D, **params)
