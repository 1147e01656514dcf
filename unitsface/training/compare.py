"""Loss comparison on equal terms (`unitsface bench losses`).

Every head trains the same backbone on the same data, schedule, budget and seeds; only
`head.name` (and that head's paper defaults) changes. Each run is then measured on:
  - the 10-fold insightface protocol on the validation .bin sets,
  - all pairs of a held-out identity set (synthetic: a render stream disjoint from both the
    training and the val.bin identities), split by identity into a calibration half and a
    test half: exact TAR at FAR 1e-3 / 1e-4 on the test half; the balanced accuracy
    ½(TAR + TNR) of ONE fixed threshold applied to the test half — the learned t = b/s for
    heads that learn one, else the threshold that is best on the calibration half; and the
    gap between that threshold and the one that would have been best on the test half.
That last pair of numbers is what a unified threshold promises: a threshold you can
deploy without calibration data.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np

from unitsface.config import for_head
from unitsface.data.synthetic import HELDOUT_SPLIT, render_identities
from unitsface.evaluation.embed import embed_images
from unitsface.evaluation.report import is_pair_result, markdown_table, mean_std
from unitsface.evaluation.threshold import balanced_threshold
from unitsface.evaluation.verification import evaluate_all_pairs, roc_curve, tar_at_far
from unitsface.training.trainer import Trainer

DEFAULT_HEADS = ("cosface", "arcface", "uce", "unitsface", "cosface_epl", "cosface_unpg")


def all_pairs(emb: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cosine scores and same-identity flags of every unordered pair of rows."""
    pairs = evaluate_all_pairs(emb, labels)["pair_scores"]
    return pairs["scores"], pairs["issame"]


def balanced_accuracy(scores: np.ndarray, issame: np.ndarray, threshold: float) -> float:
    accept = scores >= threshold
    return float(0.5 * (accept[issame].mean() + (~accept[~issame]).mean()))


def measure_run(trainer: Trainer, val_results: dict[str, Any], faces: np.ndarray,
                labels: np.ndarray) -> dict[str, Any]:
    """All numbers of one trained run (see the module docstring)."""
    emb = embed_images(trainer.model, faces, batch_size=128, device=trainer.device)
    half = labels.max() // 2
    cal, test = labels <= half, labels > half
    s_cal, y_cal = all_pairs(emb[cal], labels[cal])
    s_test, y_test = all_pairs(emb[test], labels[test])
    fpr, tpr, _ = roc_curve(s_test, y_test)
    learned = getattr(trainer.head, "threshold", None)
    fixed = float(learned) if learned is not None else balanced_threshold(s_cal, y_cal)
    return {
        "val": {n: {"accuracy": r["accuracy"], "accuracy_std": r["accuracy_std"]} for n, r in val_results.items()
                if is_pair_result(r)},
        "tar_at_far": tar_at_far(fpr, tpr, (1e-3, 1e-4)),
        "fixed_threshold": fixed,
        "threshold_source": "learned b/s" if learned is not None else "best on calibration identities",
        "fixed_threshold_accuracy": balanced_accuracy(s_test, y_test, fixed),
        "optimal_threshold": balanced_threshold(s_test, y_test),
        "roc": (fpr, tpr),
    }


def compare_heads(base: dict[str, Any], heads: list[str], seeds: list[int], out: Path,
                  test_identities: int = 200, test_images: int = 8) -> dict[str, list[dict[str, Any]]]:
    """Train every (head, seed) with `base` (a validated config) and measure it; returns head -> runs."""
    configs = {name: for_head(base, name) for name in heads}  # every head's parameters checked before training
    seed = base["data"]["synthetic"]["seed"] if base["data"]["train"] == "synthetic" else 0
    faces, labels = render_identities(seed, HELDOUT_SPLIT, test_identities, test_images)
    runs: dict[str, list[dict[str, Any]]] = {}
    for name in heads:
        for s in seeds:
            config = copy.deepcopy(configs[name])
            config["train"]["seed"] = s
            config["output"] = str(out / f"{name}-seed{s}")
            trainer = Trainer(config)
            result = measure_run(trainer, trainer.fit(), faces, labels)
            runs.setdefault(name, []).append(result)
            print(json.dumps({"head": name, "seed": s, **{k: v for k, v in result.items() if k != "roc"}},
                             default=float), flush=True)
    return runs


def results_table(runs: dict[str, list[dict[str, Any]]]) -> str:
    """Markdown: mean ± std over seeds per head."""
    val_names = list(next(iter(runs.values()))[0]["val"])
    headers = ["head", *(f"{n} 10-fold acc %" for n in val_names), "TAR@FAR=1e-3 %", "TAR@FAR=1e-4 %",
               "fixed threshold (source)", "fixed-threshold acc %", "gap to optimal t"]
    rows = []
    for name, rs in runs.items():
        row = [name]
        row += [mean_std([100 * r["val"][v]["accuracy"] for r in rs], 2) for v in val_names]
        row += [mean_std([100 * r["tar_at_far"][far] for r in rs], 2) for far in (1e-3, 1e-4)]
        row.append(f"{mean_std([r['fixed_threshold'] for r in rs], 3)} ({rs[0]['threshold_source']})")
        row.append(mean_std([100 * r["fixed_threshold_accuracy"] for r in rs], 2))
        row.append(mean_std([r["fixed_threshold"] - r["optimal_threshold"] for r in rs], 3))
        rows.append(row)
    return markdown_table(headers, rows)
