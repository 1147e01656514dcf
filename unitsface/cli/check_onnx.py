"""`unitsface check-onnx FILE`: the MFR challenge's model rules, each met / not met / unknown.

    unitsface check-onnx model.onnx [--json]

Works on unitsface exports (their metadata answers what the graph cannot) and on any third-party
ONNX face model. Exit status 0 when no rule is broken (unknowns allowed), 1 when one is.
"""

from __future__ import annotations

import argparse
import json


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("check-onnx", help="check an ONNX face model against the MFR submission rules")
    p.add_argument("file", help="an ONNX model")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def report(path: str, as_json: bool) -> int:
    """Print the rules of one ONNX file; 1 if a rule is not met (shared with `export --check-mfr`)."""
    from unitsface.export.mfr_rules import NOT_MET, UNKNOWN, check_mfr_rules, format_rules

    checks = check_mfr_rules(path)
    broken = sum(c.status == NOT_MET for c in checks)
    if as_json:
        print(json.dumps({"file": str(path), "mfr_rules": [c.as_dict() for c in checks], "not_met": broken,
                          "unknown": sum(c.status == UNKNOWN for c in checks)}))
    else:
        print(format_rules(path, checks))
    return int(broken > 0)


def run(args: argparse.Namespace) -> int:
    return report(args.file, args.json)
