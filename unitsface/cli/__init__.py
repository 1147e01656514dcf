"""`unitsface` command line: one sub-command per module in this package.

Each module listed in `COMMANDS` defines `register(subparsers)`, which adds its parser
and sets `func(args) -> int`. Bad input raises `UnitsfaceError`; `main` prints it as one
line and exits 2 instead of showing a traceback.

Every command module is imported to build the parser, so each imports what it runs (torch, onnx,
the trainer, ...) inside its `func`: `unitsface --help` and a usage error answer at once. These
local imports follow the command structure; none breaks an import cycle.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from unitsface import __version__
from unitsface.errors import UnitsfaceError

COMMANDS = ("data", "train", "eval", "demo", "bench", "export", "embed", "calibrate", "verify", "serve", "check_onnx")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unitsface", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"unitsface {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"unitsface.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"unitsface.cli.{name}":
                continue  # a command whose module is not part of this build
            raise
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except UnitsfaceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
