"""Predictions of a bundle's model on a whole dataset in torch, for evaluation and embedding export (offline, not the hot path)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from engines.bundle import Bundle
from flowsort.errors import UserError
from trainer.dataset import CellDataset
from engines.deployed_model import DeployedDeepFlow


@dataclass(frozen=True)
class Predictions:
    probabilities: np.ndarray  # [N, K] calibrated
    embedding: np.ndarray  # [N, D]
    dead_score: np.ndarray  # [N]


def check_compatible(bundle: Bundle, dataset: CellDataset) -> None:
    """Refuse a dataset whose channels or input size differ from what the model was trained on."""
    if tuple(dataset.channels) != bundle.channels:
        raise UserError(
            f"the dataset has channels {list(dataset.channels)} but the model was trained on {list(bundle.channels)}: "
            "re-import the data with the model's --channels"
        )
    if dataset.input_size != bundle.input_size:
        raise UserError(
            f"the dataset's cells are {dataset.input_size}x{dataset.input_size} but the model takes "
            f"{bundle.input_size}x{bundle.input_size}: re-import with --size {bundle.input_size}"
        )


@torch.no_grad()
def predict(module: DeployedDeepFlow, images: np.ndarray, batch_size: int = 256) -> Predictions:
    """Probabilities, embeddings and dead scores for uint16 cells [N, C, S, S], batch by batch."""
    outputs: list[list[np.ndarray]] = [[], [], []]
    for start in range(0, len(images), batch_size):
        cells = torch.from_numpy(np.asarray(images[start : start + batch_size], dtype=np.float32))
        for store, value in zip(outputs, module(cells)):
            store.append(value.numpy())
    if not outputs[0]:
        k, d = module.net.num_classes, module.net.embedding_dim
        return Predictions(np.zeros((0, k), np.float32), np.zeros((0, d), np.float32), np.zeros(0, np.float32))
    return Predictions(*(np.concatenate(store) for store in outputs))
