"""Helpers shared by the head parity tests: build a head with given state, run one step."""

from __future__ import annotations

import torch

from unitsface.heads import build


def tensor(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def make_head(name: str, weight: torch.Tensor, prototypes: torch.Tensor | None = None, epoch: int = 0, **params):
    """Head `name` in training mode with its class weights (and prototype bank) set from a reference file."""
    head = build(name, weight.shape[0], weight.shape[1], **params)
    with torch.no_grad():
        head.weight.copy_(weight)
        if prototypes is not None:
            head.prototypes.copy_(prototypes)
    head.set_epoch(epoch)
    return head.train()


def step(head, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward/backward from fresh gradients; returns (loss, dL/dx)."""
    head.zero_grad()
    x = x.clone().requires_grad_(True)
    loss = head(x, y)
    loss.backward()
    return loss, x.grad
