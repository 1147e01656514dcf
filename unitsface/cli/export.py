"""`unitsface export`: a checkpoint's backbone as ONNX and/or TorchScript, checked against PyTorch.

    unitsface export runs/x/checkpoint.pt --onnx model.onnx [--flip-sum] [--opset 17] [--static-batch N]
    unitsface export runs/x/checkpoint.pt --torchscript model.ts.pt
    unitsface export runs/x/checkpoint.pt --onnx model.onnx --check-mfr   (+ the MFR model rules, as check-onnx)

The graph input `data` is N×3×S×S float in the model's colour order, normalised as in training;
the output is N×d raw embeddings (one float32 output, dynamic batch unless `--static-batch N`). The
graph's metadata carries the learned threshold with its operating point on the run's held-out
validation set. Before anything is written the export runs on random pixels,
rendered faces and `--check-images`, and is refused if it differs from PyTorch by more than
`--tolerance` (max abs difference, printed).
"""

from __future__ import annotations

import argparse
import json

from unitsface.errors import UnitsfaceError

MAX_CHECK_IMAGES = 16


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("export", help="export a checkpoint's backbone to ONNX / TorchScript")
    p.add_argument("checkpoint", help="a unitsface checkpoint (.pt)")
    p.add_argument("--onnx", default=None, metavar="OUT.onnx", help="write an ONNX graph here")
    p.add_argument("--torchscript", default=None, metavar="OUT.pt", help="write a TorchScript archive here")
    p.add_argument("--flip-sum", action="store_true", help="put f(x) + f(flip(x)) inside the exported graph")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset version (default 17)")
    p.add_argument("--static-batch", type=int, default=None, metavar="N",
                   help="ONNX: fix the batch size at N (default: a dynamic batch)")
    p.add_argument("--check-images", default=None, metavar="DIR_OR_LIST",
                   help=f"real face images to check the export on too (first {MAX_CHECK_IMAGES})")
    p.add_argument("--tolerance", type=float, default=None, help="max abs difference allowed (default 1e-4)")
    p.add_argument("--check-mfr", action="store_true",
                   help="after the ONNX export, list the MFR submission rules it meets (as `unitsface check-onnx`)")
    p.add_argument("--json", action="store_true", help="print the reports as JSON lines")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from unitsface.data.images import list_images, load_image
    from unitsface.evaluation.threshold import exported_point
    from unitsface.export import TOLERANCE, export_onnx, export_torchscript

    if not (args.onnx or args.torchscript):
        raise UnitsfaceError("nothing to export: give --onnx OUT.onnx and/or --torchscript OUT.pt")
    if args.check_mfr and not args.onnx:
        raise UnitsfaceError("--check-mfr checks an ONNX export: give --onnx OUT.onnx")
    images = [load_image(p) for p in list_images(args.check_images)[:MAX_CHECK_IMAGES]] if args.check_images else []
    tolerance = TOLERANCE if args.tolerance is None else args.tolerance
    reports = []
    if args.onnx:
        reports.append(export_onnx(args.checkpoint, args.onnx, args.flip_sum, args.opset, args.static_batch,
                                   images, tolerance))
    if args.torchscript:
        reports.append(export_torchscript(args.checkpoint, args.torchscript, args.flip_sum, images, tolerance))
    for report in reports:
        if args.json:
            print(json.dumps(report.as_dict()))
        else:
            diffs = ", ".join(f"{k} {v:.2e}" for k, v in report.max_abs_diff.items())
            print(f"wrote {report.path} ({report.format}); max abs diff vs PyTorch: {diffs}")
            learned = exported_point(report.metadata)
            print(f"  {learned.describe()}" if learned else "  no learned threshold: set one with unitsface calibrate")
    if args.check_mfr:
        from unitsface.cli.check_onnx import report as rules

        rules(args.onnx, args.json)  # the export itself succeeded: its exit status stays 0
    return 0
