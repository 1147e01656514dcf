"""`unitsface serve`: a local web page to compare two faces with a model.

    unitsface serve --model model.pt [--val-bin val.bin] [--port 8000] [--host 127.0.0.1]

Binds to the loopback interface unless told otherwise: the page has no authentication.
With `--val-bin`, the page shows the genuine/impostor score histogram of that set with the
threshold drawn on it, and offers faces from it as samples.
"""

from __future__ import annotations

import argparse
import sys

from unitsface.cli.verify import add_model_arguments, load_verifier
from unitsface.errors import UnitsfaceError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="web page to compare two face images")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--val-bin", default=None, help="validation .bin: score histogram and sample faces")
    p.add_argument("--max-upload-mb", type=float, default=5.0, help="largest accepted image file (MB)")
    add_model_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from unitsface.serve import create_app
    except ModuleNotFoundError as exc:
        raise UnitsfaceError(f"`unitsface serve` needs the serve extra ({exc.name} is missing): "
                             "pip install 'unitsface[serve]'") from None
    if not 0 < args.port < 65536:
        raise UnitsfaceError(f"--port must be in 1..65535, got {args.port}")
    if args.max_upload_mb <= 0:
        raise UnitsfaceError(f"--max-upload-mb must be positive, got {args.max_upload_mb}")
    verifier = load_verifier(args)
    if args.val_bin:
        print(f"scoring {args.val_bin} for the histogram...", file=sys.stderr)
    app = create_app(verifier, args.val_bin, int(args.max_upload_mb * 2**20))
    print(f"serving {args.model} on http://{args.host}:{args.port}/; {verifier.describe_threshold()}",
          file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
