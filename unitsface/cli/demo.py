"""`unitsface demo`: the main job on the embedded default data (what `make demo` runs).

Generates the synthetic face set once into the cache, trains the small CPU net with a
CosFace head for a few minutes, evaluates on the held-out val.bin, and says where the
report is.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("demo", help="train and evaluate on the embedded synthetic face set (minutes, CPU)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides of the demo preset")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from unitsface.config import load_config
    from unitsface.training.trainer import train

    config = load_config("demo", args.overrides)
    start = time.perf_counter()
    results = train(config)
    out = Path(config["output"])
    print(f"\ndemo finished in {(time.perf_counter() - start) / 60:.1f} min")
    for name, r in results.items():
        print(f"  {name}: 10-fold accuracy {r['accuracy'] * 100:.2f} ± {r['accuracy_std'] * 100:.2f} %, "
              f"AUC {r['auc']:.4f}, EER {r['eer'] * 100:.2f} %")
    print(f"report: {out / 'report.md'}  (ROC: {out / 'roc.png'}, checkpoint: {out / 'last.pt'})")
    return 0
