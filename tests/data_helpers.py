"""Damaging a train.rec in place, the way a bad disk or an interrupted copy would."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path


def damage(folder: Path, keys: Iterable[int], where: str) -> None:
    """Zero 16 bytes of records `keys` of `folder/train.rec`: the start of the JPEG ("image": the record
    still reads, the image does not decode) or the frame magic ("frame": not even the label reads)."""
    rec = folder / "train.rec"
    data = bytearray(rec.read_bytes())
    offsets = dict(line.split() for line in (folder / "train.idx").read_text().splitlines())
    for key in keys:
        at = int(offsets[str(key)]) + (8 + 24 if where == "image" else 0)  # frame header + IRHeader
        data[at : at + 16] = bytes(16)
    rec.write_bytes(bytes(data))
