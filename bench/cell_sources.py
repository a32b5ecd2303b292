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
from streamer.recording_truth import Truth, read_recording
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
    parts: list[np.ndarray] = []
    acquisitions: list[str] = []
    ids: list[np.ndarray] = []
    channels: tuple[int, ...] | None = None
    shape: tuple[int, ...] | None = None
    recording = read_recording(path)
    for message in recording.messages:
        cells = message.decoded
        if cells is None:
            continue
        pixels = cells.pixels
        if cells.dtype != "uint16":
            pixels = np.clip(np.rint(pixels), 0, 65535) if cells.dtype == "float32" else pixels
            pixels = pixels.astype(np.uint16)
        if channels is None:
            channels, shape = cells.channels, pixels.shape[1:]
        elif cells.channels != channels or pixels.shape[1:] != shape:
            raise UserError(f"{path}: cells with different channels or sizes ({list(cells.channels)} "
                            f"{list(pixels.shape[1:])} after {list(channels)} {list(shape)}): use replay for it")
        parts.append(np.asarray(pixels))
        acquisitions += [cells.acquisition] * cells.count
        ids.append(cells.event_ids)
    if not parts:
        raise UserError(f"{path} holds no valid cells messages")
    event_ids = np.concatenate(ids)
    truth = recording.truth.lookup(acquisitions, event_ids) if recording.truth else None
    if truth is not None and not (truth.label >= 0).any() and truth.dead is None:
        truth = None
    images = np.ascontiguousarray(np.concatenate(parts), np.uint16)
    return CellSet(images, channels, truth, f"acquisition {path}: {len(images)} cells")


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
