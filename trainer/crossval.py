"""K-fold cross-validation, reported as mean +- sd like the paper."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy.special import softmax
from sklearn.model_selection import StratifiedKFold
from tqdm import tqdm

from engines.deployed_model import DeployedDeepFlow
from trainer.calibration import FoldEvidence
from trainer.class_mix import ClassMix
from trainer.dataset import CellDataset
from trainer.dead_cells import fit_detector
from trainer.evaluation import confusion_matrix
from trainer.merges import merged_classes, remap_labels
from trainer.train import FitResult, TrainConfig, fit, logits_and_embedding, stratified_split, validation_metrics

INNER_VALIDATION_FRACTION = 0.1


def fold_parts(labels: np.ndarray, folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train, test) positions into ``labels`` of each stratified fold: the one split every K-fold figure uses."""
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    return list(splitter.split(np.zeros(len(labels)), labels))


@dataclass(frozen=True)
class CrossValidation:
    """A cross-validation's report, and what a final model trained on every cell borrows from it."""

    summary: dict[str, Any]  # per-fold and pooled figures (bundle.json's ``cross_validation``)
    evidence: FoldEvidence

    @property
    def best_epochs(self) -> list[int]:
        return [fold["best_epoch"] for fold in self.summary["per_fold"]]


def cross_validate(
    dataset: CellDataset,
    labeled: np.ndarray,
    folds: int,
    config: TrainConfig,
    checkpoint_dir: Path | None = None,
    resume: bool = False,
    report_merges: list[str] | None = None,
    class_mix: Mapping[str, float] | None = None,
    dead_quantile: float = 0.99,
    on_fold: Callable[[int, FitResult, np.ndarray, np.ndarray], None] | None = None,
) -> CrossValidation:
    """Train one model per fold and score it on the fold it never saw.

    Early stopping uses an inner validation split of the training folds, so the
    held-out fold stays untouched until it is scored. ``report_merges`` also
    scores each fold with classes merged (probabilities summed), so one run gives
    both the 7-stage and the paper's 5-class figures. ``class_mix`` also scores
    each fold for a population with that mix (:mod:`trainer.class_mix`), against
    the class mix its own training cells had. Each fold also measures how much
    further from the live clusters unseen live cells lie than training cells do
    (at ``dead_quantile`` of the dead-cell score): a model trained on every cell
    has no unseen cells to set its dead-cell threshold on, and borrows that stretch.
    ``on_fold(fold, fitted, train_index, validation_index)`` gets each fold's model once it is scored
    (`flowsort train --keep-folds` packages it).
    """
    merge_mapping = merged_classes(dataset.class_names, report_merges)[1] if report_merges else None
    labels = dataset.labels[labeled]
    min_count = int(np.bincount(labels[labels >= 0]).min(initial=0))
    per_fold, held_out_logits, held_out_labels, stretches = [], [], [], []
    for k, (train_part, test_part) in enumerate(fold_parts(labels, folds, config.seed)):
        inner_train, inner_val = stratified_split(labels[train_part], INNER_VALIDATION_FRACTION, config.seed + k)
        train_index, val_index = labeled[train_part][inner_train], labeled[train_part][inner_val]
        test_index = labeled[test_part]
        checkpoint = checkpoint_dir / f"fold-{k + 1}.pt" if checkpoint_dir else None
        result = fit(dataset, train_index, val_index, config, checkpoint, resume, description=f"fold {k + 1}/{folds}")
        logits, test_embedding = logits_and_embedding(result.module, dataset.images, test_index)
        test_labels = dataset.labels[test_index]
        held_out_logits.append(logits)
        held_out_labels.append(test_labels)
        stretches.append(live_score_stretch(result.module, dataset, train_index, test_embedding, dead_quantile))
        metrics = validation_metrics(logits, test_labels.astype(np.int64))
        metrics["confusion_matrix"] = confusion_matrix(test_labels, logits.argmax(axis=1), len(dataset.class_names)).tolist()
        if merge_mapping is not None:
            metrics["merged"] = merged_metrics(logits, test_labels, merge_mapping)
        if class_mix is not None:
            prior = np.bincount(dataset.labels[train_index], minlength=len(dataset.class_names)) / len(train_index)
            mix = ClassMix.of(dataset.class_names, class_mix, prior)
            metrics["class_mix"] = mix.metrics(softmax(logits, axis=1), test_labels)
        metrics.update(fold=k + 1, n_test=int(len(test_index)), best_epoch=result.best_epoch)
        tqdm.write(f"fold {k + 1}/{folds} on its {len(test_index)} held-out cells: accuracy {metrics['accuracy']:.4f}, "
                   f"balanced accuracy {metrics['balanced_accuracy']:.4f}"
                   + (f"; merged accuracy {metrics['merged']['accuracy']:.4f}" if "merged" in metrics else "")
                   + (f"; at the class mix {metrics['class_mix']['accuracy']:.4f}" if "class_mix" in metrics else ""))
        per_fold.append(metrics)
        if on_fold is not None:
            on_fold(k + 1, result, train_index, val_index)
    summary: dict[str, Any] = {
        "folds": folds, "per_fold": per_fold, "smallest_class": min_count, "class_names": list(dataset.class_names),
        # Pooled over the folds: every cell is counted once, when it was held out.
        "confusion_matrix": np.sum([fold["confusion_matrix"] for fold in per_fold], axis=0).tolist(),
    }
    summary.update(mean_and_sd(per_fold))
    if merge_mapping is not None:
        summary["merged"] = {"merges": report_merges, **mean_and_sd([fold["merged"] for fold in per_fold])}
    if class_mix is not None:
        summary["class_mix"] = {"mix": per_fold[0]["class_mix"]["mix"], **mean_and_sd([fold["class_mix"] for fold in per_fold])}
    return CrossValidation(summary, FoldEvidence(np.concatenate(held_out_logits),
                                                 np.concatenate(held_out_labels).astype(np.int64),
                                                 float(np.median(stretches))))


def live_score_stretch(module: DeployedDeepFlow, dataset: CellDataset, train_index: np.ndarray, test_embedding: np.ndarray,
                       quantile: float) -> float:
    """How much higher the ``quantile`` of unseen live cells' dead-cell scores is than that of the training cells,
    with a detector fitted on the training cells (as :mod:`trainer.package` fits one)."""
    _, train_embedding = logits_and_embedding(module, dataset.images, train_index)
    detector = fit_detector(train_embedding, dataset.labels[train_index])
    seen = float(np.quantile(detector.score(train_embedding), quantile))
    return float(np.quantile(detector.score(test_embedding), quantile)) / max(seen, 1e-12)


def merged_metrics(logits: np.ndarray, labels: np.ndarray, mapping: np.ndarray) -> dict[str, float]:
    """Metrics after merging classes: merged probabilities are the sums of their members'."""
    probabilities = np.exp(logits - logits.max(axis=1, keepdims=True))
    merged = np.zeros((len(logits), int(mapping.max()) + 1))
    np.add.at(merged.T, mapping, probabilities.T)
    metrics = validation_metrics(np.log(merged + 1e-12), remap_labels(labels, mapping).astype(np.int64))
    metrics.pop("loss")
    return metrics


def mean_and_sd(per_fold: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    out = {}
    for key in ("accuracy", "balanced_accuracy"):
        values = np.array([fold[key] for fold in per_fold])
        out[key] = {"mean": float(values.mean()), "sd": float(values.std(ddof=1)) if len(values) > 1 else 0.0}
    return out
