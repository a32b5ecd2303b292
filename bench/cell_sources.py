"""The cells the simulator, replay and ``bench e2e`` send, with their truth when known.

A :class:`CellSet` holds uint16 images, their channel numbers and, when known,
their truth. It comes from the synthetic cytometer (:func:`synthetic_cells`), a
dataset folder (:func:`dataset_cells`) or the cells of an acquisition file
(:func:`recording_cells`); :func:`load_cells` picks by the ``--cells`` argument.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flowsort.errors import UserError
from streamer.recording_truth import Truth, recorded_cells
from trainer.dataset_acquisition import dataset_truth


@dataclass(frozen=True)
class CellSet:
    """Cells to send: uint16 images [N, C, H, W] with their instrument channel numbers and truth."""

    images: np.ndarray
    channels: tuple[int, ...]
    truth: Truth | None
    description: str

    def __len__(self) -> int:
        return len(self.images)


def synthetic_cells(n: int, size: int, seed: int = 0, prior: str = "jurkat", dead_fraction: float | None = None,
                    debris_fraction: float | None = None) -> CellSet:
    """``n`` cells from the synthetic cytometer's pool: noise-free renders given fresh camera noise."""
    from trainer.synthetic import CHANNELS, DEAD_FRACTION, DEBRIS_FRACTION, STAGES, CellPool

    dead = DEAD_FRACTION if dead_fraction is None else dead_fraction
    debris = DEBRIS_FRACTION if debris_fraction is None else debris_fraction
    pool = CellPool(n, seed=seed, size=size, prior=prior, dead_fraction=dead, debris_fraction=debris)
    cells = pool.sample(n, np.random.default_rng(seed + 1))
    truth = Truth(STAGES, cells.stage.astype(np.int16), cells.dead.copy(), cells.debris.copy())
    return CellSet(np.ascontiguousarray(cells.images), CHANNELS, truth,
                   f"synthetic cytometer: {n} cells, {size}x{size}, prior {prior}, seed {seed}")


def dataset_cells(path: str | Path) -> CellSet:
    from trainer.dataset import read_dataset

    dataset = read_dataset(path, mmap=False)
    return CellSet(np.ascontiguousarray(dataset.images), tuple(dataset.channels), dataset_truth(dataset),
                   f"dataset {path}: {len(dataset)} cells")


def recording_cells(path: str | Path) -> CellSet:
    """Every cell of an acquisition file's valid cells messages, with its truth where the file has it."""
    cells = recorded_cells(path)
    truth = cells.truth
    if truth is not None and not (truth.label >= 0).any() and truth.dead is None:
        truth = None
    return CellSet(cells.images, cells.channels, truth, f"acquisition {path}: {len(cells)} cells")


def load_cells(source: str, size: int, seed: int = 0, pool: int = 4096, prior: str = "jurkat") -> CellSet:
    """``synthetic``, an acquisition file or a dataset folder."""
    if source == "synthetic":
        return synthetic_cells(pool, size, seed=seed, prior=prior)
    path = Path(source)
    if path.is_dir():
        return dataset_cells(path)
    if path.is_file():
        return recording_cells(path)
    raise UserError(f"--cells {source!r}: expected 'synthetic', an acquisition file or a dataset folder")
