"""insightface verification `.bin` files: (2N encoded images, N same/different flags).

A `.bin` is a pickle, and a pickle can run arbitrary code when loaded (formats.md §6.3);
these files circulate through cloud-drive links, so they are only ever read with a
restricted unpickler that resolves the handful of NumPy/codecs globals needed for the
data and refuses everything else before it can be called.
"""

from __future__ import annotations

import io
import os
import pickle
import pickletools
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable

import numpy as np

from unitsface.errors import UnitsfaceError, brief, one_line
from unitsface.io import atomic_write

_ALLOWED_DTYPES = ("u1", "b1")


class _Refused(Exception):
    """A pickle asked for something outside the allow-list."""


class _NdarrayClass:
    """Stands in for `numpy.ndarray` so the pickle gets a token, not a callable class."""


def _checked_dtype(spec: Any, *_flags: Any) -> np.dtype:
    name = spec.decode("ascii", "replace") if isinstance(spec, bytes) else spec
    if name not in _ALLOWED_DTYPES:
        raise _Refused(f"numpy.dtype({brief(name)}) (only uint8 and bool arrays are allowed)")
    return np.dtype(name)


def _require_dtype(dtype: Any) -> np.dtype:
    if not isinstance(dtype, np.dtype) or dtype.str[1:] not in _ALLOWED_DTYPES:
        raise _Refused(f"an array of dtype {brief(dtype)}")
    return dtype


def _reconstruct(cls: Any, shape: Any, typecode: Any) -> np.ndarray:
    """`numpy.core.multiarray._reconstruct`: an empty array that BUILD then fills."""
    if cls is not _NdarrayClass:
        raise _Refused(f"_reconstruct of {brief(cls)}")
    return np.ndarray.__new__(np.ndarray, (0,), np.uint8)


def _frombuffer(buffer: Any, dtype: Any, shape: Any, order: Any) -> np.ndarray:
    """`numpy.core.numeric._frombuffer` (protocol 5 arrays, in-band buffers only)."""
    if not isinstance(buffer, (bytes, bytearray)):  # bytes(2**40) would allocate a terabyte of zeros
        raise _Refused(f"_frombuffer of a {type(buffer).__name__}")
    return np.frombuffer(buffer, dtype=_require_dtype(dtype)).reshape(shape, order=order)


def _scalar(dtype: Any, data: Any = b"") -> np.generic:
    """`numpy.core.multiarray.scalar`: numpy.bool_ labels in `issame_list`."""
    dtype = _require_dtype(dtype)
    if not isinstance(data, bytes) or len(data) != dtype.itemsize:
        raise _Refused("a numpy scalar with malformed data")
    return np.frombuffer(data, dtype=dtype)[0]


def _latin1_encode(text: Any, encoding: Any = "utf-8") -> bytes:
    """`_codecs.encode`, as Python 3 uses it to pickle `bytes` at protocol <= 2."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise _Refused(f"_codecs.encode with encoding {brief(encoding)}")
    return text.encode("latin1")


_GLOBALS: dict[tuple[str, str], Callable[..., Any] | type] = {("_codecs", "encode"): _latin1_encode}
for _core in ("numpy.core", "numpy._core"):
    _GLOBALS[(f"{_core}.multiarray", "_reconstruct")] = _reconstruct
    _GLOBALS[(f"{_core}.multiarray", "scalar")] = _scalar
    _GLOBALS[(f"{_core}.numeric", "_frombuffer")] = _frombuffer
_GLOBALS[("numpy", "dtype")] = _checked_dtype
_GLOBALS[("numpy", "ndarray")] = _NdarrayClass


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return _GLOBALS[(module, name)]
        except KeyError:
            raise _Refused(f"{module}.{name}") from None

    def persistent_load(self, pid: Any) -> Any:
        raise _Refused("a persistent id")


_MEMO_OPS = frozenset({"PUT", "BINPUT", "LONG_BINPUT", "GET", "BINGET", "LONG_BINGET"})


def _check_opcodes(data: bytes) -> None:
    """One pass over the opcodes before anything is built; raises on damage.

    CPython's unpickler sizes its memo table by the largest index it has read and clears every new
    slot, so `LONG_BINPUT 2**30` alone writes gigabytes. A pickler numbers memo entries in order, so
    an index can never exceed the opcodes read so far; genops also checks every length field against
    the bytes that remain, without allocating what a length claims.
    """
    for count, (opcode, arg, _) in enumerate(pickletools.genops(io.BytesIO(data)), 1):
        if opcode.name in _MEMO_OPS and not 0 <= int(arg) < count:
            raise ValueError(f"{opcode.name} with memo index {arg} after {count} opcodes")


def _image_bytes(entry: Any, index: int, path: Path) -> bytes:
    if isinstance(entry, (bytes, bytearray)):
        return bytes(entry)
    if isinstance(entry, np.ndarray) and entry.dtype == np.uint8 and sum(d > 1 for d in entry.shape) <= 1:
        return entry.tobytes()
    kind = f"array {entry.dtype} {entry.shape}" if isinstance(entry, np.ndarray) else type(entry).__name__
    raise UnitsfaceError(f"{path}: image entry {index} is a {kind}, expected bytes or a 1-D uint8 array")


def _issame_array(issame: Any, path: Path) -> np.ndarray:
    if isinstance(issame, np.ndarray) and issame.dtype == np.bool_ and issame.ndim == 1:
        return issame.copy()
    if isinstance(issame, (list, tuple)):
        bad = next((i for i, v in enumerate(issame) if not isinstance(v, (bool, np.bool_))), None)
        if bad is None:
            return np.asarray(issame, dtype=bool)
        raise UnitsfaceError(f"{path}: issame entry {bad} is {brief(issame[bad])}, expected a boolean")
    raise UnitsfaceError(f"{path}: issame_list is a {type(issame).__name__}, expected a list of booleans")


def load_bin(path: str | os.PathLike) -> tuple[list[bytes], np.ndarray]:
    """(2N encoded images, N booleans) of an insightface `.bin`, from Python 2 or 3 pickles.

    `encoding='bytes'` turns Python-2 `str` image entries into the bytes a decoder needs
    (formats.md §6.2); the result is validated before it is returned.
    """
    path = Path(path)
    if not path.is_file():
        raise UnitsfaceError(f".bin file not found: {path}")
    data = path.read_bytes()
    if not data:
        raise UnitsfaceError(f"{path} is empty")
    try:
        _check_opcodes(data)
        obj = _RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
    except _Refused as exc:
        raise UnitsfaceError(f"refusing to unpickle {path}: the file references {exc}") from None
    except Exception as exc:  # arbitrary bytes can fail inside pickle in many ways
        raise UnitsfaceError(f"{path} is not a valid .bin pickle: {type(exc).__name__}: {one_line(exc)}") from None
    if not (isinstance(obj, (tuple, list)) and len(obj) == 2 and isinstance(obj[0], (list, tuple))):
        raise UnitsfaceError(f"{path}: expected a pickled (bins, issame_list) pair, got {type(obj).__name__}")
    images = [_image_bytes(entry, i, path) for i, entry in enumerate(obj[0])]
    issame = _issame_array(obj[1], path)
    _check_counts(len(images), len(issame), path)
    return images, issame


def _check_counts(n_images: int, n_pairs: int, path: Path) -> None:
    if n_pairs == 0:
        raise UnitsfaceError(f"{path}: no pairs")
    if n_images != 2 * n_pairs:
        raise UnitsfaceError(f"{path}: {n_images} images for {n_pairs} pairs; expected {2 * n_pairs}")


def save_bin(path: str | os.PathLike, images: Sequence[bytes], issame: Sequence[bool] | np.ndarray) -> None:
    """Write a `.bin` that insightface's `load_bin` reads unchanged (formats.md §6.3).

    Protocol 4 with `bytes` entries and Python bools needs no globals, so it also loads
    through any restricted unpickler.
    """
    path = Path(path)
    entries = [bytes(image) for image in images]
    labels = [bool(v) for v in np.asarray(issame, dtype=bool).ravel()]
    _check_counts(len(entries), len(labels), path)
    atomic_write(path, pickle.dumps((entries, labels), protocol=4))


def fold_counts(issame: np.ndarray, folds: int = 10) -> list[tuple[int, int]]:
    """(same, different) pair counts of each contiguous fold, as the 10-fold protocol splits them.

    A file whose pairs are not in balanced blocks (formats.md §6.1) shows up here.
    """
    return [(int(part.sum()), int(part.size - part.sum())) for part in np.array_split(np.asarray(issame), folds)]
