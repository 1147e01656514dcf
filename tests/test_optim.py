"""Optimisers by name and their parameter groups: which tensors decay, the head's lr, one step by hand."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from unitsface import heads, optim
from unitsface.errors import UnitsfaceError


def small_backbone() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 4, 3, bias=True), nn.BatchNorm2d(4), nn.PReLU(4), nn.Flatten(),
                         nn.Linear(4, 6), nn.LayerNorm(6), nn.BatchNorm1d(6))


def names_of(groups: list[dict], module: nn.Module) -> list[list[str]]:
    name = {id(p): n for n, p in module.named_parameters()}
    return [[name[id(p)] for p in g["params"] if id(p) in name] for g in groups]


def test_no_decay_for_norm_weights_biases_and_prelu_slopes() -> None:
    backbone, head = small_backbone(), heads.build("uce", 5, 6)  # UniFace: class weights + a unified bias
    backbone[6].weight.requires_grad_(False)  # a frozen gamma (the iresnet embedding BN) is not optimised
    groups = optim.param_groups(backbone, head, lr=0.1, weight_decay=5e-4, head_lr_scale=10.0,
                                no_decay_norm_bias=True)
    assert [(g["lr"], g["weight_decay"]) for g in groups] == [(0.1, 5e-4), (0.1, 0.0), (1.0, 5e-4), (1.0, 0.0)]
    assert names_of(groups, backbone)[:2] == [["0.weight", "4.weight"],
                                             ["0.bias", "1.weight", "1.bias", "2.weight", "4.bias", "5.weight",
                                              "5.bias", "6.bias"]]
    assert names_of(groups, head)[2:] == [["proxies.weight"], ["bias.value"]]


@pytest.mark.parametrize("head_name", ["uss", "bce"])
def test_the_threshold_bias_takes_its_own_decay(head_name: str) -> None:
    """`bias_weight_decay` sets the learned threshold bias's decay (USS's b, BCE's b_j) and nothing else's, with or
    without `no_decay_norm_bias`; unset, the bias decays like every other parameter (the references' parity)."""
    backbone, head = small_backbone(), heads.build(head_name, 5, 6)
    everything = len(list(backbone.parameters())) + len(list(head.parameters()))
    groups = optim.param_groups(backbone, head, lr=0.1, weight_decay=5e-4, bias_weight_decay=0.0)
    assert [(g["weight_decay"], len(g["params"])) for g in groups] == [(5e-4, everything - 1), (0.0, 1)]
    assert names_of(groups, head)[1] == ["bias.value"]
    groups = optim.param_groups(backbone, head, lr=0.1, weight_decay=5e-4, no_decay_norm_bias=True,
                                bias_weight_decay=1e-3)
    assert [g["weight_decay"] for g in groups] == [5e-4, 0.0, 1e-3] and names_of(groups, head)[2] == ["bias.value"]
    unset = optim.param_groups(backbone, head, lr=0.1, weight_decay=5e-4)
    assert len(unset) == 1 and unset[0]["weight_decay"] == 5e-4


def test_defaults_make_one_group_in_module_order() -> None:
    """The layout of every checkpoint written before groups existed: it still resumes."""
    backbone, head = small_backbone(), heads.build("cosface", 5, 6)
    groups = optim.param_groups(backbone, head, lr=0.1, weight_decay=5e-4)
    assert len(groups) == 1 and groups[0]["lr"] == 0.1 and groups[0]["weight_decay"] == 5e-4
    assert [id(p) for p in groups[0]["params"]] == [id(p) for p in [*backbone.parameters(), *head.parameters()]]
    # only the lr scale set: two groups, decay everywhere
    groups = optim.param_groups(backbone, head, lr=0.1, weight_decay=5e-4, head_lr_scale=0.5)
    assert [(g["lr"], g["weight_decay"], len(g["params"])) for g in groups] == [(0.1, 5e-4, 11), (0.05, 5e-4, 1)]


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_each_group_steps_with_its_own_lr_and_decay(name: str) -> None:
    """One step from zero momentum / moments, by hand: SGD w − lr·(g + wd·w); AdamW w·(1 − lr·wd) − lr·sign(g)
    (the first Adam step is ±lr up to eps)."""
    torch.manual_seed(0)
    a, b = nn.Parameter(torch.randn(3)), nn.Parameter(torch.randn(3))
    groups = [{"params": [a], "lr": 0.1, "weight_decay": 0.5}, {"params": [b], "lr": 0.01, "weight_decay": 0.0}]
    opt = optim.build(name, groups, lr=1.0, momentum=0.9, weight_decay=0.0)
    before = [a.detach().clone(), b.detach().clone()]
    grads = [torch.randn(3), torch.randn(3)]
    a.grad, b.grad = grads[0].clone(), grads[1].clone()
    opt.step()
    for p, w, g, (lr, wd) in zip((a, b), before, grads, ((0.1, 0.5), (0.01, 0.0))):
        want = w - lr * (g + wd * w) if name == "sgd" else w * (1 - lr * wd) - lr * g.sign()
        torch.testing.assert_close(p.detach(), want, rtol=1e-5, atol=1e-6)
    opt.catch_up()  # every optimiser offers it; nothing is lazy here


def test_optimizer_names_and_errors() -> None:
    assert optim.names() == ["adamw", "sgd"]
    p = nn.Parameter(torch.zeros(4, 2))
    with pytest.raises(UnitsfaceError, match="unknown optimizer 'adam'; known: adamw, sgd"):
        optim.build("adam", [{"params": [p]}], lr=0.1)
    with pytest.raises(UnitsfaceError, match="sparse_update needs train.optimizer=sgd"):
        optim.build("adamw", [{"params": [p]}], lr=0.1, lazy=[p])
