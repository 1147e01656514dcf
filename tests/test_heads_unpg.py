"""UNPG heads (cosface_unpg, arcface_unpg, magface_unpg) and `unpg_loss`: parity and edge cases."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from head_helpers import assert_bf16_matches_fp32, make_head, step, tensor

from unitsface.errors import UnitsfaceError
from unitsface.heads import build
from unitsface.losses import functional as LF


@pytest.fixture(scope="module")
def reference(reference_dir):
    return json.loads((reference_dir / "unpg_losses.json").read_text())


def head_for_case(case: str, W: torch.Tensor, fallback: str):
    """The unitsface head that reproduces one reference case (m passed explicitly)."""
    base, rest = case.split("_", 1)
    m = 0.4 if base == "cosface" else 0.5
    arc = {"fallback": fallback} if base == "arcface" else {}
    if "wisk" not in rest:
        return make_head(base, W, m=m, **arc)
    return make_head(f"{base}_unpg", W, m=m, whisker=float(rest.split("wisk")[1]), **arc)


@pytest.mark.parametrize("fallback", ["none", "hard"])
def test_parity_with_reference(reference, fallback):
    checked = 0
    for seed, data in reference.items():
        x, y, W = tensor(data["x"]), torch.tensor(data["y"]), tensor(data["W"])
        for case, expected in data.items():
            if not isinstance(expected, dict):
                continue
            head = head_for_case(case, W, fallback)
            loss, grad_x = step(head, x, y)
            where = f"seed {seed} {case}"
            assert loss.item() == pytest.approx(expected["loss"], rel=1e-4), where
            torch.testing.assert_close(grad_x, tensor(expected["grad_x"]), atol=1e-5, rtol=0, msg=where)
            torch.testing.assert_close(head.proxies.weight.grad, tensor(expected["grad_W"]), atol=1e-5, rtol=0,
                                       msg=where)
            if "num_neg_pairs" in expected:
                assert (head.last_num_pairs, head.last_num_kept) == (expected["num_neg_pairs"],
                                                                     expected["num_kept"]), where
            checked += 1
    assert checked == 16


def explicit_unpg(margin_cos: torch.Tensor, x: torch.Tensor, y: torch.Tensor, s: float, whisker: float):
    """The reference's construction: CE over the B×(C+K') matrix, quartiles by numpy."""
    e = F.normalize(x, dim=1)
    pairs = [(e[j] @ e[k]) for j in range(len(y)) for k in range(j + 1, len(y)) if y[j] != y[k]]
    if pairs:
        values = torch.stack(pairs)
        ordered = values.detach().sort().values
        q1, q3 = ordered[int(0.25 * len(pairs))], ordered[int(0.75 * len(pairs))]
        lo, hi = q1 - whisker * (q3 - q1), q3 + whisker * (q3 - q1)
        kept = values[(values.detach() >= lo) & (values.detach() <= hi)]
        margin_cos = torch.cat([margin_cos, kept.unsqueeze(0).expand(len(y), -1)], dim=1)
    return F.cross_entropy(s * margin_cos, y)


@pytest.mark.parametrize("labels", [[2, 2, 2, 2, 2], [0, 1], [0, 3, 3, 1, 0, 3, 4, 1]])
def test_unpg_loss_equals_explicit_matrix(labels):
    """No pair (single identity: the base loss), K=1 (IQR 0, the pair kept) and repeated labels."""
    torch.manual_seed(len(labels))
    y = torch.tensor(labels)
    x = torch.randn(len(y), 16, requires_grad=True)
    W = torch.randn(6, 16)
    margin_cos = LF.cosine(x, W) - 0.3 * LF.target_mask(y, 6)
    loss, pairs, kept = LF.unpg_loss(margin_cos, x, y, 32.0, 1.0)
    explicit = explicit_unpg(margin_cos, x, y, 32.0, 1.0)
    assert loss.item() == pytest.approx(explicit.item(), rel=1e-6)
    grad, = torch.autograd.grad(loss, x, retain_graph=True)
    expected_grad, = torch.autograd.grad(explicit, x)
    torch.testing.assert_close(grad, expected_grad, atol=1e-6, rtol=1e-5)
    n_neg = sum(a != b for i, a in enumerate(labels) for b in labels[i + 1:])
    assert pairs == n_neg and (kept == 1 if n_neg == 1 else kept <= n_neg)


def test_single_identity_batch_equals_base_head():
    W = torch.randn(5, 12)
    x, y = torch.randn(4, 12) * 3, torch.full((4,), 3)
    base_loss, base_grad = step(make_head("cosface", W, m=0.5), x, y)
    head = make_head("cosface_unpg", W)
    loss, grad = step(head, x, y)
    assert (head.last_num_pairs, head.last_num_kept) == (0, 0)
    assert loss.item() == pytest.approx(base_loss.item(), rel=1e-6)
    torch.testing.assert_close(grad, base_grad)


def test_magface_unpg_is_magface_with_pairs_appended():
    torch.manual_seed(1)
    W = torch.randn(6, 16)
    x, y = torch.randn(10, 16) * 30, torch.tensor([0, 1, 1, 2, 3, 3, 4, 5, 0, 2])
    magface = make_head("magface", W)
    cos = LF.cosine(x, W)
    margin_cos = LF.replace_target(cos, y, magface.magnitudes.target(LF.gather_target(cos, y), x))
    expected = explicit_unpg(margin_cos, x, y, 64.0, 1.5) + magface.magnitudes.regularizer(x)
    head = make_head("magface_unpg", W)
    assert head(x, y).item() == pytest.approx(expected.item(), rel=1e-6)
    assert head.last_num_pairs == 10 * 9 // 2 - 4  # four same-label pairs
    with pytest.raises(UnitsfaceError):
        build("magface_unpg", 6, 16, lambda_g=10.0)


@pytest.mark.parametrize("name", ["cosface_unpg", "arcface_unpg", "magface_unpg"])
def test_finite_at_cos_plus_minus_one(name):
    W = torch.randn(4, 8)
    x = torch.stack([W[0] * 20, -W[1] * 20, W[0] * 50, -W[0] * 30])  # cos = ±1 to proxies and pairs
    y = torch.tensor([0, 1, 0, 2])
    head = make_head(name, W)
    loss, grad_x = step(head, x, y)
    assert torch.isfinite(loss) and torch.isfinite(grad_x).all() and torch.isfinite(head.proxies.weight.grad).all()


@pytest.mark.parametrize("name", ["cosface_unpg", "arcface_unpg", "magface_unpg"])
def test_bf16_autocast_matches_fp32_head(name):
    assert_bf16_matches_fp32(name, seed=2)


def test_defaults_and_validation():
    head = build("cosface_unpg", 300, 64)
    assert (head.s, head.m, head.whisker) == (64.0, 0.5, 1.5)
    # Xavier uniform: rows of norm about sqrt(2d/(C+d))
    assert head.proxies.weight.norm(dim=1).mean().item() == pytest.approx((2 * 64 / 364) ** 0.5, rel=0.1)
    with pytest.raises(UnitsfaceError):
        build("arcface_unpg", 10, 8, whisker=-1.0)
