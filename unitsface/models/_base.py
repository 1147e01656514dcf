"""What every backbone shares: the registry, the input contract and a common base class.

The input contract is recorded on each model (not only documented) because export, evaluation and
deployment must feed the network exactly what it was trained on; a silent mismatch (BGR vs RGB, raw
0-255 vs centred) costs accuracy without any error (formats.md §9.2).
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable

import torch.nn as nn

from unitsface.errors import UnitsfaceError
from unitsface.registry import Registry

# Pixels into every unitsface backbone: N x 3 x size x size RGB floats, (x - mean) / std with x in 0..255,
# i.e. (x/255 - 0.5)/0.5 as in insightface arcface_torch, UniTSFace, UniFace and EPL.
INPUT_CONTRACT: dict[str, Any] = {"size": 112, "color": "rgb", "mean": 127.5, "std": 127.5}

BACKBONES: Registry[nn.Module] = Registry("backbone")
# Registered name -> family; checkpoints refuse to load weights across families (methods.md §9.3).
FAMILIES: dict[str, str] = {}
# Registered name -> {keyword: default} a config may set (`model.<keyword>`); the fixed architecture
# arguments (layers, widths) are not among them.
PARAMETERS: dict[str, dict[str, Any]] = {}


class FaceBackbone(nn.Module):
    """Base of all backbones: maps N x 3 x S x S normalised RGB to N x d raw (un-normalised) embeddings.

    Subclasses set the class attribute `family`. `input_contract` is an instance attribute because
    a model built for a smaller input (tinyfacenet) records its own size.
    """

    family: str = ""

    def __init__(self, embedding_size: int, input_size: int = INPUT_CONTRACT["size"]) -> None:
        super().__init__()
        if not isinstance(embedding_size, int) or embedding_size < 1:
            raise UnitsfaceError(f"embedding_size must be a positive integer, got {embedding_size!r}")
        self.embedding_size = embedding_size
        self.input_contract: dict[str, Any] = {**INPUT_CONTRACT, "size": input_size}


def register(name: str, cls: type[FaceBackbone], defaults: dict[str, Any] | None = None, **fixed: Any) -> None:
    """Register `cls(**fixed, embedding_size=..., **kwargs)` under `name` and record its family.

    `fixed` arguments define the architecture (they change the weights' shapes); `defaults` override
    the constructor's defaults of tunable keywords for this name (e.g. gradient checkpointing on for
    the large ViTs) and can themselves be overridden at build time.
    """
    defaults = dict(defaults or {})
    factory: Callable[..., nn.Module] = functools.partial(cls, **fixed, **defaults)
    BACKBONES.register(name)(factory)
    FAMILIES[name] = cls.family
    signature = inspect.signature(cls)
    PARAMETERS[name] = {
        key: defaults.get(key, p.default) for key, p in signature.parameters.items()
        if key not in fixed and key != "embedding_size" and p.default is not inspect.Parameter.empty
    }

