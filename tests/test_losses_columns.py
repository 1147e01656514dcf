"""The column-loss engine equals the dense definition `functional.dense_column_loss` (loss and every gradient)
for every kind of head it serves, over several column chunks, reads rows without a gradient in its forward
only, and keeps its buffers proportional to the shard."""

from __future__ import annotations

import itertools

import pytest
import torch

from unitsface.losses import columns as LC
from unitsface.losses import functional as LF


@pytest.fixture
def chunks_of_1024(monkeypatch):
    """Chunks of exactly 1024 columns, whatever the sizes."""
    monkeypatch.setattr(LC, "CHUNK_FRACTION", 10**9)
    monkeypatch.setattr(LC, "MIN_CHUNK_COLUMNS", 1024)


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got - expected).abs().max() / expected.abs().max().clamp_min(1e-12))


def curriculum(threshold: torch.Tensor):
    """A row-dependent non-target transform (CurricularFace's shape): c·(0.3 + c) above the row's threshold."""
    return lambda c: torch.where(c > threshold.unsqueeze(1), c * (0.3 + c), c)


CASES = [  # kind, non-target transform, bias, extra logit, valid columns, clamp, λ
    *[("softmax", neg, bias, extra, valid, False, 1.0)
      for neg, bias, extra, valid in itertools.product((False, True), (None, "column"), (None, "scalar", "row"),
                                                       (False, True))],
    *[("bce", neg, bias, None, valid, clamp, lam)
      for neg, bias, valid, clamp, lam in itertools.product((False, True), ("scalar", "column"), (False, True),
                                                            (False, True), (1.0, 0.6))],
]


@pytest.mark.parametrize("kind, transform, bias_kind, extra_kind, with_valid, clamp, lam", CASES)
@pytest.mark.parametrize("trained_rows", [True, False])
def test_engine_equals_the_dense_definition(chunks_of_1024, kind, transform, bias_kind, extra_kind, with_valid,
                                            clamp, lam, trained_rows):
    """Three chunks, a row whose class is on another shard (-1), duplicate labels, a zero row and one below the
    norm floor (their radial term dropped), a target φ with a gradient of its own, s and biases that reach the
    references' clamp; gradients of x, the rows (when trained), φ through c_y, the bias and the extra logit."""
    g = torch.Generator().manual_seed(3)
    s = 32.0
    x0 = torch.randn(7, 16, generator=g)
    rows0 = 0.5 * torch.randn(2500, 16, generator=g)
    rows0[7], rows0[9] = 1e-7, 0.0
    labels = torch.tensor([0, 1023, 1024, 2499, -1, 700, 700])
    threshold = 0.2 * torch.rand(7, generator=g)
    spec = LC.ColumnSpec(kind, s, curriculum(threshold) if transform else None, lam, clamp)
    bias0 = None if bias_kind is None else (torch.tensor([12.0]) if bias_kind == "scalar"
                                           else 12.0 + 8.0 * torch.randn(2500, generator=g))
    extra0 = {None: None, "scalar": torch.tensor(2.0), "row": torch.randn(7, generator=g)}[extra_kind]
    valid = torch.rand(2500, generator=g) > 0.3 if with_valid else None

    def run(dense: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x = x0.clone().requires_grad_()
        rows = rows0.clone().requires_grad_(trained_rows)
        bias = None if bias0 is None else bias0.clone().requires_grad_()
        extra = None if extra0 is None else extra0.clone().requires_grad_()
        unit = LF.normalize(x)
        if dense:
            cos = LF.cosine(unit, rows)
            c_y = LF.target_of(cos, labels)
            loss = LF.dense_column_loss(cos, labels, c_y - 0.2 * c_y ** 2, spec, bias, extra, valid)
        else:
            c_y = LC.target_cosine(unit, rows, labels)
            loss = LC.column_loss(unit, rows, labels, c_y - 0.2 * c_y ** 2, spec, bias, extra, valid)
        inputs = [t for t in (x, rows, bias, extra) if t is not None and t.requires_grad]
        return loss, list(torch.autograd.grad(loss, inputs))

    expected, expected_grads = run(dense=True)
    got, grads = run(dense=False)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads, expected_grads):
        assert relative_error(a, b) < 1e-4


@pytest.mark.parametrize("kind", ["softmax", "bce"])
def test_mixed_rows_equal_their_dense_mixture(chunks_of_1024, kind):
    """VPL's columns M_j = (1 − λ_j)·Ŵ_j + λ_j·q_j formed per chunk equal the dense mixture, loss and gradients of
    x and W, with a zero and a below-floor proxy, an unwritten (zero) feature and a row mixed fully into one
    (λ = 1, q = 0: a zero column); the features may be overwritten after the loss, before backward()."""
    g = torch.Generator().manual_seed(11)
    x0, rows0 = torch.randn(7, 16, generator=g), torch.randn(2300, 16, generator=g)
    rows0[5], rows0[6] = 0.0, 1e-6  # row 6: norm 4e-6, below the 1e-5 floor
    features = LF.normalize(torch.randn(2300, 16, generator=g))
    features[8:12] = 0.0
    lam = torch.where(torch.rand(2300, generator=g) > 0.5, 0.15, 0.0)
    lam[[5, 6, 8, 11]] = torch.tensor([0.15, 0.15, 0.15, 1.0])
    labels = torch.tensor([5, 6, 8, 1030, 2299, -1, 11])
    spec = LC.ColumnSpec(kind, 30.0)

    def run(dense: bool) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        x, rows = x0.clone().requires_grad_(), rows0.clone().requires_grad_()
        q = features.clone()
        unit = LF.normalize(x)
        if dense:
            cos = LF.cosine(unit, (1.0 - lam.unsqueeze(1)) * LF.normalize(rows) + lam.unsqueeze(1) * q)
            loss = LF.dense_column_loss(cos, labels, LF.target_of(cos, labels) - 0.1, spec)
        else:
            mixture = LC.RowMixture(q, lam)
            c_y = LC.target_cosine(unit, rows, labels, mixture=mixture)
            loss = LC.column_loss(unit, rows, labels, c_y - 0.1, spec, mixture=mixture)
            q.normal_()  # the head's queue write after the loss
        return loss, torch.autograd.grad(loss, (x, rows))

    expected, expected_grads = run(dense=True)
    got, grads = run(dense=False)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads, expected_grads):  # elementwise: the below-floor row's ×1/eps gradient dwarfs the others
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_rows_without_a_gradient_are_read_in_the_forward_only(chunks_of_1024):
    """A memory head writes its rows after the loss and before backward(): the gradient must not change."""
    g = torch.Generator().manual_seed(6)
    x = torch.randn(4, 8, generator=g, requires_grad=True)
    rows, bias = torch.randn(1500, 8, generator=g), torch.tensor([3.0], requires_grad=True)
    labels = torch.tensor([0, 1, 1200, 3])
    spec = LC.ColumnSpec("bce", 8.0)

    def loss(memory: torch.Tensor) -> torch.Tensor:
        unit = LF.normalize(x)
        return LC.column_loss(unit, memory, labels, LC.target_cosine(unit, memory, labels) - 0.1, spec, bias)

    expected = torch.autograd.grad(loss(rows.clone()), (x, bias))
    value = loss(rows)
    rows.normal_()
    for got, want in zip(torch.autograd.grad(value, (x, bias)), expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    with torch.no_grad():
        assert not loss(rows).requires_grad


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_rows_are_read_into_fp32(chunks_of_1024, dtype):
    g = torch.Generator().manual_seed(8)
    x = LF.normalize(torch.randn(5, 16, generator=g))
    rows = torch.randn(2100, 16, generator=g).to(dtype)
    labels = torch.tensor([3, 1500, 2099, 0, 7])
    spec = LC.ColumnSpec("softmax", 64.0)
    target = LC.target_cosine(x, rows, labels)
    got = LC.column_loss(x, rows, labels, target, spec)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, LC.column_loss(x, rows.float(), labels, target, spec), rtol=0, atol=0)


def test_negative_lse_is_the_unified_bias_init(chunks_of_1024):
    g = torch.Generator().manual_seed(7)
    x, rows = LF.normalize(torch.randn(5, 8, generator=g)), torch.randn(2600, 8, generator=g)
    labels = torch.tensor([0, 1024, 2599, -1, 3])
    valid = torch.rand(2600, generator=g) > 0.5
    cos = LF.cosine(x, rows)
    for mask in (None, valid):
        expected = LF.unified_bias_init(cos, labels, 64.0, mask)
        torch.testing.assert_close(LF.mean_finite(LC.negative_lse(x, rows, labels, 64.0, mask)), expected)
    assert LF.mean_finite(LC.negative_lse(x, rows, labels, 64.0, torch.zeros(2600, dtype=torch.bool))) is None


@pytest.mark.parametrize("columns, batch", [(100_000, 128), (50_000, 256), (640, 4096), (10, 8), (0, 8)])
def test_chunks_cover_the_columns_and_scale_with_the_shard(columns, batch):
    """Chunks tile [0, C_r) in order; a chunk holds ≤ C_r·d/CHUNK_FRACTION numbers unless at its
    minimum width, so halving the shard (with the global batch doubled) halves every chunk."""
    dim = 512
    labels = torch.randint(0, max(columns, 1), (batch,))
    chunks = list(LC.column_chunks(labels, columns, dim))
    assert chunks[0].start == 0 and chunks[-1].end == columns
    assert all(a.end == b.start for a, b in zip(chunks, chunks[1:]))
    widest = max(c.end - c.start for c in chunks)
    if widest > LC.MIN_CHUNK_COLUMNS:  # rounding the width up adds at most one column
        assert batch * (widest - 1) <= columns * dim / LC.CHUNK_FRACTION
    hits = sum(int(c.targets.sum()) for c in chunks)
    assert hits == int((labels < columns).sum())


def test_chunk_size_halves_when_the_shard_halves_and_the_batch_doubles():
    one = next(LC.column_chunks(torch.zeros(128, dtype=torch.long), 100_000, 512))
    two = next(LC.column_chunks(torch.zeros(256, dtype=torch.long), 50_000, 512))
    assert 128 * (one.end - one.start) == 2 * 256 * (two.end - two.start)
