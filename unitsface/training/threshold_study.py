"""`unitsface bench threshold`: when can a learned unified threshold be deployed as it is?

A head with a unified bias b learns t = b/s by balancing, per sample, one positive term against the sum
of its C − 1 negative terms (USS against the identity memory, UCE against the class proxies). Where t
then lands on pairs of *unseen* identities — its FAR and TAR there — is what a deployment needs, and
nothing in the loss promises a particular FAR. This study measures it: the heads `unitsface`, `uss`,
`uce` and `bce` (the mean of its per-class b_j/s, a single threshold it never learned as such) and, as
the reference, `cosface` with a threshold calibrated at FAR 1e-3 on *other* unseen identities, each
trained on synthetic sets of several identity counts C at two budgets of optimizer steps, over seeds.

Every run is scored on the set's held-out identities (`heldout/`, all pairs: 100 identities × 8 images =
316,800 impostor pairs, the same identities for every C), and the calibration identities are a fourth
render stream (`CALIBRATION_SPLIT`), rendered in memory. One JSON line per run goes to
`<out>/runs.jsonl`; a rerun skips the runs already there, so a study can grow (more seeds, larger C)
and `write_study` summarises whatever the file holds.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from unitsface.config import for_head, validate
from unitsface.data.cache import cached_synthetic_dataset
from unitsface.data.synthetic import HELDOUT_FOLDER, render_identities
from unitsface.evaluation.embed import embed_images
from unitsface.evaluation.report import markdown_table, mean_std
from unitsface.evaluation.threshold import balanced_threshold, rates_at
from unitsface.evaluation.verification import evaluate_all_pairs, threshold_at_far
from unitsface.heads.components import LearnedBias
from unitsface.io import atomic_open
from unitsface.training.trainer import Trainer

STUDY_HEADS = ("unitsface", "uss", "uce", "bce", "cosface")
CALIBRATION_SPLIT = 3  # render stream of the calibration identities (0 train, 1 val.bin, 2 heldout)
TARGET_FAR = 1e-3  # the FAR of the calibrated reference threshold and of the "gap" column


@dataclass(frozen=True)
class StudyRun:
    """One training run of the study."""

    head: str
    identities: int
    budget: int  # optimizer steps asked for; the run trains whole epochs (see `epochs_for`)
    seed: int

    @property
    def name(self) -> str:
        return f"{self.head}-C{self.identities}-S{self.budget}-seed{self.seed}"


def epochs_for(budget: int, steps_per_epoch: int) -> int:
    """Whole epochs closest to `budget` steps, at least 2: one warm-up epoch for the memory heads, one of
    the sample-to-sample loss."""
    return max(2, round(budget / steps_per_epoch))


def run_config(base: dict[str, Any], run: StudyRun, out: Path) -> dict[str, Any]:
    """The validated config of one run: `base` (a validated config) with this run's identities, head,
    seed, whole-epoch budget, and the held-out identities as its only validation set, scored at the end."""
    config = for_head(base, run.head)
    synthetic = config["data"]["synthetic"]
    synthetic["identities"] = run.identities
    folder = cached_synthetic_dataset(cache=config["data"]["cache"], **synthetic)
    steps_per_epoch = max(1, run.identities * synthetic["images_per_identity"] // config["train"]["batch_size"])
    epochs = epochs_for(run.budget, steps_per_epoch)
    config["data"]["val"] = [str(folder / HELDOUT_FOLDER)]
    config["train"].update(seed=run.seed, epochs=epochs, max_steps=None, val_every=epochs * steps_per_epoch)
    config["output"] = str(out / run.name)
    return validate(config)


def deployable_thresholds(head: Any) -> dict[str, float]:
    """The single thresholds a head offers: its learned ones (both UCE conventions), or for per-class biases
    the mean of t_j = b_j/s (what one would deploy from them); empty for heads without a bias."""
    learned = head.learned_thresholds()
    if learned:
        return learned
    bias = getattr(head, "bias", None)
    if not isinstance(bias, LearnedBias):
        return {}
    return {"mean b_j/s": float(bias.thresholds.float().mean())}


def measure(trainer: Trainer, results: dict[str, Any], calibration: tuple[np.ndarray, np.ndarray]) -> dict[str, Any]:
    """Where the run's thresholds operate on the held-out identities: each learned convention's TAR/FAR,
    the model's TAR at FAR 1e-3 and 1e-4, the held-out threshold at FAR 1e-3 and the balanced one, and a
    threshold calibrated at FAR 1e-3 on the calibration identities, applied to the held-out ones."""
    (heldout,) = results.values()
    scores, issame = heldout["pair_scores"]["scores"], heldout["pair_scores"]["issame"]
    cal = evaluate_all_pairs(embed_images(trainer.model, calibration[0], batch_size=128, device=trainer.device),
                             calibration[1])["pair_scores"]
    calibrated = threshold_at_far(cal["scores"], cal["issame"], TARGET_FAR)
    return {
        "steps": trainer.step,
        "epochs": trainer.epoch,
        "tar_at_far": {str(k): heldout["tar_at_far"].get(k) for k in (1e-3, 1e-4)},  # None: too few pairs
        "threshold_at_far_1e-3": threshold_at_far(scores, issame, TARGET_FAR),
        "balanced_threshold": balanced_threshold(scores, issame),
        "learned": {name: rates_at(scores, issame, t) for name, t in deployable_thresholds(trainer.head).items()},
        "calibrated": rates_at(scores, issame, calibrated),
    }


def run_study(base: dict[str, Any], heads: Iterable[str], identities: Iterable[int], budgets: Iterable[int],
              seeds: Iterable[int], out: Path, calibration_identities: int = 100,
              calibration_images: int = 8) -> list[dict[str, Any]]:
    """Train and measure every (head, C, budget, seed) not yet in `<out>/runs.jsonl`; returns all records."""
    heads = list(heads)
    for head in heads:  # every head's parameters checked before the first run trains
        for_head(base, head)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "runs.jsonl"
    records = read_runs(log)
    done = {r["run"]["name"] for r in records}
    calibration = render_identities(base["data"]["synthetic"]["seed"], CALIBRATION_SPLIT, calibration_identities,
                                    calibration_images)
    for c in identities:
        for budget in budgets:
            for seed in seeds:
                for head in heads:
                    run = StudyRun(head, c, budget, seed)
                    if run.name in done:
                        continue
                    start = time.perf_counter()
                    trainer = Trainer(run_config(base, run, out))
                    record = {"run": {**asdict(run), "name": run.name},
                              **measure(trainer, trainer.fit(), calibration),
                              "seconds": time.perf_counter() - start}
                    with open(log, "a") as f:
                        f.write(json.dumps(record) + "\n")
                    records.append(record)
    return records


def read_runs(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ------------------------------------------------------------------------------------------------ summary


def _far(rates: dict[str, Any]) -> float:
    """FAR as a number for averaging: a "< 1/n" bound counts as half a false accept (0.5/n)."""
    far = rates["far"]
    return 0.5 / rates["n_impostor"] if isinstance(far, str) else far


def _primary(record: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
    learned = record["learned"]
    return next(iter(learned.items())) if learned else None


def groups(records: list[dict[str, Any]]) -> dict[tuple[str, int, int], list[dict[str, Any]]]:
    """Records by (head, identities, budget), in the study's order."""
    out: dict[tuple[str, int, int], list[dict[str, Any]]] = {}
    for r in records:
        run = r["run"]
        out.setdefault((run["head"], run["identities"], run["budget"]), []).append(r)
    return out


def _geo(values: list[float]) -> str:
    """Geometric mean ×/÷ geometric std over seeds ("v" alone for one value): FARs spread multiplicatively."""
    logs = [math.log(v) for v in values]
    centre = math.exp(statistics.fmean(logs))
    if len(logs) == 1:
        return f"{centre:.2g}"
    return f"{centre:.2g} ×/÷ {math.exp(statistics.stdev(logs)):.2g}"


def study_table(records: list[dict[str, Any]]) -> str:
    """One row per (head, C, budget): the learned threshold and where it lands on the held-out identities."""
    rows = []
    for (head, c, budget), rs in groups(records).items():
        measurable = [100 * r["tar_at_far"]["0.001"] for r in rs if r["tar_at_far"]["0.001"] is not None]
        tar3 = mean_std(measurable, 1) if measurable else "–"
        steps = sorted({r["steps"] for r in rs})
        base = [head, str(c), f"{budget} ({'/'.join(map(str, steps))} steps, {rs[0]['epochs']} ep.)", str(len(rs))]
        primary = [_primary(r) for r in rs]
        if primary[0] is None:  # the calibrated reference
            rows.append(base + ["–", _geo([_far(r["calibrated"]) for r in rs]) + " (calibrated)", "–",
                                mean_std([100 * r["calibrated"]["tar"] for r in rs], 1), "–", tar3])
            continue
        label = primary[0][0]
        fars = [_far(p) for _, p in primary]
        rows.append(base + [
            mean_std([p["threshold"] for _, p in primary], 3) + ("" if label == "b/s" else f" ({label})"),
            _geo(fars), _geo([f * c for f in fars]), mean_std([100 * p["tar"] for _, p in primary], 1),
            mean_std([p["threshold"] - r["threshold_at_far_1e-3"] for (_, p), r in zip(primary, rs)], 3), tar3])
    headers = ["head", "C", "budget", "seeds", "learned t", "FAR at t", "FAR × C", "TAR at t (%)",
               "t − t(FAR=1e-3)", "TAR@FAR=1e-3 (%)"]
    return markdown_table(headers, rows)


def far_times_c(records: list[dict[str, Any]], head: str, convention: str | None = None
                ) -> list[tuple[int, float]]:
    """(C, FAR × C) of every run of `head` at its primary (or the named) learned threshold."""
    out = []
    for r in records:
        if r["run"]["head"] != head or not r["learned"]:
            continue
        rates = r["learned"][convention] if convention else next(iter(r["learned"].values()))
        out.append((r["run"]["identities"], _far(rates) * r["run"]["identities"]))
    return out


def fit_summary(records: list[dict[str, Any]]) -> str:
    """Per head and convention: the fitted k of FAR ≈ k/C (median of FAR × C), its spread, and per C."""
    rows = []
    heads = dict.fromkeys(r["run"]["head"] for r in records if r["learned"])
    for head in heads:
        conventions = next(r["learned"] for r in records if r["run"]["head"] == head)
        for convention in conventions:
            pairs = far_times_c(records, head, convention)
            ks = [k for _, k in pairs]
            per_c = {c: statistics.median([k for cc, k in pairs if cc == c]) for c in sorted({c for c, _ in pairs})}
            rows.append([head, convention, str(len(ks)), f"{statistics.median(ks):.3g}",
                         f"{min(ks):.3g} – {max(ks):.3g}", ", ".join(f"C={c}: {k:.3g}" for c, k in per_c.items())])
    return markdown_table(["head", "threshold", "runs", "k = median FAR × C", "range", "median per C"], rows)


def plot_study(records: list[dict[str, Any]], path: Path) -> Path:
    """FAR at the learned threshold against C (log-log), one colour per head, one marker per budget, with
    the calibrated reference and lines k/C; beside it the TAR at t against the TAR at FAR 1e-3."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # matplotlib only where a plot is drawn
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.4))
    FigureCanvasAgg(fig)
    left, right = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    budgets = sorted({r["run"]["budget"] for r in records})
    markers = dict(zip(budgets, "os^Dv"))
    colours = dict(zip(STUDY_HEADS, ("tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:gray")))
    for (head, c, budget), rs in groups(records).items():
        primary = [_primary(r) for r in rs]
        fars = [_far(p) for _, p in primary] if primary[0] else [_far(r["calibrated"]) for r in rs]
        tars = [p["tar"] for _, p in primary] if primary[0] else [r["calibrated"]["tar"] for r in rs]
        reference = [np.nan if r["tar_at_far"]["0.001"] is None else r["tar_at_far"]["0.001"] for r in rs]
        colour = colours.get(head, "black")
        label = f"{head}, {budget} steps" + ("" if primary[0] else " (calibrated at 1e-3)")
        left.scatter([c] * len(fars), fars, color=colour, marker=markers.get(budget, "o"), s=22, label=label)
        right.scatter(reference, tars, color=colour, marker=markers.get(budget, "o"), s=22)
    cs = np.array(sorted({r["run"]["identities"] for r in records}), dtype=float)
    for k in (0.3, 1.0, 3.0):
        left.plot(cs, k / cs, color="black", lw=0.6, ls=":")
        left.annotate(f"{k:g}/C", (cs[-1], k / cs[-1]), fontsize="x-small")
    left.set_xscale("log")
    left.set_yscale("log")
    left.set_xlabel("training identities C")
    left.set_ylabel("FAR at the learned t (held-out identities)")
    left.grid(True, which="both", ls=":", lw=0.5)
    handles, labels = left.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    left.legend(unique.values(), unique.keys(), fontsize="xx-small", ncol=2)
    right.plot([0, 1], [0, 1], color="black", lw=0.6, ls=":")
    right.set_xlabel("TAR at FAR = 1e-3 (the model's quality)")
    right.set_ylabel("TAR at the learned t")
    right.grid(True, ls=":", lw=0.5)
    fig.tight_layout()
    with atomic_open(path) as fh:
        fig.savefig(fh, format="png", dpi=110)
    return path
