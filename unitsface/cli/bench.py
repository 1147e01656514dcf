"""`unitsface bench`: small self-contained benchmarks that print a Markdown table (or JSON).

Each entry of `BENCHES` adds one sub-command to the `bench` group: a function taking the
group's sub-parsers, adding its parser and setting `func(args) -> int`. `markdown_table`
and `mean_std` format results for all of them.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections.abc import Callable, Sequence
from typing import Any

from unitsface.errors import UnitsfaceError


def mean_std(values: Sequence[float], digits: int = 4) -> str:
    """"m ± s" over seeds ("m" alone for one value)."""
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.fmean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------- bench uniform


def _uniform_table(runs: list[dict[str, Any]]) -> str:
    rows = []
    for method in dict.fromkeys(run["method"] for run in runs):
        mine = [run for run in runs if run["method"] == method]
        column = [[run[key] for run in mine] for key in
                  ("sample_wise_accuracy", "uniform_accuracy", "optimal_threshold", "learned_bias")]
        finite_t = [t for t in column[2] if math.isfinite(t)]
        rows.append([method, mean_std(column[0]), mean_std(column[1]), mean_std(finite_t, 3) if finite_t else "–",
                     mean_std(column[3], 3) if None not in column[3] else "–"])
    headers = ["loss", "sample-wise acc", "uniform acc", "optimal unified t*", "learned bias b"]
    return markdown_table(headers, rows)


def _run_uniform(args: argparse.Namespace) -> int:
    from unitsface.classification import uniform_benchmark

    if args.seeds < 1:
        raise UnitsfaceError(f"--seeds must be at least 1, got {args.seeds}")
    runs = uniform_benchmark(range(args.seeds), epochs=args.epochs)
    if args.json:
        print(json.dumps({"dataset": "scikit-learn digits, 30% stratified test split", "runs": runs}, indent=2))
    else:
        print(f"Digits test split (540 samples), MLP + linear classifier, {args.epochs} epochs, "
              f"seeds 0..{args.seeds - 1} (mean ± std).\n")
        print(_uniform_table(runs))
        print("\nt* and b are in the units of the classifier scores f (unified BCE: f; the others include "
              "their per-class biases).")
    return 0


def _add_uniform(benches: argparse._SubParsersAction) -> None:
    parser = benches.add_parser(
        "uniform", help="softmax vs BCE with a unified / per-class bias on scikit-learn digits",
        description="Train a small MLP on the bundled digits set with softmax, BCE with one unified bias and "
                    "BCE with per-class biases; report sample-wise and uniform accuracy on the test split.",
    )
    parser.add_argument("--seeds", type=int, default=3, help="run seeds 0..N-1 (default 3)")
    parser.add_argument("--epochs", type=int, default=30, help="training epochs per run (default 30)")
    parser.add_argument("--json", action="store_true", help="print every run as JSON instead of a table")
    parser.set_defaults(func=_run_uniform)


BENCHES: tuple[Callable[[argparse._SubParsersAction], None], ...] = (_add_uniform,)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("bench", help="small self-contained benchmarks")
    benches = parser.add_subparsers(dest="bench", metavar="BENCH")
    for add in BENCHES:
        add(benches)

    def usage(_: argparse.Namespace) -> int:
        parser.print_help()
        return 2

    parser.set_defaults(func=usage)
