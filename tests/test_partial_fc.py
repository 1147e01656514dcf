"""Partial FC for every per-identity state (issue 5 item 3; methods.md §1.0, §2.8, §3.2).

A head with `sample_rate` < 1 must behave, on each step, exactly like the same head built with
only the kept classes: its `weight`, `memory`, `prototypes`, per-class `bias` and queues cut to
the kept rows by hand and the labels renumbered. Writes to memories and banks still land in the
real rows; the data-driven bias starts from the sampled columns only. Also: the cosine of
`LF.cosine` (rows not normalised when they carry a gradient) against the plain formula.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from unitsface import heads, optim
from unitsface.losses import functional as LF

C, D, RATE = 40, 16, 0.25  # round(0.25·40) = 10 kept columns unless the batch has more positives
SAMPLED_HEADS = [n for n in heads.names() if "sample_rate" in heads.head_parameters(n)]
MEMORY_HEADS = ("ss_softmax", "uss", "ss_bce", "unitsface")
# Parameters that switch every term on at once (memory loss, EP rows, VPL mixing).
ACTIVE = {**{name: {"s2s_start_epoch": 0, "min_fill": 0.0} for name in MEMORY_HEADS}, "vpl": {"vpl_start_step": 0}}
FEW_POSITIVES = [3, 17, 17, 0, 39, 3, 22, 8, 17, 31, 0, 22]  # 7 classes: 3 sampled negatives
MANY_POSITIVES = list(range(0, 36, 3))  # 12 classes > 10: the sample is exactly the positives


def sampled_head(name: str, sample_rate: float = RATE, classes: int = C, seed: int = 0) -> torch.nn.Module:
    """Head `name` in training mode with every per-class buffer random (some memory slots empty)."""
    torch.manual_seed(seed)
    head = heads.build(name, classes, D, sample_rate=sample_rate, **ACTIVE.get(name, {})).train()
    with torch.no_grad():
        for key, buf in head.named_buffers():
            if buf.dim() and buf.shape[0] == classes:
                if buf.dtype == torch.bool:
                    buf.copy_(torch.rand(buf.shape) < 0.8)
                elif buf.is_floating_point():
                    buf.normal_()
                else:  # VPL and AnchorFace write iterations: some fresh, some stale
                    buf.copy_(torch.randint(0, 400, buf.shape))
            elif key == "queue.iteration":
                buf.fill_(400)
            elif key == "stored.step":  # AnchorFace's features written before step 200 have expired
                buf.fill_(1200)
    head.set_epoch(5)  # past every warm-up / start epoch
    return head


def recording_columns(head: torch.nn.Module) -> list[torch.Tensor]:
    """Every column sample the head draws, in order (the hook tests/dist_worker.py uses too)."""
    drawn: list[torch.Tensor] = []
    original = head.sampled_columns

    def record(local: torch.Tensor) -> torch.Tensor | None:
        drawn.append(original(local))
        return drawn[-1]

    head.sampled_columns = record  # type: ignore[method-assign]
    return drawn


def restricted(name: str, state: dict[str, torch.Tensor], columns: torch.Tensor) -> torch.nn.Module:
    """The same head built for the kept classes only, its per-class rows cut from `state` by hand."""
    head = heads.build(name, columns.numel(), D, **ACTIVE.get(name, {})).train()
    head.load_state_dict({k: v[columns] if v.dim() and v.shape[0] == C else v for k, v in state.items()})
    head.set_epoch(5)
    return head


def forward_backward(head: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.clone().requires_grad_(True)
    loss = head(x, y)
    loss.backward()
    return loss.detach(), x.grad


@pytest.mark.parametrize("labels", [FEW_POSITIVES, MANY_POSITIVES], ids=["few_positives", "many_positives"])
@pytest.mark.parametrize("name", SAMPLED_HEADS)
def test_sampled_head_equals_the_head_of_its_kept_columns(name: str, labels: list[int]) -> None:
    head = sampled_head(name)
    before = {k: v.clone() for k, v in head.state_dict().items()}
    drawn = recording_columns(head)
    x, y = 8.0 * torch.randn(len(labels), D, generator=torch.Generator().manual_seed(1)), torch.tensor(labels)
    loss, x_grad = forward_backward(head, x, y)

    assert len(drawn) == 1, "one draw per forward, shared by every per-class state"
    columns = drawn[0]
    positives = sorted(set(labels))
    assert set(positives) <= set(columns.tolist()) and torch.equal(columns, columns.sort().values)
    assert columns.numel() == max(round(RATE * C), len(positives))
    if len(positives) > round(RATE * C):
        assert columns.tolist() == positives

    position = {int(c): i for i, c in enumerate(columns)}
    reference = restricted(name, before, columns)
    ref_loss, ref_x_grad = forward_backward(reference, x, torch.tensor([position[v] for v in labels]))
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x_grad, ref_x_grad, rtol=1e-4, atol=1e-5)

    others = torch.ones(C, dtype=torch.bool)
    others[columns] = False
    for key, p in head.named_parameters():
        ref_grad = dict(reference.named_parameters())[key].grad
        if p.grad is None:  # a standalone memory head's CosFace proxies after the warm-up
            assert ref_grad is None, key
            continue
        if p.shape[0] == C:  # per-class: the kept rows' gradient, nothing elsewhere
            torch.testing.assert_close(p.grad[columns], ref_grad, rtol=1e-4, atol=1e-5, msg=key)
            assert not p.grad[others].any(), key
        else:
            torch.testing.assert_close(p.grad, ref_grad, rtol=1e-4, atol=1e-5, msg=key)
    ref_state = reference.state_dict()
    for key, value in head.state_dict().items():
        expected = ref_state[key]
        if value.dim() and value.shape[0] == C:
            expected = before[key].clone()
            expected[columns] = ref_state[key]
            if key == "bias.value":  # S2S BCE shifts every b_j by the b0 of the sampled columns
                expected[others] += ref_state[key][0] - before[key][columns[0]]
        torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize("name", ["unitsface", "ss_softmax", "cosface_epl", "vpl"])
def test_writes_reach_the_real_rows_of_every_batch_label(name: str) -> None:
    """Memories, prototype banks and queues change in exactly the batch's classes (all positives, so
    all sampled), at their own rows, not at their positions in the sample; the memory holds the
    last occurrence of each label."""
    head = sampled_head(name, sample_rate=0.1)
    before = {k: v.clone() for k, v in head.named_buffers()}
    x = torch.randn(len(FEW_POSITIVES), D)
    head(x, torch.tensor(FEW_POSITIVES))
    changed = set()
    for key, buf in head.named_buffers():
        if buf.dim() and buf.shape[0] == C and buf.is_floating_point():
            changed |= set(torch.nonzero((buf != before[key]).reshape(C, -1).any(1)).flatten().tolist())
    assert changed == set(FEW_POSITIVES)
    if hasattr(head, "memory"):
        for label in set(FEW_POSITIVES):
            last = max(i for i, v in enumerate(FEW_POSITIVES) if v == label)
            assert torch.equal(head.memory.features[label], x[last])
        newly = head.memory.filled & ~before["memory.filled"]
        assert set(torch.nonzero(newly).flatten().tolist()) <= set(FEW_POSITIVES)
        assert bool(head.memory.filled[FEW_POSITIVES].all())


def test_uss_bias_starts_from_the_sampled_filled_columns() -> None:
    """b0 = mean_i LSE over the kept, filled negatives of s·n_ij (§2.5 with §2.8), by hand in float64:
    about log(1/r) below the value over all columns, as UniFace's log(10·C·r) is."""
    head = sampled_head("uss")
    drawn = recording_columns(head)
    memory, filled = head.memory.features.double().numpy(), head.memory.filled.numpy().copy()
    x = torch.randn(len(FEW_POSITIVES), D)
    head(x, torch.tensor(FEW_POSITIVES))
    kept = drawn[0].numpy()
    e = x.double().numpy()
    cos = (e / np.linalg.norm(e, axis=1, keepdims=True)) @ (memory / np.linalg.norm(memory, axis=1, keepdims=True)).T

    def b0(columns: np.ndarray) -> float:
        rows = []
        for i, label in enumerate(FEW_POSITIVES):
            z = [64.0 * cos[i, j] for j in columns if j != label and filled[j]]
            rows.append(np.logaddexp.reduce(z))
        return float(np.mean(rows))

    assert bool(head.bias.initialised)
    assert head.bias.value.item() == pytest.approx(b0(kept), rel=1e-5)
    assert b0(np.arange(C)) - head.bias.value.item() > 0.5  # 30 more columns in the full LSE


def test_evaluation_reads_every_column() -> None:
    head = sampled_head("uss").eval()
    assert head.columns_for(torch.tensor(FEW_POSITIVES)).columns is None


def test_unitsface_weight_gets_a_sparse_gradient_of_the_kept_rows() -> None:
    """With the lazy optimiser the CosFace proxies are read through `read_rows` like any Partial FC head."""
    head = sampled_head("unitsface")
    opt = optim.SGD(head.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, lazy=[head.proxies.weight])
    drawn = recording_columns(head)
    head(torch.randn(len(FEW_POSITIVES), D), torch.tensor(FEW_POSITIVES)).backward()
    assert head.proxies.weight.grad.is_sparse
    assert torch.equal(head.proxies.weight.grad.coalesce().indices()[0], drawn[0])
    opt.step()


# --------------------------------------------------------------------------- the cosine itself


@pytest.mark.parametrize("batch", [5, 40], ids=["B<d", "B>=d"])
def test_cosine_equals_normalised_rows_with_their_gradients(batch: int) -> None:
    """Both paths of LF.cosine give x̂·(w/max(|w|, 1e-5))ᵀ and its gradients, a zero row and a row
    below eps included (the eps semantics of the references)."""
    g = torch.Generator().manual_seed(0)
    x = (3.0 * torch.randn(batch, D, generator=g)).requires_grad_()
    w = torch.randn(30, D, generator=g)
    w[3] = 0.0
    w[7] *= 1e-7
    w.requires_grad_()
    upstream = torch.randn(batch, 30, generator=g)
    got = LF.cosine(x, w)
    gx, gw = torch.autograd.grad(got, (x, w), upstream)
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    expected = F.normalize(x64, dim=1, eps=1e-5) @ F.normalize(w64, dim=1, eps=1e-5).t()
    ex, ew = torch.autograd.grad(expected, (x64, w64), upstream.double())
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gx.double(), ex, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gw.double(), ew, rtol=1e-4, atol=1e-3)  # row 7's gradient is ~1e5


def test_cosine_against_a_buffer_survives_writes_before_backward() -> None:
    """Memories are written after the loss but before backward(): the cosine must not hold the buffer."""
    memory = torch.randn(20, D)
    x = torch.randn(4, D, requires_grad=True)
    cos = LF.cosine(x, memory)
    expected = torch.autograd.grad(cos.sum(), x, retain_graph=True)[0]
    memory.mul_(-3.0)
    torch.testing.assert_close(torch.autograd.grad(cos.sum(), x)[0], expected)
