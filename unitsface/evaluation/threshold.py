"""Where a decision threshold operates on a set of scored pairs: its TAR and FAR, and the landmarks
around it (the thresholds at fixed FARs and the balanced-accuracy one).

A learned unified threshold t = b/s (UniTSFace, UniFace) is only useful once its operating point on
*unseen* identities is known; `operating_point` measures it exactly over every pair of a set. Two
rules keep the numbers honest:

- a FAR with no false accept is "< 1/n_impostor", never 0: a set of 500 impostor pairs cannot tell
  FAR 1e-3 from FAR 1e-6;
- a threshold at a target FAR is only read where the set has at least `MIN_IMPOSTORS_PER_FAR`/FAR
  impostor pairs (10 false accepts expected at the target), otherwise it is "not measurable".

Every FAR and TAR here uses the deployment rule "accept when s >= t". `OperatingPoint` is a deployed
threshold with what is known of it; `learned_point` reads a checkpoint's or an export's learned one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Union

import numpy as np

from unitsface.errors import UnitsfaceError
from unitsface.evaluation.verification import check_scores, roc_curve, threshold_at_far

FAR_TARGETS = (1e-2, 1e-3, 1e-4)
MIN_IMPOSTORS_PER_FAR = 10
NOT_MEASURABLE = "not measurable"
# A learned threshold at or above every genuine score: what training too briefly for its C classes does (the
# threshold study, docs/threshold.md). Said wherever the operating point is, so that nobody deploys it.
ACCEPTS_NOTHING = ("it accepts no genuine pair: t is at or above every genuine score (training too short for "
                   "its classes?); set a threshold with `unitsface calibrate --far`")

Rate = Union[float, str]


def flag_blind(text: str, tar: float) -> str:
    """`text` about a threshold, with ACCEPTS_NOTHING appended when its TAR is 0."""
    return text if tar > 0 else f"{text} — {ACCEPTS_NOTHING}"


def far_key(far: float) -> str:
    """The JSON key of a FAR target: 0.01, 0.001, 0.0001 as written by Python."""
    return repr(float(far))


def rate_value(accepted: int, total: int) -> Rate:
    """accepted/total, or "< 1/total" when nothing was accepted (an upper bound, not a zero)."""
    return accepted / total if accepted else f"< 1/{total}"


def format_rate(rate: Rate | None, digits: int = 3) -> str:
    """A FAR/TAR for people: "1.8e-03", "< 1/500", or "unknown"."""
    if rate is None:
        return "unknown"
    return rate if isinstance(rate, str) else f"{rate:.{digits}g}"


def balanced_threshold(scores: np.ndarray, issame: np.ndarray) -> float:
    """The threshold maximising ½(TAR + TNR) exactly (one candidate per distinct score); the first
    best one, i.e. the highest threshold reaching the optimum."""
    fpr, tpr, thresholds = roc_curve(scores, issame)
    k = int(np.argmax(tpr - fpr))
    return float(thresholds[k]) if np.isfinite(thresholds[k]) else float(np.nextafter(np.max(scores), np.inf))


def thresholds_at_far(scores: np.ndarray, issame: np.ndarray, targets=FAR_TARGETS) -> dict[str, float | str]:
    """{far_key: lowest threshold with FAR <= target}, "not measurable" where the set has fewer than
    MIN_IMPOSTORS_PER_FAR/target impostor pairs."""
    s, y = check_scores(scores, issame)
    n_impostor = int((~y).sum())
    return {far_key(f): (threshold_at_far(s, y, f) if n_impostor * f >= MIN_IMPOSTORS_PER_FAR else NOT_MEASURABLE)
            for f in targets}


def rates_at(scores: np.ndarray, issame: np.ndarray, threshold: float) -> dict[str, Any]:
    """TAR and FAR of one threshold with their counts."""
    s, y = check_scores(scores, issame)
    accept = s >= threshold
    n_genuine, n_impostor = int(y.sum()), int((~y).sum())
    true_accepts, false_accepts = int(accept[y].sum()), int(accept[~y].sum())
    return {"threshold": float(threshold), "tar": true_accepts / n_genuine,
            "far": rate_value(false_accepts, n_impostor), "true_accepts": true_accepts,
            "false_accepts": false_accepts, "n_genuine": n_genuine, "n_impostor": n_impostor}


def operating_point(scores: np.ndarray, issame: np.ndarray, thresholds: dict[str, float]) -> dict[str, Any]:
    """The operating point of a learned threshold on one scored set.

    `thresholds` maps a convention name to its value, the primary one first (UCE reports both `b/s`
    and `(b − log(C−1))/s`, methods.md §3.1). Returns the primary threshold's TAR/FAR with counts,
    "convention", the set's thresholds at FAR 1e-2/1e-3/1e-4 and its balanced-accuracy threshold, and
    the other conventions' TAR/FAR under "other_conventions".
    """
    (name, value), *others = thresholds.items()
    point = {**rates_at(scores, issame, value), "convention": name,
             "threshold_at_far": thresholds_at_far(scores, issame),
             "balanced_threshold": balanced_threshold(scores, issame)}
    if others:
        point["other_conventions"] = {n: rates_at(scores, issame, t) for n, t in others}
    return point


def describe(point: dict[str, Any], set_name: str) -> str:
    """One sentence a newcomer understands, e.g. "the learned threshold 0.764 accepts 63.0 % of genuine
    pairs at a FAR of 1.8e-03 (573 of 316800 impostor pairs) on heldout"."""
    far = point["far"]
    far_text = (f"a FAR below 1/{point['n_impostor']} (no false accept among {point['n_impostor']} impostor pairs)"
                if isinstance(far, str) else
                f"a FAR of {far:.2g} ({point['false_accepts']} of {point['n_impostor']} impostor pairs)")
    return flag_blind(f"the learned threshold {point['threshold']:.4f} accepts {100 * point['tar']:.1f} % of "
                      f"genuine pairs at {far_text} on {set_name}", point["tar"])


def primary_set(points: dict[str, dict[str, Any]]) -> str | None:
    """The set whose operating point a deployment should quote: the one with the most impostor pairs
    (the most precise FAR); None when there is none."""
    return max(points, key=lambda name: points[name]["n_impostor"], default=None)


# ------------------------------------------------------------------------ the threshold in use


@dataclass(frozen=True)
class OperatingPoint:
    """A threshold, where it came from, and its FAR/TAR where they were measured (None: unknown).

    `far` is "< 1/n" when the measurement saw no false accept among n impostor pairs: an upper bound,
    not a zero. `measured_on` names the pair set (a validation set of the training run, a calibration
    file); `impostor_pairs` says how precise the FAR is.
    """

    threshold: float
    source: str
    far: Rate | None = None
    tar: float | None = None
    measured_on: str | None = None
    impostor_pairs: int | None = None

    @property
    def frr(self) -> float | None:
        return None if self.tar is None else 1.0 - self.tar

    def describe(self) -> str:
        """One line for people: the threshold, its source, and its expected FAR/TAR and where measured."""
        head = f"threshold {self.threshold:.4f} ({self.source})"
        if self.tar is None:
            return f"{head}; expected FAR and TAR unknown"
        return flag_blind(f"{head}; expected FAR {format_rate(self.far)}, TAR {self.tar:.3f}, measured on "
                          f"{self.measured_on} ({self.impostor_pairs} impostor pairs)", self.tar)


def measure(point: OperatingPoint, scores: np.ndarray, issame: np.ndarray, measured_on: str) -> OperatingPoint:
    """`point` with its FAR/TAR measured on these pairs (accept s >= t)."""
    rates = rates_at(scores, issame, point.threshold)
    return OperatingPoint(point.threshold, point.source, rates["far"], rates["tar"], measured_on, rates["n_impostor"])


def calibrate(scores: np.ndarray, issame: np.ndarray, far: float, measured_on: str) -> OperatingPoint:
    """The lowest threshold whose FAR on these pairs is ≤ `far` (accept s ≥ t), with its FAR/TAR."""
    if not 0 < far < 1:
        raise UnitsfaceError(f"target FAR must be in (0, 1), got {far}")
    point = OperatingPoint(threshold_at_far(scores, issame, far), f"calibrated at FAR={far:g}")
    return measure(point, scores, issame, measured_on)


def learned_point(meta: dict[str, Any]) -> OperatingPoint | None:
    """The learned threshold of a checkpoint's meta (or an export's metadata) with the operating point
    training measured on its `threshold_set`; None for a model without one."""
    if meta.get("threshold") is None:
        return None
    name = meta.get("threshold_set")
    point = (meta.get("threshold_operating_point") or {}).get(name) if name else None
    if point is None:
        return OperatingPoint(float(meta["threshold"]), "learned b/s")
    return OperatingPoint(float(meta["threshold"]), "learned b/s", point["far"], point["tar"], name,
                          point["n_impostor"])


def exported_point(metadata: dict[str, Any]) -> OperatingPoint | None:
    """The learned threshold an ONNX/TorchScript export carries (`export.common.threshold_metadata`), None
    without one."""
    if metadata.get("threshold") is None:
        return None
    pairs = metadata.get("threshold_pairs") or {}
    return OperatingPoint(float(metadata["threshold"]), metadata.get("threshold_source") or "learned b/s",
                          metadata.get("threshold_far"), metadata.get("threshold_tar"), metadata.get("threshold_set"),
                          pairs.get("impostor"))
