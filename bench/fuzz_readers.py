"""Fuzz every reader of untrusted files: RecordIO files and records, `.bin` pickles, image bytes, IJB meta files.

Each input is a valid seed file mutated by a generator seeded with (--seed, kind, index): bit flips, bytes set to
edge values, truncation, deleted/inserted/duplicated chunks, splices of two seeds, integers written over length and
size fields (wrong lengths, 2^29 - 1 byte frames, 2^32 labels, 2^60-byte pickle strings, 65535-pixel images) and, for
pickles, hostile opcodes (globals that run code, memo indices of 2^32, nesting). The only outcomes allowed are
success or a one-line UnitsfaceError. A worker process reads the inputs under RLIMIT_AS (--memory-mb above its
start-up size), so an allocation a damaged header asks for fails instead of taking the machine; the parent gives
each input --time-limit seconds and restarts a worker that hangs or dies. Findings (another exception, a
multi-line message, MemoryError, a hang, a crash, code run by a pickle) are printed with the command that
replays them in-process with a traceback.

    python bench/fuzz_readers.py [--inputs 100000] [--seed 0] [--kinds recordio bin image ijb]
    python bench/fuzz_readers.py --replay recordio:1234
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before numpy: one thread, and no per-thread arenas under RLIMIT_AS
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import multiprocessing  # noqa: E402
import pickle  # noqa: E402
import pickletools  # noqa: E402
import random  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
import warnings  # noqa: E402
from collections import Counter, defaultdict  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable  # noqa: E402

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # unitsface of this checkout

from unitsface.data.bins import load_bin, save_bin  # noqa: E402
from unitsface.data.images import decode, encode_jpeg, encode_png, image_size  # noqa: E402
from unitsface.data.recordio import (  # noqa: E402
    MAGIC_BYTES,
    IndexedRecordIO,
    iter_records,
    rebuild_index,
    scan_dataset,
    unpack,
    write_face_dataset,
)
from unitsface.errors import UnitsfaceError, one_line  # noqa: E402
from unitsface.evaluation.ijb import (  # noqa: E402
    evaluate_ijb,
    evaluate_ijb_identification,
    read_ijb_1n_meta,
    read_ijb_meta,
    template_features,
)

INTERESTING = (0, 1, 2, 3, 4, 7, 8, 0x7F, 0x80, 0xFF, 0x100, 0x7FFF, 0x8000, 0xFFFF, 0x10000, (1 << 29) - 1,
               0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 1 << 32, 1 << 60, (1 << 63) - 1, (1 << 64) - 1)
CANARY = "fuzz-canary"  # a file that hostile pickles try to create; finding one means a pickle ran code


class Finding(Exception):
    """An outcome other than success or a one-line UnitsfaceError."""

    def __init__(self, category: str, entry: str, detail: str) -> None:
        super().__init__(f"{category} in {entry}: {detail}")
        self.category = category


class Probe:
    """Calls reader entry points and classifies what they do; counts the clean UnitsfaceErrors."""

    def __init__(self) -> None:
        self.errors = 0

    def call(self, entry: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except UnitsfaceError as exc:
            text = str(exc)
            if not text.strip() or "\n" in text:
                raise Finding("multi-line error", entry, repr(text[:300])) from exc
            if _caused_by(exc, MemoryError):  # the allocation was attempted: caught, but not harmless
                raise Finding("memory", entry, f"UnitsfaceError after a MemoryError: {text[:200]}") from exc
            self.errors += 1
            return None
        except MemoryError:
            raise Finding("memory", entry, "MemoryError") from None
        except Exception as exc:
            raise Finding("exception", entry, f"{type(exc).__name__}: {one_line(exc)[:300]}") from exc


def _caused_by(exc: BaseException, kind: type) -> bool:
    """Whether `kind` is in the chain of exceptions that led to `exc` (`raise ... from None` keeps __context__)."""
    seen = exc.__cause__ or exc.__context__
    while seen is not None:
        if isinstance(seen, kind):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


# ------------------------------------------------------------------------------------------------ mutations


def put_int(rng: random.Random, data: bytearray, pos: int) -> None:
    """Write an edge-case integer (1, 2, 4 or 8 bytes, either byte order) at `pos`: wrong lengths, huge sizes."""
    width = rng.choice((1, 2, 4, 8))
    value = rng.choice(INTERESTING) & ((1 << (8 * width)) - 1)
    data[pos : pos + width] = value.to_bytes(width, rng.choice(("little", "big")))


def mutate_bytes(rng: random.Random, data: bytes, fields: list[int] = (), others: list[bytes] = ()) -> bytes:
    """1-3 generic mutations; `fields` are offsets of length/size fields that integer writes aim at."""
    out = bytearray(data)
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        n, op = len(out), rng.randrange(8)
        if op == 0 and n:  # bit flips
            for _ in range(rng.randint(1, 8)):
                out[rng.randrange(n)] ^= 1 << rng.randrange(8)
        elif op == 1 and n:
            out[rng.randrange(n)] = rng.choice((0, 0xFF, 0x7F, 0x80, rng.randrange(256)))
        elif op == 2:
            put_int(rng, out, rng.choice(fields) if fields and rng.random() < 0.7 else rng.randrange(n + 1))
        elif op == 3:  # truncation
            del out[rng.randrange(n + 1) :]
        elif op == 4:
            a = rng.randrange(n + 1)
            del out[a : a + rng.randint(1, 64)]
        elif op == 5:
            a = rng.randrange(n + 1)
            out[a:a] = rng.randbytes(rng.randint(1, 64))
        elif op == 6 and n:  # a duplicated chunk
            a = rng.randrange(n)
            chunk = out[a : a + rng.randint(1, 256)]
            b = rng.randrange(n + 1)
            out[b:b] = chunk
        elif op == 7 and others:  # splice with another seed
            other = rng.choice(others)
            out = out[: rng.randrange(n + 1)] + other[rng.randrange(len(other) + 1) :]
    return bytes(out)


def mutate_lines(rng: random.Random, text: str, values: tuple[str, ...]) -> str:
    """Line and field edits of a text table: deleted, duplicated, swapped lines; fields replaced or added."""
    lines = text.splitlines(keepends=True)
    for _ in range(rng.choice((1, 1, 2, 3))):
        if not lines:
            break
        i, op = rng.randrange(len(lines)), rng.randrange(5)
        if op == 0:
            del lines[i]
        elif op == 1:
            lines.insert(rng.randrange(len(lines) + 1), lines[i])
        elif op == 2:
            j = rng.randrange(len(lines))
            lines[i], lines[j] = lines[j], lines[i]
        else:
            sep = "," if "," in lines[i] else " "
            fields = lines[i].rstrip("\r\n").split(sep)
            k = rng.randrange(len(fields) + 1)
            if op == 3 and k < len(fields):
                fields[k] = rng.choice(values)
            else:
                fields.insert(k, rng.choice(values))
            lines[i] = sep.join(fields) + "\n"
    return "".join(lines)


NUMBERS = ("0", "-1", "1", "2", "99999999999999999999", str(1 << 63), str(-(1 << 63)), str((1 << 63) - 1),
           "1e999", "-1e999", "nan", "inf", "1.5", "0x10", "", "abc", "\u00e9", "1_000", "+7", " ", "\x00")


# -------------------------------------------------------------------------------------------------- targets


def tiny_faces(count: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [np.clip(rng.normal(128, 40, (16, 12, 3)), 0, 255).astype(np.uint8) for _ in range(count)]


class RecordIOTarget:
    """An insightface-layout train.rec/.idx/property (a split record included), mutated as files or as records."""

    name = "recordio"

    def __init__(self, work: Path) -> None:
        self.work = work
        seed_dir = work / "seed"
        jpegs = [encode_jpeg(img) for img in tiny_faces(6, 1)]
        split = jpegs[0][:8] + MAGIC_BYTES + jpegs[0][8:]  # payload holding the magic word: a split record
        items = [(0, jpegs[1]), (0, split), (1, jpegs[2]), (1, encode_png(tiny_faces(1, 2)[0])), (2, jpegs[3]),
                 (2, jpegs[4]), (2, jpegs[5])]
        write_face_dataset(seed_dir, items)
        self.rec = (seed_dir / "train.rec").read_bytes()
        self.idx = (seed_dir / "train.idx").read_text()
        self.property = (seed_dir / "property").read_text()
        with IndexedRecordIO(seed_dir / "train.idx", seed_dir / "train.rec") as reader:
            self.records = [(key, reader.read(key)) for key in reader.keys]
        aligned = [p for p in range(0, len(self.rec), 4) if self.rec[p : p + 4] == MAGIC_BYTES]
        # frame length fields, then each record's IRHeader flag, label, id
        self.fields = [p + 4 for p in aligned] + [p + d for p in aligned for d in (8, 12, 16)]
        self.folder = work / "case"

    def prepare(self, rng: random.Random) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
        self.folder.mkdir()
        rec, idx, prop = self.rec, self.idx, self.property
        choice = rng.random()
        if choice < 0.55:
            rec = mutate_bytes(rng, rec, self.fields)
        elif choice < 0.75:
            idx = mutate_lines(rng, idx, NUMBERS) if rng.random() < 0.7 else mutate_bytes(rng, idx.encode()).decode(
                "latin1")
        elif choice < 0.95:  # one record's payload damaged inside valid frames
            records = list(self.records)
            k = rng.randrange(len(records))
            key, payload = records[k]
            records[k] = (key, mutate_bytes(rng, payload, [0, 4, 8, 16, 24, 28, 32]))
            with IndexedRecordIO(self.folder / "train.idx", self.folder / "train.rec", "w") as writer:
                for key, payload in records:
                    writer.write(key, payload)
            rec, idx = (self.folder / "train.rec").read_bytes(), (self.folder / "train.idx").read_text()
        else:
            prop = mutate_lines(rng, prop, NUMBERS)
        (self.folder / "train.rec").write_bytes(rec)
        (self.folder / "train.idx").write_bytes(idx.encode("latin1", "replace"))
        (self.folder / "property").write_bytes(prop.encode("utf-8", "replace"))
        self.cache_damage = rng.random() < 0.3

    def run(self, probe: Probe) -> None:
        from unitsface.data.dataset import RecordDataset  # torch: imported by the worker once

        folder = self.folder
        probe.call("iter_records", lambda: list(iter_records(folder / "train.rec")))
        probe.call("rebuild_index", rebuild_index, folder / "train.rec", folder / "rebuilt.idx")
        reader = probe.call("IndexedRecordIO", IndexedRecordIO, folder / "train.idx", folder / "train.rec")
        if reader is not None:
            with reader:
                for key in reader.keys[:32]:
                    payload = probe.call("IndexedRecordIO.read", reader.read, key)
                    probe.call("IndexedRecordIO.read_head", reader.read_head, key, 28)
                    if payload is not None:
                        probe.call("unpack", unpack, payload)
        plain = probe.call("scan_dataset", scan_dataset, folder, cache=False)
        if plain is None:
            return
        probe.call("scan_dataset(cache)", scan_dataset, folder)
        if self.cache_damage:  # a damaged cache is a miss: the scan must come out as without it
            cache = folder / "train.scan.npz"
            data = bytearray(cache.read_bytes())
            data[len(data) // 2] ^= 0x10
            cache.write_bytes(bytes(data))
            again = probe.call("scan_dataset(damaged cache)", scan_dataset, folder)
            if again is None or not np.array_equal(again.keys, plain.keys):
                raise Finding("wrong result", "scan_dataset(damaged cache)", "differs from a scan without cache")
        dataset = probe.call("RecordDataset", RecordDataset, folder, train=True, max_bad_fraction=0.9)
        if dataset is not None:
            for i in range(len(dataset)):  # training never raises on bad data: it replaces and reports
                try:
                    image, label, _ = dataset[(i, 3)]
                except Exception as exc:
                    detail = f"{type(exc).__name__}: {one_line(exc)}"
                    raise Finding("dataset raised", "RecordDataset[i]", detail) from exc
                if tuple(image.shape) != (3, 112, 112) or not 0 <= label < dataset.num_classes:
                    raise Finding("wrong result", "RecordDataset[i]", f"shape {tuple(image.shape)}, label {label}")


class _Hostile:
    """Pickle snippets that must be refused (each leaves one object on the stack)."""

    @staticmethod
    def snippets(canary: str) -> list[bytes]:
        cmd = f"touch {canary}".encode()
        big = (1 << 60).to_bytes(8, "little")
        return [
            b"cos\nsystem\n(S'" + cmd + b"'\ntR",
            b"cbuiltins\nexec\n(S'open(" + repr(canary).encode() + b", \"w\")'\ntR",
            b"cbuiltins\ngetattr\n(cbuiltins\nopen\nS'__call__'\ntR",
            b"\x8c\x05numpy\x94\x8c\x05dtype\x94\x93\x8c\x02O8\x94\x89\x88\x87R",  # numpy.dtype('O8')
            b"cnumpy\ndtype\n(S'f8'\nI00\nI01\ntR",
            b"cnumpy.core.numeric\n_frombuffer\n(J\xff\xff\xff\x7fcnumpy\ndtype\n(S'u1'\nI00\nI01\ntRS'C'\n(I16\ntS'C'\ntR",
            b"cnumpy.core.multiarray\n_reconstruct\n(cbuiltins\nobject\n(I0\ntS'b'\ntR",
            b"N\x8c\x01a\x94r\xf0\xff\xff\xff",  # LONG_BINPUT 2^32 - 16 (after a memoised string)
            b"N\x8c\x01a\x94r\x00\x00\x00\x04",  # LONG_BINPUT 2^26: a 1 GiB memo table, cleared
            b"\x8e" + big,  # BINBYTES8 claiming 2^60 bytes
            b"\x8d" + big,  # BINUNICODE8 claiming 2^60 bytes
            b"\x96" + big,  # BYTEARRAY8 claiming 2^60 bytes
            b"\x95" + big + b"N",  # FRAME of 2^60 bytes
            b"(" * 100_000 + b"N",  # 100k marks
            b"]" * 50_000 + b"a" * 49_999,  # 50k nested lists
            b"\x82\x01",  # EXT1 code 1 (copyreg extension registry)
            b"P0\n",  # a persistent id
            b"h\xff",  # BINGET of a missing memo entry
            b"\x8a\xff" + b"\xff" * 255,  # LONG1 of 255 bytes
        ]


class BinTarget:
    """insightface `.bin` pickles: protocol 4 bytes, protocol 2 numpy arrays, Python-2 str, protocol 5 buffers."""

    name = "bin"

    def __init__(self, work: Path) -> None:
        self.work = work
        jpegs = [encode_jpeg(img) for img in tiny_faces(4, 3)]
        flags = [True, False]
        save_bin(work / "seed.bin", jpegs, flags)
        arrays = [np.frombuffer(j, np.uint8) for j in jpegs]
        self.seeds = [
            (work / "seed.bin").read_bytes(),
            pickle.dumps((arrays, [np.bool_(f) for f in flags]), protocol=2),
            pickle.dumps(([j.decode("latin1") for j in jpegs], flags), protocol=2),
            pickle.dumps((arrays, np.asarray(flags)), protocol=5),
        ]
        self.canary = work / CANARY
        self.hostile = _Hostile.snippets(str(self.canary))
        self.path = work / "case.bin"

    def prepare(self, rng: random.Random) -> None:
        seed = rng.choice(self.seeds)
        ops = list(pickletools.genops(io.BytesIO(seed)))
        if rng.random() < 0.6:
            fields = [pos + 1 for _, _, pos in ops]  # each opcode's argument
            data = mutate_bytes(rng, seed, fields, self.seeds)
        else:  # a hostile snippet at an opcode boundary, sometimes followed by POP/STOP
            pos = rng.choice([p for _, _, p in ops])
            snippet = rng.choice(self.hostile) + rng.choice((b"", b"0", b".", b"0."))
            data = seed[:pos] + snippet + seed[pos:]
            if rng.random() < 0.3:
                data = b"\x80\x02" + snippet + b"."
        self.path.write_bytes(data)

    def run(self, probe: Probe) -> None:
        probe.call("load_bin", load_bin, self.path)
        if self.canary.exists():
            self.canary.unlink()
            raise Finding("code execution", "load_bin", "a hostile pickle created the canary file")


class ImageTarget:
    """Encoded images of every format the readers accept, mutated; decode and image_size."""

    name = "image"

    def __init__(self, work: Path) -> None:
        img = tiny_faces(1, 4)[0]
        self.seeds = [encode_jpeg(img), encode_jpeg(img[..., 0]), encode_png(img)]
        for fmt, kwargs in (("JPEG", {"progressive": True}), ("PNG", {"bits": 4}), ("PPM", {}), ("BMP", {}),
                            ("TIFF", {}), ("TIFF", {"compression": "tiff_lzw"}), ("WEBP", {"lossless": True})):
            buffer = io.BytesIO()
            source = Image.fromarray(img).convert("P") if kwargs.get("bits") else Image.fromarray(img)
            source.save(buffer, fmt, **kwargs)
            self.seeds.append(buffer.getvalue())
        buffer = io.BytesIO()
        Image.fromarray(img[..., 0]).save(buffer, "PPM")  # PGM
        self.seeds.append(buffer.getvalue())
        self.fields = [self.size_fields(seed) for seed in self.seeds]
        self.data = b""

    @staticmethod
    def size_fields(data: bytes) -> list[int]:
        """Offsets of width/height fields: JPEG SOF, PNG IHDR, BMP header, TIFF IFD entries (roughly)."""
        fields = [p + 5 for p in range(len(data) - 9) if data[p] == 0xFF and data[p + 1] in (0xC0, 0xC1, 0xC2)]
        fields += [p + 7 for p in range(len(data) - 9) if data[p] == 0xFF and data[p + 1] in (0xC0, 0xC2)]
        if data[:4] == b"\x89PNG":
            fields += [16, 20]
        if data[:2] == b"BM":
            fields += [2, 10, 14, 18, 22, 28, 34]
        if data[:2] in (b"II", b"MM"):
            fields += list(range(8, min(len(data), 200), 12))
        return fields or [0]

    def prepare(self, rng: random.Random) -> None:
        k = rng.randrange(len(self.seeds))
        data = mutate_bytes(rng, self.seeds[k], self.fields[k], self.seeds)
        if data[:3] == b"P6\n" and b"255\n" in data and rng.random() < 0.2:  # a PPM header claiming a huge image
            data = b"P6\n100000 100000\n255\n" + data[data.index(b"255\n") + 4 :]
        self.data = data

    def run(self, probe: Probe) -> None:
        img = probe.call("decode", decode, self.data, "fuzz")
        if img is not None and (img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3):
            raise Finding("wrong result", "decode", f"{img.dtype} {img.shape}")
        probe.call("image_size", image_size, self.data, "fuzz")


class IJBTarget:
    """IJB-C meta folder (1:1 files and 1:N CSVs), mutated; readers, then evaluation on what they return."""

    name = "ijb"
    FILES = ("ijbc_face_tid_mid.txt", "ijbc_name_5pts_score.txt", "ijbc_template_pair_label.txt",
             "ijbc_1N_gallery_G1.csv", "ijbc_1N_gallery_G2.csv", "ijbc_1N_probe_mixed.csv")

    def __init__(self, work: Path) -> None:
        rng = np.random.default_rng(5)
        templates = np.r_[np.arange(8), rng.integers(0, 8, 16)]  # 8 templates of 24 images, 4 subjects
        subject = np.arange(8) % 4
        medias = templates * 3 + rng.integers(0, 3, len(templates))
        tid = "".join(f"img/{i}.jpg {t} {m}\n" for i, (t, m) in enumerate(zip(templates, medias)))
        pts = "".join(f"img/{i}.jpg " + " ".join(f"{v:.3f}" for v in rng.uniform(20, 90, 10))
                      + f" {rng.uniform(0.5, 1):.4f}\n" for i in range(len(templates)))
        pairs = "".join(f"{a} {b} {int(subject[a] == subject[b])}\n" for a in range(4) for b in range(4, 8))
        header = "TEMPLATE_ID,SUBJECT_ID,FILENAME\n"
        gal1 = header + "".join(f"{t},{subject[t]},x.jpg\n" for t in (0, 1))
        gal2 = header + "".join(f"{t},{subject[t]},x.jpg\n" for t in (2, 3))
        probe = header + "".join(f"{t},{subject[t]},x.jpg\n" for t in range(4, 8))
        self.seeds = dict(zip(self.FILES, (tid, pts, pairs, gal1, gal2, probe)))
        self.meta = work / "root" / "IJBC" / "meta"
        self.root = work / "root"
        self.features = np.random.default_rng(6).standard_normal((len(templates), 8)).astype(np.float32)

    def prepare(self, rng: random.Random) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
        self.meta.mkdir(parents=True)
        target = rng.choice(self.FILES)
        for name, text in self.seeds.items():
            data = text.encode()
            if name == target:
                if rng.random() < 0.6:
                    data = mutate_lines(rng, text, NUMBERS).encode("utf-8", "surrogatepass")
                else:
                    data = mutate_bytes(rng, data, [], [s.encode() for s in self.seeds.values()])
                if rng.random() < 0.03:
                    continue  # a missing file
            (self.meta / name).write_bytes(data)

    def run(self, probe: Probe) -> None:
        meta = probe.call("read_ijb_meta", read_ijb_meta, self.root, "IJBC")
        one_n = probe.call("read_ijb_1n_meta", read_ijb_1n_meta, self.root, "IJBC")
        if meta is None:
            return
        n = len(meta.templates)
        feats = np.resize(self.features, (n, 8))
        probe.call("evaluate_ijb", evaluate_ijb, feats, meta.faceness, meta.templates, meta.medias, meta.p1,
                   meta.p2, meta.labels)
        pooled = probe.call("template_features", template_features, feats, meta.faceness, meta.templates,
                            meta.medias)
        if pooled is not None and one_n is not None:
            galleries = {k: v for k, v in one_n.items() if k != "probe"}
            probe.call("evaluate_ijb_identification", evaluate_ijb_identification, pooled[1], pooled[0], galleries,
                       one_n["probe"])


TARGETS = {t.name: t for t in (RecordIOTarget, BinTarget, ImageTarget, IJBTarget)}


# --------------------------------------------------------------------------------------------------- driver


def input_rng(seed: int, kind: str, index: int) -> random.Random:
    return random.Random(f"{seed}/{kind}/{index}")  # str seeds hash with SHA-512: the same in every process


def run_input(target: Any, seed: int, index: int) -> tuple[str, str]:
    """(outcome, detail): "ok", "error" (clean UnitsfaceErrors) or a Finding category."""
    target.prepare(input_rng(seed, target.name, index))
    probe = Probe()
    try:
        target.run(probe)
    except Finding as finding:
        return finding.category, str(finding)
    return ("error" if probe.errors else "ok"), ""


def _vm_bytes() -> int:
    with open("/proc/self/status") as status:
        line = next(ln for ln in status if ln.startswith("VmSize:"))
    return int(line.split()[1]) * 1024


def make_targets(work: Path, kinds: list[str]) -> dict[str, Any]:
    targets = {}
    for kind in kinds:
        (work / kind).mkdir(parents=True, exist_ok=True)
        targets[kind] = TARGETS[kind](work / kind)
    return targets


def worker(conn: Any, kinds: list[str], seed: int, memory_mb: int, work: str) -> None:
    import torch

    # Decoders warn about damage (Pillow) or print it (libtiff); the outcome travels through `conn`.
    warnings.simplefilter("ignore")
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)

    torch.set_num_threads(1)
    from unitsface.data.dataset import RecordDataset  # noqa: F401  (imported before the limit is set)

    targets = make_targets(Path(work), kinds)
    resource.setrlimit(resource.RLIMIT_AS, (_vm_bytes() + (memory_mb << 20), resource.RLIM_INFINITY))
    conn.send("ready")
    while True:
        message = conn.recv()
        if message is None:
            return
        kind, index = message
        try:
            outcome = run_input(targets[kind], seed, index)
        except Exception as exc:  # the harness itself (writing the mutated files) failed
            outcome = ("harness", f"{type(exc).__name__}: {one_line(exc)}")
        conn.send((*outcome, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))


class Pool:
    """One worker process at a time, restarted after a hang, a crash or a memory finding."""

    def __init__(self, kinds: list[str], seed: int, memory_mb: int, work: Path) -> None:
        self.args = (kinds, seed, memory_mb, str(work))
        self.context = multiprocessing.get_context("fork")
        self.process = None
        self.restarts = 0

    def start(self) -> None:
        self.conn, child = self.context.Pipe()
        self.process = self.context.Process(target=worker, args=(child, *self.args), daemon=True)
        self.process.start()
        if not self.conn.poll(300) or self.conn.recv() != "ready":
            raise SystemExit("fuzz worker did not start")

    def stop(self) -> None:
        if self.process is not None and self.process.is_alive():
            self.process.kill()
        if self.process is not None:
            self.process.join()
        self.process = None

    def run(self, kind: str, index: int, limit: float) -> tuple[str, str, int]:
        if self.process is None:
            self.start()
        self.conn.send((kind, index))
        try:
            if self.conn.poll(limit):
                outcome, detail, rss = self.conn.recv()
                if outcome in ("memory", "harness"):
                    self.restart()
                return outcome, detail, rss
            self.restart()
            return "hang", f"no answer within {limit:g} s", 0
        except EOFError:
            code = self.process.exitcode if self.process else None
            self.restart()
            return "crash", f"worker died (exit code {code})", 0

    def restart(self) -> None:
        self.stop()
        self.restarts += 1


def replay(spec: str, seed: int, memory_mb: int) -> int:
    kind, index = spec.split(":")
    with tempfile.TemporaryDirectory(dir=_scratch()) as work:
        target = make_targets(Path(work), [kind])[kind]
        resource.setrlimit(resource.RLIMIT_AS, (_vm_bytes() + (memory_mb << 20), resource.RLIM_INFINITY))
        target.prepare(input_rng(seed, kind, int(index)))
        try:
            target.run(Probe())
        except Finding:
            traceback.print_exc()  # the chained exception shows where the reader failed
            return 1
    print("ok")
    return 0


def _scratch() -> str | None:
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--inputs", type=int, default=100_000, help="mutated inputs in all, dealt round-robin to kinds")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kinds", nargs="+", default=list(TARGETS), choices=list(TARGETS))
    ap.add_argument("--time-limit", type=float, default=10.0, help="seconds one input may take (hang)")
    ap.add_argument("--memory-mb", type=int, default=512, help="address space a worker may add to its start-up size")
    ap.add_argument("--replay", metavar="KIND:INDEX", help="run one input in this process, with a traceback")
    args = ap.parse_args(argv)
    if args.replay:
        return replay(args.replay, args.seed, args.memory_mb)
    counts: dict[str, Counter] = defaultdict(Counter)
    findings: list[dict[str, Any]] = []
    slowest, max_rss = 0.0, 0
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=_scratch()) as work:
        pool = Pool(args.kinds, args.seed, args.memory_mb, Path(work))
        try:
            for i in range(args.inputs):
                kind, index = args.kinds[i % len(args.kinds)], i // len(args.kinds)
                tick = time.perf_counter()
                outcome, detail, rss = pool.run(kind, index, args.time_limit)
                slowest, max_rss = max(slowest, time.perf_counter() - tick), max(max_rss, rss)
                counts[kind][outcome] += 1
                if outcome not in ("ok", "error"):
                    findings.append({"kind": kind, "index": index, "outcome": outcome, "detail": detail})
                if (i + 1) % 10_000 == 0:
                    print(f"  {i + 1} inputs, {len(findings)} findings, {time.perf_counter() - start:.0f} s",
                          file=sys.stderr, flush=True)
        finally:
            pool.stop()
    elapsed = time.perf_counter() - start
    for kind in args.kinds:
        c = counts[kind]
        other = {k: v for k, v in c.items() if k not in ("ok", "error")}
        print(f"{kind:9s} {sum(c.values()):7d} inputs: {c['ok']:7d} read, {c['error']:7d} one-line UnitsfaceError, "
              f"findings {other or 0}")
    shown: set[tuple[str, str, str]] = set()
    for f in findings:
        key = (f["kind"], f["outcome"], ":".join(f["detail"].split(":")[:2]))  # entry point and exception type
        if key not in shown:  # one line per kind of finding; the count says how many
            shown.add(key)
            print(f"FINDING {f['kind']}:{f['index']} {f['outcome']}: {f['detail']}\n"
                  f"  replay: python bench/fuzz_readers.py --seed {args.seed} --replay {f['kind']}:{f['index']}")
    summary = {"inputs": args.inputs, "seed": args.seed, "per_kind": {k: dict(counts[k]) for k in args.kinds},
               "findings": len(findings), "worker_restarts": pool.restarts, "slowest_input_s": round(slowest, 3),
               "worker_max_rss_mb": round(max_rss / 1024, 1), "time_limit_s": args.time_limit,
               "memory_limit_mb": args.memory_mb, "seconds": round(elapsed, 1)}
    print(json.dumps(summary))
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())
