"""Dead-cell detector: distance from the live-cell clusters in DeepFlow's embedding.

The paper saw damaged and dead cells, unsupervised, as a separate cluster in
the embedding space. We model the live classes as Gaussians with one shared
covariance (as in linear discriminant analysis, the Mahalanobis out-of-
distribution detector of Lee et al. 2018) and score a cell by its Mahalanobis
distance to the nearest class mean. The covariance is shrunk (Ledoit-Wolf)
because a 336-d covariance from a few thousand cells is otherwise singular.

The score is folded into the exported graph as a whitening matrix ``W`` with
``W W^T = Sigma^-1`` and whitened class means, so the runtime computes it with
one matrix product.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.covariance import LedoitWolf


@dataclass(frozen=True)
class GaussianDetector:
    means: np.ndarray  # [K, D] class means of live cells
    whitening: np.ndarray  # [D, D], whitening @ whitening.T == inverse shared covariance

    def score(self, embedding: np.ndarray) -> np.ndarray:
        """Mahalanobis distance of each embedding [N, D] to the nearest class mean."""
        z = embedding.astype(np.float64) @ self.whitening
        centers = self.means.astype(np.float64) @ self.whitening
        d2 = (z**2).sum(1, keepdims=True) - 2 * z @ centers.T + (centers**2).sum(1)
        return np.sqrt(np.clip(d2.min(axis=1), 0, None)).astype(np.float32)


def fit_detector(embedding: np.ndarray, labels: np.ndarray) -> GaussianDetector:
    """Fit class means and a shared, shrunk covariance on live, labeled cells."""
    classes = np.unique(labels)
    means = np.stack([embedding[labels == k].mean(axis=0) for k in classes])
    centered = embedding - means[np.searchsorted(classes, labels)]
    covariance = LedoitWolf(assume_centered=True).fit(centered).covariance_
    precision = np.linalg.inv(covariance)
    whitening = np.linalg.cholesky((precision + precision.T) / 2)
    return GaussianDetector(means=means.astype(np.float32), whitening=whitening.astype(np.float32))


def quantile_threshold(live_scores: np.ndarray, quantile: float) -> float:
    """Flag what lies beyond ``quantile`` of the live training cells' scores."""
    return float(np.quantile(live_scores, quantile))


def labeled_threshold(live_scores: np.ndarray, dead_scores: np.ndarray) -> float:
    """The threshold that best separates known dead/debris cells from live ones (Youden's J)."""
    candidates = np.unique(np.concatenate([live_scores, dead_scores]))
    live_sorted, dead_sorted = np.sort(live_scores), np.sort(dead_scores)
    # flagged when score > t: TPR = dead above t, FPR = live above t
    tpr = 1 - np.searchsorted(dead_sorted, candidates, side="right") / len(dead_sorted)
    fpr = 1 - np.searchsorted(live_sorted, candidates, side="right") / len(live_sorted)
    return float(candidates[np.argmax(tpr - fpr)])
