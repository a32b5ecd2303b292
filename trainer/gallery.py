"""Contact sheets: a row of example cells per class, every channel side by side.

Why: a look at the cells is the fastest check that an import, a simulator
change or a model's mistakes are what one thinks they are. Each channel gets
one display range from robust percentiles over the whole dataset, so the bright
brightfield and the dim darkfield are both visible and rows stay comparable.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from trainer.dataset import UNLABELED, CellDataset

ZOOM = 2  # screen pixels per image pixel
DPI = 100
LABEL_WIDTH = 150  # screen pixels left of the cells for the row names
TITLE_HEIGHT = 40  # screen pixels above the first row
CHANNEL_GAP = 1  # image pixels between the channels of one cell
CELL_GAP = 4  # image pixels between cells and between rows
PERCENTILES = (0.5, 99.5)
RANGE_SAMPLE = 2000  # cells the display ranges are estimated from


def default_rows(dataset: CellDataset) -> dict[str, np.ndarray]:
    """Cell indices per row: one row per class present, then the unlabeled cells,
    split into dead cells and debris where the dataset knows them (synthetic data)."""
    rows = {
        name: np.flatnonzero(dataset.labels == index)
        for index, name in enumerate(dataset.class_names)
    }
    unlabeled = dataset.labels == UNLABELED
    for kind in ("dead", "debris"):
        if kind in dataset.truth:
            mask = unlabeled & dataset.truth[kind].astype(bool)
            rows[kind] = np.flatnonzero(mask)
            unlabeled &= ~mask
    rows["unlabeled"] = np.flatnonzero(unlabeled)
    return {name: index for name, index in rows.items() if index.size}


def display_ranges(dataset: CellDataset, rng: np.random.Generator) -> np.ndarray:
    """[C, 2] low/high display value per channel from percentiles of up to
    ``RANGE_SAMPLE`` cells (a sample keeps memory-mapped datasets cheap)."""
    count = min(len(dataset), RANGE_SAMPLE)
    sample = np.asarray(dataset.images[np.sort(rng.choice(len(dataset), count, replace=False))])
    pixels = sample.transpose(1, 0, 2, 3).reshape(sample.shape[1], -1)
    ranges = np.percentile(pixels, PERCENTILES, axis=1).T
    ranges[:, 1] = np.maximum(ranges[:, 1], ranges[:, 0] + 1)
    return ranges


def write_contact_sheet(
    dataset: CellDataset,
    path: str | Path,
    per_class: int = 8,
    seed: int = 0,
    title: str | None = None,
    rows: Mapping[str, np.ndarray] | None = None,
) -> Path:
    """Draw up to ``per_class`` random cells of each row into the PNG ``path``.

    ``rows`` maps a row label to cell indices (default :func:`default_rows`);
    other commands pass their own grouping, e.g. the cells a model confused.
    Each row is labeled with its name and how many cells it holds in all.
    """
    from matplotlib import colormaps
    from matplotlib.figure import Figure  # no pyplot: no global state, PNGs render with Agg

    rows = {name: np.asarray(index) for name, index in (rows or default_rows(dataset)).items() if len(index)}
    if not rows:
        raise ValueError("no cells to show: the dataset or every requested row is empty")
    rng = np.random.default_rng(seed)
    ranges = display_ranges(dataset, rng)
    strips = [_strip(dataset, _pick(index, per_class, rng), ranges, per_class) for index in rows.values()]

    strip_height, strip_width = strips[0].shape
    width = LABEL_WIDTH + strip_width * ZOOM
    height = TITLE_HEIGHT + len(strips) * strip_height * ZOOM
    figure = Figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    cmap = colormaps["gray"].with_extremes(bad="white")
    row_height = strip_height * ZOOM / height
    for row, ((name, index), strip) in enumerate(zip(rows.items(), strips)):
        bottom = 1 - (TITLE_HEIGHT / height + (row + 1) * row_height)
        axes = figure.add_axes((LABEL_WIDTH / width, bottom, 1 - LABEL_WIDTH / width, row_height))
        axes.imshow(strip, cmap=cmap, vmin=0, vmax=1, interpolation="nearest", aspect="auto")
        axes.set_axis_off()
        figure.text(8 / width, bottom + row_height / 2, f"{name}\n{len(index):,} cells", va="center", fontsize=9)
    channels = " | ".join(dataset.channel_names)
    heading = f"{title}\n" if title else ""
    figure.text(0.5, 1 - 4 / height, f"{heading}each cell: {channels}", ha="center", va="top", fontsize=9)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=DPI)
    return path


def _pick(index: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    chosen = rng.choice(index, min(count, index.size), replace=False)
    return np.sort(chosen)


def _strip(dataset: CellDataset, index: np.ndarray, ranges: np.ndarray, slots: int) -> np.ndarray:
    """One row of the sheet scaled to 0..1, gaps NaN (drawn white); always ``slots`` cells
    wide so every row lines up."""
    images = np.asarray(dataset.images[index], dtype=np.float32)
    n, channels, size, _ = images.shape
    scaled = (images - ranges[:, 0, None, None]) / (ranges[:, 1] - ranges[:, 0])[:, None, None]
    cell_width = channels * size + (channels - 1) * CHANNEL_GAP
    strip = np.full((size + CELL_GAP, slots * (cell_width + CELL_GAP)), np.nan, dtype=np.float32)
    for slot in range(n):
        for channel in range(channels):
            left = slot * (cell_width + CELL_GAP) + channel * (size + CHANNEL_GAP)
            strip[:size, left : left + size] = np.clip(scaled[slot, channel], 0, 1)
    return strip
