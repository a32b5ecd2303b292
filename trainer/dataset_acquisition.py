"""A dataset as an acquisition file (``flowsort import ... --to-acquisition``): its cells as timed messages, its labels as truth records."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from flowsort.errors import UserError
from streamer.codec import CellsEncoder
from streamer.recording import AcquisitionWriter
from streamer.recording_truth import Truth, write_truth

if TYPE_CHECKING:
    from trainer.dataset import CellDataset

IMPORT_RATE = 1000.0  # cells/s: the Poisson timing given to imported cells (replay can re-time them)
IMPORT_SEED = 0


def dataset_truth(dataset: CellDataset) -> Truth | None:
    """A dataset's labels (and the simulator's dead/debris truth, when it has it)."""
    if not dataset.is_labeled and not dataset.truth:
        return None
    dead = dataset.truth.get("dead")
    debris = dataset.truth.get("debris")
    return Truth(tuple(dataset.class_names), np.asarray(dataset.labels, np.int16),
                 None if dead is None else np.asarray(dead, bool), None if debris is None else np.asarray(debris, bool))


def write_dataset_acquisition(dataset: CellDataset, path: str | Path, acquisition: str | None = None,
                              rate: float = IMPORT_RATE, seed: int = IMPORT_SEED, cells_per_message: int = 1) -> dict[str, Any]:
    """Write ``dataset`` as an acquisition file: its cells in a shuffled order, one message each (or blocks),
    timed as Poisson arrivals at ``rate`` cells/s, with the labels as truth records.

    Event ids are the dataset's object ids. Returns a summary.
    """
    path = Path(path)
    if path.exists() and path.stat().st_size > 0:
        raise UserError(f"{path} exists: choose a new file for --to-acquisition (acquisition files are append-only)")
    n = len(dataset)
    if n == 0:
        raise UserError("the dataset holds no cells")
    acquisition = acquisition or path.stem
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    images = np.asarray(dataset.images)
    event_ids = np.asarray(dataset.object_ids, np.int64).astype(np.uint64)
    if len(np.unique(event_ids)) != n:
        event_ids = np.arange(1, n + 1, dtype=np.uint64)  # object ids repeat across class folders: renumber
    arrivals = np.cumsum(rng.exponential(1.0 / rate, n))
    start_ns = time.time_ns()
    capture = start_ns + (arrivals * 1e9).astype(np.int64)
    encoder = CellsEncoder(acquisition, dataset.channels, dataset.input_size)
    truth = dataset_truth(dataset)
    with AcquisitionWriter(path, {"source": dataset.source.get("kind", "dataset"), "acquisition": acquisition,
                                  "cells": n, "timing": f"poisson {rate:g} cells/s (imported)"}) as writer:
        for start in range(0, n, cells_per_message):
            index = order[start:start + cells_per_message]
            stamps = capture[start:start + len(index)]
            frames = encoder.encode(event_ids[index], np.ascontiguousarray(images[index]), capture_ns=stamps)
            writer.write([frames[0], np.ascontiguousarray(frames[1]).tobytes()], time_ns=int(stamps[-1]))
        if truth is not None:
            write_truth(writer, acquisition, event_ids[order], truth.take(order))
    return {"path": str(path), "acquisition": acquisition, "cells": n, "messages": -(-n // cells_per_message),
            "labeled": truth is not None, "duration_s": float(arrivals[-1]) if n else 0.0}


def print_acquisition_summary(summary: dict[str, Any]) -> None:
    labels = "with labels" if summary["labeled"] else "no labels"
    print(f"wrote acquisition file {summary['path']}: {summary['cells']:,} cells in {summary['messages']:,} messages "
          f"({labels}), acquisition {summary['acquisition']!r}, {summary['duration_s']:.1f} s at "
          f"{IMPORT_RATE:g} cells/s Poisson (replay can re-time it)")
