"""Heads: `unitsface.heads.build(name, num_classes, embedding_size, **params)`.

Each head module registers its names on import; `names()` lists them.
"""

from __future__ import annotations

import importlib

from unitsface.heads.base import HEADS, ClassifierHead, Head, build, check_parameters, head_parameters

# Modules that register heads. A module added here is imported once, on package import.
_HEAD_MODULES = (
    "margin", "uniface", "unitsface", "epl", "unpg", "magface", "adaface", "curricularface", "vpl",
)

for _name in _HEAD_MODULES:
    try:
        importlib.import_module(f"unitsface.heads.{_name}")
    except ModuleNotFoundError as _exc:  # a head module not yet part of this build
        if _exc.name != f"unitsface.heads.{_name}":
            raise


def names() -> list[str]:
    return HEADS.names()


__all__ = ["HEADS", "ClassifierHead", "Head", "build", "check_parameters", "head_parameters", "names"]
