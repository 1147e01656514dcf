"""EPL heads (cosface_epl, arcface_epl, uce_epl): reference parity, the prototype bank, stacking."""

from __future__ import annotations

import json
import math

import pytest
import torch
from head_helpers import make_head, step, tensor

from unitsface.errors import UnitsfaceError
from unitsface.heads import build
from unitsface.losses import functional as LF

# reference case prefix -> (head name, parameters matching the case)
VARIANTS = {
    "cosface_epl_m0.4_s64_k0.7": "cosface_epl",
    "arcface_epl_m0.4_s64_k0.7": "arcface_epl",
    "uniface_epl_m0.4_s64_k0.7_b=log(10C)": "uce_epl",
}


@pytest.fixture(scope="module")
def reference(reference_dir):
    return json.loads((reference_dir / "epl_losses.json").read_text())


def test_parity_with_reference(reference):
    checked = 0
    for seed, data in reference.items():
        x, y, W, Q = tensor(data["x"]), torch.tensor(data["y"]), tensor(data["W"]), tensor(data["Q"])
        for case, expected in data.items():
            if not isinstance(expected, dict):
                continue
            prefix, epoch = case.rsplit("_epoch", 1)
            head = make_head(VARIANTS[prefix], W, Q, int(epoch))
            if VARIANTS[prefix] == "uce_epl":
                assert head.bias.value.item() == pytest.approx(math.log(10 * W.shape[0]))
            loss, grad_x = step(head, x, y)
            where = f"seed {seed} {case}"
            assert loss.item() == pytest.approx(expected["loss"], rel=1e-4), where
            torch.testing.assert_close(grad_x, tensor(expected["grad_x"]), atol=1e-5, rtol=0, msg=where)
            torch.testing.assert_close(head.proxies.weight.grad, tensor(expected["grad_W"]), atol=1e-5, rtol=0,
                                       msg=where)
            torch.testing.assert_close(head.prototypes.bank, tensor(expected["Q_after"]), atol=1e-5, rtol=0, msg=where)
            if "grad_bias" in expected:
                torch.testing.assert_close(head.bias.value.grad, tensor(expected["grad_bias"]), atol=1e-4, rtol=1e-5)
            checked += 1
    assert checked == 12


def random_case(seed: int = 0, batch: int = 6, classes: int = 8, dim: int = 16):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, dim, generator=g) * 5, torch.randint(0, classes, (batch,), generator=g),
            torch.randn(classes, dim, generator=g), torch.randn(classes, dim, generator=g))


def test_update_is_gated_softsign_move_with_parallel_read_and_last_writer():
    x, _, W, Q = random_case()
    y = torch.tensor([3, 5, 3, 1, 3, 5])  # 3 and 5 repeat: rows 4 and 5 must win
    head = make_head("cosface_epl", W, Q, epoch=0)
    step(head, x, y)
    expected = Q.clone()
    for i in (4, 5, 3):  # last occurrences, each computed from the OLD bank row
        e = x[i] / x[i].norm()
        a = float(Q[y[i]] @ e)
        alpha = a / (1 + abs(a))
        row = alpha * Q[y[i]] + (1 - alpha) * e
        expected[y[i]] = row / row.norm()
    torch.testing.assert_close(head.prototypes.bank, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("alpha, gate", [("sigmoid_shifted", lambda a: 1 / (1 + math.exp(1 - a))),
                                         ("sigmoid", lambda a: 1 / (1 + math.exp(-a)))])
def test_alternative_gates(alpha, gate):
    x, _, W, Q = random_case(1)
    y = torch.arange(6)
    head = make_head("cosface_epl", W, Q, epoch=0, alpha=alpha)
    step(head, x, y)
    e = x[2] / x[2].norm()
    w = gate(float(Q[2] @ e))
    row = w * Q[2] + (1 - w) * e
    torch.testing.assert_close(head.prototypes.bank[2], row / row.norm(), atol=1e-6, rtol=0)


def test_bank_not_updated_in_eval_mode():
    x, y, W, Q = random_case(2)
    head = make_head("arcface_epl", W, Q, epoch=5).eval()
    loss = head(x, y)
    assert torch.isfinite(loss)
    torch.testing.assert_close(head.prototypes.bank, Q, atol=0, rtol=0)


def test_ep_term_starts_at_ep_start_epoch_and_stacking_weights():
    x, y, W, Q = random_case(3)
    only_classifier = LF.cosface_loss(LF.cosine(x, W), y, 64.0, 0.4)
    before = make_head("cosface_epl", W, Q, epoch=2).eval()
    assert before(x, y).item() == pytest.approx(only_classifier.item(), rel=1e-6)
    half = make_head("cosface_epl", W, Q, epoch=3).eval()(x, y)
    summed = make_head("cosface_epl", W, Q, epoch=3, stack_weight="sum").eval()(x, y)
    ep = summed - only_classifier
    assert ep.item() > 0
    assert half.item() == pytest.approx(0.5 * summed.item(), rel=1e-6)


def test_update_after_loss_reads_the_old_bank():
    x, y, W, Q = random_case(4)
    after = make_head("cosface_epl", W, Q, epoch=5, update="after_loss")
    frozen = make_head("cosface_epl", W, Q, epoch=5).eval()
    before = make_head("cosface_epl", W, Q, epoch=5)
    loss_after, loss_frozen, loss_before = after(x, y), frozen(x, y), before(x, y)
    assert loss_after.item() == pytest.approx(loss_frozen.item(), rel=1e-6)
    assert loss_after.item() != pytest.approx(loss_before.item(), rel=1e-4)
    torch.testing.assert_close(after.prototypes.bank, before.prototypes.bank, atol=0, rtol=0)


def test_bank_init_reference_is_unnormalised_and_unit_is_normalised():
    torch.manual_seed(0)
    ref = build("cosface_epl", 50, 512)
    unit = build("cosface_epl", 50, 512, bank_init="unit")
    assert ref.prototypes.bank.norm(dim=1).mean().item() == pytest.approx(math.sqrt(512), rel=0.05)
    torch.testing.assert_close(unit.prototypes.bank.norm(dim=1), torch.ones(50))
    assert ref.prototypes.bank.dtype == torch.float32 and "prototypes.bank" in ref.state_dict()


def test_uce_epl_threshold_bias_and_options():
    head = build("uce_epl", 100, 8, bias_init=12.8, s=32.0)
    assert head.threshold == pytest.approx(0.4)
    assert build("uce_epl", 100, 8).bias.value.item() == pytest.approx(math.log(1000))
    assert build("cosface_epl", 100, 8).threshold is None
    for bad in ({"alpha": "tanh"}, {"bank_init": "zeros"}, {"update": "never"}, {"stack_weight": "mean"},
                {"gradient": "magic"}):
        with pytest.raises(UnitsfaceError):
            build("arcface_epl", 10, 8, **bad)


@pytest.mark.parametrize("name", list(VARIANTS.values()))
def test_finite_at_cos_plus_minus_one_and_repeated_labels(name):
    W = torch.randn(4, 8)
    x = torch.stack([W[0], -W[1], W[0] * 3, W[2]])  # cos = 1 on the target, −1 elsewhere
    y = torch.tensor([0, 1, 0, 2])
    head = make_head(name, W, W.clone(), epoch=5)
    loss, grad_x = step(head, x, y)
    assert torch.isfinite(loss) and torch.isfinite(grad_x).all() and torch.isfinite(head.proxies.weight.grad).all()


@pytest.mark.parametrize("name", list(VARIANTS.values()))
def test_bf16_autocast_matches_fp32_head(name):
    x, y, W, Q = random_case(5)
    x = x.bfloat16().float()  # the same inputs on both paths
    reference_loss = make_head(name, W, Q, epoch=5)(x, y)
    head = make_head(name, W, Q, epoch=5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = head(x.bfloat16().requires_grad_(True), y)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(reference_loss.item(), rel=1e-5)
    loss.backward()
    assert torch.isfinite(head.proxies.weight.grad).all()
