"""`unitsface eval`: verification sets (default), IJB-B/C 1:1, MegaFace-style identification.

    unitsface eval --checkpoint CKPT --bin lfw.bin cfp_fp.bin agedb_30.bin [--json] [--out DIR]
    unitsface eval --onnx MODEL.onnx --input-size 112 --normalize 127.5,127.5 --color rgb --bin ...
    unitsface eval --checkpoint CKPT --pairs pairs.txt --pairs-root LFW_ALIGNED/   (LFW View 2, 10 folds)
    unitsface eval --onnx MODEL.onnx --images-root FACES/   (every pair of FACES/<identity>/<img>)
    unitsface eval ijb --root IJB_ROOT --name IJBC (--checkpoint CKPT | --onnx MODEL | --features F.npy)
    unitsface eval megaface --probe P.npy --probe-labels L.npy --distractors D.npy [D2.npy ...]
    unitsface eval mfr --onnx MODEL.onnx --images-root FACES/ [--align YUNET.onnx] [--groups G.txt] --no-flip
    unitsface eval mfr --checkpoint CKPT (--rec DIR | --synthetic 200) [--json] [--out DIR]

Every model path goes through an `Embedder`, so checkpoints and third-party ONNX graphs are embedded
and scored the same way; `--normalize`, `--color` and `--input-size` describe what an ONNX graph wants.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from unitsface.errors import UnitsfaceError

if TYPE_CHECKING:
    from unitsface.embedder import Embedder

FILE_CHUNK = 1024  # image files decoded and embedded at once


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("eval", help="evaluate a model: .bin sets, LFW pairs, image folders, IJB, MegaFace, MFR")
    p.add_argument("protocol", nargs="?", default="bin", choices=("bin", "ijb", "megaface", "mfr"),
                   help="bin (default): pair verification (--bin, --pairs, --images-root); ijb: IJB-B/C 1:1; "
                        "megaface: MegaFace-style identification; mfr: masked-face Mask and All sets")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", help="a unitsface checkpoint (.pt)")
    src.add_argument("--onnx", help="any ONNX face model (input N×3×H×W, output N×d)")
    src.add_argument("--features", help="ijb: precomputed N×2d features [image | flipped] (.npy)")
    p.add_argument("--input-size", type=int, default=112, help="ONNX input size (square)")
    p.add_argument("--normalize", default=None, help="ONNX input normalisation 'mean,std' (default 127.5,127.5)")
    p.add_argument("--color", choices=("rgb", "bgr"), default=None, help="ONNX input channel order")
    p.add_argument("--no-flip", action="store_true",
                   help="single pass instead of flip-sum embeddings (ijb: no mirror images, flip=none modes)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")

    v = p.add_argument_group("bin protocol (pair verification)")
    v.add_argument("--bin", nargs="+", default=[], help="one or more insightface .bin verification sets")
    v.add_argument("--pairs", help="LFW-style pairs.txt (View 2: its sets are the 10 folds)")
    v.add_argument("--pairs-root", help="image root of --pairs: <root>/<name>/<name>_<nnnn>.jpg")
    v.add_argument("--images-root", nargs="+", default=[], metavar="DIR",
                   help="folders of identities <DIR>/<identity>/<img>: every pair scored (AUC, EER, TAR@FAR)")
    v.add_argument("--resize", choices=("pad", "stretch"), default="pad",
                   help="how image files of another size become the model's square input: scale to fit on "
                        "black (pad, default) or resize the whole image (stretch)")
    v.add_argument("--out", default=None, help="also write report.md and roc.png (bin and pairs sets, mfr) here")

    ijb = p.add_argument_group("ijb protocol")
    ijb.add_argument("--root", help="folder of the IJB release (<root>/<name>/meta and loose_crop)")
    ijb.add_argument("--name", default="IJBC", help="IJBB or IJBC")
    ijb.add_argument("--mode", default=None, help="test mode, e.g. N1D1F1 or flip=sum,image_norm=keep,faceness=on "
                                                  "(default: insightface's N1D1F1)")
    ijb.add_argument("--all-modes", action="store_true", help="score all 8 flip/norm/faceness combinations")
    ijb.add_argument("--save-features", help="write the N×2d [image | flipped] features to this .npy")
    ijb.add_argument("--workers", type=int, default=1, help="processes aligning loose crops")

    mf = p.add_argument_group("megaface protocol")
    mf.add_argument("--probe", help="probe features (.npy) or a folder <identity>/<img> embedded with the model")
    mf.add_argument("--probe-labels", help="identity of each probe row (.npy), with a .npy --probe")
    mf.add_argument("--distractors", nargs="+", default=[],
                    help="distractor features (.npy, memory-mapped) or image folders embedded with the model")
    mf.add_argument("--ranks", default="1", help="identification ranks, e.g. 1,10")
    mf.add_argument("--far", type=float, default=1e-6, help="FAR of the verification TAR (default 1e-6)")

    mfr = p.add_argument_group("mfr protocol (faces from --images-root DIR, --rec or --synthetic)")
    mfr.add_argument("--rec", metavar="DIR", help="a train.rec/train.idx face set")
    mfr.add_argument("--synthetic", type=int, metavar="N", help="N held-out synthetic identities, rendered in memory")
    mfr.add_argument("--synthetic-images", type=int, default=8, help="images per synthetic identity (default 8)")
    mfr.add_argument("--synthetic-seed", type=int, default=0, help="seed of the synthetic set (default 0, the demo's)")
    mfr.add_argument("--align", metavar="DETECTOR.onnx",
                     help="detect five landmarks with this YuNet model and align; without it images must be "
                          "112×112 aligned crops")
    mfr.add_argument("--groups", metavar="FILE", help="lines 'identity group': one All-set row per group")
    mfr.add_argument("--seed", type=int, default=0, help="seed of the rendered masks (default 0)")
    p.set_defaults(func=run)


# ------------------------------------------------------------------------------------------ embedding
def load_embedder(args: argparse.Namespace) -> Embedder:
    from unitsface.cli.verify import parse_normalize
    from unitsface.embedder import Embedder

    if not (args.checkpoint or args.onnx):
        raise UnitsfaceError("give a model: --checkpoint CKPT or --onnx MODEL")
    options = {}
    if args.onnx:
        options["input_size"] = args.input_size
        if args.normalize:
            options["normalize"] = parse_normalize(args.normalize)
        if args.color:
            options["color"] = args.color
    return Embedder.load(args.checkpoint or args.onnx, **options)


def fit_face(image: np.ndarray, size: int, resize: str) -> np.ndarray:
    """An RGB image as the model's size×size input: "pad" keeps the aspect (black borders, like the rest
    of unitsface), "stretch" resizes the whole frame bilinearly (how model READMEs often feed raw sets)."""
    from PIL import Image

    from unitsface.data.images import to_face_image

    if resize == "pad" or image.shape[:2] == (size, size):
        return to_face_image(image, size)
    return np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))


def embed_files(embedder: Embedder, paths: Sequence[Path], flip: bool, batch_size: int,
                resize: str = "pad") -> np.ndarray:
    """Raw (flip-sum unless flip=False) embeddings of image files, FILE_CHUNK files in memory at a time."""
    from unitsface.data.images import load_image

    parts = []
    for a in range(0, len(paths), FILE_CHUNK):
        faces = np.stack([fit_face(load_image(p), embedder.size, resize) for p in paths[a : a + FILE_CHUNK]])
        parts.append(embedder.raw_embeddings(faces, flip, batch_size))
    return np.concatenate(parts)


def embed_identity_folder(embedder: Embedder, root: str | Path, flip: bool, batch_size: int,
                          resize: str = "pad") -> tuple[np.ndarray, np.ndarray]:
    """(embeddings, class index) of every image of a `root/<identity>/<img>` tree."""
    from unitsface.data.images import list_image_folder

    if not Path(root).is_dir():
        raise UnitsfaceError(f"image folder not found: {root}")
    _, items = list_image_folder(root)
    emb = embed_files(embedder, [p for p, _ in items], flip, batch_size, resize)
    return emb, np.array([label for _, label in items])


# ------------------------------------------------------------------------------------ bin protocol
def _pair_results(args: argparse.Namespace, embedder: Embedder) -> dict[str, dict]:
    """evaluate_pairs results of every --bin set and of the --pairs list, by set name.

    Every file is read and checked before the first image is embedded: a bad last set fails at once.
    """
    from unitsface.data.bins import load_bin
    from unitsface.evaluation.verification import evaluate_pairs, read_lfw_pairs

    flip = not args.no_flip
    sets = {path.stem: load_bin(path) for path in map(Path, args.bin)}
    if args.pairs:
        pairs, root = read_lfw_pairs(args.pairs), Path(args.pairs_root)
        distinct = list(dict.fromkeys(pairs.paths1 + pairs.paths2))
        missing = [name for name in distinct if not (root / name).is_file()]
        if missing:
            raise UnitsfaceError(f"{len(missing)} images named by {args.pairs} are missing, e.g. {root / missing[0]}")
    results = {}
    for name, (encoded, issame) in sets.items():
        emb = embedder.embed_encoded(encoded, flip=flip, batch_size=args.batch_size)
        results[name] = evaluate_pairs(emb[0::2], emb[1::2], issame)
    if args.pairs:
        emb = embed_files(embedder, [root / name for name in distinct], flip, args.batch_size, args.resize)
        row = {name: i for i, name in enumerate(distinct)}
        e1, e2 = emb[[row[n] for n in pairs.paths1]], emb[[row[n] for n in pairs.paths2]]
        results[root.name or "pairs"] = evaluate_pairs(e1, e2, pairs.issame, folds=pairs.folds)
    return results


def _run_pairs(args: argparse.Namespace) -> int:
    from unitsface.evaluation.report import format_all_pairs, format_table, jsonable, write_report
    from unitsface.evaluation.verification import evaluate_all_pairs

    if not (args.bin or args.pairs or args.images_root):
        raise UnitsfaceError("give something to evaluate on: --bin FILE.bin [...], --pairs pairs.txt "
                             "--pairs-root DIR, or --images-root DIR")
    if bool(args.pairs) != bool(args.pairs_root):
        raise UnitsfaceError("--pairs and --pairs-root go together (the list and the folder of its images)")
    if args.out and not (args.bin or args.pairs):
        raise UnitsfaceError("--out writes the 10-fold report of --bin/--pairs sets; there are none")
    missing = [root for root in args.images_root if not Path(root).is_dir()]
    if missing:
        raise UnitsfaceError(f"image folder not found: {missing[0]}")
    embedder = load_embedder(args)
    pair_results = _pair_results(args, embedder)
    folder_results = {}
    for root in args.images_root:
        emb, labels = embed_identity_folder(embedder, root, not args.no_flip, args.batch_size, args.resize)
        folder_results[Path(root).name] = evaluate_all_pairs(emb, labels)
    if args.out:
        write_report(Path(args.out), pair_results, {"model": args.checkpoint or args.onnx})
    if args.json:
        print(json.dumps({name: jsonable(r) for name, r in {**pair_results, **folder_results}.items()}))
    else:
        print("\n\n".join(([format_table(pair_results)] if pair_results else [])
                          + ([format_all_pairs(folder_results, not args.no_flip)] if folder_results else [])))
    return 0


# ------------------------------------------------------------------------------------------------ ijb
def _run_ijb(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from unitsface.evaluation.ijb import ijb_mode
    from unitsface.evaluation.ijb_cli import ijb_json, read_release, run_ijb

    if not args.root:
        raise UnitsfaceError("eval ijb needs --root, the folder of the IJB release")
    mode = ijb_mode(args.mode) if args.mode else None
    meta = read_release(args.root, args.name)  # bad meta files fail before a model is loaded
    embedder = None if args.features else load_embedder(args)
    quiet = True if args.features else None  # None: a bar on a terminal only
    with tqdm(total=len(meta.image_names), unit="img", desc="embedding", disable=quiet) as bar:
        out = run_ijb(meta, args.name, embedder, args.features, args.save_features, mode, args.all_modes,
                      not args.no_flip, args.batch_size, args.workers, bar.update)
    print(json.dumps(ijb_json(out)) if args.json else out["table"])
    return 0


# ------------------------------------------------------------------------------------------- megaface
def _npy(path: str | Path, what: str, mmap: bool = False) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False, mmap_mode="r" if mmap else None)
    except FileNotFoundError:
        raise UnitsfaceError(f"{what} file not found: {path}") from None
    except (ValueError, OSError) as exc:
        raise UnitsfaceError(f"{what} {path} is not a readable .npy array: {exc}") from None


def _megaface_inputs(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """(probe features, probe identities, distractor blocks) from .npy files or image folders."""
    from unitsface.data.images import list_images

    if not args.probe or not args.distractors:
        raise UnitsfaceError("eval megaface needs --probe and --distractors")
    folders = [s for s in [args.probe, *args.distractors] if Path(s).is_dir()]
    embedder = load_embedder(args) if folders else None
    flip = not args.no_flip
    if Path(args.probe).is_dir():
        probe, labels = embed_identity_folder(embedder, args.probe, flip, args.batch_size)
    else:
        if not args.probe_labels:
            raise UnitsfaceError("a .npy --probe needs --probe-labels LABELS.npy (one identity per row)")
        probe, labels = _npy(args.probe, "probe features"), _npy(args.probe_labels, "probe labels")
    distractors = [embed_files(embedder, list_images(s), flip, args.batch_size) if Path(s).is_dir()
                   else _npy(s, "distractor features", mmap=True) for s in args.distractors]
    for source, block in zip(args.distractors, distractors):
        if block.ndim != 2:
            raise UnitsfaceError(f"distractor features {source} must be a 2-D (n, d) array, got shape {block.shape}")
    return probe, labels, distractors


def format_megaface(r: dict) -> str:
    from unitsface.evaluation.report import markdown_table, pct

    head = (["probes", "identities", "distractors"] + [f"rank-{k} (%)" for k in r["identification"]]
            + [f"TAR@FAR={f:g} (%)" for f in r["tar_at_far"]] + ["variant"])
    row = ([str(r["n_probes"]), str(r["n_identities"]), str(r["n_distractors"])]
           + [pct(v) for v in r["identification"].values()] + [pct(v) for v in r["tar_at_far"].values()]
           + [r["variant"]])
    return markdown_table(head, [row]) + "\n\nMegaFace Challenge 1 style: rank-k over ordered same-identity " \
                                         "probe pairs against all distractors; TAR with probe-distractor impostors."


def _run_megaface(args: argparse.Namespace) -> int:
    from unitsface.evaluation.megaface import evaluate_megaface
    from unitsface.evaluation.report import jsonable

    try:
        ranks = sorted({int(k) for k in args.ranks.split(",")})
    except ValueError:
        raise UnitsfaceError(f"--ranks must be comma-separated integers, got {args.ranks!r}") from None
    if ranks[0] < 1 or not 0 < args.far < 1:
        raise UnitsfaceError(f"ranks must be >= 1 and --far in (0, 1); got {args.ranks!r} and {args.far}")
    probe, labels, distractors = _megaface_inputs(args)
    result = evaluate_megaface(probe, labels, distractors, ranks=ranks, far=args.far)
    print(json.dumps(jsonable(result)) if args.json else format_megaface(result))
    return 0


# ------------------------------------------------------------------------------------------------ mfr
def _run_mfr(args: argparse.Namespace) -> int:
    from unitsface.evaluation.mfr_cli import format_mfr, read_groups, run_mfr, sources, write_mfr_report
    from unitsface.evaluation.report import jsonable

    faces = sources(args.images_root, args.rec, args.synthetic, args.synthetic_images, args.synthetic_seed)
    groups = read_groups(args.groups) if args.groups else None
    if args.align and not Path(args.align).is_file():
        raise UnitsfaceError(f"detector model not found: {args.align}")
    embedder = load_embedder(args)
    detector = None
    if args.align:
        from unitsface.detect import FaceDetector

        detector = FaceDetector(args.align)
    result = run_mfr(faces, embedder, detector, groups, not args.no_flip, args.batch_size, args.seed,
                     roc=bool(args.out))
    if args.out:
        write_mfr_report(args.out, result, {"model": args.checkpoint or args.onnx, "detector": args.align or "—"})
    print(json.dumps(jsonable(result)) if args.json else format_mfr(result))
    return 0


def run(args: argparse.Namespace) -> int:
    return {"bin": _run_pairs, "ijb": _run_ijb, "megaface": _run_megaface, "mfr": _run_mfr}[args.protocol](args)
