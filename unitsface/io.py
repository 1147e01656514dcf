"""Atomic file writes: the one place that implements "temp file beside it, then rename".

Readers never see a half-written file, and an interrupted run leaves the previous file
intact. Every writer in unitsface (checkpoints, records, .bin sets, reports, exports,
features) goes through these functions.
"""

from __future__ import annotations

import glob
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO


def temp_file(path: str | os.PathLike, mode: str = "wb") -> tuple[Path, IO]:
    """An open temp file beside `path`, with the permissions a plain `open` would give it.

    mkstemp creates files readable by the owner only; datasets and models are shared.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)
    return Path(tmp), os.fdopen(fd, mode)


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """`with atomic_open(p) as f: ...` writes `p` all at once, or not at all if the block raises."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp, handle = temp_file(path, mode)
    try:
        with handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: str | os.PathLike, data: bytes | str) -> None:
    """Write `data` (bytes or text) to `path` atomically."""
    with atomic_open(path, "wb" if isinstance(data, bytes) else "w") as handle:
        handle.write(data)


def remove_stale_temp_files(target: str | os.PathLike) -> int:
    """Delete the temp files `temp_file` made for `target` (a file, or every file directly in a folder) that
    are still there: left by a process killed mid-write. Returns how many. Only where nothing else writes
    at the time: a checkpoint (one writer), the output folder of a run as it starts.
    """
    target = Path(target)
    folder, name = (target, "*") if target.is_dir() else (target.parent, glob.escape(target.name))
    stale = list(folder.glob(f".{name}.*.tmp"))
    for tmp in stale:
        tmp.unlink(missing_ok=True)
    return len(stale)
