"""Heads: `unitsface.heads.build(name, num_classes, embedding_size, **params)`.

Each head module registers its names when imported below; `names()` lists them. The imports are
plain: a head module that fails to import fails the package, rather than silently leaving the
registry without its heads.
"""

from __future__ import annotations

from unitsface.heads import (  # noqa: F401  (imported to register their heads)
    adaface,
    anchor,
    curricularface,
    epl,
    magface,
    margin,
    uniface,
    unitsface,
    unpg,
    vpl,
)
from unitsface.heads.base import HEADS, Head, build, check_parameters, head_parameters


def names() -> list[str]:
    return HEADS.names()


__all__ = ["HEADS", "Head", "build", "check_parameters", "head_parameters", "names"]
