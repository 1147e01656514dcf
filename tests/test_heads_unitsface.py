"""UniTSFace / UniFace heads: parity with the official code, memory semantics, bias rules, numerics."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from unitsface import heads
from unitsface.errors import UnitsfaceError
from unitsface.losses import functional as LF

C, D = 40, 32

# Case of unitsface_losses.json -> (head, parameters). Threshold-BCE cases run in the references'
# clamp mode; `clamp_reached` below decides whether the clean softplus must agree as well.
CASES = {
    "normalized_softmax_m0.4_s64": ("cosface", {"s": 64.0, "m": 0.4}),
    "uce_m0.4_s64_b=log(10C)": ("uce", {"s": 64.0, "m": 0.4}),
    "uce_m0.4_s64_b=12.5": ("uce", {"s": 64.0, "m": 0.4, "bias_init": 12.5}),
    "bce_perclass_m0.4_s64_b=log(10C)": ("bce", {"s": 64.0, "m": 0.4}),
    "ss_softmax_m0.1_s64": ("ss_softmax", {"s": 64.0, "m_sample": 0.1}),
    "uss_m0.1_s64_b=20": ("uss", {"s": 64.0, "m_sample": 0.1, "bias_init": 20.0}),
    "uss_m0.1_s64_b=init": ("uss", {"s": 64.0, "m_sample": 0.1}),
    "uss_m0.3_s32_b=9": ("uss", {"s": 32.0, "m_sample": 0.3, "bias_init": 9.0}),
    "ss_bce_m0.1_s64_b=init": ("ss_bce", {"s": 64.0, "m_sample": 0.1}),
}
THRESHOLD_HEADS = ("uce", "bce", "uss", "ss_bce")


@pytest.fixture(scope="module")
def reference(reference_dir):
    with open(reference_dir / "unitsface_losses.json") as f:
        return json.load(f)


def t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def loaded_head(name: str, params: dict, seed_data: dict) -> torch.nn.Module:
    """The head with `weight` / `memory` from the reference inputs, every memory slot filled, past the
    memory heads' warm-up epoch (the reference cases are the sample-to-sample loss itself)."""
    head = heads.build(name, C, D, **params).train()
    with torch.no_grad():
        if hasattr(head, "memory"):
            head.memory.copy_(t(seed_data["M"]))
            head.filled.fill_(True)
            head.set_epoch(1)
        else:
            head.weight.copy_(t(seed_data["W"]))
    return head


def run_step(head: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.clone().requires_grad_(True)
    loss = head(x, y)
    loss.backward()
    return loss.detach(), x.grad


def clamp_reached(seed_data: dict, name: str, params: dict, bias: float) -> bool:
    """Whether any s(c − m·onehot) − b of the case leaves [−s, s] (computed from the stored cosines)."""
    cos = np.array(seed_data["cos_M" if name in ("uss", "ss_bce") else "cos_W"], dtype=np.float64)
    y = np.array(seed_data["y"])
    s, m = params["s"], params.get("m", params.get("m_sample"))
    u = s * cos - bias
    u[np.arange(len(y)), y] -= s * m
    return bool((np.abs(u) > s).any())


@pytest.mark.parametrize("seed", ["7", "8"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_parity_with_official_code(reference, seed, case):
    data, ref = reference[seed], reference[seed][case]
    name, params = CASES[case]
    clamped = {**params, "clamp": "reference"} if name in THRESHOLD_HEADS else params
    head = loaded_head(name, clamped, data)
    if case.endswith("b=init"):  # data-driven: b starts at 0, not yet initialised
        assert not bool(head.bias_initialised) and not head.bias.detach().any()
    x, y = t(data["x"]), torch.tensor(data["y"])
    loss, grad_x = run_step(head, x, y)

    assert loss.item() == pytest.approx(ref["loss"], rel=1e-4)
    torch.testing.assert_close(grad_x, t(ref["grad_x"]), atol=1e-5, rtol=0)
    if "grad_W" in ref:
        torch.testing.assert_close(head.weight.grad, t(ref["grad_W"]), atol=1e-5, rtol=0)
    if "grad_bias" in ref:
        # The bias the loss used: a data-driven one was set from this very batch (b=init cases).
        torch.testing.assert_close(head.bias.detach(), t(ref["bias_after"]), atol=1e-4, rtol=1e-6)
        torch.testing.assert_close(head.bias.grad, t(ref["grad_bias"]), atol=1e-5, rtol=0)
    if hasattr(head, "bias_initialised"):
        assert bool(head.bias_initialised)
    if hasattr(head, "memory"):
        # Write-after-loss: every label's slot now holds its last occurrence in the batch.
        expected = t(data["M"])
        for i, label in enumerate(data["y"]):
            expected[label] = x[i]
        torch.testing.assert_close(head.memory, expected, atol=0, rtol=0)

    if name in THRESHOLD_HEADS and not clamp_reached(data, name, params, ref["bias_after"][0]):
        clean = loaded_head(name, params, data)  # clamp=False: plain softplus, same numbers
        clean_loss, clean_grad = run_step(clean, x, y)
        assert clean_loss.item() == pytest.approx(ref["loss"], rel=1e-4)
        torch.testing.assert_close(clean_grad, t(ref["grad_x"]), atol=1e-5, rtol=0)


def test_reference_cosines_use_eps_1e5(reference):
    data = reference["7"]
    x = t(data["x"])
    torch.testing.assert_close(LF.cosine(x, t(data["W"])), t(data["cos_W"]), atol=2e-6, rtol=0)
    torch.testing.assert_close(LF.cosine(x, t(data["M"])), t(data["cos_M"]), atol=2e-6, rtol=0)


def test_clamp_mode_changes_the_one_case_that_reaches_it(reference):
    # Seed 7 with b=12.5 has a positive cosine below m − 1 + b/s ≈ −0.405, so the clean form differs.
    data, name, params = reference["7"], *CASES["uce_m0.4_s64_b=12.5"]
    assert clamp_reached(data, name, params, 12.5)
    clean_loss, _ = run_step(loaded_head(name, params, data), t(data["x"]), torch.tensor(data["y"]))
    assert clean_loss.item() > reference["7"]["uce_m0.4_s64_b=12.5"]["loss"] + 1e-2


# --------------------------------------------------------------------------- the loss functions by hand


def naive_threshold_bce(cos, labels, bias, s, m, valid=None, neg_weight=1.0) -> float:
    """Loops in float64: the definition of methods.md §2.2 / §3.1 term by term."""
    cos = np.asarray(cos, dtype=np.float64)
    bias = np.broadcast_to(np.asarray(bias, dtype=np.float64), (cos.shape[1],))
    valid = np.ones(cos.shape[1], bool) if valid is None else np.asarray(valid)
    total = 0.0
    for i, y in enumerate(labels):
        for j in range(cos.shape[1]):
            if not valid[j]:
                continue
            if j == y:
                total += math.log1p(math.exp(-(s * (cos[i, j] - m) - bias[y])))
            else:
                total += neg_weight * math.log1p(math.exp(s * cos[i, j] - bias[j]))
    return total / len(labels)


def test_threshold_bce_unified_and_per_class_by_hand():
    cos = t([[0.5, 0.1, -0.2], [0.3, 0.4, 0.0]])
    labels = torch.tensor([0, 1])
    unified = LF.threshold_bce_loss(cos, labels, t([1.5]), s=4.0, m=0.2, neg_weight=0.5)
    assert unified.item() == pytest.approx(naive_threshold_bce(cos, [0, 1], 1.5, 4.0, 0.2, neg_weight=0.5),
                                           rel=1e-6)
    bias = t([1.0, 2.0, -0.5])  # the positive uses b_{y_i}, column j's negative uses b_j
    per_class = LF.threshold_bce_loss(cos, labels, bias, s=4.0, m=0.2)
    assert per_class.item() == pytest.approx(naive_threshold_bce(cos, [0, 1], bias, 4.0, 0.2), rel=1e-6)


def test_threshold_bce_masks_invalid_columns():
    cos = t([[0.5, 0.1, -0.2], [0.3, 0.4, 0.0]])
    valid = torch.tensor([True, False, True])  # row 1's own slot is unfilled: no positive term
    loss = LF.threshold_bce_loss(cos, torch.tensor([0, 1]), t([1.0]), s=4.0, m=0.2, valid_columns=valid)
    assert loss.item() == pytest.approx(naive_threshold_bce(cos, [0, 1], 1.0, 4.0, 0.2, valid=valid), rel=1e-6)


def test_threshold_bce_clamp_stops_gradient_outside_s():
    cos = t([[-0.9, 0.95]]).requires_grad_(True)  # positive arg 4(−1.1) − 1 = −5.4 < −4; negative 2.8
    bias = t([1.0]).requires_grad_(True)
    LF.threshold_bce_loss(cos, torch.tensor([0]), bias, s=4.0, m=0.2, clamp=True).backward()
    assert cos.grad[0, 0].item() == 0.0  # clamped positive: no gradient
    assert cos.grad[0, 1].item() == pytest.approx(4.0 * torch.sigmoid(t(2.8)).item(), rel=1e-6)
    assert bias.grad.item() == pytest.approx(-torch.sigmoid(t(2.8)).item(), rel=1e-6)


def test_unified_bias_init_by_hand():
    cos = t([[0.5, 0.1, -0.2], [0.3, 0.4, 0.0]])
    s = 10.0
    expected = (math.log(math.exp(1.0) + math.exp(-2.0)) + math.log(math.exp(3.0) + math.exp(0.0))) / 2
    b0 = LF.unified_bias_init(cos, torch.tensor([0, 1]), s)
    assert b0.item() == pytest.approx(expected, rel=1e-6)
    # Only filled negatives count; a row without any is left out; no row at all gives None.
    valid = torch.tensor([True, True, False])
    assert LF.unified_bias_init(cos, torch.tensor([0, 1]), s, valid).item() == pytest.approx(2.0, rel=1e-6)
    assert LF.unified_bias_init(cos, torch.tensor([0, 0]), s, torch.tensor([True, False, False])) is None


def test_sample_softmax_masks_unfilled_slots():
    cos = t([[0.5, 0.1, -0.2], [0.3, 0.4, 0.0]]).requires_grad_(True)
    valid = torch.tensor([True, False, True])
    loss = LF.sample_softmax_loss(cos, torch.tensor([0, 1]), s=2.0, m=0.1, valid_columns=valid)
    row0 = math.log(math.exp(0.8) + math.exp(-0.4)) - 0.8  # column 1 masked; row 1 has no positive
    assert loss.item() == pytest.approx(row0 / 2, rel=1e-6)
    loss.backward()
    assert torch.isfinite(cos.grad).all() and cos.grad[1].abs().sum() == 0 and cos.grad[0, 1] == 0


# --------------------------------------------------------------------------- memory semantics


def fresh(name: str, num_classes: int = 5, dim: int = 4, **params) -> torch.nn.Module:
    return heads.build(name, num_classes, dim, **params).train()


ACTIVE = {"s2s_start_epoch": 0, "min_fill": 0.0}  # the sample-to-sample term from the first call on


def test_memory_reads_before_the_call_and_last_writer_wins():
    head = fresh("uss", bias_init=2.0, **ACTIVE)
    x = torch.randn(4, 4)
    y = torch.tensor([1, 3, 1, 0])
    loss = head(x, y)
    # Empty memory: no positive, no negative, so the first loss is exactly 0 (no self-positive).
    assert loss.item() == 0.0
    assert head.filled.tolist() == [True, True, False, True, False]
    torch.testing.assert_close(head.memory[1], x[2])  # last occurrence of label 1
    torch.testing.assert_close(head.memory[3], x[1])
    assert head.memory[2].abs().sum() == 0

    x2 = torch.randn(2, 4)
    y2 = torch.tensor([1, 2])  # label 2's slot is unfilled: no positive for row 1
    loss2 = head(x2, y2)
    valid = [True, True, False, True, False]
    cos = LF.normalize(x2) @ LF.normalize(torch.stack([x[3], x[2], x[0], x[1], x[0]])).t()
    expected = naive_threshold_bce(cos, [1, 2], 2.0, 64.0, 0.1, valid=valid)
    assert loss2.item() == pytest.approx(expected, rel=1e-5)


def test_eval_mode_neither_writes_nor_initialises():
    head = fresh("uss", **ACTIVE)
    head(torch.randn(3, 4), torch.tensor([0, 1, 2]))  # fills 0..2
    head.eval()
    before = head.memory.clone()
    loss = head(torch.randn(3, 4), torch.tensor([0, 1, 3]))
    assert torch.equal(head.memory, before) and not bool(head.bias_initialised) and loss.item() == 0.0


def test_data_driven_bias_is_set_once_at_the_first_evaluation():
    torch.manual_seed(0)
    head = fresh("uss", num_classes=6, **ACTIVE)
    x = torch.randn(6, 4)
    head(x, torch.arange(6))  # the first call fills the memory; no negatives yet, b still 0
    assert head.bias.item() == 0.0 and not bool(head.bias_initialised) and head.threshold is None
    x2, y2 = torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 4, 4])
    expected = LF.unified_bias_init(LF.cosine(x2, head.memory), y2, 64.0)
    head(x2, y2)
    assert head.bias.item() == pytest.approx(expected.item(), rel=1e-6)
    assert head.threshold == pytest.approx(expected.item() / 64.0, rel=1e-6)
    with torch.no_grad():
        head.bias.fill_(-1.0)  # the reference would re-arm here; the persistent flag does not
    head(torch.randn(2, 4), torch.tensor([0, 1]))
    assert head.bias.item() == -1.0


def test_ss_bce_shifts_every_class_bias_by_b0():
    torch.manual_seed(1)
    head = fresh("ss_bce", num_classes=4, **ACTIVE)
    head(torch.randn(4, 4), torch.arange(4))
    x2, y2 = torch.randn(3, 4), torch.tensor([0, 2, 2])
    b0 = LF.unified_bias_init(LF.cosine(x2, head.memory), y2, 64.0).item()
    head(x2, y2)
    torch.testing.assert_close(head.bias.detach(), torch.full((4,), b0))
    torch.testing.assert_close(head.thresholds, torch.full((4,), b0 / 64.0))
    assert head.threshold is None


@pytest.mark.parametrize("name", ["uss", "ss_bce", "ss_softmax"])
def test_standalone_heads_warm_up_on_cosface_then_train_sample_to_sample_alone(name):
    """methods.md §2.5–2.6: epoch 0 is CosFace (s, m_class) on the class proxies while the memory fills — no
    loss from an empty memory —, then the sample-to-sample loss alone (the code's combine=False), the bias
    set once from the full memory."""
    torch.manual_seed(7)
    head = fresh(name, num_classes=4, dim=8)
    cosface = heads.build("cosface", 4, 8).train()
    cosface.weight.data.copy_(head.weight.data)
    x, y = torch.randn(8, 8), torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    assert head(x, y).item() == pytest.approx(cosface(x, y).item(), rel=1e-6)
    head.set_epoch(1)  # still inside epoch 0's schedule until the epoch says otherwise
    memory = head.memory.clone()
    assert head.filled.all() and not bool(getattr(head, "bias_initialised", False))
    x2, y2 = torch.randn(4, 8), torch.tensor([3, 2, 1, 0])
    cos = LF.cosine(x2, memory)
    x2.requires_grad_(True)
    loss = head(x2, y2)
    if name == "ss_softmax":
        expected = LF.sample_softmax_loss(cos, y2, 64.0, 0.1).item()
    else:
        b0 = LF.unified_bias_init(cos, y2, 64.0).item()
        torch.testing.assert_close(head.bias.detach(), torch.full_like(head.bias, b0))
        expected = naive_threshold_bce(cos, y2.tolist(), b0, 64.0, 0.1)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert head.weight.grad is None  # CosFace is off: the proxies are not part of the loss any more


def test_bias_starts_within_one_percent_of_the_full_memory_value():
    """The probe of issue 10: C = 2000 identities, batches of 64. Started from the first step, the old
    standalone head set b0 from a memory 3 % full (63.6 against 67.1); with the warm-up b0 comes from
    the full memory at the start epoch, as the reference's epoch-1 call does."""
    torch.manual_seed(8)
    classes, dim, batch = 2000, 32, 64
    head = fresh("uss", num_classes=classes, dim=dim)
    centres = torch.randn(classes, dim)
    order = torch.randperm(classes)
    for start in range(0, classes, batch):  # epoch 0: every identity seen once
        y = order[start:start + batch]
        head(centres[y] + 0.5 * torch.randn(len(y), dim), y)
        assert not bool(head.bias_initialised)
    head.set_epoch(1)
    y = torch.randint(0, classes, (batch,))
    x = centres[y] + 0.5 * torch.randn(batch, dim)
    full = LF.unified_bias_init(LF.cosine(x, head.memory), y, 64.0).item()
    head(x, y)
    assert head.bias.item() == pytest.approx(full, rel=0.01)
    assert head.filled.all()


def test_state_dict_round_trip_keeps_memory_and_flags():
    head = fresh("unitsface")
    head(torch.randn(3, 4), torch.tensor([0, 1, 2]))
    state = head.state_dict()
    assert {"weight", "bias", "memory", "filled", "bias_initialised"} <= set(state)
    other = fresh("unitsface")
    other.load_state_dict(state)
    assert torch.equal(other.memory, head.memory) and torch.equal(other.filled, head.filled)


# --------------------------------------------------------------------------- the UniTSFace schedule


def test_unitsface_warmup_then_cosface_plus_uss():
    torch.manual_seed(2)
    head = fresh("unitsface", num_classes=4, dim=8)
    cosface = heads.build("cosface", 4, 8).train()
    cosface.weight.data.copy_(head.weight.data)
    x, y = torch.randn(8, 8), torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    loss0 = head(x, y)  # epoch 0: CosFace only, memory written anyway
    assert loss0.item() == pytest.approx(cosface(x, y).item(), rel=1e-6)
    assert head.filled.all() and not bool(head.bias_initialised)

    head.set_epoch(1)
    x2, y2 = torch.randn(4, 8), torch.tensor([3, 2, 1, 0])
    memory = head.memory.clone()
    b0 = LF.unified_bias_init(LF.cosine(x2, memory), y2, 64.0).item()
    loss1 = head(x2, y2)
    uss = naive_threshold_bce(LF.cosine(x2, memory), y2.tolist(), b0, 64.0, 0.1)
    assert loss1.item() == pytest.approx(cosface(x2, y2).item() + uss, rel=1e-5)
    assert head.threshold == pytest.approx(b0 / 64.0, rel=1e-6)

    only_uss = fresh("unitsface", num_classes=4, dim=8, weights=(0.0, 1.0), bias_init=b0)
    only_uss.memory.copy_(memory)
    only_uss.filled.fill_(True)
    only_uss.set_epoch(1)
    assert only_uss(x2, y2).item() == pytest.approx(uss, rel=1e-5)


def test_unitsface_waits_for_min_fill():
    head = fresh("unitsface", num_classes=4, dim=8, min_fill=0.75)
    head.set_epoch(3)
    head(torch.randn(2, 8), torch.tensor([0, 1]))  # half filled: USS stays off
    assert not head.sample_to_sample_active() and not bool(head.bias_initialised)
    head(torch.randn(1, 8), torch.tensor([2]))
    assert head.sample_to_sample_active()
    state = {k: v.clone() for k, v in head.state_dict().items()}
    state["filled"][:] = False  # an emptier memory loaded into a head that had reached min_fill
    head.load_state_dict(state)
    assert not head.sample_to_sample_active()


@pytest.mark.parametrize("memory_dtype", ["bfloat16", "float16"])
def test_half_precision_memory_stores_rounded_features_and_barely_moves_the_loss(memory_dtype):
    """The memory is kept in 16 bits (half the bytes); the loss reads it into fp32 and matches the fp32
    memory head holding the same rounded features exactly, the fp32 features to the rounding."""
    g = torch.Generator().manual_seed(11)
    x1, x2 = torch.randn(6, 16, generator=g), torch.randn(6, 16, generator=g)
    y = torch.tensor([0, 1, 2, 3, 4, 5])
    half = fresh("unitsface", num_classes=6, dim=16, memory_dtype=memory_dtype, min_fill=0.0)
    full = fresh("unitsface", num_classes=6, dim=16, min_fill=0.0)
    full.load_state_dict(half.state_dict())
    assert half.memory.dtype == getattr(torch, memory_dtype) and half.memory.element_size() == 2
    for head in (half, full):
        head.set_epoch(1)
        head(x1, y)  # fills the memory (b0 comes from the second call)
    torch.testing.assert_close(half.memory.float(), full.memory.to(half.memory.dtype).float())
    exact = fresh("unitsface", num_classes=6, dim=16, min_fill=0.0)
    exact.load_state_dict({**full.state_dict(), "memory": half.memory.float()})
    exact.set_epoch(1)
    losses = [head(x2, y).item() for head in (half, full, exact)]
    assert losses[0] == pytest.approx(losses[2], rel=1e-6)
    assert losses[0] == pytest.approx(losses[1], rel=1e-2)
    with pytest.raises(UnitsfaceError, match="memory_dtype"):
        heads.build("uss", 6, 16, memory_dtype="int8")


# --------------------------------------------------------------------------- UniFace heads


def test_uce_bias_init_and_threshold_conventions():
    head = heads.build("uce", 100, 8, s=32.0, sample_rate=0.5)
    assert head.bias.shape == (1,) and head.bias.item() == pytest.approx(math.log(10 * 100 * 0.5), rel=1e-6)
    assert head.threshold == pytest.approx(math.log(500) / 32, rel=1e-6)
    assert head.threshold_uce == pytest.approx((math.log(500) - math.log(99)) / 32, rel=1e-6)
    assert head.learned_thresholds() == {"b/s": head.threshold, "(b - log(C-1))/s": head.threshold_uce}
    epl = heads.build("uce_epl", 100, 8, s=32.0, sample_rate=0.5)  # the same UCE bias, both conventions
    assert epl.learned_thresholds() == pytest.approx(head.learned_thresholds())
    bce = heads.build("bce", 100, 8)
    assert bce.bias.shape == (100,) and bce.threshold is None and bce.learned_thresholds() == {}
    torch.testing.assert_close(bce.thresholds, torch.full((100,), math.log(1000) / 64))


@pytest.mark.parametrize("name", ["uce", "bce"])
def test_uniface_sampling_keeps_positives_and_uses_the_kept_columns(name):
    torch.manual_seed(3)
    head = heads.build(name, 20, 8, sample_rate=0.25).train()
    with torch.no_grad():
        head.bias.copy_(torch.linspace(3.0, 6.0, head.bias.numel()))
    x, y = torch.randn(6, 8), torch.tensor([17, 3, 3, 11, 0, 19])
    torch.manual_seed(4)
    loss = head(x, y)
    torch.manual_seed(4)  # the same draw of negatives
    rows, local, columns = head.class_rows(y)
    assert columns.numel() == 5 and set(y.tolist()) <= set(columns.tolist())
    assert torch.equal(columns[local], y)
    bias = head.bias if name == "uce" else head.bias[columns]
    expected = naive_threshold_bce(LF.cosine(x, rows).detach(), local.tolist(), bias.detach(), 64.0, 0.4)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("name", ["uce", "uss", "uce_epl"])
@pytest.mark.parametrize("spelling, clamped", [(True, True), ("reference", True), (False, False), ("none", False)])
def test_every_clamp_spelling_means_the_same_for_every_threshold_head(name, spelling, clamped):
    assert heads.build(name, 4, 4, clamp=spelling).clamp is clamped  # uce_epl once read "none" as True


def test_renamed_parameters_name_their_new_key():
    with pytest.raises(UnitsfaceError, match=r"head 'uss': parameter 'm' is now 'm_sample'"):
        heads.build("uss", 4, 4, m=0.1)
    with pytest.raises(UnitsfaceError, match=r"head 'unitsface': parameter 'warmup_epochs' is now 's2s_start_epoch'"):
        heads.build("unitsface", 4, 4, warmup_epochs=1)


def test_bad_options_are_clear_errors():
    for name in ("uss", "uce", "uce_epl"):
        with pytest.raises(UnitsfaceError, match=f"head '{name}': clamp must be"):
            heads.build(name, 4, 4, clamp="sometimes")
    with pytest.raises(UnitsfaceError, match=r"head 'unitsface': weights must be two numbers"):
        heads.build("unitsface", 4, 4, weights=1.0)
    assert heads.build("uce", 4, 4, clamp="reference").clamp is True


# --------------------------------------------------------------------------- numerics

# A fixed bias keeps the memory heads' loss active from the first call with negatives.
EDGE_PARAMS = {"uce": {}, "bce": {}, "ss_softmax": {}, "uss": {"bias_init": 30.0}, "ss_bce": {"bias_init": 30.0},
               "unitsface": {"bias_init": 30.0}}


@pytest.mark.parametrize("name", sorted(EDGE_PARAMS))
def test_cos_plus_minus_one_single_identity_repeated_labels(name):
    torch.manual_seed(5)
    head = fresh(name, num_classes=3, dim=4, **EDGE_PARAMS[name])
    head.set_epoch(1)
    if hasattr(head, "memory"):
        head(torch.randn(3, 4), torch.arange(3))  # fill
    rows = head.memory if hasattr(head, "memory") else head.weight
    base = rows[1].detach().clone()
    # One identity, repeated; cos = +1 with its slot/proxy, −1 for the flipped copy.
    x = torch.stack([base, -base, 1e6 * base, 1e-12 * base]).requires_grad_(True)
    y = torch.ones(4, dtype=torch.long)
    loss = head(x, y)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("name", sorted(EDGE_PARAMS))
def test_bf16_autocast_keeps_the_head_in_fp32(name):
    torch.manual_seed(6)
    ref = fresh(name, num_classes=6, dim=8, **EDGE_PARAMS[name])
    ref.set_epoch(1)
    if hasattr(ref, "memory"):
        ref(torch.randn(6, 8), torch.arange(6))
    amp = fresh(name, num_classes=6, dim=8, **EDGE_PARAMS[name])
    amp.load_state_dict(ref.state_dict())
    amp.set_epoch(1)
    x, y = torch.randn(5, 8).bfloat16(), torch.tensor([0, 2, 2, 5, 1])
    expected = ref(x.float(), y)  # the same bf16 embeddings, no autocast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = amp(x, y)
    assert got.dtype == torch.float32 and torch.isfinite(got)
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)


def test_threshold_bce_is_finite_for_extreme_logits():
    cos = t([[1.0, -1.0, 1.0]]).requires_grad_(True)
    for bias in (t([1e4]), t([-1e4]), t([0.0, 1e4, -1e4])):
        loss = LF.threshold_bce_loss(cos, torch.tensor([1]), bias, s=64.0, m=0.4)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(cos.grad).all()
