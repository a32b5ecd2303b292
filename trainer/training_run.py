"""A whole training run, as `flowsort train` does it: a dataset in, a calibrated model bundle out."""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flowsort.errors import UserError
from trainer.class_mix import ClassMix
from trainer.crossval import cross_validate
from trainer.dataset import CellDataset, read_dataset
from trainer.holdout import MANIFEST_KEY, HeldOutFold
from trainer.merges import apply_merges
from trainer.package import write_bundle
from trainer.train import FitResult, TrainConfig, fit, stratified_split

VAL_FRACTION = 0.2
FOLDS_DIR = "folds"  # --keep-folds: the fold models' bundles, inside the bundle directory
DEAD_QUANTILE = 0.99


def train_bundle(
    dataset_path: Path,
    output: Path,
    config: TrainConfig,
    merges: Sequence[str] = (),
    val_fraction: float = VAL_FRACTION,
    folds: int = 0,
    cv_merges: Sequence[str] = (),
    class_mix: Mapping[str, float] | None = None,
    dead_quantile: float = DEAD_QUANTILE,
    threads: int | None = None,
    resume: bool = False,
    held_out: HeldOutFold | None = None,
    final_on_all_cells: bool = False,
    keep_folds: bool = False,
) -> dict[str, Any]:
    """Train on the labeled cells of ``dataset_path`` (after ``merges``, outside the ``held_out`` fold),
    optionally cross-validate first, and write the bundle to ``output``; prints progress and returns the
    bundle's manifest.

    The final model learns from ``1 - val_fraction`` of the cells and early-stops on the rest, or with
    ``final_on_all_cells`` from every one of them for the median of the folds' best epochs, calibrated on the
    folds' held-out predictions (:func:`trainer.package.calibrate_and_fit_detector`). With ``held_out`` as well,
    the folds split the cells outside it: nested cross-validation, which scores the whole recipe on that fold.
    ``keep_folds`` also writes each fold's model as a bundle under ``output/folds`` (teachers for `flowsort
    distill`, an ensemble for `flowsort bench frontier`).
    """
    check_run_settings(val_fraction, dead_quantile, threads)
    if folds == 1 or folds < 0:
        raise UserError("--folds must be 0 (no cross-validation) or at least 2")
    if cv_merges and not folds:
        raise UserError("--cv-merge reports cross-validation: give --folds K as well")
    if class_mix and not folds:
        raise UserError("--class-mix reports cross-validation: give --folds K as well "
                        "(or score a bundle with `flowsort evaluate --class-mix`)")
    if keep_folds and not folds:
        raise UserError("--keep-folds keeps the cross-validation's fold models: give --folds K as well")
    if final_on_all_cells and not folds:
        raise UserError("--final-on-all-cells takes its epoch count and its calibration from cross-validation: "
                        "give --folds K as well")
    dataset = apply_merges(read_dataset(dataset_path), merges)
    labeled = trainable_cells(dataset, held_out, dataset_path)
    if class_mix:  # refuse a mix that names the wrong classes now, not after the folds have trained
        ClassMix.of(dataset.class_names, class_mix,
                    np.bincount(dataset.labels[labeled], minlength=len(dataset.class_names)) / len(labeled))
    checkpoints = output / "checkpoints"
    counts = ", ".join(f"{name} {count}" for name, count in zip(
        dataset.class_names, np.bincount(dataset.labels[labeled], minlength=len(dataset.class_names))))
    print(f"training on {len(labeled)} labeled cells ({counts}), input {dataset.input_size}x{dataset.input_size}, "
          f"channels {list(dataset.channels)}")

    extra = {}
    cv = None
    if folds:
        def package_fold(fold: int, fitted: FitResult, train_index: np.ndarray, val_index: np.ndarray) -> None:
            write_bundle(output / FOLDS_DIR / f"fold-{fold}", fitted, dataset, train_index, val_index, config,
                         dead_quantile, None, held_out_manifest(dataset, held_out))

        cv = cross_validate(dataset, labeled, folds, config, checkpoints, resume, cv_merges, class_mix, dead_quantile,
                            package_fold if keep_folds else None)
        extra["cross_validation"] = cv.summary
        summary = cv.summary
        for title, block in (("", summary), (" (merged)", summary.get("merged")),
                             (" at the class mix", summary.get("class_mix"))):
            if block:
                print(f"{folds}-fold cross-validation{title}: accuracy {block['accuracy']['mean']:.4f} ± "
                      f"{block['accuracy']['sd']:.4f}, balanced accuracy {block['balanced_accuracy']['mean']:.4f} ± "
                      f"{block['balanced_accuracy']['sd']:.4f}")

    train_index, val_index = final_split(dataset, labeled, val_fraction, config.seed)
    early_stop_on = val_index
    seen_everything = None
    if cv is not None and final_on_all_cells:
        seen_everything = cv.evidence
        config = replace(config, epochs=max(1, int(np.median(cv.best_epochs))))
        print(f"final model on all {len(labeled)} cells for {config.epochs} epochs (the median of the folds' best "
              f"epochs {cv.best_epochs}), calibrated on the folds' held-out predictions")
        train_index, early_stop_on = labeled, val_index[:0]  # the validation cells stay as sample cells, marked seen
    fitted = fit(dataset, train_index, early_stop_on, config, checkpoints / "final.pt", resume,
                 description="final model")
    write_bundle(output, fitted, dataset, train_index, val_index, config, dead_quantile, extra,
                 held_out_manifest(dataset, held_out), seen_everything)
    shutil.rmtree(checkpoints, ignore_errors=True)
    return print_bundle_summary(output)


def check_run_settings(val_fraction: float, dead_quantile: float, threads: int | None) -> None:
    """The settings every bundle-writing run shares (`flowsort train`, `flowsort distill`), checked before work."""
    if threads:
        torch.set_num_threads(threads)
    if not 0 < val_fraction < 1:
        raise UserError("--val-fraction must be between 0 and 1")
    if not 0 < dead_quantile < 1:
        raise UserError("--dead-quantile must be between 0 and 1")


def trainable_cells(dataset: CellDataset, held_out: HeldOutFold | None, path: Path) -> np.ndarray:
    """The labeled cells a model may learn from: all of them, or those outside the held-out fold."""
    if not dataset.is_labeled:
        raise UserError(f"{path} has no labeled cells: training needs class folders")
    return held_out.split(dataset)[0] if held_out else np.flatnonzero(dataset.labels >= 0)


def final_split(
    dataset: CellDataset, labeled: np.ndarray, val_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Dataset indices (train, validation) of the shipped model: a stratified split of ``labeled``."""
    train_part, val_part = stratified_split(dataset.labels[labeled], val_fraction, seed)
    return labeled[train_part], labeled[val_part]


def held_out_manifest(dataset: CellDataset, held_out: HeldOutFold | None) -> dict[str, Any] | None:
    """The bundle.json section naming the fold kept out of training, if any."""
    return {MANIFEST_KEY: held_out.record(dataset)} if held_out else None


def print_bundle_summary(output: Path) -> dict[str, Any]:
    """Print the written bundle's headline figures; returns its manifest."""
    manifest = json.loads((output / "bundle.json").read_text())
    val = manifest["metrics"]["validation"]
    detector = manifest["dead_cell_detector"]
    scored = (f"validation accuracy {val['accuracy']:.4f}, balanced accuracy {val['balanced_accuracy']:.4f} "
              f"(epoch {manifest['metrics']['best_epoch']})" if "accuracy" in val
              else f"trained on every labeled cell for {manifest['metrics']['best_epoch']} epochs")
    print(f"bundle written to {output}: {scored}, temperature {manifest['temperature']:.3f}, "
          f"dead threshold {detector['threshold']:.2f} ({detector['threshold_from']})")
    return manifest
