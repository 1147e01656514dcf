"""The sample-to-class margin core: hand-computed values, gradient modes, identities, heads via build."""

from __future__ import annotations

import math

import pytest
import torch

from unitsface import heads
from unitsface.errors import UnitsfaceError
from unitsface.losses import functional as LF

COS = [[0.5, 0.1, -0.2], [0.3, 0.4, 0.0]]
LABELS = torch.tensor([0, 1])


def lse(*z: float) -> float:
    return math.log(sum(math.exp(v) for v in z))


def grad_of(fn, cos_values, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    cos = torch.tensor(cos_values, requires_grad=True)
    loss = fn(cos, *args, **kwargs)
    loss.backward()
    return loss.detach(), cos.grad


# --------------------------------------------------------------------------- hand values


def test_cosface_by_hand():
    loss = LF.cosface_loss(torch.tensor(COS), LABELS, s=2.0, m=0.3)
    row0 = lse(0.4, 0.2, -0.4) - 0.4  # 2·(0.5 − 0.3), 2·0.1, 2·(−0.2)
    row1 = lse(0.6, 0.2, 0.0) - 0.2
    assert loss.item() == pytest.approx((row0 + row1) / 2, rel=1e-6)


def test_normface_by_hand():
    loss = LF.normface_loss(torch.tensor(COS), LABELS, s=2.0)
    expected = (lse(1.0, 0.2, -0.4) - 1.0 + lse(0.6, 0.8, 0.0) - 0.8) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_arcface_exact_and_straight_through_share_the_value_not_the_gradient():
    s, m, c = 2.0, 0.5, 0.5
    row = [[c, 0.1, -0.2]]
    exact, g_exact = grad_of(LF.arcface_loss, row, torch.tensor([0]), s, m, "exact")
    st, g_st = grad_of(LF.arcface_loss, row, torch.tensor([0]), s, m, "straight_through")
    phi = math.cos(math.acos(c) + m)
    expected = lse(s * phi, 0.2, -0.4) - s * phi
    assert exact.item() == pytest.approx(expected, rel=1e-6) and st.item() == pytest.approx(expected, rel=1e-6)
    # dL/dz_y = p_y − 1 for both; the exact mode multiplies by φ'(c) = cos m + sin m · c/√(1 − c²).
    p_y = math.exp(-expected)  # softmax of the target: exp(s·φ − LSE), and LSE = loss + s·φ
    assert g_st[0, 0].item() == pytest.approx(s * (p_y - 1), rel=1e-5)
    dphi = math.cos(m) + math.sin(m) * c / math.sqrt(1 - c * c)
    assert g_exact[0, 0].item() == pytest.approx(s * (p_y - 1) * dphi, rel=1e-5)
    torch.testing.assert_close(g_exact[0, 1:], g_st[0, 1:])  # negatives: same values, same gradient


def test_arcface_fallbacks():
    m = 0.5
    c = torch.tensor([-0.95, -0.3, 0.6], requires_grad=True)  # −0.95 < −cos m = −0.878: θ + m > π
    hard = LF.arcface_target(c, m, fallback="hard")
    hard.sum().backward()
    assert hard[0].item() == pytest.approx(-0.95 - m * math.sin(m), rel=1e-6)  # c − m·sin m, slope 1
    assert c.grad[0].item() == pytest.approx(1.0, rel=1e-6)
    for i in (1, 2):
        assert hard[i].item() == pytest.approx(math.cos(math.acos(c[i].item()) + m), rel=1e-6)
    easy = LF.arcface_target(c.detach(), m, fallback="easy")
    assert easy[1].item() == pytest.approx(-0.3) and easy[2].item() == pytest.approx(hard[2].item())
    none = LF.arcface_target(c.detach(), m, fallback="none")
    assert none[0].item() == pytest.approx(math.cos(math.acos(-0.95) + m), rel=1e-6)


def test_combined_general_triple_by_hand_and_saturation():
    c = torch.tensor([0.5, -0.5], requires_grad=True)
    phi = LF.combined_target(c, 1.0, 0.3, 0.2)
    assert phi[0].item() == pytest.approx(math.cos(math.pi / 3 + 0.3) - 0.2, rel=1e-6)
    # m1·θ + m2 = 2·(2π/3) > π: the value saturates at −1 − m3 with no gradient.
    sat = LF.combined_target(c, 2.0, 0.0, 0.1)
    sat.sum().backward()
    assert sat[1].item() == pytest.approx(-1.1, rel=1e-6) and c.grad[1].item() == 0.0


@pytest.mark.parametrize("gradient", ["exact", "straight_through"])
def test_combined_reduces_bit_for_bit(gradient):
    cos = torch.tensor(COS)
    for combined_args, single in (((1.0, 0.0, 0.35), lambda c: LF.cosface_loss(c, LABELS, 64.0, 0.35)),
                                  ((1.0, 0.45, 0.0), lambda c: LF.arcface_loss(c, LABELS, 64.0, 0.45, gradient))):
        a, ga = grad_of(LF.combined_loss, COS, LABELS, 64.0, *combined_args, gradient)
        b, gb = grad_of(single, COS)
        assert torch.equal(a, b) and torch.equal(ga, gb)
    assert torch.isfinite(LF.combined_loss(cos, LABELS, 64.0, 1.0, 0.3, 0.2, gradient))


@pytest.mark.parametrize("fn", [
    lambda c, y: LF.arcface_loss(c, y, 64.0, 0.5, "exact"),
    lambda c, y: LF.arcface_loss(c, y, 64.0, 0.5, "straight_through", "none"),
    lambda c, y: LF.combined_loss(c, y, 64.0, 1.0, 0.3, 0.2, "exact"),
    lambda c, y: LF.combined_loss(c, y, 64.0, 1.2, 0.0, 0.0, "exact"),
    lambda c, y: LF.cosface_loss(c, y, 64.0, 0.4),
])
def test_cos_plus_minus_one_is_finite(fn):
    loss, grad = grad_of(fn, [[1.0, -1.0, 0.0], [-1.0, 1.0, 1.0]], LABELS)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()


# --------------------------------------------------------------------------- heads via build

MARGIN_HEADS = {
    "softmax": {},
    "normface": {"s": 30.0},
    "cosface": {"s": 30.0, "m": 0.35},
    "arcface": {"s": 30.0, "m": 0.5, "gradient": "straight_through", "fallback": "none"},
    "combined": {"s": 30.0, "m1": 1.0, "m2": 0.3, "m3": 0.2},
}


def functional_loss(name: str, head, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The loss computed from the pieces, independently of the head's plumbing."""
    p = MARGIN_HEADS[name]
    if name == "softmax":
        logits = x @ head.proxies.weight.t() + head.bias
        return (torch.logsumexp(logits, 1) - logits.gather(1, y[:, None]).squeeze(1)).mean()
    cos = LF.normalize(x) @ LF.normalize(head.proxies.weight).t()
    if name == "normface":
        return LF.normface_loss(cos, y, p["s"])
    if name == "cosface":
        return LF.cosface_loss(cos, y, p["s"], p["m"])
    if name == "arcface":
        return LF.arcface_loss(cos, y, p["s"], p["m"], p["gradient"], p["fallback"])
    return LF.combined_loss(cos, y, p["s"], p["m1"], p["m2"], p["m3"])


@pytest.mark.parametrize("name", sorted(MARGIN_HEADS))
def test_heads_compute_their_formula(name):
    torch.manual_seed(0)
    head = heads.build(name, 7, 16, **MARGIN_HEADS[name]).train()
    if name == "softmax":
        head.bias.data.normal_()
    x, y = torch.randn(5, 16), torch.tensor([6, 0, 0, 3, 2])
    assert head(x, y).item() == pytest.approx(functional_loss(name, head, x, y).item(), rel=1e-5)


@pytest.mark.parametrize("name", sorted(MARGIN_HEADS))
def test_heads_under_bf16_autocast_stay_fp32(name):
    torch.manual_seed(1)
    head = heads.build(name, 7, 16, **MARGIN_HEADS[name]).train()
    x, y = torch.randn(5, 16).bfloat16(), torch.tensor([6, 0, 0, 3, 2])
    expected = head(x.float(), y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = head(x, y)
    assert got.dtype == torch.float32 and got.item() == pytest.approx(expected.item(), rel=1e-6)


def test_sampling_keeps_positives_and_remaps_labels():
    torch.manual_seed(2)
    head = heads.build("cosface", 50, 8, sample_rate=0.1).train()
    y = torch.tensor([49, 7, 7, 23, 0, 31, 12])
    sample = head.columns_for(y)
    rows, local, columns = head.proxies.rows(sample), sample.labels, sample.columns
    assert columns.numel() == 6  # max(round(0.1·50) = 5, 6 distinct positives)
    assert set(y.tolist()) <= set(columns.tolist()) and torch.equal(columns, columns.sort().values)
    assert torch.equal(columns[local], y) and torch.equal(rows, head.proxies.weight[columns])
    x = torch.randn(7, 8)
    torch.manual_seed(3)
    loss = head(x, y)
    torch.manual_seed(3)
    sample = head.columns_for(y)
    rows, local = head.proxies.rows(sample), sample.labels
    assert loss.item() == pytest.approx(LF.cosface_loss(LF.cosine(x, rows), local).item(), rel=1e-6)
    head.eval()
    assert head.columns_for(y).columns is None  # evaluation never samples


def test_build_errors_are_one_line_and_name_the_fault():
    with pytest.raises(UnitsfaceError, match=r"head 'cosface' has no parameter 'margin'; it accepts: m, s, "):
        heads.build("cosface", 10, 8, margin=0.3)
    with pytest.raises(UnitsfaceError, match=r"unknown head 'cosfase'; known: .*cosface"):
        heads.build("cosfase", 10, 8)
    with pytest.raises(UnitsfaceError, match=r"head 'arcface': gradient must be 'exact' or 'straight_through'"):
        heads.build("arcface", 10, 8, gradient="approx")
    with pytest.raises(UnitsfaceError, match="label out of range"):
        heads.build("cosface", 10, 8)(torch.randn(2, 8), torch.tensor([0, 10]))
