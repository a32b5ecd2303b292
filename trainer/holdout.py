"""One cross-validation fold kept out of training, so several models are scored on the same unseen cells.

``--hold-out K/N`` trains on the labeled cells outside fold K of the stratified
N-fold split that ``--folds N`` uses (split seed 0, the seed of the documented
cross-validation runs). The bundle records the fold, and ``flowsort bench
frontier`` scores each bundle on exactly those cells, pooling one bundle per fold
into a model's cross-validation accuracy, and refuses bundles of other splits.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from flowsort.errors import UserError
from trainer.crossval import fold_parts
from trainer.dataset import CellDataset, content_hash

SPLIT_SEED = 0
MANIFEST_KEY = "held_out"


@dataclass(frozen=True)
class HeldOutFold:
    fold: int  # 1-based
    folds: int
    split_seed: int = SPLIT_SEED

    @classmethod
    def parse(cls, text: str) -> HeldOutFold:
        """``K/N``, e.g. ``1/5``."""
        try:
            fold, folds = (int(part) for part in text.split("/"))
        except ValueError:
            raise UserError(f"--hold-out {text!r}: expected K/N, e.g. 1/5 (fold 1 of a 5-fold split)") from None
        if folds < 2 or not 1 <= fold <= folds:
            raise UserError(f"--hold-out {text!r}: need N >= 2 and 1 <= K <= N")
        return cls(fold, folds)

    def split(self, dataset: CellDataset) -> tuple[np.ndarray, np.ndarray]:
        """Dataset indices (labeled cells to train on, held-out labeled cells)."""
        labeled = np.flatnonzero(dataset.labels >= 0)
        train_part, test_part = fold_parts(dataset.labels[labeled], self.folds, self.split_seed)[self.fold - 1]
        return labeled[train_part], labeled[test_part]

    def record(self, dataset: CellDataset) -> dict[str, Any]:
        """What a bundle stores: the fold, the dataset it indexes, and its size."""
        return {**asdict(self), "dataset_hash": content_hash(dataset), "n_cells": int(len(self.split(dataset)[1]))}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> HeldOutFold:
        return cls(int(record["fold"]), int(record["folds"]), int(record["split_seed"]))


def as_held_out(dataset: CellDataset, manifest: dict[str, Any]) -> tuple[CellDataset, HeldOutFold]:
    """The dataset labeled as the bundle (``manifest``: its bundle.json) was trained, and its held-out fold.

    The fold is defined on the labels the model was trained with, so the bundle's merges are applied first.
    """
    from trainer.merges import apply_merges

    record = manifest[MANIFEST_KEY]
    merged = apply_merges(dataset, manifest["provenance"].get("dataset_merges", []))
    if content_hash(merged) != record["dataset_hash"]:
        raise UserError("this is not the dataset the model was trained on (its content hash differs)")
    return merged, HeldOutFold.from_record(record)


def held_out_removed(dataset: CellDataset, manifest: dict[str, Any]) -> CellDataset:
    """``dataset`` without the cells of the bundle's held-out fold, keeping the dataset's own labels."""
    merged, fold = as_held_out(dataset, manifest)
    keep = np.ones(len(dataset), bool)
    keep[fold.split(merged)[1]] = False
    return dataset.subset(np.flatnonzero(keep))
