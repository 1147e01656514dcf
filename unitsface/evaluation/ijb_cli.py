"""IJB-B / IJB-C 1:1 from the official release folder: align, embed, pool, score (evaluation.md §5).

`run_ijb` is what `unitsface eval ijb` runs. From a model it aligns every loose crop to the 112×112
template with its five landmarks, embeds the face and its mirror image ([image | flipped], the N×2d
layout `evaluate_ijb` and insightface's feature files use) and can save those features, so that the
expensive part runs once and every test mode is re-scored from the `.npy` in seconds (`features=`).
Everything is checked before the first image is embedded (meta files line up, every image exists), and
a features file is written only when complete, so a bad release fails in seconds and leaves nothing.
"""

from __future__ import annotations

import itertools
import multiprocessing
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np

from unitsface.align import align_face
from unitsface.data.images import load_image
from unitsface.embedder import Embedder
from unitsface.errors import UnitsfaceError
from unitsface.evaluation.ijb import IJBMeta, evaluate_ijb, read_ijb_meta
from unitsface.evaluation.report import format_ijb_table, jsonable
from unitsface.io import atomic_open

IJB_NAMES = ("IJBB", "IJBC")
DEFAULT_MODE = {"flip": True, "norm_score": True, "detector_score": True}  # insightface's N1D1F1
ALIGN_CHUNK = 1024  # loose crops aligned and embedded at once (1024 × 112² × 3 bytes = 37 MiB of faces)


def read_release(root: str | Path, name: str) -> IJBMeta:
    """The 1:1 meta data of `<root>/<name>` (or `<root>` itself when it holds `meta/`), checked."""
    name = name.upper()
    if name not in IJB_NAMES:
        raise UnitsfaceError(f"IJB set must be one of {', '.join(IJB_NAMES)}, got {name!r}")
    if not Path(root).is_dir():
        raise UnitsfaceError(f"IJB root folder not found: {root}")
    return read_ijb_meta(root, name)


def image_paths(meta: IJBMeta) -> list[Path]:
    """Every loose crop the meta files name; an error naming the first missing one (and how many are)."""
    if not meta.image_dir.is_dir():
        raise UnitsfaceError(f"IJB image folder not found: {meta.image_dir} (the release's loose_crop/)")
    paths = [meta.image_dir / n for n in meta.image_names]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise UnitsfaceError(f"{len(missing)} of {len(paths)} IJB images are missing, e.g. {missing[0]}")
    return paths


def aligned_face(task: tuple[Path, np.ndarray, int]) -> np.ndarray:
    """One loose crop aligned to the size×size template by its five landmarks (RGB uint8)."""
    path, landmarks, size = task
    return align_face(load_image(path), landmarks, size)


def _aligned_chunks(tasks: Sequence[tuple[Path, np.ndarray, int]], workers: int) -> Iterator[np.ndarray]:
    """Aligned faces, ALIGN_CHUNK at a time; one process pool for the whole run when workers > 1, and
    never more than one chunk of faces in memory (an IJB-C worth of faces would be 18 GB)."""
    chunks = (tasks[a : a + ALIGN_CHUNK] for a in range(0, len(tasks), ALIGN_CHUNK))
    if workers <= 1:
        yield from (np.stack([aligned_face(t) for t in chunk]) for chunk in chunks)
        return
    with multiprocessing.Pool(workers) as pool:
        yield from (np.stack(pool.map(aligned_face, chunk, chunksize=16)) for chunk in chunks)


def embed_ijb(
    meta: IJBMeta,
    embedder: Embedder,
    flip: bool = True,
    batch_size: int = 64,
    workers: int = 1,
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """N×2d float32 features [f(aligned image) | f(its mirror image)], row i = meta.image_names[i].

    With `flip=False` the mirror image is not embedded and its half repeats f: every test mode then
    scores as flip=none (the sum 2f normalises to the same template features).
    """
    paths = image_paths(meta)
    tasks = [(p, lm, embedder.size) for p, lm in zip(paths, meta.landmarks)]
    out: np.ndarray | None = None  # allocated once d is known: IJB-C at d=512 is 1.9 GB, never held twice
    done = 0
    for faces in _aligned_chunks(tasks, workers):
        f = embedder.raw_embeddings(faces, flip=False, batch_size=batch_size)
        if flip:
            mirrored = embedder.raw_embeddings(np.ascontiguousarray(faces[:, :, ::-1]), flip=False,
                                               batch_size=batch_size)
        else:
            mirrored = f
        if out is None:
            out = np.empty((len(tasks), 2 * f.shape[1]), dtype=np.float32)
        out[done : done + len(faces)] = np.hstack([f, mirrored])
        done += len(faces)
        if progress is not None:
            progress(len(faces))
    return out


def load_features(path: str | Path, n_images: int) -> np.ndarray:
    """A precomputed N×2d features file (.npy) that must have one row per meta image."""
    path = Path(path)
    if not path.is_file():
        raise UnitsfaceError(f"features file not found: {path}")
    try:
        features = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise UnitsfaceError(f"{path} is not a readable .npy array: {exc}") from None
    if features.ndim != 2 or len(features) != n_images:
        raise UnitsfaceError(f"{path} has shape {features.shape} but the meta files list {n_images} images "
                             "(expected one [image | flipped] row per image)")
    return features


def _check_writable(path: Path) -> None:
    if not path.parent.is_dir():
        raise UnitsfaceError(f"folder of --save-features does not exist: {path.parent}")


def save_features(path: str | Path, features: np.ndarray) -> Path:
    """Write the features .npy atomically: a run stopped midway leaves no truncated file."""
    path = Path(path)
    _check_writable(path)
    with atomic_open(path) as fh:
        np.save(fh, features, allow_pickle=False)
    return path


def ijb_modes(default: dict[str, bool], all_modes: bool, flip_available: bool) -> list[dict[str, bool]]:
    """The test modes to score: the default one, or all 8 (flip=sum only when mirror features exist)."""
    if not all_modes:
        return [default]
    flips = (True, False) if flip_available else (False,)
    return [{"flip": f, "norm_score": n, "detector_score": d}
            for f, n, d in itertools.product(flips, (True, False), (True, False))]


def mode_letters(mode: dict[str, bool]) -> str:
    """eval_ijbc letters of a mode ("N1D1F1"), the short key of a result."""
    return f"N{mode['norm_score']:d}D{mode['detector_score']:d}F{mode['flip']:d}"


def run_ijb(
    meta: IJBMeta,
    name: str,
    embedder: Embedder | None = None,
    features: str | Path | None = None,
    save_to: str | Path | None = None,
    mode: dict[str, bool] | None = None,
    all_modes: bool = False,
    flip: bool = True,
    batch_size: int = 64,
    workers: int = 1,
    progress: Callable[[int], None] | None = None,
) -> dict:
    """IJB 1:1 of a release (`read_release`) for a model (`embedder`) or a features file; returns {"set",
    "n_images", "results": {letters: evaluate_ijb result}, "table"}. `flip=False`: no mirror images."""
    if (embedder is None) == (features is None):
        raise UnitsfaceError("IJB needs exactly one source: a model (--checkpoint/--onnx) or --features FILE.npy")
    if save_to is not None and embedder is None:
        raise UnitsfaceError("--save-features needs a model to embed with; the features given are already saved")
    if save_to is not None:
        _check_writable(Path(save_to))  # before hours of embedding, not after
    if embedder is not None:
        feats = embed_ijb(meta, embedder, flip, batch_size, workers, progress)
        if save_to is not None:
            save_features(save_to, feats)
    else:
        feats = load_features(features, len(meta.image_names))
    default = dict(mode or DEFAULT_MODE)
    if not flip:
        default["flip"] = False
    results = {}
    for m in ijb_modes(default, all_modes, flip):
        results[mode_letters(m)] = evaluate_ijb(feats, meta.faceness, meta.templates, meta.medias,
                                                meta.p1, meta.p2, meta.labels, **m)
    label = name.upper()
    table = format_ijb_table({f"{label} {k}": r for k, r in results.items()})
    return {"set": label, "n_images": len(meta.image_names), "results": results, "table": table}


def ijb_json(run: dict) -> dict:
    """`run_ijb`'s output as plain JSON (no table, no ROC arrays)."""
    return {k: jsonable(v) for k, v in run.items() if k != "table"}
