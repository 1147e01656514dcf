"""`unitsface train --config FILE_OR_PRESET [key=value ...] [--resume CKPT]`."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("train", help="train a backbone + head from a YAML config or preset",
                              description="Train a face-recognition model. Values after the options override "
                                          "config keys, e.g. head.name=uss train.lr=0.05.")
    p.add_argument("--config", default=None, help="YAML file or preset name (see --list-presets)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    p.add_argument("--resume", default=None, metavar="CKPT", help="continue exactly from a checkpoint")
    p.add_argument("--list-presets", action="store_true", help="print the shipped presets, one line each, and exit")
    p.add_argument("--print-config", action="store_true", help="print the validated config and exit")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import yaml

    from unitsface.config import load_config, preset_summary, presets

    if args.list_presets:
        names = presets()
        width = max(map(len, names))
        print("\n".join(f"{name:<{width}}  {preset_summary(name)}" for name in names))
        return 0
    config = load_config(args.config, args.overrides)
    if args.print_config:
        print(yaml.safe_dump(config, sort_keys=False))
        return 0
    from unitsface.training.trainer import train

    train(config, resume=args.resume)
    return 0
