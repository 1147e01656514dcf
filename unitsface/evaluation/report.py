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

from unitsface.evaluation.threshold import describe, format_rate
from unitsface.io import atomic_open, atomic_write

Curves = Mapping[str, tuple[np.ndarray, np.ndarray]]
_PLOT_POINTS = 2000


def pct(x: Optional[float], digits: int = 2) -> str:
    return "–" if x is None or not np.isfinite(x) else f"{100 * x:.{digits}f}"


def format_table(results: Mapping[str, dict], label: str = "accuracy (%)") -> str:
    """One row, one column per set (LFW, CFP-FP, AgeDB-30, ...): mean ± population std in percent."""
    names = list(results)
    cells = [f"{pct(r['accuracy'])} ± {pct(r['accuracy_std'])}" for r in results.values()]
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
        row = [name, str(r["n_pairs"]), f"{pct(r['accuracy'])} ± {pct(r['accuracy_std'])}",
               pct(r["accuracy_stderr"])]
        row += [pct(r["tar_at_far"].get(t)) for t in targets]
        row += [pct(r["auc"], 3), pct(r["eer"]), pct(r["best_threshold_accuracy"]), f"{r['best_threshold']:.4f}"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def format_all_pairs(results: dict[str, dict], flip: bool = True) -> str:
    """One row per folder: sizes, AUC, EER, strict TAR@FAR and leave-one-out rank-1, in percent."""
    targets = sorted({t for r in results.values() for t in r["tar_at_far"]}, reverse=True)
    head = (["set", "images", "identities", "pairs (genuine)", "AUC (%)", "EER (%)"]
            + [f"TAR@FAR={t:g} (%)" for t in targets] + ["rank-1 (%)"])
    rows = [[name, str(r["n_images"]), str(r["n_identities"]), f"{r['n_pairs']} ({r['n_genuine']})",
             pct(r["auc"], 3), pct(r["eer"])] + [pct(r["tar_at_far"].get(t)) for t in targets]
            + [pct(r["rank1"])] for name, r in results.items()]
    kind = "flip-sum" if flip else "single-pass"
    return markdown_table(head, rows) + (f"\n\nAll pairs i < j, cosine of {kind} embeddings, accept s >= t; TAR at "
                                         "the lowest threshold with FAR <= target; rank-1 leaves each image out.")


def is_pair_result(result: Mapping[str, Any]) -> bool:
    """Whether a result comes from the k-fold pair protocol (else from all pairs of an identity set)."""
    return "accuracy" in result


def summary(result: Mapping[str, Any]) -> dict[str, Any]:
    """The few numbers of a validation result worth a line in metrics.jsonl."""
    keys = ("accuracy", "accuracy_std", "auc", "tar_at_far") if is_pair_result(result) else \
        ("auc", "eer", "tar_at_far", "rank1")
    return {k: result[k] for k in keys}


def format_overview(results: Mapping[str, dict]) -> str:
    """What a run reaches, one row per set: 10-fold accuracy for pair lists, then exact TAR@FAR, AUC and
    EER over all pairs of every set."""
    targets = (1e-2, 1e-3, 1e-4)
    head = ["set", "protocol", "pairs (impostor)", "10-fold accuracy (%)"] + \
        [f"TAR@FAR={t:g} (%)" for t in targets] + ["AUC (%)", "EER (%)"]
    rows = []
    for name, r in results.items():
        accuracy = f"{pct(r['accuracy'])} ± {pct(r['accuracy_std'])}" if is_pair_result(r) else "–"
        rows.append([name, "10-fold pairs" if is_pair_result(r) else "all pairs", f"{r['n_pairs']} ({r['n_impostor']})",
                     accuracy] + [pct(r["tar_at_far"].get(t)) for t in targets] + [pct(r["auc"], 3), pct(r["eer"])])
    return markdown_table(head, rows) + ("\n\nTAR@FAR: exact over all pairs, at the lowest threshold with FAR <= "
                                         "target; – where the set has too few impostor pairs for the target.")


def format_operating_points(points: Mapping[str, dict]) -> str:
    """The learned threshold's operating point on each set: a sentence each, then a table."""
    far_keys = list(next(iter(points.values()))["threshold_at_far"])
    lines = [f"- {describe(point, name)}." for name, point in points.items()]
    head = ["set", "convention", "threshold", "TAR (%)", "FAR", "genuine / impostor pairs"] + \
        [f"t at FAR={float(k):g}" for k in far_keys] + ["balanced t"]
    rows = []
    for name, point in points.items():
        conventions = {point["convention"]: point, **point.get("other_conventions", {})}
        for convention, rates in conventions.items():
            rows.append([name, convention, f"{rates['threshold']:.4f}", pct(rates["tar"]), format_rate(rates["far"]),
                         f"{rates['n_genuine']} / {rates['n_impostor']}"]
                        + [v if isinstance(v, str) else f"{v:.4f}" for v in point["threshold_at_far"].values()]
                        + [f"{point['balanced_threshold']:.4f}"])
    return "\n".join(lines) + "\n\n" + markdown_table(head, rows) + (
        "\n\nAccept when cosine >= threshold. \"t at FAR\" is the lowest threshold whose FAR on the set stays "
        "below the target (not measurable with fewer than 10/FAR impostor pairs); \"balanced t\" maximises "
        "(TAR + TNR)/2 on the set. Where the learned threshold sits between them tells where it operates.")


def format_ijb_table(results: Mapping[str, dict], reading: str = "tar_at_far") -> str:
    """IJB 1:1 table as insightface prints it: one row per run, TAR (%) at each FAR, AUC (%), and the
    test mode; `reading` picks "tar_at_far" (closest point), "tar_at_far_strict" or "tar_at_far_interp"."""
    targets = sorted({t for r in results.values() for t in r[reading]})
    lines = ["| run | " + " | ".join(f"{t:g}" for t in targets) + " | AUC | mode |", "|---" * (len(targets) + 3) + "|"]
    for name, r in results.items():
        cells = [pct(r[reading].get(t)) for t in targets] + [pct(r["auc"]), r["mode"]]
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
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # matplotlib only where a plot is drawn
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


def plot_threshold(history: Mapping[str, Any], scores: np.ndarray, issame: np.ndarray, threshold: float,
                   set_name: str, path: Union[str, Path]) -> Path:
    """Two panels, saved atomically as a PNG: (left) the learned threshold over training steps beside the
    held-out thresholds at FAR 1e-2/1e-3/1e-4 and the balanced one, read at every validation of `set_name`;
    (right) the final genuine and impostor score histograms of that set with the learned threshold drawn.

    `history`: {"steps": [...], "threshold": [...], "validations": [(step, operating point), ...]}.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # matplotlib only where a plot is drawn
    from matplotlib.figure import Figure

    path = Path(path)
    fig = Figure(figsize=(11, 4.2))
    FigureCanvasAgg(fig)
    left, right = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    left.plot(history["steps"], history["threshold"], color="black", lw=1.5, label="learned t = b/s")
    validations = history["validations"]
    steps = [step for step, _ in validations]
    if validations:
        for key in validations[-1][1]["threshold_at_far"]:
            values = [p["threshold_at_far"].get(key) for _, p in validations]
            if all(isinstance(v, float) for v in values):
                left.plot(steps, values, marker="o", ms=3, lw=1, label=f"{set_name}: t at FAR {float(key):g}")
        left.plot(steps, [p["balanced_threshold"] for _, p in validations], marker="s", ms=3, lw=1, ls="--",
                  label=f"{set_name}: balanced t")
    left.set_xlabel("optimizer step")
    left.set_ylabel("cosine threshold")
    left.set_title("learned threshold vs held-out operating thresholds")
    left.grid(True, ls=":", lw=0.5)
    left.legend(fontsize="small")
    s, y = np.asarray(scores), np.asarray(issame, dtype=bool)
    bins = np.linspace(min(s.min(), threshold) - 0.02, max(s.max(), threshold) + 0.02, 80)
    right.hist(s[~y], bins=bins, density=True, alpha=0.55, color="tab:red", label=f"impostor ({(~y).sum()})")
    right.hist(s[y], bins=bins, density=True, alpha=0.55, color="tab:green", label=f"genuine ({y.sum()})")
    right.axvline(threshold, color="black", lw=1.5, label=f"learned t = {threshold:.3f}")
    right.set_yscale("log")
    right.set_xlabel("cosine score")
    right.set_ylabel("density (log)")
    right.set_title(f"final scores on {set_name}")
    right.legend(fontsize="small")
    fig.tight_layout()
    with atomic_open(path) as fh:
        fig.savefig(fh, format="png", dpi=110)
    return path


ARRAY_KEYS = ("roc", "pair_scores")  # per-pair arrays of a result: for plots and operating points, not JSON


def jsonable(obj: Any) -> Any:
    """Results as plain JSON types (float keys become strings, numpy scalars Python numbers); ROC curves
    and pair scores are dropped because they belong in the plots, not in the metrics file."""
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items() if k not in ARRAY_KEYS}
    if isinstance(obj, (list, tuple, np.ndarray)):
        return [jsonable(v) for v in obj]
    return obj.item() if isinstance(obj, np.generic) else obj


def write_report(
    out_dir: Union[str, Path], results: Mapping[str, dict], extra: Optional[Mapping[str, Any]] = None,
    operating_points: Optional[Mapping[str, dict]] = None,
) -> Path:
    """Write report.md, roc.png and metrics.json for validation results (set name -> result of
    `evaluate_pairs` or `evaluate_all_pairs`).

    The report leads with what the model reaches (accuracy, TAR@FAR), then, for a learned threshold, its
    `operating_points` on each set (also under "threshold_operating_point" in metrics.json), then the
    details. `extra` holds run facts to print with the numbers (backbone, head, ...). Returns report.md.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pairs = {n: r for n, r in results.items() if is_pair_result(r)}
    identity_sets = {n: r for n, r in results.items() if not is_pair_result(r)}
    parts = ["# Verification report", "", format_overview(results), ""]
    if operating_points:
        parts += ["## Learned threshold", "", format_operating_points(operating_points), ""]
    if pairs:
        protocols = sorted({r["protocol"] for r in pairs.values()})
        parts += ["## Pair sets", "", format_details(pairs), "",
                  f"Protocol: {'; '.join(protocols)}. Accuracy is the mean over folds, ± the population std "
                  "(insightface); s.e. = sample std / sqrt(folds). TAR@FAR, AUC and EER are exact over all pairs "
                  "(cosine, accept s >= t). The best-threshold accuracy is tuned on the scored pairs: optimistic, "
                  "not comparable with 10-fold numbers.", ""]
    if identity_sets:
        parts += ["## Identity sets (all pairs)", "", format_all_pairs(identity_sets), ""]
    if extra:
        parts += ["## Run", "", "| key | value |", "|---|---|"]
        parts += [f"| {k} | {v:.6g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in extra.items()]
        parts.append("")
    plot_roc({n: (r["roc"]["fpr"], r["roc"]["tpr"]) for n, r in results.items()}, out / "roc.png")
    payload = {"results": jsonable(results), "extra": jsonable(dict(extra or {}))}
    if operating_points:
        payload["threshold_operating_point"] = jsonable(dict(operating_points))
    atomic_write(out / "metrics.json", json.dumps(payload, indent=1) + "\n")
    atomic_write(out / "report.md", "\n".join(parts))
    return out / "report.md"
