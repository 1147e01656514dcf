"""What `unitsface eval mfr` runs: faces from a folder, a `.rec` set or held-out synthetic identities ->
aligned crops -> one rendered-mask probe per identity -> embeddings -> `evaluate_mfr` -> table/report.

Faces are read, aligned (with `--align DETECTOR.onnx`; otherwise they must be 112×112 aligned crops)
and embedded FACE_CHUNK at a time, so only embeddings are kept. Each identity's probe is its first
image in listing order; its mask is drawn from a generator keyed by (seed, identity position), so a
set scores the same whatever the chunking. Everything that can be checked without a model (image
counts per identity, the groups file) is checked before the first image is embedded.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from unitsface.align import template
from unitsface.data.images import decode, list_image_folder, load_image
from unitsface.data.masks import MaskParams, render_masks, sample_masks
from unitsface.data.recordio import IndexedRecordIO, resolve_record_paths, scan_dataset, unpack
from unitsface.data.synthetic import HELDOUT_SPLIT, render_identities
from unitsface.detect import FaceDetector, face_crop
from unitsface.errors import UnitsfaceError
from unitsface.evaluation.mfr import ALL_FARS, MASK_FAR, check_sets, evaluate_mfr
from unitsface.evaluation.report import jsonable, markdown_table, pct, plot_roc
from unitsface.io import atomic_write

if TYPE_CHECKING:
    from unitsface.embedder import Embedder

FACE_CHUNK = 1024  # faces decoded, aligned and embedded at once
MFR_SIZE = 112


@dataclass
class FaceSet:
    """Images by identity, loaded on demand: (identity name, source name for messages, loader)."""

    name: str
    items: list[tuple[str, str, Callable[[], np.ndarray]]]

    @property
    def labels(self) -> np.ndarray:
        return np.array([identity for identity, _, _ in self.items])


def folder_set(root: str | Path) -> FaceSet:
    """`root/<identity>/<img>` (identities with no image are simply absent)."""
    classes, items = list_image_folder(root)
    return FaceSet(Path(root).name, [(classes[label], str(path), lambda p=path: load_image(p))
                                     for path, label in items])


def record_set(folder: str | Path) -> FaceSet:
    """A train.rec/train.idx set; identities are the integer labels, written as text."""
    idx, rec = resolve_record_paths(folder)
    index = scan_dataset(folder)
    reader = IndexedRecordIO(idx, rec)

    def load(key: int) -> np.ndarray:
        return decode(unpack(reader.read(key), f"{rec} key {key}")[1], f"{rec} key {key}")

    items = [(str(int(label)), f"{rec} key {key}", lambda k=int(key): load(k))
             for key, label in zip(index.keys, index.labels)]
    return FaceSet(Path(folder).name or rec.stem, items)


def synthetic_set(identities: int, images: int, seed: int) -> FaceSet:
    """Held-out synthetic identities (render split 2, disjoint from training and val.bin), in memory."""
    if identities < 2 or images < 2:
        raise UnitsfaceError(f"--synthetic needs 2+ identities of 2+ images, got {identities} × {images}")
    faces, labels = render_identities(seed, HELDOUT_SPLIT, identities, images)
    items = [(str(label), f"synthetic identity {label} image {i % images}", lambda f=face: f)
             for i, (face, label) in enumerate(zip(faces, labels))]
    return FaceSet(f"synthetic-heldout-s{seed}", items)


def read_groups(path: str | Path) -> dict[str, list[str]]:
    """A groups file: one `identity group` per line (the last comma or whitespace splits them; '#'
    starts a comment line) -> group name -> identities, in file order."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise UnitsfaceError(f"cannot read groups file {path}: {exc.strerror or exc}") from None
    groups: dict[str, list[str]] = {}
    for number, line in enumerate(lines, 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        parts = text.rsplit(",", 1) if "," in text else text.rsplit(None, 1)
        if len(parts) != 2 or not parts[0].strip() or not parts[1].strip():
            raise UnitsfaceError(f"{path} line {number}: expected 'identity group', got {line!r}")
        groups.setdefault(parts[1].strip(), []).append(parts[0].strip())
    if not groups:
        raise UnitsfaceError(f"groups file {path} names no identity")
    return groups


def _chunks(n: int) -> Iterator[slice]:
    for a in range(0, n, FACE_CHUNK):
        yield slice(a, min(n, a + FACE_CHUNK))


def embed_set(faces: FaceSet, embedder: Embedder, detector: FaceDetector | None, flip: bool, batch_size: int,
              seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, int]]:
    """(unmasked embeddings of every face, probe rows, embeddings of the masked probes, and with a
    detector how many faces it aligned and found no face in)."""
    if embedder.size != MFR_SIZE:
        raise UnitsfaceError(f"the MFR protocol feeds {MFR_SIZE}×{MFR_SIZE} faces; {embedder.name} takes "
                             f"{embedder.size}×{embedder.size}")
    labels = faces.labels
    _, first = np.unique(labels, return_index=True)
    probe_rows = np.sort(first)  # each identity's first image, in listing order
    probe_of = {int(row): i for i, row in enumerate(probe_rows)}
    features, masked = [], []
    found = missing = 0
    for part in _chunks(len(faces.items)):
        crops, marks = [], []
        for _, source, load in faces.items[part]:
            crop, landmarks = face_crop(load(), source, detector, MFR_SIZE)
            crops.append(crop)
            marks.append(template(MFR_SIZE) if landmarks is None else landmarks)
            if landmarks is not None:
                found += 1
            elif detector is not None:
                missing += 1
        batch = np.stack(crops)
        features.append(embedder.raw_embeddings(batch, flip, batch_size))
        rows = [r for r in range(part.start, part.stop) if r in probe_of]
        if rows:
            local = np.asarray(rows) - part.start
            params = MaskParams.concat([sample_masks(np.random.default_rng([seed, probe_of[r]]), 1) for r in rows])
            drawn = render_masks(batch[local], params, np.stack(marks)[local])
            masked.append(embedder.raw_embeddings(drawn, flip, batch_size))
    counts = {"aligned": found, "no_face_found": missing} if detector is not None else {}
    return np.concatenate(features), probe_rows, np.concatenate(masked), counts


def run_mfr(faces: FaceSet, embedder: Embedder, detector: FaceDetector | None, groups: dict[str, list[str]] | None,
            flip: bool, batch_size: int, seed: int, roc: bool = False) -> dict[str, Any]:
    """The checks, the embeddings and `evaluate_mfr` of one face set."""
    labels = faces.labels
    check_sets(labels, groups)  # before any image is embedded
    features, probe_rows, masked, counts = embed_set(faces, embedder, detector, flip, batch_size, seed)
    result = evaluate_mfr(features, labels, probe_rows, masked, groups, roc)
    result.update(set=faces.name, flip=flip, mask_seed=seed, faces=counts)
    return result


def _rows(result: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    named = [("Mask (masked probe vs unmasked)", result["mask"]), ("Mask pairs, probes unmasked", result["unmasked"]),
             ("All (every pair, unmasked)", result["all"])]
    return named + [(f"group {g} (all pairs)", r) for g, r in result["groups"].items()]


def format_mfr(result: dict[str, Any]) -> str:
    """The MFR table: pairs and exact TAR at each protocol FAR, the ranking score, and the notes."""
    fars = (MASK_FAR, *[f for f in ALL_FARS if f != MASK_FAR])
    head = ["set", "genuine pairs", "impostor pairs"] + [f"TAR@FAR≤{f:g} (%)" for f in fars]
    rows, coarse = [], False
    for name, r in _rows(result):
        cells = []
        for f in fars:
            value = r["tar_at_far"].get(f)
            below = value is not None and f * r["n_impostor"] < 1
            coarse |= below
            cells.append(pct(value) + ("*" if below else ""))
        rows.append([name, str(r["n_genuine"]), str(r["n_impostor"])] + cells)
    faces = result.get("faces") or {}
    notes = [f"{result['set']}: {result['n_images']} images of {result['n_identities']} identities"
             + (f"; {faces['aligned']} aligned by detected landmarks, {faces['no_face_found']} with no face found "
                "(scaled to fit, template landmarks)" if faces else "") + ".",
             f"Score = 0.25 · TAR(Mask @ 1e-4) + 0.75 · TAR(All @ 1e-6) = {100 * result['score']:.2f}.",
             f"Exact over every pair: cosine of {'flip-sum' if result['flip'] else 'single-pass'} embeddings "
             f"(the MFR server used single-pass: --no-flip), accept s ≥ t, TAR at the lowest threshold with "
             f"FAR ≤ target; one rendered mask per identity's first image (seed {result['mask_seed']})."]
    if coarse:
        notes.append("* FAR target below 1/(impostor pairs): the reading allows no false accept at all.")
    return markdown_table(head, rows) + "\n\n" + "\n".join(notes)


def write_mfr_report(out: str | Path, result: dict[str, Any], extra: dict[str, Any]) -> Path:
    """report.md, roc.png and metrics.json of one `eval mfr` run (the ROCs need roc=True results)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    curves = {name: (r["roc"]["fpr"], r["roc"]["tpr"]) for name, r in _rows(result)}
    plot_roc(curves, out / "roc.png", title=f"MFR protocol on {result['set']}")
    lines = ["# MFR protocol report", "", format_mfr(result), "", "## Run", "", "| key | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in extra.items()]
    lines += ["", "![ROC](roc.png) — exact at the 65,536 histogram bin edges of the scores.", ""]
    atomic_write(out / "metrics.json", json.dumps({"results": jsonable(result), "extra": jsonable(extra)}, indent=1)
                 + "\n")
    atomic_write(out / "report.md", "\n".join(lines))
    return out / "report.md"


def sources(images_root: Sequence[str], rec: str | None, synthetic: int | None, synthetic_images: int,
            synthetic_seed: int) -> FaceSet:
    """The one face set `eval mfr` was given."""
    given = [bool(images_root), rec is not None, synthetic is not None]
    if sum(given) != 1 or len(images_root) > 1:
        raise UnitsfaceError("eval mfr takes one face set: --images-root DIR, --rec DIR or --synthetic N")
    if images_root:
        if not Path(images_root[0]).is_dir():
            raise UnitsfaceError(f"image folder not found: {images_root[0]}")
        return folder_set(images_root[0])
    if rec is not None:
        return record_set(rec)
    return synthetic_set(int(synthetic), synthetic_images, synthetic_seed)
