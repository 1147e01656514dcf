"""MXNet RecordIO (`.rec` + `.idx`) and the insightface dataset layout, without MXNet.

Byte layouts are specified in /docs/formats.md §1–4; this module follows them exactly:
frames with a magic word and a 3-bit continuation flag, records split wherever the
payload contains the magic at an aligned offset (so a resynchronising reader never
mistakes image bytes for a frame start), a 24-byte `IRHeader` in front of every image,
and insightface's meta records (record 0 and one range record per identity).

The reader memory-maps the `.rec`: random access costs one page fault per record instead
of a full read of a file that is often tens of gigabytes, and forked data-loader workers
share the mapping.
"""

from __future__ import annotations

import io
import mmap
import os
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Callable, NamedTuple, Union

import numpy as np

from unitsface.data.images import decode, encode_jpeg, image_size
from unitsface.errors import UnitsfaceError, brief
from unitsface.io import atomic_write, temp_file

MAGIC = 0xCED7230A
_OLD_MAGIC = 0x3ED7230A  # early dmlc-core (2-bit flag); named in errors, never read
MAGIC_BYTES = struct.pack("<I", MAGIC)
_LENGTH_MASK = (1 << 29) - 1
MAX_RECORD_BYTES = 1 << 29  # the writer refuses records of this size or more
FLOAT32_EXACT = 1 << 24  # largest integer range float32 labels/keys hold exactly (§4.5)

_FRAME = struct.Struct("<II")
_HEADER = struct.Struct("<IfQQ")
HEADER_BYTES = _HEADER.size  # 24

Label = Union[float, np.ndarray]


# --------------------------------------------------------------------------- files


def resolve_record_paths(path: str | os.PathLike) -> tuple[Path, Path]:
    """(idx, rec) for a dataset folder holding train.rec/train.idx, or for a `.rec` path."""
    path = Path(path)
    rec = path / "train.rec" if path.is_dir() else path
    if rec.suffix != ".rec":
        raise UnitsfaceError(f"expected a folder with train.rec/train.idx or a .rec file, got {path}")
    idx = rec.with_suffix(".idx")
    for required in (rec, idx):
        if not required.is_file():
            raise UnitsfaceError(f"record file not found: {required}")
    return idx, rec


# --------------------------------------------------------------------------- frames


def split_payload(payload: bytes) -> list[bytes]:
    """Cut `payload` at every 4-byte-aligned occurrence of the magic word, dropping it (§1.2)."""
    pieces, start = [], 0
    pos = payload.find(MAGIC_BYTES)
    while pos != -1:
        if pos % 4 == 0:
            pieces.append(payload[start:pos])
            start = pos + 4
            pos = payload.find(MAGIC_BYTES, start)
        else:
            pos = payload.find(MAGIC_BYTES, pos + 1)
    pieces.append(payload[start:])
    return pieces


def encode_record(payload: bytes) -> bytes:
    """The frames of one record as written by dmlc-core's RecordIOWriter."""
    if len(payload) >= MAX_RECORD_BYTES:
        raise UnitsfaceError(f"record of {len(payload)} bytes is too large for RecordIO (limit 2^29 - 1)")
    pieces = split_payload(bytes(payload))
    last = len(pieces) - 1
    out = bytearray()
    for i, piece in enumerate(pieces):
        cflag = 0 if last == 0 else 1 if i == 0 else 3 if i == last else 2
        out += _FRAME.pack(MAGIC, (cflag << 29) | len(piece))
        out += piece
    out += bytes(-len(pieces[-1]) % 4)
    return bytes(out)


def _frame(buf, size: int, pos: int, where: Callable[[], str]) -> tuple[int, int, int]:
    """Validate the frame header at `pos`; return (cflag, data start, data length)."""
    if pos + 8 > size:
        raise UnitsfaceError(f"{where()}: truncated file: frame header at offset {pos} is past the end ({size} bytes)")
    magic, lrecord = _FRAME.unpack_from(buf, pos)
    if magic != MAGIC:
        old = " (old dmlc-core magic 0x3ED7230A, not supported)" if magic == _OLD_MAGIC else ""
        raise UnitsfaceError(f"{where()}: bad magic 0x{magic:08X} at offset {pos}, expected 0xCED7230A{old}")
    cflag, length = lrecord >> 29, lrecord & _LENGTH_MASK
    if cflag > 3:
        raise UnitsfaceError(f"{where()}: invalid continuation flag {cflag} at offset {pos}")
    if pos + 8 + length > size:
        raise UnitsfaceError(f"{where()}: truncated file: frame at offset {pos} needs {length} bytes, file has {size}")
    return cflag, pos + 8, length


def _read_record(buf, size: int, offset: int, where: Callable[[], str]) -> tuple[bytes, int]:
    """The payload of the record starting at `offset` and the offset just past it."""
    parts: list[bytes] = []
    pos = offset
    while True:
        cflag, start, length = _frame(buf, size, pos, where)
        if bool(parts) != (cflag in (2, 3)):
            expected = "a continuation (flag 2/3)" if parts else "a record start (flag 0/1)"
            raise UnitsfaceError(f"{where()}: frame at offset {pos} has flag {cflag}, expected {expected}")
        parts.append(buf[start : start + length])
        pos = start + length + (-length % 4)
        if cflag in (0, 3):
            return (parts[0] if len(parts) == 1 else MAGIC_BYTES.join(parts)), pos


class _MappedFile:
    """A read-only memory map of a file (mmap cannot map empty files, hence the fallback)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with open(path, "rb") as handle:
            self.size = os.fstat(handle.fileno()).st_size
            self.buf = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) if self.size else b""

    def close(self) -> None:
        if isinstance(self.buf, mmap.mmap):
            self.buf.close()


def iter_records(rec_path: str | os.PathLike) -> Iterator[tuple[int, bytes]]:
    """(offset, payload) of every record of a `.rec`, in file order, without an `.idx`."""
    mapped = _MappedFile(Path(rec_path))
    try:
        pos = 0
        while pos < mapped.size:
            offset = pos
            payload, pos = _read_record(mapped.buf, mapped.size, offset, lambda: str(mapped.path))
            yield offset, payload
    finally:
        mapped.close()


def rebuild_index(rec_path: str | os.PathLike, idx_path: str | os.PathLike) -> int:
    """Write an `.idx` for an image `.rec` from a sequential scan; keys are the IRHeader ids.

    MXNet's image writers (im2rec, insightface's builder) set `id` to the record key, which
    is what makes a lost `.idx` recoverable. Returns the number of records.
    """
    lines, seen = [], set()
    for offset, payload in iter_records(rec_path):
        key = unpack(payload, source=f"{rec_path} offset {offset}")[0].id
        if key in seen:
            raise UnitsfaceError(f"{rec_path}: id {key} occurs twice (offset {offset}); cannot use ids as keys")
        seen.add(key)
        lines.append(f"{key}\t{offset}\n")
    atomic_write(idx_path, "".join(lines).encode())
    return len(lines)


# --------------------------------------------------------------------------- indexed file


class IndexedRecordIO:
    """Random access to a `.rec` through its `.idx` (mode "r"), or writing both (mode "w").

    Writing goes to temp files that replace `idx_path`/`rec_path` on `close()`; leaving the
    `with` block on an exception discards them.
    """

    def __init__(self, idx_path: str | os.PathLike, rec_path: str | os.PathLike, mode: str = "r") -> None:
        self.idx_path, self.rec_path, self.mode = Path(idx_path), Path(rec_path), mode
        self._offsets: dict[int, int] = {}
        self.keys: list[int] = []
        self._mapped: _MappedFile | None = None
        self._tmp: dict[Path, tuple[Path, IO]] = {}
        if mode == "r":
            self._open_reader()
        elif mode == "w":
            self._open_writer()
        else:
            raise UnitsfaceError(f"IndexedRecordIO mode must be 'r' or 'w', got {mode!r}")

    # ---- reading

    def _open_reader(self) -> None:
        for path in (self.idx_path, self.rec_path):
            if not path.is_file():
                raise UnitsfaceError(f"record file not found: {path}")
        size = self.rec_path.stat().st_size
        with open(self.idx_path, encoding="ascii", errors="replace") as handle:
            for line_no, line in enumerate(handle, 1):
                fields = line.split()
                if not fields:
                    continue
                try:
                    key, offset = int(fields[0]), int(fields[1])
                    if len(fields) != 2:
                        raise ValueError
                except (ValueError, IndexError):
                    raise UnitsfaceError(
                        f"{self.idx_path} line {line_no}: expected '<key>\\t<offset>', got {brief(line)}"
                    ) from None
                if key in self._offsets:
                    raise UnitsfaceError(f"{self.idx_path} line {line_no}: duplicate key {key}")
                if offset % 4 or offset < 0 or offset + 8 > size:
                    raise UnitsfaceError(
                        f"{self.idx_path} line {line_no}: key {key} has offset {offset}, which is "
                        f"{'not a multiple of 4' if offset % 4 else 'past the end'} of {self.rec_path} ({size} bytes)"
                    )
                self._offsets[key] = offset
                self.keys.append(key)
        self._mapped = _MappedFile(self.rec_path)

    def _locate(self, key: int) -> tuple[int, Callable[[], str]]:
        if self._mapped is None:
            raise UnitsfaceError(f"{self.rec_path} is not open for reading")
        try:
            offset = self._offsets[key]
        except KeyError:
            raise UnitsfaceError(f"key {key} is not in {self.idx_path}") from None
        return offset, lambda: f"{self.rec_path} key {key}"

    def read(self, key: int) -> bytes:
        """The payload of record `key` (split parts joined, magic words restored)."""
        offset, where = self._locate(key)
        return _read_record(self._mapped.buf, self._mapped.size, offset, where)[0]

    def read_head(self, key: int, n: int) -> tuple[bytes, int]:
        """(first `n` payload bytes, payload length) without copying the rest of the record.

        Scanning labels of millions of records only needs their headers; only the rare
        split record is read whole.
        """
        offset, where = self._locate(key)
        cflag, start, length = _frame(self._mapped.buf, self._mapped.size, offset, where)
        if cflag == 0:
            return self._mapped.buf[start : start + min(n, length)], length
        payload = self.read(key)
        return payload[:n], len(payload)

    def __contains__(self, key: int) -> bool:
        return key in self._offsets

    def __len__(self) -> int:
        return len(self.keys)

    # ---- writing

    def _open_writer(self) -> None:
        for path, mode in ((self.rec_path, "wb"), (self.idx_path, "w")):
            path.parent.mkdir(parents=True, exist_ok=True)
            self._tmp[path] = temp_file(path, mode)
        self._position = 0

    def write(self, key: int, data: bytes) -> None:
        """Append record `key`; its `.idx` line is written after its frames (§2)."""
        if self.mode != "w":
            raise UnitsfaceError(f"{self.rec_path} is open for reading, not writing")
        key = int(key)
        if key in self._offsets:
            raise UnitsfaceError(f"duplicate key {key} written to {self.rec_path}")
        frames = encode_record(data)
        self._tmp[self.rec_path][1].write(frames)
        self._tmp[self.idx_path][1].write(f"{key}\t{self._position}\n")
        self._offsets[key] = self._position
        self.keys.append(key)
        self._position += len(frames)

    def _abort(self) -> None:
        for tmp, handle in self._tmp.values():
            handle.close()
            tmp.unlink(missing_ok=True)
        self._tmp.clear()

    # ---- both

    def close(self) -> None:
        """Reader: unmap. Writer: flush and move the finished files into place (rec first)."""
        if self._mapped is not None:
            self._mapped.close()
            self._mapped = None
        for path, (tmp, handle) in list(self._tmp.items()):
            handle.close()
            os.replace(tmp, path)
            del self._tmp[path]

    def __enter__(self) -> IndexedRecordIO:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self._abort()
        self.close()


# --------------------------------------------------------------------------- IRHeader


class IRHeader(NamedTuple):
    """MXNet's image-record header; `label` is a float, or a float32 array when flag > 0."""

    flag: int
    label: Label
    id: int
    id2: int


def pack(header: IRHeader, data: bytes) -> bytes:
    """Header + data as MXNet's `recordio.pack`: the label's shape decides `flag` (§3)."""
    if np.ndim(header.label) == 0:
        flag, scalar, extra = 0, float(header.label), b""
    else:
        labels = np.asarray(header.label, dtype="<f4").ravel()
        if labels.size == 0:
            raise UnitsfaceError("an IRHeader label array must not be empty")
        flag, scalar, extra = labels.size, 0.0, labels.tobytes()
    return _HEADER.pack(flag, scalar, int(header.id), int(header.id2)) + extra + bytes(data)


def unpack(payload: bytes, source: str = "record") -> tuple[IRHeader, bytes]:
    """(IRHeader, data) of a record payload; `source` names it in error messages."""
    if len(payload) < HEADER_BYTES:
        raise UnitsfaceError(f"{source}: payload of {len(payload)} bytes is shorter than the 24-byte IRHeader")
    flag, label, id_, id2 = _HEADER.unpack_from(payload)
    start = HEADER_BYTES
    if flag > 0:
        start += 4 * flag
        if start > len(payload):
            raise UnitsfaceError(f"{source}: IRHeader declares {flag} labels but the payload has {len(payload)} bytes")
        label = np.frombuffer(payload, dtype="<f4", count=flag, offset=HEADER_BYTES).copy()
    return IRHeader(flag, label, id_, id2), payload[start:]


def pack_image(header: IRHeader, img: np.ndarray, quality: int = 95) -> bytes:
    return pack(header, encode_jpeg(img, quality))


def unpack_image(payload: bytes, source: str = "record") -> tuple[IRHeader, np.ndarray]:
    header, data = unpack(payload, source)
    return header, decode(data, source)


# --------------------------------------------------------------------------- insightface layout


@dataclass(frozen=True)
class RecordIndex:
    """Which records of a dataset are images, and their integer labels."""

    keys: np.ndarray  # int64 image keys, in .idx order
    labels: np.ndarray  # int64 class per image key
    num_classes: int
    has_meta: bool  # record 0 is an insightface meta header
    skipped: int  # records with no image data (identity-range records met by the scan)
    image_shape: tuple[int, int] | None  # (height, width) from the `property` file
    unreadable: np.ndarray  # int64 keys whose frame, IRHeader or label could not be read (not in `keys`)


def _meta_limit(reader: IndexedRecordIO) -> int | None:
    """label[0] of record 0 if it passes every check of formats.md §4.3, else None."""
    if 0 not in reader:
        return None
    try:
        head, length = reader.read_head(0, HEADER_BYTES + 8)
    except UnitsfaceError:
        return None  # an unreadable record 0: scanned (and set aside) like any other record
    if length != HEADER_BYTES + 8 or len(head) < HEADER_BYTES:
        return None
    header, _ = unpack(head)
    if header.flag != 2:
        return None
    first, last = (float(v) for v in header.label)
    if not (first.is_integer() and last.is_integer() and 1 <= first <= last):
        return None
    first = int(first)
    if first - 1 > max(reader.keys) or (first - 1) not in reader:
        return None
    return first


def _read_property(folder: Path) -> tuple[int, tuple[int, int]] | None:
    path = folder / "property"
    if not path.is_file():
        return None
    try:
        classes, height, width = (int(v) for v in path.read_bytes().decode("ascii", "replace").strip().split(","))
    except ValueError:
        raise UnitsfaceError(f"{path}: expected '<num_classes>,<height>,<width>'") from None
    # Class numbers are float32 labels (exact below 2^24); a damaged count must not size a classifier.
    if not (0 < classes <= FLOAT32_EXACT and 0 < height < 1 << 16 and 0 < width < 1 << 16):
        raise UnitsfaceError(f"{path}: {classes},{height},{width} is not a class count in [1, 2^24] and an image "
                             "size in [1, 65535]")
    return classes, (height, width)


def image_label(reader: IndexedRecordIO, key: int) -> int | None:
    """The class of image record `key` from its IRHeader alone; None for a record without image data.

    Labels are float32 in the file: only integers in [0, 2^24) name a class exactly (§4.5), so
    anything else (a flipped exponent bit, NaN) is a damaged record, not a class to allocate.
    """
    head, length = reader.read_head(key, HEADER_BYTES + 4)
    if len(head) < HEADER_BYTES:
        raise UnitsfaceError(f"{reader.rec_path} key {key}: payload of {length} bytes is shorter than the IRHeader")
    flag, label = _HEADER.unpack_from(head)[:2]
    if length <= HEADER_BYTES + 4 * flag:
        return None  # no image data: an identity-range record, or a header past the payload
    if flag > 0:
        label = struct.unpack_from("<f", head, HEADER_BYTES)[0]
    if not (label.is_integer() and 0 <= label < FLOAT32_EXACT):
        raise UnitsfaceError(f"{reader.rec_path} key {key}: label {label} is not a class (an integer in [0, 2^24))")
    return int(label)


def _scan(idx: Path, rec: Path) -> RecordIndex:
    with IndexedRecordIO(idx, rec) as reader:
        limit = _meta_limit(reader)
        if limit is None:
            candidates = list(reader.keys)
        else:
            # Beyond 2^24 the float32 limit may be rounded (§4.5): scan every key and let
            # the empty-payload rule below drop the identity-range records instead.
            exact = limit <= FLOAT32_EXACT
            candidates = [k for k in reader.keys if k != 0 and (k < limit or not exact)]
            if exact and len(candidates) != limit - 1:
                missing = next(k for k in range(1, limit) if k not in reader)
                raise UnitsfaceError(
                    f"{idx}: record 0 says images are keys 1..{limit - 1} but key {missing} is missing"
                )
        keys, labels, unreadable = [], [], []
        for key in candidates:
            try:
                label = image_label(reader, key)
            except UnitsfaceError:
                unreadable.append(key)  # a damaged record must not make the other millions unusable
                continue
            if label is not None:
                keys.append(key)
                labels.append(label)
    if not keys:
        broken = f" ({len(unreadable)} unreadable records, e.g. key {unreadable[0]})" if unreadable else ""
        raise UnitsfaceError(f"{rec} holds no image records{broken}")
    label_array = np.asarray(labels, dtype=np.int64)
    num_classes = int(label_array.max()) + 1
    prop = _read_property(rec.parent)
    if prop is not None:
        if prop[0] < num_classes:
            raise UnitsfaceError(
                f"{rec.parent / 'property'} says {prop[0]} classes but labels go up to {num_classes - 1}"
            )
        num_classes = prop[0]
    return RecordIndex(
        keys=np.asarray(keys, dtype=np.int64),
        labels=label_array,
        num_classes=num_classes,
        has_meta=limit is not None,
        skipped=len(candidates) - len(keys) - len(unreadable),
        image_shape=prop[1] if prop else None,
        unreadable=np.asarray(unreadable, dtype=np.int64),
    )


def _stamp(*paths: Path) -> np.ndarray:
    stats = [os.stat(p) for p in paths if p.exists()]
    return np.asarray([v for s in stats for v in (s.st_size, s.st_mtime_ns)], dtype=np.int64)


_CACHED = ("keys", "labels", "num_classes", "has_meta", "skipped", "unreadable")


def _cached_scan(path: Path, stamp: np.ndarray) -> RecordIndex | None:
    """The scan stored at `path` if it is readable and stamped `stamp`; anything else is a cache miss."""
    try:
        with np.load(path, allow_pickle=False) as saved:
            if not (set(_CACHED) <= set(saved.files) and np.array_equal(saved["stamp"], stamp)):
                return None
            shape = tuple(int(v) for v in saved["image_shape"])
            return RecordIndex(
                keys=saved["keys"],
                labels=saved["labels"],
                num_classes=int(saved["num_classes"]),
                has_meta=bool(saved["has_meta"]),
                skipped=int(saved["skipped"]),
                image_shape=shape if len(shape) == 2 else None,  # type: ignore[arg-type]
                unreadable=saved["unreadable"],
            )
    except Exception:  # a damaged cache file (any of numpy's or zipfile's errors) is only a miss
        return None


def scan_dataset(folder: str | os.PathLike, cache: bool = True) -> RecordIndex:
    """Image keys and labels of a train.rec/train.idx, reading record headers only.

    With `cache`, the result is stored next to the `.idx` as `<name>.scan.npz`, stamped
    with the sizes and mtimes of the rec/idx/property files, and reused while they match.
    An unwritable dataset folder just goes without a cache.
    """
    idx, rec = resolve_record_paths(folder)
    cache_path = idx.with_suffix(".scan.npz")
    stamp = _stamp(idx, rec, rec.parent / "property")
    if cache and cache_path.is_file():
        index = _cached_scan(cache_path, stamp)
        if index is not None:
            return index
    index = _scan(idx, rec)
    if cache:
        buffer = io.BytesIO()
        fields = {k: getattr(index, k) for k in _CACHED}
        np.savez(buffer, stamp=stamp, image_shape=np.asarray(index.image_shape or (), np.int64), **fields)
        try:
            atomic_write(cache_path, buffer.getvalue())
        except OSError:
            pass
    return index


def write_face_dataset(out_dir: str | os.PathLike, items: Iterable[tuple[int, bytes]], name: str = "train") -> dict:
    """Write `<name>.rec`/`<name>.idx` + `property` in insightface's layout (formats.md §4.1).

    `items` are (class label, encoded image) with labels in non-decreasing order (the
    builder's requirement: each identity's images are one key range). Labels that are
    skipped get an empty range, so the identity record for class c is always key a + c.
    Returns counts and paths.
    """
    out = Path(out_dir)
    rec, idx = out / f"{name}.rec", out / f"{name}.idx"
    ranges: list[tuple[int, int]] = []
    shape = None
    key = 1
    with IndexedRecordIO(idx, rec, "w") as writer:
        for label, data in items:
            label = int(label)
            if label < max(0, len(ranges) - 1):
                raise UnitsfaceError(
                    f"image {key}: label {label} after label {len(ranges) - 1}; labels must be >= 0 and "
                    "come grouped in non-decreasing order"
                )
            if shape is None:
                shape = image_size(data, f"image 1 (label {label})")
            while len(ranges) <= label:
                ranges.append((key, key))
            ranges[label] = (ranges[label][0], key + 1)
            writer.write(key, pack(IRHeader(0, float(label), key, 0), data))
            key += 1
        if shape is None:
            raise UnitsfaceError(f"no images to write to {rec}")
        first, end = key, key + len(ranges)
        if end > FLOAT32_EXACT:
            raise UnitsfaceError(
                f"{end} records exceed 2^24, which float32 meta labels cannot address exactly; "
                "write an im2rec-style rec without meta records instead"
            )
        for label, bounds in enumerate(ranges):
            writer.write(first + label, pack(IRHeader(2, np.asarray(bounds), first + label, 0), b""))
        writer.write(0, pack(IRHeader(2, np.asarray([first, end]), 0, 1), b""))
    atomic_write(out / "property", f"{len(ranges)},{shape[0]},{shape[1]}\n".encode())
    return {"images": key - 1, "identities": len(ranges), "records": end, "rec": str(rec), "idx": str(idx)}
