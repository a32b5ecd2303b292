"""Evaluating a model bundle on a dataset: the numbers behind `flowsort evaluate` and `flowsort embed`.

Why: a bundle's own metrics describe one held-out split of its training data.
Before a sort gate is trusted, a user needs the same numbers on new data
(another day, another donor), under the class merges the experiment cares
about, plus how well calibrated the probabilities are, how good the embedding
is independently of the classifier head, and what the dead-cell detector flags.

A dataset's class order may differ from the bundle's, so labels are matched to
the model's classes by name, never by index.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
from scipy.special import softmax

from engines.bundle import Bundle, load_bundle
from engines.deployed_model import load_deployed
from flowsort.errors import UserError
from trainer.class_mix import ClassMix
from trainer.calibration import expected_calibration_error, reliability
from trainer.dataset import UNLABELED, CellDataset, read_dataset
from trainer.predictions import Predictions, check_compatible, predict
from trainer.report_html import render_report
from trainer.merges import apply_merges, merged_classes, parse_merge

PREDICT_CHUNK = 4096  # cells read from the memory-mapped dataset per step of the progress bar
KNN_K = 20
KNN_TEMPERATURE = 0.07
KNN_MAX_CELLS = 20_000
KNN_BLOCK_ELEMENTS = 1 << 24  # similarities held at once (64 MiB of float32)
MAP_MAX_CELLS = 3000  # t-SNE is quadratic in memory and slow beyond a few thousand points
MAP_PCA_DIMS = 50
MAP_MIN_CELLS = 10
REPORT_JSON = "report.json"
REPORT_HTML = "report.html"
@dataclass(frozen=True)
class Merge:
    """The model's classes merged for evaluation: merged probabilities are sums of their members'."""

    specs: tuple[str, ...]
    source_names: tuple[str, ...]
    class_names: tuple[str, ...]
    mapping: np.ndarray  # model class index -> merged class index

    @classmethod
    def of(cls, class_names: Sequence[str], specs: Sequence[str]) -> Merge:
        names, mapping = merged_classes(tuple(class_names), list(specs))
        return cls(tuple(specs), tuple(class_names), names, mapping.astype(np.int64))

    def probabilities(self, probabilities: np.ndarray) -> np.ndarray:
        return probabilities @ np.eye(len(self.class_names), dtype=probabilities.dtype)[self.mapping]

    def index_by_name(self) -> dict[str, int]:
        """Merged names and the model's own names, each to its merged index."""
        return {
            **{name: index for index, name in enumerate(self.class_names)},
            **{name: int(self.mapping[index]) for index, name in enumerate(self.source_names)},
        }


def load_inputs(
    bundle_path: str | Path, dataset_path: str | Path, label_maps: Sequence[str] = ()
) -> tuple[Bundle, CellDataset]:
    """The verified bundle and the dataset labeled in the model's classes, refused when the model cannot read
    its cells."""
    bundle = load_bundle(bundle_path)
    dataset = as_trained(bundle, read_dataset(dataset_path), label_maps)
    check_compatible(bundle, dataset)
    if len(dataset) == 0:
        raise UserError(f"dataset {dataset_path} holds no cells")
    return bundle, dataset


def as_trained(bundle: Bundle, dataset: CellDataset, label_maps: Sequence[str] = ()) -> CellDataset:
    """The dataset labeled as the model was trained: the bundle's own training merges applied, then
    ``label_maps`` (``A,B=CLASS``: dataset classes to a model class, for bundles that record no merge).

    Each merge maps whichever of its classes the dataset holds, so a 5-class
    model (G1, S_phase and G2 merged into Interphase) evaluates a 7-stage
    dataset and a dataset of G1 cells alike, without the user repeating the merge.
    """
    for spec in label_maps:
        members, _ = parse_merge(spec)
        if not set(members) & set(dataset.class_names):
            raise UserError(f"--map-labels {spec!r}: the dataset has none of {', '.join(members)}; "
                            f"its classes are {', '.join(dataset.class_names)}")
    recorded = bundle.manifest["provenance"].get("dataset_merges", [])
    return apply_merges(apply_merges(dataset, recorded, missing_ok=True), label_maps, missing_ok=True)


def run_model(bundle: Bundle, dataset: CellDataset, chunk: int = PREDICT_CHUNK) -> Predictions:
    """Predictions for every cell, read chunk by chunk from the memory-mapped dataset with a progress bar."""
    from tqdm import tqdm

    module = load_deployed(bundle)
    parts: list[Predictions] = []
    with tqdm(total=len(dataset), desc="predict", unit="cell", dynamic_ncols=True, disable=None) as bar:
        for start in range(0, len(dataset), chunk):
            parts.append(predict(module, dataset.images[start : start + chunk]))
            bar.update(len(parts[-1].dead_score))
    return Predictions(*(np.concatenate([getattr(part, f.name) for part in parts]) for f in fields(Predictions)))


def flagged_dead(dead_score: np.ndarray, bundle: Bundle) -> np.ndarray:
    """The cells the bundle's dead-cell detector flags: a score above its threshold, as on the instrument."""
    return dead_score > bundle.dead_threshold


def labels_by_name(dataset: CellDataset, index_of: Mapping[str, int]) -> np.ndarray:
    """The dataset's labels re-indexed into another class list by name.

    Unlabeled cells and cells whose class is not in ``index_of`` become UNLABELED.
    """
    table = np.array([index_of.get(name, UNLABELED) for name in dataset.class_names] + [UNLABELED], dtype=np.int16)
    return table[dataset.labels]  # an UNLABELED (-1) label picks the trailing UNLABELED


def unknown_classes(dataset: CellDataset, known: set[str]) -> list[str]:
    """The dataset's classes that label cells and are not in ``known``."""
    return [name for name, count in dataset.class_counts().items() if count and name not in known]


def check_known_classes(dataset: CellDataset, known: set[str], class_names: Sequence[str]) -> None:
    """Refuse labeled cells of a class the model cannot predict: their accuracy would silently be zero."""
    unknown = unknown_classes(dataset, known)
    if unknown:
        raise UserError(
            f"the dataset labels cells as {', '.join(unknown)}, which the model does not know "
            f"(its classes: {', '.join(class_names)}): tell which model class each stands for with "
            f"--map-labels {unknown[0]}=CLASS (several classes: --map-labels A,B=CLASS, repeatable), "
            "or import the cells unlabeled"
        )


def model_labels(bundle: Bundle, dataset: CellDataset, merge: Merge | None = None, strict: bool = True) -> np.ndarray:
    """Labels as indices into the bundle's classes; cells labeled only with a merged name become UNLABELED.

    ``strict`` refuses cells labeled with a class the model does not know; otherwise they become UNLABELED.
    """
    index_of = {name: index for index, name in enumerate(bundle.class_names)}
    if strict:
        check_known_classes(dataset, set(index_of) | (set(merge.class_names) if merge else set()), bundle.class_names)
    return labels_by_name(dataset, index_of)


def confusion_matrix(labels: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts [true, predicted]."""
    flat = labels.astype(np.int64) * num_classes + predicted.astype(np.int64)
    return np.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def balanced_accuracy(confusion: np.ndarray) -> float | None:
    """Mean recall over the classes present, as scikit-learn defines it."""
    support = confusion.sum(axis=1)
    present = support > 0
    if not present.any():
        return None
    return float((np.diag(confusion)[present] / support[present]).mean())


def classification_metrics(probabilities: np.ndarray, labels: np.ndarray, class_names: Sequence[str]) -> dict[str, Any]:
    """Accuracy, balanced accuracy, per-class precision/recall/F1/support and confusion on labeled cells.

    Undefined values (precision of a class never predicted, recall of a class absent) are None.
    """
    known = labels != UNLABELED
    truth, predicted = labels[known], probabilities[known].argmax(axis=1)
    confusion = confusion_matrix(truth, predicted, len(class_names))
    hits, support, called = np.diag(confusion), confusion.sum(axis=1), confusion.sum(axis=0)
    per_class = {
        name: {
            "precision": _ratio(hits[k], called[k]),
            "recall": _ratio(hits[k], support[k]),
            "f1": _ratio(2 * hits[k], support[k] + called[k]),
            "support": int(support[k]),
        }
        for k, name in enumerate(class_names)
    }
    return {
        "class_names": list(class_names),
        "n_labeled": int(known.sum()),
        "accuracy": _ratio(hits.sum(), len(truth)),
        "balanced_accuracy": balanced_accuracy(confusion),
        "per_class": per_class,
        "confusion_matrix": confusion.tolist(),
    }


def uncalibrated(probabilities: np.ndarray, temperature: float) -> np.ndarray:
    """The probabilities before temperature scaling: softmax(T log p) undoes p = softmax(z / T) exactly."""
    log_p = np.log(np.maximum(probabilities.astype(np.float64), np.finfo(np.float64).tiny))
    return softmax(temperature * log_p, axis=1)


def calibration_metrics(probabilities: np.ndarray, labels: np.ndarray, temperature: float) -> dict[str, Any]:
    """ECE and reliability tables before and after the bundle's temperature scaling, on labeled cells."""
    known = labels != UNLABELED
    after, truth = probabilities[known], labels[known].astype(np.int64)
    record: dict[str, Any] = {"temperature": temperature, "bins": 15, "n_labeled": int(known.sum())}
    for name, probs in (("before", uncalibrated(after, temperature)), ("after", after)):
        record[f"ece_{name}"] = expected_calibration_error(probs, truth) if len(truth) else None
        record[f"reliability_{name}"] = {key: _jsonable(value) for key, value in reliability(probs, truth).items()}
    return record


def knn_accuracy(
    embedding: np.ndarray, labels: np.ndarray, k: int = KNN_K, temperature: float = KNN_TEMPERATURE
) -> dict[str, Any] | None:
    """Leave-one-out weighted k-NN accuracy of the labeled cells' embeddings.

    Why: it measures the embedding itself (what the dead-cell detector and any
    downstream clustering see) independently of the classifier head.
    """
    labeled = np.flatnonzero(labels != UNLABELED)
    if len(labeled) < 2:
        return None
    # quadratic in the cells: a random subsample keeps large datasets to a minute
    known = np.sort(np.random.default_rng(0).choice(labeled, min(len(labeled), KNN_MAX_CELLS), replace=False))
    x = embedding[known].astype(np.float32)
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    truth = labels[known].astype(np.int64)
    num_classes = int(truth.max()) + 1
    k = min(k, len(known) - 1)
    predicted = np.empty(len(truth), dtype=np.int64)
    chunk = max(1, KNN_BLOCK_ELEMENTS // len(known))
    for start in range(0, len(truth), chunk):
        similarity = x[start : start + chunk] @ x.T
        rows = np.arange(len(similarity))
        similarity[rows, start + rows] = -np.inf  # leave the cell itself out
        nearest = np.argpartition(-similarity, k - 1, axis=1)[:, :k]
        # exp((s - 1) / T) has the same ratios as exp(s / T) without overflow
        weights = np.exp((np.take_along_axis(similarity, nearest, axis=1) - 1) / temperature)
        votes = np.zeros((len(similarity), num_classes))
        np.add.at(votes, (rows[:, None], truth[nearest]), weights)
        predicted[start : start + chunk] = votes.argmax(axis=1)
    return {
        "k": k,
        "temperature": temperature,
        "protocol": (
            f"weighted k-NN, leave-one-out within the dataset on labeled cells: cosine similarity, the {k} most "
            f"similar other cells vote with weight exp(similarity / {temperature:g}) "
            "(the DINO / self-supervised cell-imaging protocol)"
        ),
        "n_labeled": int(len(truth)),
        "subsampled_from": int(len(labeled)) if len(known) < len(labeled) else None,
        "accuracy": float((predicted == truth).mean()),
        "balanced_accuracy": balanced_accuracy(confusion_matrix(truth, predicted, num_classes)),
    }


def dead_cell_metrics(dead_score: np.ndarray, bundle: Bundle, truth: np.ndarray | None) -> dict[str, Any]:
    """What the detector flags at the bundle's threshold and, with dead/debris truth, how well it separates them."""
    from sklearn.metrics import roc_auc_score

    flagged = flagged_dead(dead_score, bundle)
    record: dict[str, Any] = {
        "threshold": bundle.dead_threshold,
        "n_cells": int(len(flagged)),
        "n_flagged": int(flagged.sum()),
        "flagged_fraction": float(flagged.mean()),
        "auroc": None,
    }
    if truth is not None:
        record.update(
            n_dead_or_debris=int(truth.sum()),
            n_live=int((~truth).sum()),
            flagged_fraction_dead_or_debris=_ratio(flagged[truth].sum(), truth.sum()),
            flagged_fraction_live=_ratio(flagged[~truth].sum(), (~truth).sum()),
            auroc=float(roc_auc_score(truth, dead_score)) if 0 < truth.sum() < len(truth) else None,
        )
    return record


def embedding_map(embedding: np.ndarray, max_cells: int = MAP_MAX_CELLS, seed: int = 0) -> tuple[np.ndarray, np.ndarray] | None:
    """t-SNE coordinates [M, 2] of a random subsample of at most ``max_cells`` cells, and their indices.

    Rows are L2-normalized (so distances follow the cosine similarity the k-NN
    uses) and reduced to 50 principal components first, the usual speed-up.
    The Barnes-Hut iterations run on one OpenMP thread: each of the 1,000 steps
    is a tiny parallel region, and on a busy machine the threads' waits at them
    made the map ten times slower than one thread.
    """
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    if len(embedding) < MAP_MIN_CELLS:
        return None
    rng = np.random.default_rng(seed)
    index = np.sort(rng.choice(len(embedding), min(len(embedding), max_cells), replace=False))
    x = embedding[index].astype(np.float64)
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    x = PCA(min(MAP_PCA_DIMS, *x.shape), random_state=seed).fit_transform(x)
    tsne = TSNE(2, perplexity=min(30.0, (len(index) - 1) / 3), init="pca", learning_rate="auto", random_state=seed)
    with threadpool_limits(1, user_api="openmp"):
        return index, tsne.fit_transform(x)


def build_report(
    bundle: Bundle,
    dataset: CellDataset,
    predictions: Predictions,
    labels: np.ndarray,
    merge: Merge | None,
    class_mix: ClassMix | None = None,
) -> dict[str, Any]:
    """Every number of the evaluation, JSON-ready; ``labels`` index the bundle's classes."""
    from trainer.package import dead_truth

    report: dict[str, Any] = {
        **classification_metrics(predictions.probabilities, labels, bundle.class_names),
        "knn": knn_accuracy(predictions.embedding, labels),
        "calibration": calibration_metrics(predictions.probabilities, labels, float(bundle.manifest["temperature"])),
        "dead_cells": dead_cell_metrics(predictions.dead_score, bundle, dead_truth(dataset)),
        "bundle": {
            "path": str(bundle.path),
            "content_hash": bundle.content_hash,
            "class_names": list(bundle.class_names),
            "channels": list(bundle.channels),
            "input_size": bundle.input_size,
        },
        "dataset": {
            "n_cells": len(dataset),
            "class_counts": dataset.class_counts(),
            "source": dataset.source,
        },
    }
    if merge is not None:
        merged_labels = labels_by_name(dataset, merge.index_by_name())
        report["merged"] = {
            "merges": list(merge.specs),
            **classification_metrics(merge.probabilities(predictions.probabilities), merged_labels, merge.class_names),
            "knn": knn_accuracy(predictions.embedding, merged_labels),
        }
    if class_mix is not None:
        report["class_mix"] = class_mix.metrics(predictions.probabilities, labels)
    return report


def evaluate(
    bundle_path: str | Path,
    dataset_path: str | Path,
    merges: Sequence[str],
    out: str | Path,
    class_mix: Mapping[str, float] | None = None,
    label_maps: Sequence[str] = (),
) -> dict[str, Any]:
    """Evaluate, draw the figures and write ``report.json``, ``report.html`` and the PNGs into ``out``.

    ``class_mix`` (class -> frequency over the bundle's classes) also scores the
    model for a population with that mix (:mod:`trainer.class_mix`);
    ``label_maps`` name the model class of dataset classes (:func:`as_trained`).
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file: give -o a folder for the report")
    bundle, dataset = load_inputs(bundle_path, dataset_path, label_maps)
    merge = Merge.of(bundle.class_names, merges) if merges else None
    mix = ClassMix.of(bundle.class_names, class_mix, bundle.class_prior) if class_mix else None
    labels = model_labels(bundle, dataset, merge)
    if not dataset.is_labeled:
        raise UserError(
            f"dataset {dataset_path} has no labeled cells: evaluation compares predictions with labels "
            "(use `flowsort embed` to export predictions for unlabeled cells)"
        )
    predictions = run_model(bundle, dataset)
    report = build_report(bundle, dataset, predictions, labels, merge, mix)
    report["dataset"]["path"] = str(dataset_path)
    out.mkdir(parents=True, exist_ok=True)
    report["figures"] = {name: path.name for name, path in draw_figures(out, bundle, dataset, predictions, labels, report).items()}
    (out / REPORT_JSON).write_text(json.dumps(report, indent=2) + "\n")
    (out / REPORT_HTML).write_text(render_report(report, out))
    return report


def draw_figures(
    out: Path, bundle: Bundle, dataset: CellDataset, predictions: Predictions, labels: np.ndarray, report: dict[str, Any]
) -> dict[str, Path]:
    """The report's PNGs in ``out``, by name; a figure with nothing to show is left out."""
    from trainer import plots

    figures = {
        "reliability": plots.reliability_diagram(report["calibration"], out / "reliability.png"),
        "examples": plots.example_gallery(dataset, out / "examples.png"),
        "misclassified": plots.misclassified_gallery(
            dataset, labels, predictions.probabilities, bundle.class_names, out / "misclassified.png"
        ),
        "most_flagged": plots.flagged_gallery(dataset, predictions.dead_score, report["dead_cells"], out / "most_flagged.png"),
    }
    mapped = embedding_map(predictions.embedding)
    if mapped is not None:
        index, coordinates = mapped
        figures["embedding_map"] = plots.embedding_map(
            coordinates, labels[index], bundle.class_names, flagged_dead(predictions.dead_score[index], bundle),
            out / "embedding_map.png",
        )
    return {name: path for name, path in figures.items() if path is not None}


def _ratio(numerator: float, denominator: float) -> float | None:
    return float(numerator / denominator) if denominator else None


def _jsonable(values: np.ndarray) -> list[float | int | None]:
    """An array as a JSON list, NaN as null."""
    return [None if isinstance(v, float) and math.isnan(v) else v for v in values.tolist()]
