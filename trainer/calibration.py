"""Temperature scaling (Guo et al. 2017) and expected calibration error.

Deep nets are over-confident; a sort gate's minimum probability only means
what it says once the probabilities are calibrated. One scalar temperature,
fitted on held-out cells, fixes confidence without changing any decision.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax, softmax


@dataclass(frozen=True)
class FoldEvidence:
    """What a model trained on every labeled cell, having no unseen cells of its own, borrows from the
    cross-validation folds that trained it: their held-out predictions, and how far unseen live cells lie."""

    logits: np.ndarray  # [N, K] each cell's logits from the fold model that never saw it
    labels: np.ndarray  # [N]
    live_score_stretch: float  # median over folds: dead-cell score quantile of unseen live cells / of training cells


def negative_log_likelihood(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    return float(-log_softmax(logits / temperature, axis=1)[np.arange(len(labels)), labels].mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature in [0.05, 20] minimizing held-out negative log-likelihood."""
    if len(labels) == 0:
        return 1.0
    result = minimize_scalar(
        lambda log_t: negative_log_likelihood(logits, labels, float(np.exp(log_t))),
        bounds=(np.log(0.05), np.log(20.0)),
        method="bounded",
    )
    return float(np.exp(result.x))


def calibrated_probabilities(logits: np.ndarray, temperature: float) -> np.ndarray:
    return softmax(logits / temperature, axis=1)


def reliability(probabilities: np.ndarray, labels: np.ndarray, bins: int = 15) -> dict[str, np.ndarray]:
    """Per confidence bin: mean confidence, accuracy and cell count."""
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == labels
    which = np.minimum((confidence * bins).astype(int), bins - 1)
    count = np.bincount(which, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_confidence = np.bincount(which, confidence, bins) / count
        accuracy = np.bincount(which, correct.astype(float), bins) / count
    return {"confidence": mean_confidence, "accuracy": accuracy, "count": count}


def expected_calibration_error(probabilities: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    table = reliability(probabilities, labels, bins)
    filled = table["count"] > 0
    gaps = np.abs(table["confidence"][filled] - table["accuracy"][filled])
    return float((gaps * table["count"][filled]).sum() / max(1, len(labels)))
