"""Evaluation protocols on precomputed embeddings (specs: evaluation.md).

- `verification`: insightface `.bin` 10-fold protocol (exact reproduction by default), exact ROC,
  TAR@FAR, AUC, EER, deployment thresholds, LFW `pairs.txt`.
- `ijb`: IJB-B/IJB-C meta readers, vectorised template pooling, 1:1 and 1:N.
- `megaface`: MegaFace Challenge 1 identification / verification in bounded memory.
- `mfr`: the MFR protocol (Mask / All sets), exact TAR at FAR over every pair in tiles.
- `report`: papers-style Markdown tables, ROC plots, report bundles.

`report` (matplotlib) is not imported here, so numeric callers stay light.
"""

from unitsface.evaluation.ijb import (
    IJB_FAR_TARGETS,
    IJBMeta,
    describe_ijb_mode,
    evaluate_ijb,
    evaluate_ijb_identification,
    ijb_mode,
    image_features,
    pair_scores,
    read_ijb_1n_meta,
    read_ijb_meta,
    template_features,
)
from unitsface.evaluation.megaface import clean_probes, evaluate_megaface
from unitsface.evaluation.mfr import evaluate_mfr, exact_tar_at_far
from unitsface.evaluation.verification import (
    PAIR_FAR_TARGETS,
    LargestScores,
    PairList,
    auc,
    best_single_threshold,
    eer,
    evaluate_all_pairs,
    evaluate_pairs,
    far_frr_at,
    l2_normalize,
    per_class_contiguous_folds,
    rates_from_counts,
    read_lfw_pairs,
    roc_counts,
    roc_curve,
    scores_from_pairs,
    tar_at_far,
    threshold_at_far,
)

__all__ = [
    "IJB_FAR_TARGETS",
    "IJBMeta",
    "LargestScores",
    "PAIR_FAR_TARGETS",
    "PairList",
    "auc",
    "best_single_threshold",
    "clean_probes",
    "describe_ijb_mode",
    "eer",
    "exact_tar_at_far",
    "evaluate_ijb",
    "evaluate_ijb_identification",
    "evaluate_all_pairs",
    "evaluate_megaface",
    "evaluate_mfr",
    "evaluate_pairs",
    "far_frr_at",
    "ijb_mode",
    "image_features",
    "l2_normalize",
    "pair_scores",
    "per_class_contiguous_folds",
    "rates_from_counts",
    "read_ijb_1n_meta",
    "read_ijb_meta",
    "read_lfw_pairs",
    "roc_counts",
    "roc_curve",
    "scores_from_pairs",
    "tar_at_far",
    "template_features",
    "threshold_at_far",
]
