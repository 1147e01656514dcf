"""`unitsface data`: make, convert and inspect training and verification data."""

from __future__ import annotations

import argparse

from unitsface.data.images import FACE_SIZE
from unitsface.errors import UnitsfaceError


def _print_report(report: dict) -> None:
    for key, value in report.items():
        print(f"{key}: {value}")


def _synth(args: argparse.Namespace) -> int:
    from unitsface.data.synthetic import write_synthetic_dataset  # heavy renderer: import on use

    report = write_synthetic_dataset(
        args.out,
        args.identities,
        args.images_per_identity,
        args.seed,
        image_size=args.image_size,
        val_identities=args.val_identities,
        val_pairs=args.val_pairs,
        heldout_identities=args.heldout_identities,
        heldout_images=args.heldout_images,
    )
    _print_report(report if isinstance(report, dict) else {"out": args.out})
    return 0


def _pack(args: argparse.Namespace) -> int:
    from unitsface.data.tools import pack

    _print_report(pack(args.src, args.out, args.workers, args.quality, args.image_size, args.root))
    return 0


def _import(args: argparse.Namespace) -> int:
    from unitsface.data.tools import import_images

    _print_report(import_images(args.src, args.out, args.workers, args.quality, args.image_size))
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from unitsface.data.tools import inspect

    _print_report(inspect(args.path, args.sheet, args.sheet_identities, args.sheet_images))
    return 0


def _make_bin(args: argparse.Namespace) -> int:
    from unitsface.data.tools import make_bin_from_folder, make_bin_from_pairs

    if args.pairs_file and not args.root:
        raise UnitsfaceError("make-bin --pairs-file needs --root, the folder of <name>/<name>_<nnnn>.jpg images")
    if args.from_folder:
        report = make_bin_from_folder(args.from_folder, args.out, args.pairs, args.seed, args.workers, args.image_size)
    else:
        report = make_bin_from_pairs(args.pairs_file, args.root, args.out, args.workers, args.image_size)
    _print_report(report)
    return 0


def _mask(args: argparse.Namespace) -> int:
    from pathlib import Path

    from unitsface.data.tools import mask_bin, mask_folder

    source = Path(args.src)
    if not (source.is_dir() or (source.suffix == ".bin" and source.is_file())):
        raise UnitsfaceError(f"mask source must be a folder of identities or an existing .bin file: {source}")
    if source.suffix == ".bin" and Path(args.out).suffix != ".bin":
        raise UnitsfaceError(f"a .bin is masked into a .bin; got output {args.out}")
    detector = None
    if args.align:
        from unitsface.detect import FaceDetector

        if not Path(args.align).is_file():
            raise UnitsfaceError(f"detector model not found: {args.align}")
        detector = FaceDetector(args.align)
    masker = mask_folder if source.is_dir() else mask_bin
    _print_report(masker(source, args.out, args.prob, args.seed, detector))
    return 0


def _conversion_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workers", type=int, default=1, help="encoder processes (default 1)")
    parser.add_argument("--image-size", type=int, default=FACE_SIZE, help="output side in pixels (default 112)")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("data", help="make, convert and inspect face data sets")
    commands = parser.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)

    synth = commands.add_parser("synth", help="write a synthetic face data set (train.rec, val.bin, heldout/)")
    synth.add_argument("--out", required=True, help="output folder")
    synth.add_argument("--identities", type=int, required=True)
    synth.add_argument("--images-per-identity", type=int, required=True)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--image-size", type=int, default=FACE_SIZE)
    synth.add_argument(
        "--val-identities", type=int, default=None, help="identities of the validation pairs (default: the generator's)"
    )
    synth.add_argument(
        "--val-pairs", type=int, default=None, help="number of validation pairs (default: the generator's)"
    )
    synth.add_argument("--heldout-identities", type=int, default=100,
                       help="identities of the held-out set heldout/<id>/<img>.jpg, scored all-pairs (default 100)")
    synth.add_argument("--heldout-images", type=int, default=8, help="images per held-out identity (default 8)")
    synth.set_defaults(func=_synth)

    pack = commands.add_parser("pack", help="image folder SRC/<identity>/<img> or im2rec .lst -> OUT/train.rec")
    pack.add_argument("src", help="image folder or .lst file")
    pack.add_argument("out", help="output folder for train.rec, train.idx, property")
    pack.add_argument("--root", default=None, help="image root of a .lst (default: the .lst's folder)")
    pack.add_argument("--quality", type=int, default=95, help="JPEG quality of re-encoded images (default 95)")
    _conversion_options(pack)
    pack.set_defaults(func=_pack)

    inspect = commands.add_parser("inspect", help="counts, labels and image size of a .rec folder or a .bin")
    inspect.add_argument("path", help="folder with train.rec/train.idx, a .rec file, or a .bin file")
    inspect.add_argument("--sheet", default=None, help="write a contact sheet PNG of a few identities here")
    inspect.add_argument("--sheet-identities", type=int, default=8)
    inspect.add_argument("--sheet-images", type=int, default=6, help="images per identity on the sheet")
    inspect.set_defaults(func=_inspect)

    make_bin = commands.add_parser("make-bin", help="verification pairs -> insightface .bin")
    make_bin.add_argument("out", help="output .bin file")
    source = make_bin.add_mutually_exclusive_group(required=True)
    source.add_argument("--pairs-file", help="LFW-style pairs.txt (images ROOT/<name>/<name>_<nnnn>.jpg)")
    source.add_argument("--from-folder", metavar="ROOT", help="draw random pairs from ROOT/<identity>/<img>")
    make_bin.add_argument("--root", help="image root for --pairs-file")
    make_bin.add_argument("--pairs", type=int, default=600, help="pairs to draw with --from-folder (default 600)")
    make_bin.add_argument("--seed", type=int, default=0)
    _conversion_options(make_bin)
    make_bin.set_defaults(func=_make_bin)

    mask = commands.add_parser("mask", help="draw face masks: a folder of identities, or the first image of each "
                                            ".bin pair (labels and layout kept)")
    mask.add_argument("src", help="SRC/<identity>/<img> (aligned 112×112 faces) or a .bin")
    mask.add_argument("out", help="output folder, or output .bin for a .bin")
    mask.add_argument("--prob", type=float, default=1.0, help="chance that an image gets a mask (default 1)")
    mask.add_argument("--seed", type=int, default=0)
    mask.add_argument("--align", metavar="DETECTOR.onnx", default=None,
                      help="detect and align faces with this YuNet model first (images of any size)")
    mask.set_defaults(func=_mask)

    import_ = commands.add_parser("import", help="PGM/PNG/JPEG tree of any size -> 112x112 RGB JPEG tree")
    import_.add_argument("src", help="SRC/<identity>/<img>")
    import_.add_argument("out", help="output folder OUT/<identity>/<img>.jpg")
    import_.add_argument("--quality", type=int, default=95)
    _conversion_options(import_)
    import_.set_defaults(func=_import)
