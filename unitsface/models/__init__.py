"""Backbones: `unitsface.models.build(name, embedding_size=512, **kwargs)`.

Every model maps N x 3 x 112 x 112 RGB floats normalised as (x - 127.5) / 127.5 (i.e. (x/255 - 0.5)/0.5)
to N x d raw, un-normalised embeddings; `input_contract(model)` returns that contract as a dict
(`INPUT_CONTRACT` is the default). Flip-sum is not part of any model: evaluation applies it.

Families (checkpoints refuse to load weights across them, methods.md §9.3):
- iresnet: `iresnet18/34/50/100/200` (insightface arcface_torch layout)
- lresnet: `lresnet18e_ir/34/50/100/200e_ir` (UniTSFace / UniFace / EPL LResNet-E-IR)
- mobilefacenet: `mobilefacenet`
- tinyfacenet: `tinyfacenet` (fast CPU net for tests and the demo; `input_size` kwarg)
- vit: `vit_t/s/b/l` (insightface arcface_torch layout; `mask_ratio`, `drop_path`, `gradient_checkpointing`)

`parameters(name)` lists the keywords a config may set for a backbone (`model.<keyword>`);
`load_pretrained(model, path)` loads third-party or unitsface weights into a built model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from unitsface.errors import UnitsfaceError
from unitsface.models import iresnet, mobile, vit  # noqa: F401  (modules register their names on import)
from unitsface.models._base import BACKBONES, FAMILIES, INPUT_CONTRACT, PARAMETERS, FaceBackbone
from unitsface.models.weights import LoadReport, load_matching, load_pretrained
from unitsface.training.checkpoint import load_checkpoint


def names() -> list[str]:
    """All registered backbone names, sorted."""
    return BACKBONES.names()


def parameters(name: str) -> dict[str, Any]:
    """The keywords backbone `name` accepts besides `embedding_size`, with their defaults."""
    BACKBONES.get(name)  # raises the registry's clear error for an unknown name
    return dict(PARAMETERS[name])


def build(name: str, embedding_size: int = 512, **kwargs: Any) -> nn.Module:
    """Construct backbone `name` producing `embedding_size`-d embeddings; kwargs go to its constructor
    (e.g. `dropout` for the ResNets, `input_size` for tinyfacenet, `mask_ratio` for the ViTs; see
    `parameters(name)`). Unknown names or arguments raise UnitsfaceError."""
    factory = BACKBONES.get(name)
    unknown = sorted(set(kwargs) - set(PARAMETERS[name]))
    if unknown:
        accepted = ", ".join(sorted(PARAMETERS[name])) or "nothing besides embedding_size"
        raise UnitsfaceError(f"backbone {name!r} has no parameter {unknown[0]!r}; it accepts: {accepted}")
    return factory(embedding_size=embedding_size, **kwargs)


def family(name: str) -> str:
    """The weight family of backbone `name` ("iresnet", "lresnet", "mobilefacenet", "tinyfacenet", "vit")."""
    BACKBONES.get(name)  # raises the registry's clear error for an unknown name
    return FAMILIES[name]


def input_contract(model: nn.Module) -> dict[str, Any]:
    """A copy of the model's input contract: {"size", "color", "mean", "std"}; pixels x in 0..255 enter
    the network as (x - mean) / std in channel order `color`, at size x size.

    Wrappers that keep the model as `.module` (DistributedDataParallel) or `._orig_mod`
    (torch.compile) are looked through.
    """
    inner: Any = model
    while not isinstance(inner, FaceBackbone):
        wrapped = [getattr(inner, attr) for attr in ("module", "_orig_mod") if hasattr(inner, attr)]
        if not wrapped or not isinstance(wrapped[0], nn.Module):
            raise UnitsfaceError(f"{type(model).__name__} is not a unitsface backbone: it has no input contract")
        inner = wrapped[0]
    return dict(inner.input_contract)


@torch.no_grad()
def clamp_prelu_(model: nn.Module, min_slope: float = 0.01) -> None:
    """Clamp every PReLU slope of `model` to >= `min_slope`, in place.

    The UniTSFace/UniFace/EPL recipe does this after every optimizer step (methods.md §9.1) so that
    weight decay and large steps cannot turn a PReLU into a sign-flipping or dead unit.
    """
    for module in model.modules():
        if isinstance(module, nn.PReLU):
            module.weight.clamp_(min=min_slope)


__all__ = ["INPUT_CONTRACT", "FaceBackbone", "LoadReport", "build", "clamp_prelu_", "family", "input_contract",
           "load_matching", "load_pretrained", "names", "parameters"]


def load_backbone(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """The trained backbone of a unitsface checkpoint in eval mode — the weight average when the run kept one
    (`train.ema`: what it validated) — and the checkpoint's `meta` (threshold and its operating point, input
    contract...)."""
    ckpt = load_checkpoint(path)
    meta = dict(ckpt["meta"])
    model = build(meta["backbone"], embedding_size=int(meta["embedding_size"]))
    try:
        model.load_state_dict(ckpt.get("model_ema") or ckpt["model"])
    except RuntimeError as exc:
        raise UnitsfaceError(f"{path}: weights do not fit backbone {meta['backbone']!r}: "
                             f"{str(exc).splitlines()[0]}") from None
    return model.to(device).eval(), meta
