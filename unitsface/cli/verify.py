"""`unitsface verify`: are two faces the same person? One JSON line per pair.

    unitsface verify A.jpg B.jpg --model model.pt
    unitsface verify --pairs pairs.txt --model model.onnx [--threshold 0.3]

Also home of the model options every deployment command shares (`add_model_arguments`,
`load_verifier`), so that embed, calibrate, verify and serve read a model the same way.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from unitsface.errors import UnitsfaceError


def add_model_arguments(parser: argparse.ArgumentParser, threshold: bool = True) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", required=True, help="a unitsface checkpoint (.pt) or an ONNX graph (.onnx)")
    group.add_argument("--input-size", type=int, default=None, help="third-party ONNX: square input size")
    group.add_argument("--normalize", default=None, metavar="MEAN,STD",
                       help="third-party ONNX: input (x - mean) / std in 0..255 units; 'mean,std' or "
                            "'m1,m2,m3,s1,s2,s3' per channel (default 127.5,127.5)")
    group.add_argument("--color", choices=("rgb", "bgr"), default=None, help="third-party ONNX: channel order")
    group.add_argument("--batch-size", type=int, default=32)
    if threshold:
        group.add_argument("--threshold", type=float, default=None,
                           help="decide with this cosine threshold instead of the calibrated or learned one")


def parse_normalize(text: str) -> tuple[Any, Any]:
    """'mean,std' or six numbers (three means, three stds) -> (mean, std)."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) == 2:
        return values[0], values[1]
    if len(values) == 6:
        return values[:3], values[3:]
    raise UnitsfaceError(f"--normalize must be 'mean,std' or 'm1,m2,m3,s1,s2,s3', got {text!r}")


def load_verifier(args: argparse.Namespace, calibration: bool = True):
    """The FaceVerifier that `add_model_arguments`' options describe."""
    from unitsface.verifier import FaceVerifier

    if args.batch_size < 1:
        raise UnitsfaceError(f"--batch-size must be ≥ 1, got {args.batch_size}")
    return FaceVerifier.load(
        args.model,
        input_size=args.input_size,
        normalize=parse_normalize(args.normalize) if args.normalize else None,
        color=args.color,
        threshold=getattr(args, "threshold", None),
        batch_size=args.batch_size,
        calibration=calibration,
    )


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("verify", help="score two face images (or a list of pairs) and decide same/different")
    p.add_argument("images", nargs="*", metavar="IMAGE", help="two aligned face images")
    p.add_argument("--pairs", default=None,
                   help="text file of pairs, 'A B' per line (relative paths: from the file's folder)")
    add_model_arguments(p)
    p.set_defaults(func=run)


def read_pairs(path: str | Path) -> list[tuple[Path, Path]]:
    path = Path(path)
    if not path.is_file():
        raise UnitsfaceError(f"pairs file not found: {path}")
    pairs = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        if len(fields) != 2:
            raise UnitsfaceError(f"{path}:{number}: expected two image paths, got {len(fields)} fields")
        pairs.append((path.parent / fields[0], path.parent / fields[1]))
    if not pairs:
        raise UnitsfaceError(f"{path} lists no pairs")
    return pairs


def decision(verifier, a: Path, b: Path) -> dict[str, Any]:
    """The JSON record of one pair: score, the threshold in use with its source and expected FAR/TAR
    (null when unknown), and the decision."""
    score = verifier.score(a, b)
    point = verifier.operating_point
    return {"a": str(a), "b": str(b), "score": round(score, 6), "threshold": verifier.threshold,
            "same": verifier.decide(score), "threshold_source": verifier.threshold_source,
            "threshold_far": point.far, "threshold_tar": point.tar}


def run(args: argparse.Namespace) -> int:
    if bool(args.pairs) == bool(args.images):
        raise UnitsfaceError("give either two images or --pairs FILE")
    if args.images and len(args.images) != 2:
        raise UnitsfaceError(f"give exactly two images, got {len(args.images)}")
    pairs = read_pairs(args.pairs) if args.pairs else [(Path(args.images[0]), Path(args.images[1]))]
    verifier = load_verifier(args)
    if verifier.threshold is None:
        what = "no unitsface metadata" if verifier.third_party else "no learned threshold"
        raise UnitsfaceError(f"{args.model} has {what} and no calibration: pass --threshold T or run "
                             "`unitsface calibrate --model ... --bin VAL.bin --far 1e-4`")
    print(verifier.describe_threshold(), file=sys.stderr)
    failed = 0
    for a, b in pairs:
        try:
            record = decision(verifier, a, b)
        except UnitsfaceError as exc:
            if not args.pairs:
                raise
            failed += 1
            record = {"a": str(a), "b": str(b), "error": str(exc)}
        print(json.dumps(record), flush=True)
    return 1 if failed else 0
