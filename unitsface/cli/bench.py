"""`unitsface bench`: small self-contained benchmarks that print a Markdown table (or JSON).

Each entry of `BENCHES` adds one sub-command to the `bench` group: a function taking the
group's sub-parsers, adding its parser and setting `func(args) -> int`. `markdown_table`
and `mean_std` format results for all of them.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from typing import Any

from unitsface.errors import UnitsfaceError
from unitsface.evaluation.report import markdown_table, mean_std

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


# --------------------------------------------------------------------------- bench losses


def _run_losses(args: argparse.Namespace) -> int:
    from pathlib import Path

    from unitsface.config import load_config
    from unitsface.evaluation.report import plot_roc
    from unitsface.training.compare import compare_heads, results_table

    if args.seeds < 1:
        raise UnitsfaceError(f"--seeds must be at least 1, got {args.seeds}")
    overrides = list(args.overrides)
    if args.data != "synthetic":
        overrides.append(f"data.train={args.data}")
    if args.steps:
        overrides.append(f"train.max_steps={args.steps}")
    base = load_config("bench_losses", overrides)
    heads = args.heads.split(",")
    from unitsface import heads as head_registry

    unknown = [h for h in heads if h not in head_registry.names()]
    if unknown:
        raise UnitsfaceError(f"unknown head {unknown[0]!r}; known: {', '.join(head_registry.names())}")
    out = Path(args.out)
    runs = compare_heads(base, heads, list(range(args.seeds)), out)
    table = results_table(runs)
    plot_roc({name: rs[0]["roc"] for name, rs in runs.items()}, out / "roc.png",
             title="held-out identities, seed 0")
    text = (f"Same backbone ({base['model']['backbone']}), data ({base['data']['train']}), schedule and budget "
            f"for every head; {args.seeds} seeds, mean ± std.\n\n{table}\n")
    (out / "results.md").write_text(text)
    print(text)
    print(f"written: {out / 'results.md'}, {out / 'roc.png'}")
    return 0


def _add_losses(benches: argparse._SubParsersAction) -> None:
    from unitsface.training.compare import DEFAULT_HEADS

    parser = benches.add_parser(
        "losses", help="train one backbone with each head on equal terms and compare them",
        description="Trains the same backbone with each head (same data, schedule, budget, seeds) and writes a "
                    "Markdown table of 10-fold accuracy, TAR@FAR, fixed-threshold accuracy and threshold gap, "
                    "plus an overlaid ROC plot.",
    )
    parser.add_argument("--data", default="synthetic", help="'synthetic' (default) or a folder with train.rec/.idx")
    parser.add_argument("--heads", default=",".join(DEFAULT_HEADS),
                        help="comma-separated head names: any registered head, e.g. cosface_anchor,arcface_anchor "
                             "(default: the table of docs/results.md)")
    parser.add_argument("--seeds", type=int, default=3, help="run seeds 0..N-1 (default 3)")
    parser.add_argument("--steps", type=int, default=None, help="cap every run at N optimiser steps")
    parser.add_argument("--out", default="runs/bench-losses", help="output folder")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="overrides of the bench_losses preset")
    parser.set_defaults(func=_run_losses)


# --------------------------------------------------------------------------- bench threshold

STUDY_BEGIN, STUDY_END = "<!-- study:begin -->", "<!-- study:end -->"
QUICK = ["model.embedding_size=32", "train.batch_size=16", "data.synthetic.heldout_identities=6",
         "data.synthetic.heldout_images=3", "data.synthetic.val_pairs=20"]


def _int_list(text: str, what: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise UnitsfaceError(f"--{what} must be comma-separated positive integers, got {text!r}")
    return values


def study_markdown(records: list[dict[str, Any]], plot_name: str, command: str) -> str:
    """The generated part of docs/threshold.md: what ran, the table, the fitted k and the plot."""
    from unitsface.training.threshold_study import fit_summary, study_table

    minutes = sum(r["seconds"] for r in records) / 60
    return (f"Made by `{command}` ({len(records)} runs, {minutes:.1f} min of training and measuring on this "
            f"machine). Held-out: all pairs of the synthetic set's `heldout/` identities; calibration: other "
            f"unseen identities. Mean ± std over seeds; FARs as geometric mean ×/÷ geometric std (a FAR "
            f"with no false accept counts as 0.5/n).\n\n{study_table(records)}\n\n"
            f"FAR ≈ k/C, fitted per head:\n\n{fit_summary(records)}\n\n![FAR at the learned threshold against C]"
            f"({plot_name})\n")


def _run_threshold(args: argparse.Namespace) -> int:
    from pathlib import Path

    from unitsface.config import load_config
    from unitsface.io import atomic_write
    from unitsface.training.threshold_study import STUDY_HEADS, plot_study, run_study

    calibration = (100, 8)  # identities × images of the calibration stream, like the held-out set
    if args.quick:
        identities, budgets, seeds, heads = [8, 16], [4], 1, list(STUDY_HEADS)
        overrides, calibration = [*QUICK, *args.overrides], (6, 3)
    else:
        identities, budgets, seeds = (_int_list(args.identities, "identities"), _int_list(args.budgets, "budgets"),
                                      args.seeds)
        heads, overrides = args.heads.split(","), list(args.overrides)
    if seeds < 1:
        raise UnitsfaceError(f"--seeds must be at least 1, got {seeds}")
    base = load_config("bench_threshold", overrides)
    from unitsface import heads as head_registry

    unknown = [h for h in heads if h not in head_registry.names()]
    if unknown:
        raise UnitsfaceError(f"unknown head {unknown[0]!r}; known: {', '.join(head_registry.names())}")
    out = Path(args.out)
    records = run_study(base, heads, identities, budgets, range(seeds), out, *calibration)
    plot = plot_study(records, out / "threshold_study.png")
    command = "unitsface bench threshold" + (" --quick" if args.quick else "")
    text = study_markdown(records, plot.name, command)
    atomic_write(out / "study.md", text)
    if args.doc:
        doc = Path(args.doc)
        old = doc.read_text() if doc.is_file() else f"{STUDY_BEGIN}\n{STUDY_END}\n"
        if STUDY_BEGIN not in old or STUDY_END not in old:
            raise UnitsfaceError(f"{doc} has no {STUDY_BEGIN} ... {STUDY_END} section to fill")
        head, rest = old.split(STUDY_BEGIN, 1)
        atomic_write(doc.parent / plot.name, plot.read_bytes())
        atomic_write(doc, f"{head}{STUDY_BEGIN}\n{text}{STUDY_END}{rest.split(STUDY_END, 1)[1]}")
    print(text)
    print(f"written: {out / 'study.md'}, {plot}, {out / 'runs.jsonl'}" + (f", {args.doc}" if args.doc else ""))
    return 0


def _add_threshold(benches: argparse._SubParsersAction) -> None:
    from unitsface.training.threshold_study import STUDY_HEADS

    parser = benches.add_parser(
        "threshold", help="where a learned unified threshold lands on unseen identities, as C and budget grow",
        description="Trains unitsface, uss, uce, bce and cosface (calibrated on other identities) on synthetic "
                    "sets of several identity counts at several step budgets and seeds, and measures each learned "
                    "threshold's FAR and TAR on held-out identities (docs/threshold.md). Runs already in "
                    "OUT/runs.jsonl are skipped, so a study can be extended.",
    )
    parser.add_argument("--identities", default="100,400,1600",
                        help="training identity counts C (default 100,400,1600)")
    parser.add_argument("--budgets", default="150,300",
                        help="optimizer steps per run, rounded to whole epochs, at least 2 (default 150,300)")
    parser.add_argument("--seeds", type=int, default=2, help="run seeds 0..N-1 (default 2)")
    parser.add_argument("--heads", default=",".join(STUDY_HEADS), help="comma-separated heads")
    parser.add_argument("--quick", action="store_true", help="a tiny study (seconds) that checks the machinery")
    parser.add_argument("--out", default="runs/bench-threshold", help="output folder (runs, runs.jsonl, study.md)")
    parser.add_argument("--doc", default=None, metavar="FILE.md",
                        help=f"also fill the {STUDY_BEGIN} ... {STUDY_END} section of this Markdown file")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="overrides of the bench_threshold preset")
    parser.set_defaults(func=_run_threshold)


BENCHES: tuple[Callable[[argparse._SubParsersAction], None], ...] = (_add_uniform, _add_losses, _add_threshold)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("bench", help="small self-contained benchmarks")
    benches = parser.add_subparsers(dest="bench", metavar="BENCH")
    for add in BENCHES:
        add(benches)

    def usage(_: argparse.Namespace) -> int:
        parser.print_help()
        return 2

    parser.set_defaults(func=usage)
