"""Generic classification with a unified threshold: a linear layer trained with softmax or BCE.

BCE with one bias b shared by all classes (L_bce-u) learns a single threshold that separates
every positive score from every negative one — "uniform classification" (Li et al.,
"Rediscovering BCE Loss for Uniform Classification", arXiv 2403.07289; the form implemented
is the same group's BCE-vs-CE code `models/linear.py`). BCE with free b_j (L_bce-d) and
softmax are the comparisons. methods.md §3.4 gives the loss, §4 the metrics.

`uniform_benchmark` trains a small MLP on scikit-learn's bundled digits set (no download)
with each of the three losses, for `unitsface bench uniform`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from unitsface.errors import UnitsfaceError
from unitsface.losses import functional as LF


class LinearClassifier(nn.Module):
    """Scores f_ij = <w_j, x_i> (or s·cos θ_ij when `normalized`) and a softmax or BCE loss.

    loss="softmax": CE over f + b, b per class (bias_mode must be "diverse": a shared bias
    cancels in softmax). loss="bce": Σ_j BCE terms on f − b (methods.md §3.4), with one float
    scalar b ("unified", a Parameter of shape (1,)) or b ∈ R^C ("diverse"). BCE biases start
    at log(10·C) like the face heads, or at `bias_init`.
    """

    def __init__(self, in_features: int, num_classes: int, loss: str = "softmax", bias_mode: str = "diverse",
                 normalized: bool = False, s: float = 64.0, lam: float = 1.0,
                 bias_init: float | None = None) -> None:
        super().__init__()
        if loss not in ("softmax", "bce"):
            raise UnitsfaceError(f"loss must be 'softmax' or 'bce', got {loss!r}")
        if bias_mode not in ("unified", "diverse"):
            raise UnitsfaceError(f"bias_mode must be 'unified' or 'diverse', got {bias_mode!r}")
        if loss == "softmax" and bias_mode == "unified":
            raise UnitsfaceError("bias_mode 'unified' needs loss 'bce': a shared bias cancels in softmax")
        if num_classes < 2:
            raise UnitsfaceError(f"num_classes must be at least 2, got {num_classes}")
        self.loss_name, self.bias_mode, self.normalized = loss, bias_mode, bool(normalized)
        self.s, self.lam = float(s), float(lam)
        self.weight = nn.Parameter(torch.empty(num_classes, in_features))
        nn.init.normal_(self.weight, 0.0, 1.0 / math.sqrt(in_features))
        default = 0.0 if loss == "softmax" else math.log(10.0 * num_classes)
        start = default if bias_init is None else float(bias_init)
        self.bias = nn.Parameter(torch.full((1 if bias_mode == "unified" else num_classes,), start))

    def metric(self, x: torch.Tensor) -> torch.Tensor:
        """f (N×C) before any bias, in fp32."""
        if self.normalized:
            return self.s * LF.cosine(x, self.weight)
        with torch.autocast(device_type=x.device.type, enabled=False):
            return x.float() @ self.weight.float().t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Decision scores: f + b (softmax), f − b_j (diverse BCE), or f (unified BCE).

        A unified bias is left out so it stays comparable with the optimal threshold t* of
        these scores (methods.md §4): b and t* are in the same units.
        """
        f = self.metric(x)
        if self.loss_name == "softmax":
            return f + self.bias
        return f if self.bias_mode == "unified" else f - self.bias

    def loss(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean over the batch of the per-sample loss (BCE terms summed over classes, §3.5)."""
        f = self.metric(x)
        if self.loss_name == "softmax":
            return LF.cross_entropy_rows(f + self.bias, labels).mean()
        return LF.threshold_bce_loss(f, labels, self.bias, s=1.0, m=0.0, lam=self.lam)

    @property
    def threshold(self) -> float | None:
        """The learned unified threshold b (units of f); None for per-class biases."""
        return float(self.bias.detach()) if self.bias_mode == "unified" else None


# --------------------------------------------------------------------------- the digits benchmark

BENCH_METHODS: dict[str, dict[str, Any]] = {
    "softmax": {"loss": "softmax", "bias_mode": "diverse"},
    "bce-unified": {"loss": "bce", "bias_mode": "unified"},
    "bce-diverse": {"loss": "bce", "bias_mode": "diverse"},
}


def digits_split(seed: int, test_fraction: float = 0.3) -> tuple[torch.Tensor, ...]:
    """(x_train, y_train, x_test, y_test): scikit-learn's bundled 8×8 digits, pixels scaled to
    [0, 1], a stratified split drawn from `seed`."""
    from sklearn.datasets import load_digits  # scikit-learn (slow to import) only for the digits benchmark
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x / 16.0, y, test_size=test_fraction, stratify=y,
                                              random_state=seed)
    f32, i64 = torch.float32, torch.long
    return torch.tensor(x_tr, dtype=f32), torch.tensor(y_tr, dtype=i64), torch.tensor(x_te, dtype=f32), \
        torch.tensor(y_te, dtype=i64)


def train_digits_model(method: str, seed: int, epochs: int = 30, batch_size: int = 64,
                       lr: float = 3e-3, embedding_size: int = 32) -> dict[str, Any]:
    """Train MLP(64→128→`embedding_size`) + LinearClassifier with one `method` of BENCH_METHODS
    and measure it on the test split. The seed fixes the split, the MLP's initial weights
    and the batch order, so the methods differ only in the classifier and its loss."""
    if method not in BENCH_METHODS:
        raise UnitsfaceError(f"unknown method {method!r}; known: {', '.join(BENCH_METHODS)}")
    x_tr, y_tr, x_te, y_te = digits_split(seed)
    torch.manual_seed(seed)
    trunk = nn.Sequential(nn.Linear(x_tr.shape[1], 128), nn.ReLU(), nn.Linear(128, embedding_size))
    classifier = LinearClassifier(embedding_size, 10, **BENCH_METHODS[method])
    optimizer = torch.optim.Adam([*trunk.parameters(), *classifier.parameters()], lr=lr)
    order_rng = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for _ in range(epochs):
        for batch in torch.randperm(len(y_tr), generator=order_rng).split(batch_size):
            loss = classifier.loss(trunk(x_tr[batch]), y_tr[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    seconds = time.perf_counter() - start
    with torch.no_grad():
        scores = classifier(trunk(x_te))
    accuracy, threshold = LF.uniform_accuracy(scores, y_te)
    return {
        "method": method, "seed": seed, "sample_wise_accuracy": LF.sample_wise_accuracy(scores, y_te),
        "uniform_accuracy": accuracy, "optimal_threshold": threshold, "learned_bias": classifier.threshold,
        "final_train_loss": loss.item(), "train_seconds": seconds,
    }


def uniform_benchmark(seeds: Iterable[int], epochs: int = 30) -> list[dict[str, Any]]:
    """One result per (method, seed): every method of BENCH_METHODS on the same seeds."""
    if epochs < 1:
        raise UnitsfaceError(f"epochs must be at least 1, got {epochs}")
    return [train_digits_model(method, seed, epochs) for method in BENCH_METHODS for seed in seeds]
