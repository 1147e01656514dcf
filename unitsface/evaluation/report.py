"""Papers-style Markdown tables, ROC plots and the `report.md` / `roc.png` / `metrics.json` bundle.

Tables keep the 10-fold accuracy and the optimistic single-threshold accuracy in separate, labelled
columns (evaluation.md §4), and say that "±" is insightface's population std, not a standard error.
Plots use matplotlib's Agg canvas directly, so no global backend or pyplot state is touched.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np

from unitsface.io import atomic_open, atomic_write

Curves = Mapping[str, tuple[np.ndarray, np.ndarray]]
_PLOT_POINTS = 2000


def _pct(x: Optional[float], digits: int = 2) -> str:
    return "–" if x is None or not np.isfinite(x) else f"{100 * x:.{digits}f}"


def format_table(results: Mapping[str, dict], label: str = "accuracy (%)") -> str:
    """One row, one column per set (LFW, CFP-FP, AgeDB-30, ...): mean ± population std in percent."""
    names = list(results)
    cells = [f"{_pct(r['accuracy'])} ± {_pct(r['accuracy_std'])}" for r in results.values()]
    return "\n".join([f"| | {' | '.join(names)} |", "|---" * (len(names) + 1) + "|",
                      f"| {label} | {' | '.join(cells)} |"])


def format_details(results: Mapping[str, dict]) -> str:
    """One row per set: pairs, accuracy ± std, standard error, exact TAR@FAR columns, AUC, EER and the
    optimistic best-threshold accuracy in its own column."""
    targets = sorted({t for r in results.values() for t in r["tar_at_far"]}, reverse=True)
    head = (["set", "pairs", "accuracy (%) ± std", "s.e. (%)"] + [f"TAR@FAR={t:g} (%)" for t in targets]
            + ["AUC (%)", "EER (%)", "best-threshold acc. (%, optimistic)", "best threshold (cos)"])
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for name, r in results.items():
        row = [name, str(r["n_pairs"]), f"{_pct(r['accuracy'])} ± {_pct(r['accuracy_std'])}",
               _pct(r["accuracy_stderr"])]
        row += [_pct(r["tar_at_far"].get(t)) for t in targets]
        row += [_pct(r["auc"], 3), _pct(r["eer"]), _pct(r["best_threshold_accuracy"]), f"{r['best_threshold']:.4f}"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def format_ijb_table(results: Mapping[str, dict], reading: str = "tar_at_far") -> str:
    """IJB 1:1 table as insightface prints it: one row per run, TAR (%) at each FAR, AUC (%), and the
    test mode; `reading` picks "tar_at_far" (closest point), "tar_at_far_strict" or "tar_at_far_interp"."""
    targets = sorted({t for r in results.values() for t in r[reading]})
    lines = ["| run | " + " | ".join(f"{t:g}" for t in targets) + " | AUC | mode |", "|---" * (len(targets) + 3) + "|"]
    for name, r in results.items():
        cells = [_pct(r[reading].get(t)) for t in targets] + [_pct(r["auc"]), r["mode"]]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + f"\n\nTAR (%) at FAR, reading: {reading}."


def mean_std(values: Sequence[float], digits: int = 4) -> str:
    """"m ± s" over seeds ("m" alone for one value)."""
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.fmean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _thin_for_plot(fpr: np.ndarray, tpr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Keep the best-TAR point at log-spaced FARs: a 15M-point IJB ROC plots like the full curve."""
    if len(fpr) <= 2 * _PLOT_POINTS:
        return fpr, tpr
    lo = fpr[fpr > 0].min()
    grid = np.logspace(np.log10(lo), 0, _PLOT_POINTS)
    idx = np.unique(np.r_[0, np.searchsorted(fpr, grid, side="right") - 1])
    return fpr[idx], tpr[idx]


def plot_roc(curves: Curves, path: Union[str, Path], title: str = "ROC") -> Path:
    """Overlay labelled ROC curves (label -> (fpr, tpr)) on a log-FAR axis and save a PNG atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    fig = Figure(figsize=(6.4, 4.8))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    lo = 1.0
    for label, (fpr, tpr) in curves.items():
        fpr, tpr = _thin_for_plot(np.asarray(fpr), np.asarray(tpr))
        ax.plot(fpr, tpr, lw=1.2, label=label)
        if (fpr > 0).any():
            lo = min(lo, fpr[fpr > 0].min())
    ax.set_xscale("log")
    ax.set_xlim(max(lo, 1e-7), 1.0)
    ax.set_ylim(top=1.0)
    ax.set_xlabel("FAR (false accept rate)")
    ax.set_ylabel("TAR (true accept rate)")
    ax.set_title(title)
    ax.grid(True, which="both", ls=":", lw=0.5)
    ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    with atomic_open(path) as fh:
        fig.savefig(fh, format="png", dpi=120)
    return path


def jsonable(obj: Any) -> Any:
    """Results as plain JSON types (float keys become strings, numpy scalars Python numbers); ROC arrays
    are dropped because they belong in the plot, not in the metrics file."""
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items() if k != "roc"}
    if isinstance(obj, (list, tuple, np.ndarray)):
        return [jsonable(v) for v in obj]
    return obj.item() if isinstance(obj, np.generic) else obj


def write_report(
    out_dir: Union[str, Path], results: Mapping[str, dict], extra: Optional[Mapping[str, Any]] = None
) -> Path:
    """Write report.md, roc.png and metrics.json for `evaluate_pairs` results (set name -> result).

    `extra` holds run facts to print with the numbers (backbone, head, learned threshold, ...).
    Returns the report.md path.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    protocols = sorted({r["protocol"] for r in results.values()})
    parts = ["# Verification report", "", format_table(results), "", "## Details", "", format_details(results), "",
             f"Protocol: {'; '.join(protocols)}. Accuracy is the mean over folds, ± the population std "
             "(insightface); s.e. = sample std / sqrt(folds). TAR@FAR, AUC and EER are exact over all pairs "
             "(cosine, accept s >= t). The best-threshold accuracy is tuned on the scored pairs: optimistic, "
             "not comparable with 10-fold numbers.", ""]
    if extra:
        parts += ["## Run", "", "| key | value |", "|---|---|"]
        parts += [f"| {k} | {v:.6g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in extra.items()]
        parts.append("")
    plot_roc({n: (r["roc"]["fpr"], r["roc"]["tpr"]) for n, r in results.items()}, out / "roc.png")
    payload = json.dumps({"results": jsonable(results), "extra": jsonable(dict(extra or {}))}, indent=1)
    atomic_write(out / "metrics.json", payload + "\n")
    atomic_write(out / "report.md", "\n".join(parts))
    return out / "report.md"
