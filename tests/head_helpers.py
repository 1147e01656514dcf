"""Helpers shared by the head parity tests: build a head with given state, run one step."""

from __future__ import annotations

import pytest
import torch

from unitsface.heads import build


def tensor(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def make_head(name: str, weight: torch.Tensor, prototypes: torch.Tensor | None = None, epoch: int = 0, **params):
    """Head `name` in training mode with its class weights (and prototype bank) set from a reference file."""
    head = build(name, weight.shape[0], weight.shape[1], **params)
    with torch.no_grad():
        head.proxies.weight.copy_(weight)
        if prototypes is not None:
            head.prototypes.bank.copy_(prototypes)
    head.set_epoch(epoch)
    return head.train()


def step(head, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward/backward from fresh gradients; returns (loss, dL/dx)."""
    head.zero_grad()
    x = x.clone().requires_grad_(True)
    loss = head(x, y)
    loss.backward()
    return loss, x.grad


def assert_bf16_matches_fp32(name: str, seed: int) -> None:
    """Under bf16 autocast the head still computes in fp32: same loss as without autocast."""
    torch.manual_seed(seed)
    W = torch.randn(6, 16)
    x, y = (torch.randn(12, 16) * 20).bfloat16().float(), torch.randint(0, 6, (12,))
    reference_loss = make_head(name, W)(x, y)
    head = make_head(name, W)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = head(x.bfloat16().requires_grad_(True), y)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(reference_loss.item(), rel=1e-5)
