"""CellProfiler IFC montages: grids of fixed-size tiles, one TIFF per channel.

The CellProfiler imaging flow cytometry workflow (Blasi et al. 2016) stitches
cells into square tiles of a grid, row-major, one montage file per channel:
``<label>/<montage>_Ch3.tif`` and ``<label>/<montage>_Ch6.tif`` hold the same
cell at the same grid position. The last montage is filled up with blank tiles
(every pixel the same value in every channel); those are padding and skipped.
A blank tile before the last cell, or one blank in only some channels, means
the files are damaged or misaligned, so it is reported rather than dropped.

Object ids are ``ordinal * id_stride + tile``, with ``id_stride`` the smallest
power of ten holding every tile index, so an id reads as montage and tile
(montage 3, tile 417 is 3417 with 30x30 grids); ``source["montages"]`` maps
each ordinal back to its folder and montage name.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trainer.dataset import CellDataset
from trainer.import_report import CellCollector, ImportReport
from trainer.tiff_tree import Group, default_channel_names, read_group, scan_tree


@dataclass
class MontageCells:
    """The cells kept from one montage: tiles ``[N, C, t, t]`` and their grid indices."""

    label: str | None
    ordinal: int
    tiles: np.ndarray
    indices: np.ndarray


def import_montages(
    root: str | Path,
    channels: tuple[int, ...],
    tile: int,
    size: int,
    channel_names: tuple[str, ...] | None = None,
    strict: bool = False,
) -> CellDataset:
    """Cut a tree of montages into a dataset of ``size`` x ``size`` cells."""
    from tqdm import tqdm

    report = ImportReport(strict)
    tree = scan_tree(root, channels, report, unit="montage")
    table, kept = [], []
    empty_tiles = skipped_tiles = 0
    for ordinal, group in enumerate(tqdm(tree.groups, desc="reading montages", unit="montage", disable=None)):
        entry = {"ordinal": ordinal, "label": group.label, "name": group.name, "grid": None}
        table.append(entry)
        stack = read_group(group, channels, report)
        tiles = None if stack is None else cut_tiles(stack, tile, group, report)
        if tiles is None:
            continue
        entry["grid"] = [stack.shape[1] // tile, stack.shape[2] // tile]
        keep, n_empty = classify_tiles(tiles, entry["grid"][1], channels, group, report)
        empty_tiles += n_empty
        skipped_tiles += len(tiles) - n_empty - int(keep.sum())
        kept.append(MontageCells(group.label, ordinal, tiles[keep], np.flatnonzero(keep)))

    n_tiles = max((rows * cols for rows, cols in (e["grid"] for e in table if e["grid"])), default=1)
    stride = 10 ** len(str(n_tiles - 1))
    collector = CellCollector(size, report)
    for cells in kept:
        if len(cells.tiles):
            collector.add(cells.tiles, cells.label, cells.ordinal * stride + cells.indices)
    report.extra.update(n_montages=len(kept), n_montages_skipped=tree.n_found - len(kept), empty_tiles=empty_tiles)
    source = {
        "kind": "montage",
        "path": str(Path(root).resolve()),
        "channels": list(channels),
        "tile": tile,
        "id_stride": stride,
        "montages": table,
    }
    return collector.build(
        channels, channel_names or default_channel_names(channels), source, n_skipped=skipped_tiles
    )


def cut_tiles(stack: np.ndarray, tile: int, group: Group, report: ImportReport) -> np.ndarray | None:
    """``[C, H, W]`` montage -> ``[rows * cols, C, tile, tile]`` in row-major grid order."""
    channels, height, width = stack.shape
    if height % tile or width % tile:
        report.problem(
            group.path,
            f"montage of {height}x{width} px is not a whole number of {tile}x{tile} tiles: check --tile",
        )
        return None
    rows, cols = height // tile, width // tile
    grid = stack.reshape(channels, rows, tile, cols, tile).transpose(1, 3, 0, 2, 4)
    return np.ascontiguousarray(grid).reshape(rows * cols, channels, tile, tile)


def classify_tiles(
    tiles: np.ndarray, cols: int, channels: tuple[int, ...], group: Group, report: ImportReport
) -> tuple[np.ndarray, int]:
    """Which tiles are cells, and how many trailing blank tiles are padding.

    Blank tiles elsewhere (in every channel or only some) are reported.
    """
    flat = tiles.reshape(*tiles.shape[:2], -1)
    blank = (flat == flat[..., :1]).all(axis=-1)  # [N, C]
    all_blank = blank.all(axis=1)
    cells = np.flatnonzero(~all_blank)
    n_padding = len(tiles) - (int(cells[-1]) + 1 if len(cells) else 0)
    keep = ~blank.any(axis=1)
    for index in np.flatnonzero(~keep[: len(tiles) - n_padding]):
        if all_blank[index]:
            reason = "blank in every channel before the last cell: the montage is damaged"
        else:
            blank_in = ", ".join(f"Ch{c}" for c, b in zip(channels, blank[index]) if b)
            reason = f"blank in {blank_in} only: the channel files may not be aligned"
        report.problem(group.path, f"tile {index} (row {index // cols}, column {index % cols}) {reason}; skipped")
    if not len(cells):
        report.problem(group.path, "montage holds no cells: every tile is blank")
    return keep, n_padding
