"""Loss math: `functional` holds every formula as a function of cosine matrices; `rows` streams the
CosFace and threshold-BCE losses over a shard's class rows in column chunks (memory ∝ the shard)."""

from unitsface.losses import functional, rows

__all__ = ["functional", "rows"]
