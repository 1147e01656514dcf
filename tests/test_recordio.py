"""RecordIO frames, IRHeader, the insightface layout and corrupt-file errors (formats.md §1–4)."""

from __future__ import annotations

import os
import random
import struct
from pathlib import Path

import numpy as np
import pytest

from unitsface.data import recordio
from unitsface.data.images import encode_jpeg
from unitsface.data.recordio import (
    MAGIC_BYTES,
    IndexedRecordIO,
    IRHeader,
    iter_records,
    pack,
    pack_image,
    rebuild_index,
    scan_dataset,
    unpack,
    unpack_image,
    write_face_dataset,
)
from unitsface.errors import UnitsfaceError

M = MAGIC_BYTES


def _frames(rec: bytes) -> list[tuple[int, int, int]]:
    """(offset, cflag, length) of every frame, parsed independently of the module."""
    out, pos = [], 0
    while pos < len(rec):
        magic, lrecord = struct.unpack_from("<II", rec, pos)
        assert magic == 0xCED7230A
        length = lrecord & ((1 << 29) - 1)
        out.append((pos, lrecord >> 29, length))
        pos += 8 + length + (-length % 4)
    assert pos == len(rec)
    return out


def _write(tmp_path: Path, records: dict[int, bytes]) -> tuple[Path, Path]:
    idx, rec = tmp_path / "t.idx", tmp_path / "t.rec"
    with IndexedRecordIO(idx, rec, "w") as writer:
        for key, data in records.items():
            writer.write(key, data)
    return idx, rec


def test_frames_match_the_documented_bytes():
    split = recordio.encode_record(b"ABCD" + M + b"EF")
    assert split.hex(" ") == "0a 23 d7 ce 04 00 00 20 41 42 43 44 0a 23 d7 ce 02 00 00 60 45 46 00 00"
    assert recordio.encode_record(b"hello") == bytes.fromhex("0A23D7CE05000000") + b"hello\0\0\0"
    header = pack(IRHeader(0, 7.0, 42, 0), b"")
    assert header == bytes.fromhex("000000000000E0402A000000000000000000000000000000")


PAYLOADS = {
    1: b"",
    2: b"a",
    3: b"ab",
    4: b"abc",
    5: b"abcd",
    6: M,  # one aligned magic and nothing else: two empty pieces
    7: M + b"xyz",
    8: b"1234" + M,
    9: b"1234" + M + M + b"56789" + M + b"0",
    10: b"12" + M + b"34",  # unaligned magic: stays in one frame
    11: b"1" + M + M + b"2",  # unaligned twice
    12: M[:3],
}


def test_round_trip_including_split_records_and_padding(tmp_path):
    rng = random.Random(0)
    records = dict(PAYLOADS)
    for key in range(20, 60):
        records[key] = bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 40))) + M * rng.randrange(2)
    idx, rec = _write(tmp_path, records)
    with IndexedRecordIO(idx, rec) as reader:
        assert reader.keys == list(records)
        for key, payload in records.items():
            assert reader.read(key) == payload
    raw = rec.read_bytes()
    frames = _frames(raw)
    # The invariant splitting exists for: an aligned magic word in the file is always a frame start.
    aligned_magic = [i for i in range(0, len(raw), 4) if raw[i : i + 4] == M]
    assert aligned_magic == [offset for offset, _, _ in frames]
    by_offset = {offset: (cflag, length) for offset, cflag, length in frames}
    offsets = dict(line.split("\t") for line in idx.read_text().splitlines())
    start = [offset for offset, _, _ in frames].index(int(offsets["9"]))
    # "1234" | M | "" | M | "56789" M "0": the third magic is unaligned (offset 17) and stays
    assert [(c, n) for _, c, n in frames[start : start + 3]] == [(1, 4), (2, 0), (3, 10)]
    assert by_offset[int(offsets["10"])] == (0, 8)
    assert by_offset[int(offsets["6"])] == (1, 0)


def test_hand_built_split_record_is_reassembled(tmp_path):
    rec, idx = tmp_path / "h.rec", tmp_path / "h.idx"
    rec.write_bytes(
        bytes.fromhex("0A23D7CE04000020")
        + b"ABCD"
        + bytes.fromhex("0A23D7CE02000060")
        + b"EF\0\0"
        + bytes.fromhex("0A23D7CE05000000")
        + b"hello\0\0\0"
    )
    idx.write_text("7\t0\n3\t24  \n")  # trailing blanks and order of the file, not of keys
    with IndexedRecordIO(idx, rec) as reader:
        assert reader.keys == [7, 3]
        assert reader.read(7) == b"ABCD" + M + b"EF"
        assert reader.read(3) == b"hello"
        assert reader.read_head(7, 6) == (b"ABCD" + M[:2], 10)
    assert [(off, len(p)) for off, p in iter_records(rec)] == [(0, 10), (24, 5)]


def test_irheader_scalar_and_array_labels():
    header, data = unpack(pack(IRHeader(0, 3.0, 5, 1), b"jpeg"))
    assert header == IRHeader(0, 3.0, 5, 1) and data == b"jpeg"
    header, data = unpack(pack(IRHeader(99, [4.0, 0.5, 2.0], 6, 0), b"\x01\x02"))
    assert header.flag == 3 and header.label.dtype == np.float32
    np.testing.assert_array_equal(header.label, [4.0, 0.5, 2.0])
    assert data == b"\x01\x02"
    raw = pack(IRHeader(0, 0.0, 0, 0), b"")
    assert len(raw) == 24
    with pytest.raises(UnitsfaceError, match="declares 2 labels"):
        unpack(struct.pack("<IfQQ", 2, 0.0, 0, 0) + b"\0\0\0\0")
    with pytest.raises(UnitsfaceError, match="shorter than the 24-byte"):
        unpack(b"\0" * 10)


def test_pack_image_round_trip():
    img = np.zeros((112, 112, 3), np.uint8)
    img[:, :56] = (200, 30, 40)
    header, decoded = unpack_image(pack_image(IRHeader(0, 1.0, 1, 0), img, quality=95))
    assert header.label == 1.0 and decoded.shape == (112, 112, 3)
    assert np.abs(decoded.astype(int) - img).mean() < 3


def test_insightface_layout_matches_the_documented_example(tmp_path):
    images = [b"\xff\xd8" + bytes([i]) * 7 for i in range(5)]
    # the size of the first image goes into `property`; use a real JPEG for it
    first = encode_jpeg(np.full((112, 96, 3), 128, np.uint8))
    items = list(zip([0, 0, 1, 2, 2], [first, *images[1:]]))
    report = write_face_dataset(tmp_path, items)
    assert report["images"] == 5 and report["identities"] == 3 and report["records"] == 9
    assert (tmp_path / "property").read_text().strip() == "3,112,96"
    with IndexedRecordIO(tmp_path / "train.idx", tmp_path / "train.rec") as reader:
        assert reader.keys == [1, 2, 3, 4, 5, 6, 7, 8, 0]  # images, identity ranges, then record 0
        meta, rest = unpack(reader.read(0))
        assert (meta.flag, list(meta.label), meta.id, meta.id2, rest) == (2, [6, 9], 0, 1, b"")
        ranges = [list(unpack(reader.read(k))[0].label) for k in (6, 7, 8)]
        assert ranges == [[1, 3], [3, 4], [4, 6]]
        for key, (label, data) in enumerate(items, 1):
            header, payload = unpack(reader.read(key))
            assert (header.flag, header.label, header.id, payload) == (0, float(label), key, data)
    index = scan_dataset(tmp_path, cache=False)
    assert index.has_meta and index.num_classes == 3 and index.image_shape == (112, 96)
    assert index.keys.tolist() == [1, 2, 3, 4, 5] and index.labels.tolist() == [0, 0, 1, 2, 2]


def test_label_gap_gets_an_empty_identity_range(tmp_path):
    jpeg = encode_jpeg(np.zeros((8, 8, 3), np.uint8))
    write_face_dataset(tmp_path, [(0, jpeg), (2, jpeg)])
    with IndexedRecordIO(tmp_path / "train.idx", tmp_path / "train.rec") as reader:
        assert list(unpack(reader.read(0))[0].label) == [3, 6]
        assert [list(unpack(reader.read(k))[0].label) for k in (3, 4, 5)] == [[1, 2], [2, 2], [2, 3]]
    assert scan_dataset(tmp_path, cache=False).num_classes == 3


def test_writer_refuses_unsorted_labels_and_leaves_nothing(tmp_path):
    jpeg = encode_jpeg(np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(UnitsfaceError, match="non-decreasing"):
        write_face_dataset(tmp_path, [(1, jpeg), (0, jpeg)])
    assert os.listdir(tmp_path) == []


def test_im2rec_rec_without_meta_record(tmp_path):
    jpeg = encode_jpeg(np.zeros((8, 8, 3), np.uint8))
    order = [3, 0, 4, 1, 2]  # shuffled list order; key 0 is an ordinary image
    labels = {0: 0, 1: 0, 2: 1, 3: 2, 4: 2}
    _write(tmp_path, {k: pack(IRHeader(0, float(labels[k]), k, 0), jpeg) for k in order})
    (tmp_path / "t.rec").rename(tmp_path / "train.rec")
    (tmp_path / "t.idx").rename(tmp_path / "train.idx")
    index = scan_dataset(tmp_path, cache=False)
    assert not index.has_meta and index.keys.tolist() == order
    assert index.labels.tolist() == [labels[k] for k in order] and index.num_classes == 3


def test_label_array_records_take_the_first_element_and_are_not_meta(tmp_path):
    # im2rec --pack-label: record 0 is an image with flag 2; it must not be read as a meta header
    jpeg = encode_jpeg(np.zeros((8, 8, 3), np.uint8))
    records = {k: pack(IRHeader(2, [float(k % 2), 9.0], k, 0), jpeg) for k in range(4)}
    records[4] = pack(IRHeader(0, 0.0, 4, 0), b"")  # no image data: skipped, counted
    _write(tmp_path, records)
    for name in ("rec", "idx"):
        (tmp_path / f"t.{name}").rename(tmp_path / f"train.{name}")
    index = scan_dataset(tmp_path, cache=False)
    assert not index.has_meta and index.skipped == 1
    assert index.keys.tolist() == [0, 1, 2, 3] and index.labels.tolist() == [0, 1, 0, 1]


def test_scan_reads_records_whose_header_is_split(tmp_path):
    jpeg = encode_jpeg(np.zeros((8, 8, 3), np.uint8))
    magic_id = struct.unpack("<Q", M + b"\0\0\0\0")[0]  # id field at offset 8 holds the magic
    payload = pack(IRHeader(0, 1.0, magic_id, 0), jpeg)
    _write(tmp_path, {0: payload})
    for name in ("rec", "idx"):
        (tmp_path / f"t.{name}").rename(tmp_path / f"train.{name}")
    assert _frames((tmp_path / "train.rec").read_bytes())[0][1] == 1  # really split
    index = scan_dataset(tmp_path, cache=False)
    assert index.labels.tolist() == [1]


def test_scan_cache_is_used_and_invalidated(tmp_path, monkeypatch):
    jpeg = encode_jpeg(np.zeros((8, 8, 3), np.uint8))
    write_face_dataset(tmp_path, [(0, jpeg), (1, jpeg)])
    first = scan_dataset(tmp_path)
    assert (tmp_path / "train.scan.npz").is_file()
    real_scan = recordio._scan
    monkeypatch.setattr(recordio, "_scan", lambda *a: pytest.fail("cache not used"))
    cached = scan_dataset(tmp_path)
    assert cached.keys.tolist() == first.keys.tolist() and cached.image_shape == (8, 8)
    monkeypatch.setattr(recordio, "_scan", real_scan)
    write_face_dataset(tmp_path, [(0, jpeg), (0, jpeg), (1, jpeg)])
    assert scan_dataset(tmp_path).labels.tolist() == [0, 0, 1]


def test_rebuild_index_from_sequential_scan(tmp_path):
    jpeg = encode_jpeg(np.zeros((8, 8, 3), np.uint8))
    write_face_dataset(tmp_path, [(0, jpeg), (0, M * 3), (1, jpeg)])
    original = (tmp_path / "train.idx").read_text()
    assert rebuild_index(tmp_path / "train.rec", tmp_path / "rebuilt.idx") == 6
    assert (tmp_path / "rebuilt.idx").read_text() == original


def test_writer_discards_temp_files_on_error(tmp_path):
    with pytest.raises(RuntimeError):
        with IndexedRecordIO(tmp_path / "a.idx", tmp_path / "a.rec", "w") as writer:
            writer.write(1, b"x")
            raise RuntimeError("interrupted")
    assert os.listdir(tmp_path) == []
    with pytest.raises(UnitsfaceError, match="duplicate key 1"):
        with IndexedRecordIO(tmp_path / "a.idx", tmp_path / "a.rec", "w") as writer:
            writer.write(1, b"x")
            writer.write(1, b"y")


# --------------------------------------------------------------------------- corrupt inputs


@pytest.fixture
def small_rec(tmp_path):
    idx, rec = _write(tmp_path, {1: b"A" * 10, 2: b"B" * 40, 3: b"C" * 6})
    return idx, rec


def test_truncated_file_names_file_key_and_offset(small_rec):
    idx, rec = small_rec
    data = rec.read_bytes()
    assert len(data) == 84  # frames of 20, 48 and 16 bytes
    rec.write_bytes(data[:-4])  # key 3 (offset 68, 6 bytes of data) loses its tail
    with IndexedRecordIO(idx, rec) as reader:
        assert reader.read(1) == b"A" * 10
        with pytest.raises(UnitsfaceError, match=r"t\.rec key 3: truncated file: frame at offset 68 needs 6"):
            reader.read(3)


def test_idx_offset_past_end_or_unaligned(small_rec):
    idx, rec = small_rec
    idx.write_text("1\t0\n2\t4000\n")
    with pytest.raises(UnitsfaceError, match=r"t\.idx line 2: key 2 has offset 4000, which is past the end"):
        IndexedRecordIO(idx, rec)
    idx.write_text("1\t0\n2\t6\n")
    with pytest.raises(UnitsfaceError, match="key 2 has offset 6, which is not a multiple of 4"):
        IndexedRecordIO(idx, rec)


def test_bad_magic_old_magic_and_bad_flags(small_rec):
    idx, rec = small_rec
    data = bytearray(rec.read_bytes())
    data[20:24] = struct.pack("<I", 0x3ED7230A)  # key 2 starts at 20 (key 1: 8 + 10 + 2 padding)
    data[0:4] = b"JUNK"
    rec.write_bytes(bytes(data))
    with IndexedRecordIO(idx, rec) as reader:
        with pytest.raises(UnitsfaceError, match=r"key 1: bad magic 0x4B4E554A at offset 0"):
            reader.read(1)
        with pytest.raises(UnitsfaceError, match="old dmlc-core magic"):
            reader.read(2)
    data[0:8] = struct.pack("<II", 0xCED7230A, (3 << 29) | 10)  # a last part where a record starts
    data[20:24] = M
    data[24:28] = struct.pack("<I", (5 << 29) | 40)
    rec.write_bytes(bytes(data))
    with IndexedRecordIO(idx, rec) as reader:
        with pytest.raises(UnitsfaceError, match="has flag 3, expected a record start"):
            reader.read(1)
        with pytest.raises(UnitsfaceError, match="invalid continuation flag 5"):
            reader.read(2)
        with pytest.raises(UnitsfaceError, match="key 8 is not in"):
            reader.read(8)


def test_malformed_idx_lines(small_rec):
    idx, rec = small_rec
    idx.write_text("1\t0\n1\t24\n")
    with pytest.raises(UnitsfaceError, match="line 2: duplicate key 1"):
        IndexedRecordIO(idx, rec)
    idx.write_text("1\t0\nfoo bar\n")
    with pytest.raises(UnitsfaceError, match="line 2: expected"):
        IndexedRecordIO(idx, rec)


def test_meta_header_pointing_at_missing_keys(tmp_path):
    jpeg = encode_jpeg(np.zeros((8, 8, 3), np.uint8))
    records = {0: pack(IRHeader(2, [4, 4], 0, 1), b"")}
    records.update({k: pack(IRHeader(0, 0.0, k, 0), jpeg) for k in (1, 3)})  # key 2 is missing
    _write(tmp_path, records)
    for name in ("rec", "idx"):
        (tmp_path / f"t.{name}").rename(tmp_path / f"train.{name}")
    with pytest.raises(UnitsfaceError, match="images are keys 1..3 but key 2 is missing"):
        scan_dataset(tmp_path, cache=False)


# ------------------------------------------------ found by bench/fuzz_readers.py (each raised something else)


def test_scan_sets_damaged_records_aside_and_rejects_absurd_labels(tmp_path):
    """Was: a bad frame anywhere made the whole set unusable; a label of 1e30 raised OverflowError."""
    jpeg = encode_jpeg(np.zeros((8, 8, 3), np.uint8))
    records = {k: pack(IRHeader(0, float(k % 2), k, 0), jpeg) for k in range(4)}
    records[1] = pack(IRHeader(0, 1e30, 1, 0), jpeg)
    records[2] = pack(IRHeader(1, [float("nan")], 2, 0), jpeg)
    idx, rec = _write(tmp_path, records)
    for path in (idx, rec):
        path.rename(tmp_path / f"train{path.suffix}")
    data = bytearray((tmp_path / "train.rec").read_bytes())
    last = len(data) - (8 + len(records[3]) + (-len(records[3]) % 4))  # key 3: the last frame
    data[last : last + 4] = b"JUNK"
    (tmp_path / "train.rec").write_bytes(bytes(data))
    index = scan_dataset(tmp_path, cache=False)
    assert index.keys.tolist() == [0] and index.unreadable.tolist() == [1, 2, 3]
    with IndexedRecordIO(tmp_path / "train.idx", tmp_path / "train.rec") as reader:
        with pytest.raises(UnitsfaceError, match=r"key 1: label 1\.0+15\d*e\+30 is not a class"):
            recordio.image_label(reader, 1)


def test_absurd_property_values_are_an_error(tmp_path):
    """Was: OverflowError while caching the scan (and a 2^60-class count would size the classifier)."""
    jpeg = encode_jpeg(np.zeros((8, 8, 3), np.uint8))
    write_face_dataset(tmp_path, [(0, jpeg), (1, jpeg)])
    for text in ("2,8,99999999999999999999", "1152921504606846976,8,8", "2,0,8", "2,\xff8,8"):
        (tmp_path / "property").write_text(text)
        with pytest.raises(UnitsfaceError, match="property"):
            scan_dataset(tmp_path)


def test_a_damaged_scan_cache_is_a_miss(tmp_path):
    """Was: zipfile.BadZipFile from the cache file next to the data."""
    jpeg = encode_jpeg(np.zeros((8, 8, 3), np.uint8))
    write_face_dataset(tmp_path, [(0, jpeg), (1, jpeg), (1, jpeg)])
    first = scan_dataset(tmp_path)
    cache = tmp_path / "train.scan.npz"
    for position in (40, len(cache.read_bytes()) // 2):
        data = bytearray(cache.read_bytes())
        data[position] ^= 0x10
        cache.write_bytes(bytes(data))
        again = scan_dataset(tmp_path)
        assert again.keys.tolist() == first.keys.tolist() and again.labels.tolist() == [0, 1, 1]
