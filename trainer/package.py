"""Packaging a trained model as a bundle: calibrate, fit the dead-cell detector, export, checksum."""

from __future__ import annotations

import datetime
import subprocess
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engines.bundle import ONNX_FILE, OUTPUT_NAMES, VALIDATION_FILE, VALIDATION_SEEN_KEY, WEIGHTS_FILE, write_manifest
from flowsort import __version__
from trainer.calibration import FoldEvidence, expected_calibration_error, calibrated_probabilities, fit_temperature
from trainer.dataset import UNLABELED, CellDataset, content_hash
from trainer.dead_cells import fit_detector, labeled_threshold, quantile_threshold
from engines.deployed_model import DeployedDeepFlow, export_onnx
from trainer.train import FitResult, TrainConfig, logits_and_embedding

DEAD_TRUTH_KEYS = ("dead", "debris")
MIN_HELD_OUT_CELLS = 100  # live validation cells needed to set the dead-cell threshold on them


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def dead_truth(dataset: CellDataset) -> np.ndarray | None:
    """Cells known to be dead or debris, when the dataset carries that ground truth."""
    keys = [key for key in DEAD_TRUTH_KEYS if key in dataset.truth]
    if not keys:
        return None
    return np.logical_or.reduce([dataset.truth[key].astype(bool) for key in keys])


def calibrate_and_fit_detector(
    module: DeployedDeepFlow,
    dataset: CellDataset,
    train_index: np.ndarray,
    validation_index: np.ndarray,
    dead_quantile: float,
    seen_everything: FoldEvidence | None = None,
) -> dict[str, Any]:
    """Set temperature and dead-cell detector on ``module``; return what the manifest records.

    ``seen_everything``: the model was trained on every labeled cell (``validation_index`` are some of them), so
    the temperature comes from the cross-validation folds' held-out predictions and the live cells' dead-cell
    scores are the training cells' stretched as far as the folds saw unseen cells lie beyond their training cells.
    """
    labels = dataset.labels.astype(np.int64)
    if seen_everything is None:
        val_logits, val_embedding = logits_and_embedding(module, dataset.images, validation_index)
        val_labels = labels[validation_index]
    else:  # the validation cells are training cells: the folds' held-out predictions stand in for them
        val_logits, val_labels = seen_everything.logits, seen_everything.labels
    temperature = fit_temperature(val_logits, val_labels)
    module.set_temperature(temperature)

    _, train_embedding = logits_and_embedding(module, dataset.images, train_index)
    detector = fit_detector(train_embedding, labels[train_index])
    module.set_dead_cell_detector(detector.means, detector.whitening)
    train_scores = detector.score(train_embedding)
    # Cells the network was fitted on sit closer to their class means than new cells do, so a
    # threshold set on them flags too many live cells in the stream; held-out cells set it
    # whenever there are enough of them to place a tail quantile.
    held_out = seen_everything is None and len(validation_index) >= MIN_HELD_OUT_CELLS
    live_scores = detector.score(val_embedding) if held_out else train_scores
    live_from = "validation" if held_out else "training"
    if seen_everything is not None:
        live_scores = train_scores * seen_everything.live_score_stretch
        live_from = f"training, x{seen_everything.live_score_stretch:.3f} (cross-validation folds' unseen cells)"

    detector_record: dict[str, Any] = {
        "method": "mahalanobis-nearest-class-shared-covariance",
        "classes_fitted": len(detector.means),
        "live_scores_from": live_from,
    }
    dead = dead_truth(dataset)
    known_dead = np.flatnonzero(dead & (labels == UNLABELED)) if dead is not None else np.zeros(0, np.int64)
    if len(known_dead):
        _, dead_embedding = logits_and_embedding(module, dataset.images, known_dead)
        threshold = labeled_threshold(live_scores, detector.score(dead_embedding))
        detector_record.update(threshold_from="labels", labeled_dead_cells=int(len(known_dead)))
    else:
        threshold = quantile_threshold(live_scores, dead_quantile)
        detector_record.update(threshold_from="quantile", quantile=dead_quantile)
    detector_record["threshold"] = threshold
    detector_record["flagged_fraction_train"] = float((train_scores > threshold).mean())
    if held_out:
        detector_record["flagged_fraction_validation"] = float((live_scores > threshold).mean())
    calibration = {
        "temperature": temperature,
        "fitted_on": "cross-validation held-out predictions" if seen_everything is not None else "validation",
        "ece_before": expected_calibration_error(calibrated_probabilities(val_logits, 1.0), val_labels) if len(val_labels) else None,
        "ece_after": expected_calibration_error(calibrated_probabilities(val_logits, temperature), val_labels) if len(val_labels) else None,
    }
    return {"detector": detector_record, "calibration": calibration}


def write_bundle(
    out: Path,
    fitted: FitResult,
    dataset: CellDataset,
    train_index: np.ndarray,
    validation_index: np.ndarray,
    config: TrainConfig,
    dead_quantile: float = 0.99,
    extra_metrics: dict[str, Any] | None = None,
    extra_manifest: dict[str, Any] | None = None,
    seen_everything: FoldEvidence | None = None,
) -> Path:
    """Write the bundle directory ``out`` (replacing the model files there).

    ``extra_manifest`` adds top-level bundle.json sections (the held-out fold, distillation settings).
    ``seen_everything``: the model was trained on every labeled cell (:func:`calibrate_and_fit_detector`);
    ``validation_index`` then names training cells kept as the bundle's sample cells.
    """
    module = fitted.module.cpu().eval()
    fitted_parts = calibrate_and_fit_detector(module, dataset, train_index, validation_index, dead_quantile,
                                              seen_everything)
    out.mkdir(parents=True, exist_ok=True)
    net = module.net
    architecture = {
        "architecture": "deepflow",
        "num_classes": net.num_classes,
        "in_channels": net.in_channels,
        "input_size": net.input_size,
        "width": net.width,
        "embedding_dim": net.embedding_dim,
        "dead_cell_classes": int(module.whitened_means.shape[0]),
    }
    torch.save({"architecture": architecture, "state_dict": module.state_dict()}, out / WEIGHTS_FILE)
    export_onnx(module, out / ONNX_FILE)
    np.savez_compressed(
        out / VALIDATION_FILE,
        images=np.asarray(dataset.images[validation_index]),
        labels=dataset.labels[validation_index],
        object_ids=dataset.object_ids[validation_index],
    )
    manifest = {
        "class_names": list(dataset.class_names),
        "channels": [{"number": n, "name": name} for n, name in zip(dataset.channels, dataset.channel_names)],
        "input": {"name": "cells", "dtype": "uint16", "layout": "NCHW", "size": net.input_size},
        "outputs": list(OUTPUT_NAMES),
        "model": architecture,
        "normalization": {
            "kind": "per-channel standardization inside the graph",
            "mean": module.mean.flatten().tolist(),
            "std": (1 / module.inv_std).flatten().tolist(),
        },
        "temperature": fitted_parts["calibration"]["temperature"],
        "dead_cell_detector": fitted_parts["detector"],
        "metrics": {
            "validation": fitted.best_metrics,
            "best_epoch": fitted.best_epoch,
            "calibration": fitted_parts["calibration"],
            **(extra_metrics or {}),
        },
        "training": {**asdict(config), "precision_used": fitted.precision, "history": fitted.history},
        "provenance": {
            "dataset_hash": content_hash(dataset),
            "dataset_source": dataset.source,
            "dataset_merges": dataset.summary.get("merges", []),
            "n_train": int(len(train_index)),
            # The class mix the probabilities are calibrated to (the streamer's sample_prior re-weights from it).
            "train_class_counts": {name: int(count) for name, count in zip(
                dataset.class_names, np.bincount(dataset.labels[train_index].astype(np.int64), minlength=len(dataset.class_names)))},
            "n_validation": int(len(validation_index)),
            VALIDATION_SEEN_KEY: seen_everything is not None,
            "seed": config.seed,
            "flowsort_version": __version__,
            "git_commit": git_commit(),
            "torch_version": torch.__version__,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        },
    }
    manifest.update(extra_manifest or {})
    write_manifest(out, manifest, [ONNX_FILE, WEIGHTS_FILE, VALIDATION_FILE])
    return out
