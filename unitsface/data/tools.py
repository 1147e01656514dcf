"""Back ends of `unitsface data ...`: pack, import, inspect, make-bin and mask.

Every function returns a dict report for the CLI to print. Image conversion runs in a
process pool (`workers`), because JPEG encoding dominates the cost of packing and the
GIL would serialise it in threads.
"""

from __future__ import annotations

import io
import multiprocessing
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from pathlib import Path
from typing import TypeVar

import numpy as np
from PIL import Image, ImageDraw

from unitsface.data.bins import fold_counts, load_bin, save_bin
from unitsface.data.images import (
    FACE_SIZE,
    decode,
    encode_jpeg,
    encode_png,
    face_jpeg,
    image_size,
    is_jpeg,
    list_image_folder,
    to_face_image,
)
from unitsface.data.masks import mask_faces
from unitsface.data.recordio import (
    IndexedRecordIO,
    atomic_write,
    resolve_record_paths,
    scan_dataset,
    unpack,
    write_face_dataset,
)
from unitsface.detect import face_crop
from unitsface.errors import UnitsfaceError

T = TypeVar("T")
R = TypeVar("R")

_SHOWN_BAD = 5  # bad file names listed in a report; the rest are counted


def parallel_map(fn: Callable[[T], R], items: Iterable[T], workers: int) -> Iterator[R]:
    """`map` in input order, over a process pool when workers > 1."""
    if workers <= 1:
        yield from map(fn, items)
        return
    with multiprocessing.Pool(workers) as pool:
        yield from pool.imap(fn, items, chunksize=16)


def _convert(path: Path, size: int, quality: int) -> tuple[bytes | None, str]:
    """(face JPEG, "") or (None, reason): one bad file must not abort a long conversion."""
    try:
        return face_jpeg(path.read_bytes(), size, quality, str(path)), ""
    except (UnitsfaceError, OSError) as exc:
        return None, str(exc)


def _bad_report(bad: list[str]) -> dict:
    return {"bad_files": len(bad), "bad_examples": bad[:_SHOWN_BAD]} if bad else {}


# --------------------------------------------------------------------------- pack


def read_lst(path: str | os.PathLike, root: str | os.PathLike) -> list[tuple[Path, int]]:
    """(image path, class) of an im2rec `.lst` (formats.md §5), sorted by class then index.

    Sorting groups each identity's images, which the insightface layout needs.
    """
    path, root = Path(path), Path(root)
    rows = []
    for line_no, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        fields = line.rstrip("\n").split("\t")
        try:
            index, label = int(fields[0]), float(fields[1])
            if len(fields) < 3 or not label.is_integer() or label < 0:
                raise ValueError
        except (ValueError, IndexError):
            raise UnitsfaceError(
                f"{path} line {line_no}: expected '<index>\\t<integer label>\\t<path>', got {line!r}"
            ) from None
        rows.append((int(label), index, root / fields[-1]))
    if not rows:
        raise UnitsfaceError(f"{path} lists no images")
    rows.sort(key=lambda row: (row[0], row[1]))
    return [(file, label) for label, _, file in rows]


def pack(
    src: str | os.PathLike,
    out: str | os.PathLike,
    workers: int = 1,
    quality: int = 95,
    size: int = FACE_SIZE,
    root: str | os.PathLike | None = None,
) -> dict:
    """An image folder `src/<identity>/<img>` or an im2rec `.lst` -> out/train.rec/.idx/property."""
    src = Path(src)
    if src.is_dir():
        items = list_image_folder(src)[1]
    elif src.suffix == ".lst" and src.is_file():
        items = read_lst(src, root if root is not None else src.parent)
    else:
        raise UnitsfaceError(f"pack source must be an image folder or an existing .lst file: {src}")
    bad: list[str] = []

    def converted() -> Iterator[tuple[int, bytes]]:
        results = parallel_map(partial(_convert, size=size, quality=quality), [p for p, _ in items], workers)
        for (_, label), (data, reason) in zip(items, results):
            if data is None:
                bad.append(reason)
            else:
                yield label, data

    report = write_face_dataset(out, converted())
    return {**report, **_bad_report(bad)}


# --------------------------------------------------------------------------- import


def _import_one(task: tuple[Path, Path], size: int, quality: int) -> str:
    source, dest = task
    data, reason = _convert(source, size, quality)
    if data is not None:
        atomic_write(dest, data)
    return reason


def import_images(
    src: str | os.PathLike, out: str | os.PathLike, workers: int = 1, quality: int = 95, size: int = FACE_SIZE
) -> dict:
    """Any-size, any-colour image tree `src/<identity>/<img>` -> `out/<identity>/<stem>.jpg` face JPEGs."""
    classes, items = list_image_folder(src)
    out = Path(out)
    tasks, seen = [], {}
    for path, label in items:
        dest = out / classes[label] / f"{path.stem}.jpg"
        if dest in seen:
            raise UnitsfaceError(f"{path} and {seen[dest]} would both be written to {dest}")
        seen[dest] = path
        tasks.append((path, dest))
    for name in classes:
        (out / name).mkdir(parents=True, exist_ok=True)
    reasons = list(parallel_map(partial(_import_one, size=size, quality=quality), tasks, workers))
    bad = [reason for reason in reasons if reason]
    return {"identities": len(classes), "images": len(tasks) - len(bad), "out": str(out), **_bad_report(bad)}


# --------------------------------------------------------------------------- inspect


def _contact_sheet(rows: list[list[np.ndarray]], labels: list[int]) -> bytes:
    """PNG of one row of FACE_SIZE tiles per identity, the class written in each row."""
    columns = max(len(row) for row in rows)
    sheet = Image.new("RGB", (columns * FACE_SIZE, len(rows) * FACE_SIZE))
    draw = ImageDraw.Draw(sheet)
    for r, (row, label) in enumerate(zip(rows, labels)):
        for c, img in enumerate(row):
            sheet.paste(Image.fromarray(to_face_image(img, FACE_SIZE)), (c * FACE_SIZE, r * FACE_SIZE))
        draw.text((3, r * FACE_SIZE + 2), str(label), fill=(255, 255, 0))
    return encode_png(np.asarray(sheet))


def _inspect_records(path: Path, sheet: Path | None, identities: int, per_identity: int) -> dict:
    index = scan_dataset(path)
    idx, rec = resolve_record_paths(path)
    present, counts = np.unique(index.labels, return_counts=True)
    report = {
        "rec": str(rec),
        "layout": "insightface (meta record 0)" if index.has_meta else "im2rec / shuffled (no meta record)",
        "images": len(index.keys),
        "identities": len(present),
        "num_classes": index.num_classes,
        "label_range": f"{present.min()}..{present.max()}",
        "images_per_identity": f"min {counts.min()}, median {int(np.median(counts))}, max {counts.max()}",
        "records_without_image": index.skipped,
    }
    if len(present) != index.num_classes:
        report["labels_without_images"] = index.num_classes - len(present)
    with IndexedRecordIO(idx, rec) as reader:
        first = unpack(reader.read(int(index.keys[0])))[1]
        height, width = image_size(first, f"{rec} key {index.keys[0]}")
        report["image_size"] = f"{height}x{width}"
        if sheet is not None:
            chosen = present[np.linspace(0, len(present) - 1, min(identities, len(present))).astype(int)]
            rows = []
            for label in chosen:
                keys = index.keys[index.labels == label][:per_identity]
                rows.append([decode(unpack(reader.read(int(k)))[1], f"{rec} key {k}") for k in keys])
            atomic_write(sheet, _contact_sheet(rows, [int(v) for v in chosen]))
            report["sheet"] = str(sheet)
    return report


def _inspect_bin(path: Path) -> dict:
    images, issame = load_bin(path)
    height, width = image_size(images[0], f"{path} image 0")
    folds = fold_counts(issame)
    return {
        "bin": str(path),
        "pairs": len(issame),
        "same": int(issame.sum()),
        "different": int((~issame).sum()),
        "image_size": f"{height}x{width}",
        "fold_same_different": " ".join(f"{s}/{d}" for s, d in folds),
    }


def inspect(path: str | os.PathLike, sheet: str | os.PathLike | None = None, identities=8, per_identity=6) -> dict:
    """Counts, label range and image size of a record dataset (or pair counts of a `.bin`)."""
    path = Path(path)
    if path.suffix == ".bin":
        return _inspect_bin(path)
    return _inspect_records(path, Path(sheet) if sheet else None, identities, per_identity)


# --------------------------------------------------------------------------- make-bin


def read_lfw_pairs(path: str | os.PathLike) -> list[tuple[str, int, str, int]]:
    """(name1, n1, name2, n2) of an LFW `pairs.txt`; same-person lines have name1 == name2.

    The optional first line `<folds>\\t<pairs per fold>` is skipped.
    """
    path = Path(path)
    pairs = []
    for line_no, line in enumerate(path.read_text().splitlines(), 1):
        fields = line.split()
        try:
            if len(fields) == 3:
                pairs.append((fields[0], int(fields[1]), fields[0], int(fields[2])))
            elif len(fields) == 4:
                pairs.append((fields[0], int(fields[1]), fields[2], int(fields[3])))
            elif not (line_no == 1 and all(f.isdigit() for f in fields)):
                raise ValueError
        except ValueError:
            raise UnitsfaceError(
                f"{path} line {line_no}: expected 'name n1 n2' or 'name1 n1 name2 n2', got {line!r}"
            ) from None
    if not pairs:
        raise UnitsfaceError(f"{path} lists no pairs")
    return pairs


def _write_bin(out: Path, pairs: list[tuple[Path, Path]], issame: list[bool], workers: int, size: int) -> dict:
    """Encode each distinct image once and save the `.bin`; any unreadable image is an error."""
    distinct = list(dict.fromkeys(p for pair in pairs for p in pair))
    encoded = {}
    for path, (data, reason) in zip(
        distinct, parallel_map(partial(_convert, size=size, quality=95), distinct, workers)
    ):
        if data is None:
            raise UnitsfaceError(reason)
        encoded[path] = data
    save_bin(out, [encoded[p] for pair in pairs for p in pair], issame)
    return {"bin": str(out), "pairs": len(pairs), "same": sum(issame), "images": len(distinct)}


def make_bin_from_pairs(
    pairs_file: str | os.PathLike, root: str | os.PathLike, out: str | os.PathLike, workers: int = 1, size=112
) -> dict:
    """An LFW-style pairs list + image tree `root/<name>/<name>_<nnnn>.jpg` -> `.bin`, in list order."""
    root = Path(root)
    pairs, issame = [], []
    for name1, n1, name2, n2 in read_lfw_pairs(pairs_file):
        paths = (root / name1 / f"{name1}_{n1:04d}.jpg", root / name2 / f"{name2}_{n2:04d}.jpg")
        for path in paths:
            if not path.is_file():
                raise UnitsfaceError(f"image {path} named by {pairs_file} not found")
        pairs.append(paths)
        issame.append(name1 == name2)
    return _write_bin(Path(out), pairs, issame, workers, size)


def _sample_pair(groups: list[list[Path]], same: bool, rng: np.random.Generator) -> tuple[Path, Path]:
    if same:
        group = groups[rng.integers(len(groups))]
        i, j = rng.choice(len(group), 2, replace=False)
        return group[i], group[j]
    a, b = rng.choice(len(groups), 2, replace=False)
    return groups[a][rng.integers(len(groups[a]))], groups[b][rng.integers(len(groups[b]))]


def make_bin_from_folder(
    root: str | os.PathLike, out: str | os.PathLike, pairs: int, seed: int, workers: int = 1, size=112
) -> dict:
    """`pairs` distinct random pairs from `root/<identity>/<img>`, alternating same/different.

    Alternation keeps every contiguous fold of the 10-fold protocol balanced.
    """
    classes, items = list_image_folder(root)
    groups: list[list[Path]] = [[] for _ in classes]
    for path, label in items:
        groups[label].append(path)
    groups = [g for g in groups if g]
    multi = [g for g in groups if len(g) >= 2]
    if pairs < 2 or not multi or len(groups) < 2:
        raise UnitsfaceError(f"{root}: need pairs >= 2, an identity with 2+ images and 2+ identities")
    rng = np.random.default_rng(seed)
    issame = [i % 2 == 0 for i in range(pairs)]
    chosen: list[tuple[Path, Path]] = []
    seen: set[frozenset] = set()
    for _ in range(100 * pairs + 1000):
        if len(chosen) == pairs:
            break
        same = issame[len(chosen)]
        pair = _sample_pair(multi if same else groups, same, rng)
        if frozenset(pair) not in seen:
            seen.add(frozenset(pair))
            chosen.append(pair)
    if len(chosen) < pairs:
        raise UnitsfaceError(f"{root}: found only {len(chosen)} distinct pairs of the {pairs} asked for")
    return _write_bin(Path(out), chosen, issame, workers, size)


# --------------------------------------------------------------------------- mask


def _masked_image(data: bytes, source: str, key: list[int], prob: float, detector) -> tuple[np.ndarray | None, bool]:
    """(the face to write, or None to keep the bytes as they are; whether it got a mask).

    The draw comes from a generator keyed by (seed, image position): which images are masked, and
    how, does not depend on the order they are processed in.
    """
    rng = np.random.default_rng(key)
    masked = bool(rng.random() < prob)
    face, landmarks = face_crop(decode(data, source), source, detector)  # without a detector: a 112×112 crop?
    if masked:
        return mask_faces(face, rng, landmarks), True
    return (None if detector is None else face), False


def _encode_like(face: np.ndarray, name: str) -> bytes:
    """`face` encoded in the format the file name says: JPEG (quality 95), PNG, else Pillow's choice."""
    suffix = Path(name).suffix.lower()
    if suffix in (".jpg", ".jpeg"):
        return encode_jpeg(face, 95)
    if suffix == ".png":
        return encode_png(face)
    buffer = io.BytesIO()
    Image.fromarray(face).save(buffer, format=Image.registered_extensions().get(suffix, "PNG"))
    return buffer.getvalue()


def _check_probability(prob: float) -> None:
    if not 0.0 <= prob <= 1.0:
        raise UnitsfaceError(f"--prob must be in [0, 1], got {prob}")


def mask_folder(src: str | os.PathLike, out: str | os.PathLike, prob: float = 1.0, seed: int = 0,
                detector=None) -> dict:
    """`src/<identity>/<img>` -> `out/<identity>/<img>`, each image masked with probability `prob`.

    Names, identities and formats are kept; an image left unmasked (and not aligned) is copied byte
    for byte. The tree is written to a temp folder beside `out` and renamed at the end: an error
    leaves nothing behind. Without a detector every image must be a 112×112 aligned crop.
    """
    _check_probability(prob)
    classes, items = list_image_folder(src)
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UnitsfaceError(f"{out} already exists and is not empty")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    masked = 0
    try:
        for name in classes:
            (tmp / name).mkdir(parents=True)
        for i, (path, label) in enumerate(items):
            data = path.read_bytes()
            face, drawn = _masked_image(data, str(path), [seed, i], prob, detector)
            masked += drawn
            (tmp / classes[label] / path.name).write_bytes(data if face is None else _encode_like(face, path.name))
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"identities": len(classes), "images": len(items), "masked": masked, "out": str(out)}


def mask_bin(src: str | os.PathLike, out: str | os.PathLike, prob: float = 1.0, seed: int = 0, detector=None) -> dict:
    """A `.bin` with the first image of each pair masked with probability `prob` (labels kept): masked
    probe against unmasked reference, as in the MFR Mask set."""
    _check_probability(prob)
    images, issame = load_bin(src)
    result, masked = list(images), 0
    for slot, data in enumerate(images):
        first = slot % 2 == 0
        face, drawn = _masked_image(data, f"{src} image {slot}", [seed, slot // 2], prob if first else 0.0, detector)
        masked += drawn
        if face is not None:
            result[slot] = encode_jpeg(face, 95) if is_jpeg(data) else encode_png(face)
    save_bin(out, result, issame)
    return {"bin": str(out), "pairs": len(issame), "masked": masked}
