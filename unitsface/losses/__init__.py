"""Loss math: `unitsface.losses.functional` holds every formula as a function of cosines."""

from unitsface.losses import functional

__all__ = ["functional"]
