"""`unitsface calibrate`: choose (or check) a model's decision threshold on a verification `.bin`.

    unitsface calibrate --model model.pt --bin val.bin --far 1e-4 [--json]
    unitsface calibrate --model model.pt --bin val.bin          # measure the threshold in use

With `--far`, finds the lowest threshold whose FAR on the set is ≤ the target and stores it
beside the model as `<model>.threshold.json`, where every unitsface tool finds it (see
`unitsface.verifier`). Without `--far`, nothing is written: the threshold already in use
(calibrated, else the learned b/s) is measured on the set. The report always says which
threshold is in use, where it comes from, and its FAR/FRR on the set.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from unitsface.cli.verify import add_model_arguments, load_verifier
from unitsface.errors import UnitsfaceError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("calibrate", help="set a model's threshold for a target FAR on a .bin pair set")
    p.add_argument("--bin", required=True, help="verification pairs (insightface .bin)")
    p.add_argument("--far", type=float, default=None,
                   help="target false accept rate; stores the threshold (default: measure the one in use)")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    add_model_arguments(p, threshold=False)
    p.set_defaults(func=run)


def _point(point) -> dict[str, Any] | None:
    return None if point is None else {"threshold": point.threshold, "source": point.source,
                                       "far": point.far, "frr": point.frr, "tar": point.tar}


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from unitsface.data.bins import load_bin
    from unitsface.embedder import pair_scores
    from unitsface.evaluation.threshold import calibrate, measure
    from unitsface.verifier import write_calibration

    # Re-calibrating must work even when the stored calibration is stale, so it is not read then.
    verifier = load_verifier(args, calibration=args.far is None)
    if args.far is None and verifier.operating_point is None:
        raise UnitsfaceError(f"{args.model} has no learned threshold and no calibration: pass --far TARGET")
    encoded, issame = load_bin(args.bin)
    with tqdm(total=len(encoded), desc="embed", unit="img", file=sys.stderr, disable=None) as bar:
        scores = pair_scores(verifier, encoded, bar.update)
    name = Path(args.bin).name
    written = None
    if args.far is not None:
        in_use = calibrate(scores, issame, args.far, name)
        written = write_calibration(args.model, in_use)
    else:
        in_use = measure(verifier.operating_point, scores, issame, name)
    learned = verifier.learned
    report = {
        "model": args.model, "bin": args.bin, "pairs": len(issame),
        "genuine": int(issame.sum()), "impostor": int((~issame).sum()),
        "in_use": _point(in_use),
        "learned": _point(None if learned is None else measure(learned, scores, issame, name)),
        "written": None if written is None else str(written),
    }
    if args.json:
        print(json.dumps(report))
    else:
        print(format_report(report))
    return 0


def format_report(report: dict[str, Any]) -> str:
    from unitsface.evaluation.threshold import format_rate

    def line(label: str, p: dict[str, Any]) -> str:
        return f"{label:<17}{p['threshold']:.6f}  ({p['source']})  FAR {format_rate(p['far'])}  FRR {p['frr']:.3g}"

    lines = [f"{report['bin']}: {report['pairs']} pairs ({report['genuine']} genuine, {report['impostor']} impostor)",
             line("threshold in use", report["in_use"])]
    if report["learned"] and report["learned"]["source"] != report["in_use"]["source"]:
        lines.append(line("learned b/s", report["learned"]))
    if report["written"]:
        lines.append(f"stored in {report['written']}")
    return "\n".join(lines)
