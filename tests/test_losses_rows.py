"""The streamed row losses equal the cosine-matrix formulas of `functional` (loss and gradients),
over several column chunks, and their buffers scale with the shard."""

import pytest
import torch

from unitsface.losses import functional as LF
from unitsface.losses import rows as LR


@pytest.fixture
def chunks_of_1024(monkeypatch):
    """Chunks of exactly 1024 columns, whatever the sizes."""
    monkeypatch.setattr(LR, "CHUNK_FRACTION", 10**9)
    monkeypatch.setattr(LR, "MIN_CHUNK_COLUMNS", 1024)


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got - expected).abs().max() / expected.abs().max())


@pytest.mark.parametrize("s", [8.0, 64.0])
def test_cosface_rows_loss_matches_the_cosine_matrix_form(chunks_of_1024, s):
    """Loss and gradients of cosface_loss(cosine(x, W)), including rows whose class lies on no
    column (-1) and class rows below the norm floor (zero, 1e-7), whose radial term is dropped."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 16, generator=g, requires_grad=True)
    w = 0.3 * torch.randn(2500, 16, generator=g)
    w[7], w[9] = 1e-7, 0.0
    w.requires_grad_()
    labels = torch.tensor([0, 1023, 1024, 2499, -1, 7])
    expected = LF.cosface_loss(LF.cosine(x, w), labels, s=s, m=0.3)
    ex, ew = torch.autograd.grad(expected, (x, w))
    got = LR.cosface_rows_loss(x, w, labels, s=s, m=0.3)
    gx, gw = torch.autograd.grad(got, (x, w))
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    assert relative_error(gx, ex) < 1e-5
    assert relative_error(gw, ew) < 1e-5
    assert relative_error(gw[7], ew[7]) < 1e-5 and relative_error(gw[9], ew[9]) < 1e-5


@pytest.mark.parametrize("per_class", [False, True])
@pytest.mark.parametrize("clamp", [False, True])
def test_threshold_bce_rows_loss_matches_the_cosine_matrix_form(chunks_of_1024, per_class, clamp):
    """Loss and gradients (embeddings, bias) of threshold_bce_loss on the full cosine matrix, with raw
    memory rows (one of them zero), a B×C validity mask, negative weight λ and, with s = 64 and
    biases around ±30, terms beyond the references' clamp."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(5, 16, generator=g, requires_grad=True)
    rows = torch.randn(2100, 16, generator=g)
    rows[5] = 0.0
    labels = torch.tensor([0, 1024, 2099, -1, 700])
    bias = (30 * torch.randn(2100, generator=g) if per_class else torch.tensor([30.0])).requires_grad_()
    valid = torch.rand(5, 2100, generator=g) > 0.3
    cos = LF.normalize(x) @ LF.normalize(rows).t()
    expected = LF.threshold_bce_loss(cos, labels, bias, 64.0, 0.1, 0.5, clamp, valid)
    ex, eb = torch.autograd.grad(expected, (x, bias))
    got = LR.threshold_bce_rows_loss(x, rows, labels, bias, 64.0, 0.1, 0.5, clamp, valid)
    gx, gb = torch.autograd.grad(got, (x, bias))
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-5)
    assert relative_error(gx, ex) < 1e-5
    assert relative_error(gb, eb) < 1e-5


def test_threshold_bce_rows_loss_reads_the_memory_in_its_forward_only(chunks_of_1024):
    """The head writes the memory after the loss and before backward(): the gradient must not change."""
    g = torch.Generator().manual_seed(6)
    x = torch.randn(4, 8, generator=g, requires_grad=True)
    rows, bias = torch.randn(1500, 8, generator=g), torch.tensor([3.0], requires_grad=True)
    labels = torch.tensor([0, 1, 1200, 3])
    expected = torch.autograd.grad(LR.threshold_bce_rows_loss(x, rows.clone(), labels, bias, 8.0, 0.1), (x, bias))
    loss = LR.threshold_bce_rows_loss(x, rows, labels, bias, 8.0, 0.1)
    rows.normal_()
    for got, want in zip(torch.autograd.grad(loss, (x, bias)), expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    with torch.no_grad():
        assert not LR.threshold_bce_rows_loss(x, rows, labels, bias, 8.0, 0.1).requires_grad


def test_unified_bias_init_rows_matches_the_cosine_matrix_form(chunks_of_1024):
    g = torch.Generator().manual_seed(7)
    x, rows = torch.randn(5, 8, generator=g), torch.randn(2600, 8, generator=g)
    labels = torch.tensor([0, 1024, 2599, -1, 3])
    valid = torch.rand(2600, generator=g) > 0.5
    cos = LF.normalize(x) @ LF.normalize(rows).t()
    for mask in (None, valid):
        expected = LF.unified_bias_init(cos, labels, 64.0, mask)
        torch.testing.assert_close(LR.unified_bias_init_rows(x, rows, labels, 64.0, mask), expected)
    assert LR.unified_bias_init_rows(x, rows, labels, 64.0, torch.zeros(2600, dtype=torch.bool)) is None


@pytest.mark.parametrize("columns, batch", [(100_000, 128), (50_000, 256), (640, 4096), (10, 8), (0, 8)])
def test_chunks_cover_the_columns_and_scale_with_the_shard(columns, batch):
    """Chunks tile [0, C_r) in order; a chunk holds ≤ C_r·d/CHUNK_FRACTION numbers unless at its
    minimum width, so halving the shard (with the global batch doubled) halves every chunk."""
    dim = 512
    labels = torch.randint(0, max(columns, 1), (batch,))
    chunks = list(LR.column_chunks(labels, columns, dim))
    assert chunks[0].start == 0 and chunks[-1].end == columns
    assert all(a.end == b.start for a, b in zip(chunks, chunks[1:]))
    widest = max(c.end - c.start for c in chunks)
    if widest > LR.MIN_CHUNK_COLUMNS:  # rounding the width up adds at most one column
        assert batch * (widest - 1) <= columns * dim / LR.CHUNK_FRACTION
    hits = sum(len(c.rows_with_positive) for c in chunks)
    assert hits == int((labels < columns).sum())


def test_chunk_size_halves_when_the_shard_halves_and_the_batch_doubles():
    one = next(LR.column_chunks(torch.zeros(128, dtype=torch.long), 100_000, 512))
    two = next(LR.column_chunks(torch.zeros(256, dtype=torch.long), 50_000, 512))
    assert 128 * (one.end - one.start) == 2 * 256 * (two.end - two.start)
