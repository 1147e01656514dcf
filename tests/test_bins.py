"""Verification `.bin` files: round trips, Python-2 pickles, and refusing malicious pickles."""

from __future__ import annotations

import os
import pickle
import struct

import numpy as np
import pytest

from unitsface.data.bins import fold_counts, load_bin, save_bin
from unitsface.data.images import decode, encode_jpeg
from unitsface.errors import UnitsfaceError


def _jpegs(n: int) -> list[bytes]:
    rng = np.random.default_rng(0)
    return [encode_jpeg(rng.integers(0, 256, (112, 112, 3), dtype=np.uint8), 90) for _ in range(n)]


def test_save_load_round_trip(tmp_path):
    images, issame = _jpegs(6), [True, False, True]
    save_bin(tmp_path / "a.bin", images, issame)
    loaded, flags = load_bin(tmp_path / "a.bin")
    assert loaded == images and flags.dtype == np.bool_ and flags.tolist() == issame
    assert decode(loaded[0]).shape == (112, 112, 3)
    # what insightface's own loader does: a plain pickle.load of (bins, issame_list)
    bins, issame_list = pickle.loads((tmp_path / "a.bin").read_bytes())
    assert bins == images and issame_list == issame
    assert [name for name in os.listdir(tmp_path)] == ["a.bin"]  # no temp file left


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_python3_builder_files_with_numpy_arrays_and_numpy_bools(tmp_path, protocol):
    # insightface's builder under Python 3 stores OpenCV's 1-D uint8 arrays; labels may be numpy bools
    images = _jpegs(4)
    arrays = [np.frombuffer(data, np.uint8).copy() for data in images]
    arrays[1] = arrays[1].reshape(-1, 1)  # older OpenCV returned N x 1 arrays
    payload = (arrays, [np.bool_(True), np.bool_(False)])
    (tmp_path / "b.bin").write_bytes(pickle.dumps(payload, protocol=protocol))
    loaded, flags = load_bin(tmp_path / "b.bin")
    assert loaded == images and flags.tolist() == [True, False]


def _py2_str(data: bytes) -> bytes:
    """Python 2 `str` as cPickle writes it (SHORT_BINSTRING / BINSTRING)."""
    if len(data) < 256:
        return b"U" + bytes([len(data)]) + data
    return b"T" + struct.pack("<i", len(data)) + data


def test_python2_pickle_with_str_entries_loads_as_bytes(tmp_path):
    images = _jpegs(4)
    memo = iter(range(100))
    # protocol 2, as Python 2's cPickle.dump(..., protocol=2) lays out ([str, ...], [bool, ...])
    body = b"\x80\x02" + b"]q" + bytes([next(memo)]) + b"("
    for data in images:
        body += _py2_str(data) + b"q" + bytes([next(memo)])
    body += b"e]q" + bytes([next(memo)]) + b"(\x88\x89e\x86q" + bytes([next(memo)]) + b"."
    (tmp_path / "py2.bin").write_bytes(body)
    with pytest.raises(UnicodeDecodeError):
        pickle.loads(body)  # the Python-3 default (ASCII) fails on JPEG bytes, hence encoding='bytes'
    loaded, flags = load_bin(tmp_path / "py2.bin")
    assert loaded == images and flags.tolist() == [True, False]


class _Exploit:
    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def test_malicious_pickle_is_refused_and_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps(([_Exploit(f"touch {marker}"), b"x"], [True]), protocol=2)
    (tmp_path / "evil.bin").write_bytes(payload)
    with pytest.raises(
        UnitsfaceError, match=r"refusing to unpickle .*evil\.bin: the file references (posix|os)\.system"
    ):
        load_bin(tmp_path / "evil.bin")
    assert not marker.exists()
    pickle.loads(payload)  # control: the same bytes really run the command under a plain unpickler
    assert marker.exists()


@pytest.mark.parametrize(
    "payload, refused",
    [
        (pickle.dumps((eval, [True]), protocol=4), "builtins.eval"),
        (pickle.dumps(([np.array([1, 2], dtype=object)], [True]), protocol=4), "numpy.dtype('O8')"),
        (pickle.dumps(([np.zeros(3, np.float64)], [True]), protocol=2), "numpy.dtype('f8')"),
        (pickle.dumps(([b"x", b"y"], [True]), protocol=2).replace(b"latin1", b"rot_13"), "encoding 'rot_13'"),
    ],
    ids=["eval", "object-array", "float-array", "codecs-rot13"],
)
def test_other_globals_and_dtypes_are_refused(tmp_path, payload, refused):
    (tmp_path / "x.bin").write_bytes(payload)
    with pytest.raises(UnitsfaceError, match="refusing to unpickle") as info:
        load_bin(tmp_path / "x.bin")
    assert refused in str(info.value)


def test_structural_errors(tmp_path):
    path = tmp_path / "bad.bin"
    cases = [
        (b"", "is empty"),
        (pickle.dumps(([b"a", b"b", b"c"], [True])), "3 images for 1 pairs; expected 2"),
        (pickle.dumps(([], [])), "no pairs"),
        (pickle.dumps({"bins": []}), r"expected a pickled \(bins, issame_list\) pair"),
        (pickle.dumps(([b"a", 7], [True])), "image entry 1 is a int"),
        (pickle.dumps(([b"a", b"b"], [1])), "issame entry 0 is 1, expected a boolean"),
        (pickle.dumps(([b"a", b"b"], [True]))[:-5], "not a valid .bin pickle"),
    ]
    for content, message in cases:
        path.write_bytes(content)
        with pytest.raises(UnitsfaceError, match=message):
            load_bin(path)
    with pytest.raises(UnitsfaceError, match="3 images for 1 pairs"):
        save_bin(path, [b"a", b"b", b"c"], [True])
    with pytest.raises(UnitsfaceError, match="not found"):
        load_bin(tmp_path / "missing.bin")


@pytest.mark.parametrize(
    "payload",
    [
        pickle.dumps(([b"a", b"b"], [True]), protocol=2)[:-1] + b"N\x8c\x01a\x94r\x00\x00\x00\x04.",
        b"\x80\x02cnumpy.core.numeric\n_frombuffer\n(J\xff\xff\xff\x7fcnumpy\ndtype\n(S'u1'\nI00\nI01\ntRS'C'\n"
        b"(I16\ntS'C'\ntR.",
        b"\x80\x04\x8e" + (1 << 60).to_bytes(8, "little") + b"abc.",
    ],
    ids=["memo-index-2^26", "frombuffer-of-an-int", "bytes8-of-2^60"],
)
def test_pickles_that_ask_for_gigabytes_are_refused_before_allocating(tmp_path, payload):
    """Found by bench/fuzz_readers.py under RLIMIT_AS: CPython's unpickler clears a memo table as large as the
    LONG_BINPUT index it reads (1 GiB here), and bytes(2**31 - 1) in `_frombuffer` allocated 2 GiB of zeros."""
    import resource

    (tmp_path / "x.bin").write_bytes(payload)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(UnitsfaceError, match="(not a valid .bin pickle|refusing to unpickle)") as info:
        load_bin(tmp_path / "x.bin")
    assert "MemoryError" not in str(info.value) and not isinstance(info.value.__context__, MemoryError)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100_000  # kB: nothing was allocated


def test_an_entry_nested_50000_deep_is_described_without_recursion(tmp_path):
    """Found by bench/fuzz_readers.py (100k run): the error message's repr raised RecursionError."""
    n = 50_000
    (tmp_path / "deep.bin").write_bytes(b"\x80\x02(U\x01aU\x01bl]" + b"]" * n + b"a" * (n - 1) + b"a\x86.")
    with pytest.raises(UnitsfaceError, match=r"issame entry 0 is \[+\.\.\.\]+, expected a boolean"):
        load_bin(tmp_path / "deep.bin")


def test_fold_counts_of_lfw_block_order():
    issame = np.array(([True] * 3 + [False] * 3) * 10)
    assert fold_counts(issame) == [(3, 3)] * 10
    assert fold_counts(np.array([True] * 30 + [False] * 30))[:4] == [(6, 0), (6, 0), (6, 0), (6, 0)]
