"""`unitsface demo`: the main job on the embedded default data (what `make demo` runs).

Generates the synthetic face set once into the cache, trains the small CPU net with the namesake
`unitsface` head (CosFace + USS) for a few minutes, evaluates it on the held-out `val.bin` pairs and the
held-out identities, and says where its learned threshold operates on them and where the report is.
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
    from unitsface.evaluation.report import is_pair_result
    from unitsface.evaluation.threshold import describe
    from unitsface.training.trainer import train_run

    config = load_config("demo", args.overrides)
    start = time.perf_counter()
    trainer, results = train_run(config)
    out = Path(config["output"])
    print(f"\ndemo finished in {(time.perf_counter() - start) / 60:.1f} min ({trainer.head_name} head)")
    for name, r in results.items():
        tar = ", ".join(f"TAR@FAR={far:g} {100 * v:.1f} %" for far, v in r["tar_at_far"].items() if far <= 1e-2)
        accuracy = f"10-fold accuracy {r['accuracy'] * 100:.2f} ± {r['accuracy_std'] * 100:.2f} %, " \
            if is_pair_result(r) else ""
        print(f"  {name} ({r['n_pairs']} pairs): {accuracy}{tar or 'too few pairs for TAR@FAR <= 1e-2'}, "
              f"AUC {r['auc']:.4f}")
    for name, point in trainer.operating_points.items():
        print(f"  {describe(point, name)}")
    print(f"report: {out / 'report.md'}  (ROC: {out / 'roc.png'}, threshold: {out / 'threshold.png'}, "
          f"checkpoint: {out / 'last.pt'})")
    return 0
