"""MagFace, AdaFace, CurricularFace and VPL heads: reference parity, state updates, edge cases."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from head_helpers import assert_bf16_matches_fp32, make_head, step, tensor

from unitsface.errors import UnitsfaceError
from unitsface.heads import build, head_parameters
from unitsface.losses import functional as LF


@pytest.fixture(scope="module")
def reference(reference_dir):
    return json.loads((reference_dir / "baseline_losses.json").read_text())


def assert_step(head, x, y, expected, where):
    loss, grad_x = step(head, x, y)
    assert loss.item() == pytest.approx(expected["loss"], rel=1e-4), where
    torch.testing.assert_close(grad_x, tensor(expected["grad_x"]), atol=1e-5, rtol=0, msg=where)
    torch.testing.assert_close(head.proxies.weight.grad, tensor(expected["grad_W"]), atol=1e-5, rtol=0, msg=where)
    return loss


# --------------------------------------------------------------------------- reference parity


def test_magface_parity(reference):
    for seed, data in reference.items():
        x, y, W = tensor(data["x"]), torch.tensor(data["y"]), tensor(data["W"])
        expected = data["magface_s64_lm0.45_um0.8_la10_ua110_lambda35"]
        loss = assert_step(make_head("magface", W), x, y, expected, f"seed {seed}")
        a = np.clip(np.linalg.norm(np.array(data["x"]), axis=1), 10, 110)
        loss_g = float(np.mean(a / 110**2 + 1 / a))
        assert loss_g == pytest.approx(expected["loss_g"], rel=1e-5)
        assert loss.item() - 35 * loss_g == pytest.approx(expected["loss_id"], rel=1e-4)


@pytest.mark.parametrize("name, case, params, buffers", [
    ("adaface", "adaface_m0.4_h0.333_s64_talpha0.01", {}, ("batch_mean", "batch_std")),
    ("curricularface", "curricularface_s64_m0.5_alpha0.1", {"alpha": 0.1}, ("t",)),
])
def test_two_step_parity_with_running_statistics(reference, name, case, params, buffers):
    for seed, data in reference.items():
        x, y, W = tensor(data["x"]), torch.tensor(data["y"]), tensor(data["W"])
        head = make_head(name, W, **params)
        for i, expected in enumerate(data[case]["steps"]):
            xs, ys = (x, y) if i == 0 else (x.flip(0), y.flip(0))  # step 2 feeds the batch reversed
            assert_step(head, xs, ys, expected, f"seed {seed} step {i}")
            for buffer in buffers:
                assert getattr(head, buffer).item() == pytest.approx(expected[buffer], rel=1e-5, abs=1e-7)


# --------------------------------------------------------------------------- MagFace


def test_magface_lambda_bound():
    bound = LF.magface_lambda_bound(64, 0.45, 0.8, 10, 110)
    assert bound == pytest.approx(64 * 0.0035 * 110**2 * 100 / (110**2 - 100), rel=1e-9)
    assert bound == pytest.approx(22.59, abs=0.01)
    with pytest.raises(UnitsfaceError, match="lambda_g"):
        build("magface", 10, 8, lambda_g=20.0)  # MagFace's argparse default
    build("magface", 10, 8, lambda_g=23.0)
    build("magface", 10, 8, l_a=1.0, u_a=51.0, l_margin=0.45, u_margin=1.0, lambda_g=5.0)  # README fine-tune


def test_magface_easy_margin_and_norm_gradient():
    W = torch.eye(4, 8)
    x = torch.zeros(2, 8)
    x[0, :2] = torch.tensor([0.6, 0.8]) * 60  # cos 0.6 to class 0, norm 60
    x[1, :2] = torch.tensor([-0.6, 0.8]) * 60  # cos −0.6 to class 0: easy margin keeps c
    head = make_head("magface", W)
    target = head.magnitudes.target(torch.tensor([0.6, -0.6]), x)
    m = 0.45 + 0.35 / 100 * 50
    assert target[0].item() == pytest.approx(math.cos(math.acos(0.6) + m), abs=1e-6)
    assert target[1].item() == pytest.approx(-0.6, abs=1e-6)
    assert head.magnitudes.regularizer(x).item() == pytest.approx(35 * (60 / 110**2 + 1 / 60), rel=1e-6)


# --------------------------------------------------------------------------- AdaFace / CurricularFace state


def test_statistics_count_duplicates_and_freeze_in_eval():
    torch.manual_seed(3)
    W = torch.randn(5, 8)
    x, y = torch.randn(6, 8) * torch.tensor([[5.0], [7], [9], [20], [150], [3]]), torch.tensor([1, 1, 1, 2, 0, 1])
    ada = make_head("adaface", W, t_alpha=0.5)
    cur = make_head("curricularface", W, alpha=0.5)
    step(ada, x, y)
    step(cur, x, y)
    norms = np.clip(np.linalg.norm(x.numpy(), axis=1), 1e-3, 100)  # 150 is clipped at 100
    assert ada.batch_mean.item() == pytest.approx(0.5 * norms.mean() + 10, rel=1e-6)
    assert ada.batch_std.item() == pytest.approx(0.5 * norms.std(ddof=1) + 50, rel=1e-6)
    e, w = F.normalize(x, dim=1), F.normalize(W, dim=1)
    assert cur.t.item() == pytest.approx(0.5 * (e * w[y]).sum(1).mean().item(), rel=1e-5)
    state = (ada.batch_mean.clone(), ada.batch_std.clone(), cur.t.clone())
    ada.eval()(x, y)
    cur.eval()(x, y)
    assert torch.equal(torch.cat(state), torch.cat([ada.batch_mean, ada.batch_std, cur.t]))
    assert {"batch_mean", "batch_std"} <= set(ada.state_dict()) and "t" in cur.state_dict()


def test_adaface_single_row_batch_keeps_std():
    head = make_head("adaface", torch.randn(3, 8))
    loss, _ = step(head, torch.randn(1, 8) * 30, torch.tensor([2]))
    assert torch.isfinite(loss) and head.batch_std.item() == 100.0
    assert head.batch_mean.item() != 20.0


def test_curricularface_modulates_hard_negatives_only():
    W = torch.eye(3, 3)
    x = torch.tensor([[0.8, 0.55, -0.2]])  # cos (0.817, 0.562, −0.204) after normalisation
    head = make_head("curricularface", W).eval()
    head.t.fill_(0.3)
    c = F.normalize(x, dim=1)[0]
    target = math.cos(math.acos(c[0].item()) + 0.5)  # 0.33: class 1 is a hard negative, class 2 is not
    logits = torch.tensor([target, c[1] * (0.3 + c[1]), c[2]]) * 64
    expected = torch.logsumexp(logits, 0) - logits[0]
    assert head(x, torch.tensor([0])).item() == pytest.approx(expected.item(), rel=1e-5)


# --------------------------------------------------------------------------- VPL


def test_vpl_off_before_start_iter_and_queue_written_after_loss():
    torch.manual_seed(4)
    W = torch.randn(5, 8)
    x, y = torch.randn(4, 8), torch.tensor([3, 1, 3, 0])
    head = make_head("vpl", W, vpl_start_step=10)
    queue = head.queue.features.clone()
    loss = head(x, y)
    assert loss.item() == pytest.approx(LF.arcface_loss(LF.cosine(x, W), y, 64.0, 0.5).item(), rel=1e-5)
    assert head.queue.iteration.item() == 1
    e = F.normalize(x, dim=1)
    torch.testing.assert_close(head.queue.features[[3, 1, 0]], e[[2, 1, 3]])  # last occurrence of 3 wins
    torch.testing.assert_close(head.queue.features[[2, 4]], queue[[2, 4]])
    assert head.queue.written.tolist() == [1, 1, 0, 1, 0]


def test_vpl_mixes_only_fresh_rows_after_start_iter():
    torch.manual_seed(5)
    W = torch.randn(5, 8)
    x, y = torch.randn(4, 8), torch.tensor([0, 1, 2, 4])
    head = make_head("vpl", W, base="cosface", vpl_start_step=100, staleness=20)
    with torch.no_grad():
        head.queue.iteration.fill_(100)  # the next training forward is T = 101 > T_0
        head.queue.written.copy_(torch.tensor([90, 81, 80, 0, 101]))  # T − τ = 11, 20, 21, 101, 0
    q = head.queue.features.clone()
    w = F.normalize(W, dim=1)
    lam = torch.tensor([0.15, 0.15, 0.0, 0.0, 0.15]).unsqueeze(1)
    mixed = F.normalize((1 - lam) * w + lam * q, dim=1)
    cos = F.normalize(x, dim=1) @ mixed.t()
    expected = F.cross_entropy(64 * (cos - 0.4 * F.one_hot(y, 5)), y)
    loss = head(x, y)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    loss.backward()
    assert head.proxies.weight.grad.abs().sum() > 0
    assert head.queue.written.tolist() == [101, 101, 101, 0, 101]


def test_vpl_eval_changes_nothing_and_state_is_checkpointed():
    head = make_head("vpl", torch.randn(4, 8)).eval()
    before = {k: v.clone() for k, v in head.state_dict().items()}
    head(torch.randn(3, 8), torch.tensor([0, 1, 2]))
    assert all(torch.equal(before[k], v) for k, v in head.state_dict().items())
    assert {"queue.features", "queue.written", "queue.iteration"} <= set(before)
    torch.testing.assert_close(head.queue.features.norm(dim=1), torch.ones(4))
    with pytest.raises(UnitsfaceError):
        build("vpl", 4, 8, base="sphereface")


# --------------------------------------------------------------------------- shared edge cases

BASELINES = ["magface", "adaface", "curricularface", "vpl"]


@pytest.mark.parametrize("name", BASELINES)
def test_finite_at_cos_plus_minus_one_with_repeated_labels(name):
    W = torch.randn(4, 8)
    x = torch.stack([W[0] * 20, -W[1] * 20, W[0] * 50, W[2] * 30])  # cos = 1 on targets, −1 elsewhere
    head = make_head(name, W)
    loss, grad_x = step(head, x, torch.tensor([0, 1, 0, 2]))
    assert torch.isfinite(loss) and torch.isfinite(grad_x).all() and torch.isfinite(head.proxies.weight.grad).all()


@pytest.mark.parametrize("name", BASELINES)
def test_bf16_autocast_matches_fp32_head(name):
    assert_bf16_matches_fp32(name, seed=6)


def test_defaults_and_initialisations():
    assert head_parameters("magface") == {"s": 64.0, "l_margin": 0.45, "u_margin": 0.8, "l_a": 10.0, "u_a": 110.0,
                                          "lambda_g": 35.0, "weight_init": "unit", "sample_rate": 1.0}
    assert head_parameters("adaface")["h"] == 0.333 and head_parameters("curricularface")["alpha"] == 0.01
    vpl = head_parameters("vpl")
    assert (vpl["vpl_lambda"], vpl["vpl_start_step"], vpl["staleness"]) == (0.15, 8000, 200)
    torch.testing.assert_close(build("adaface", 20, 64).proxies.weight.norm(dim=1), torch.ones(20))
    assert build("curricularface", 2000, 64).proxies.weight.std().item() == pytest.approx(0.01, rel=0.05)
    assert build("vpl", 10, 8, base="cosface").m == 0.4 and build("vpl", 10, 8).m == 0.5
