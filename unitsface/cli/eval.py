"""`unitsface eval`: verification .bin sets (default), IJB-B/C, MegaFace-style identification.

    unitsface eval --checkpoint CKPT --bin lfw.bin cfp_fp.bin agedb_30.bin [--json]
    unitsface eval --onnx MODEL.onnx --input-size 112 --normalize 127.5,127.5 --color rgb --bin ...
    unitsface eval ijb --root IJB_ROOT --name IJBC (--checkpoint CKPT | --onnx MODEL | --features F.npy)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("eval", help="evaluate a model on .bin sets (LFW, CFP-FP, AgeDB-30...), IJB")
    p.add_argument("protocol", nargs="?", default="bin", choices=("bin", "ijb"),
                   help="bin (default): insightface 10-fold .bin protocol; ijb: IJB-B/C 1:1")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", help="a unitsface checkpoint (.pt)")
    src.add_argument("--onnx", help="any ONNX face model (input N×3×H×W, output N×d)")
    src.add_argument("--features", help="ijb: precomputed N×2d features [image | flipped] (.npy)")
    p.add_argument("--bin", nargs="+", default=[], help="one or more insightface .bin verification sets")
    p.add_argument("--input-size", type=int, default=112, help="ONNX input size (square)")
    p.add_argument("--normalize", default=None, help="ONNX input normalisation 'mean,std' (default 127.5,127.5)")
    p.add_argument("--color", choices=("rgb", "bgr"), default=None, help="ONNX input channel order")
    p.add_argument("--no-flip", action="store_true", help="single pass instead of flip-sum embeddings")
    p.add_argument("--root", help="ijb: folder of the IJB release (meta/ and loose_crop/)")
    p.add_argument("--name", default="IJBC", help="ijb: IJBB or IJBC")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--out", default=None, help="also write report.md and roc.png into this folder")
    p.set_defaults(func=run)


def load_embedder(args: argparse.Namespace):
    from unitsface.errors import UnitsfaceError
    from unitsface.verifier import FaceVerifier

    if not (args.checkpoint or args.onnx):
        raise UnitsfaceError("give a model: --checkpoint CKPT or --onnx MODEL")
    options = {}
    if args.onnx:
        options["input_size"] = args.input_size
        if args.normalize:
            try:
                mean, std = (float(v) for v in args.normalize.split(","))
            except ValueError:
                raise UnitsfaceError(f"--normalize must be 'mean,std', got {args.normalize!r}") from None
            options["normalize"] = (mean, std)
        if args.color:
            options["color"] = args.color
    return FaceVerifier.load(args.checkpoint or args.onnx, **options)


def run(args: argparse.Namespace) -> int:
    from unitsface.errors import UnitsfaceError

    if args.protocol == "ijb":
        from unitsface.evaluation.ijb import run_ijb_cli

        results = run_ijb_cli(args)
        print(json.dumps(results) if args.json else results["table"])
        return 0
    if not args.bin:
        raise UnitsfaceError("give at least one verification set: --bin FILE.bin [FILE.bin ...]")
    from unitsface.data.bins import load_bin
    from unitsface.evaluation.report import format_table, jsonable, write_report
    from unitsface.evaluation.verification import evaluate_pairs

    verifier = load_embedder(args)
    results = {}
    for path in map(Path, args.bin):
        encoded, issame = load_bin(path)
        emb = verifier.embed_encoded(encoded, flip=not args.no_flip, batch_size=args.batch_size)
        results[path.stem] = evaluate_pairs(emb[0::2], emb[1::2], issame)
    if args.out:
        write_report(Path(args.out), results, {"model": args.checkpoint or args.onnx})
    if args.json:
        print(json.dumps({name: jsonable(r) for name, r in results.items()}))
    else:
        print(format_table(results))
    return 0

