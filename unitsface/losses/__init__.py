"""Loss math: `functional` holds each head's formulas (target transforms) and their dense references on
cosine matrices; `columns` is the engine every head trains with, streaming the columns of a class shard in
chunks (memory ∝ the shard)."""

from unitsface.losses import columns, functional

__all__ = ["columns", "functional"]
