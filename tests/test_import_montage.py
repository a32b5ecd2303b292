"""`flowsort import montage`: CellProfiler tile grids cut back into aligned cells."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile

from flowsort.cli import main
from flowsort.errors import UserError
from trainer.dataset import UNLABELED, read_dataset
from trainer.montage import import_montages

TILE = 8


def tile_image(cell: int, channel: int) -> np.ndarray:
    """A non-blank tile whose level encodes the cell and the channel."""
    rng = np.random.default_rng(cell * 100 + channel)
    return (1000 * channel + cell + rng.integers(0, 3, (TILE, TILE))).astype(np.uint16)


def montage(cells: list[int | None], rows: int, cols: int, channel: int) -> np.ndarray:
    """Tiles row-major; ``None`` is a blank tile, and the grid is filled up with blank tiles."""
    grid = np.zeros((rows * TILE, cols * TILE), np.uint16)
    for index, cell in enumerate(cells):
        if cell is not None:
            row, col = divmod(index, cols)
            grid[row * TILE : (row + 1) * TILE, col * TILE : (col + 1) * TILE] = tile_image(cell, channel)
    return grid


def write_montage(folder: Path, name: str, cells: list[int | None], rows: int = 3, cols: int = 3) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for channel in (3, 6):
        tifffile.imwrite(folder / f"{name}_Ch{channel}.tif", montage(cells, rows, cols, channel))


def test_grid_order_alignment_and_trailing_padding_through_the_cli(tmp_path: Path) -> None:
    root = tmp_path / "montages"
    write_montage(root / "G1", "CP0001", list(range(9)))
    write_montage(root / "G1", "CP0002", [9, 10, 11, 12, 13])  # 4 blank padding tiles at the end
    write_montage(root / "G2", "CP0001", [20, 21], rows=2, cols=4)
    out = tmp_path / "ds"
    args = ["import", "montage", str(root), "--channels", "3,6", "--tile", str(TILE), "--size", str(TILE)]
    assert main([*args, "-o", str(out)]) == 0

    ds = read_dataset(out)
    assert ds.class_names == ("G1", "G2") and ds.class_counts() == {"G1": 14, "G2": 2}
    stride = ds.source["id_stride"]
    assert stride == 10
    assert ds.object_ids.tolist() == [*range(9), *range(10, 15), 20, 21]
    montages = {m["ordinal"]: m for m in ds.source["montages"]}
    cells = [*range(14), 20, 21]
    for i, object_id in enumerate(ds.object_ids):
        ordinal, tile = divmod(int(object_id), stride)
        entry = montages[ordinal]
        _, cols = entry["grid"]
        source = tifffile.imread(root / entry["label"] / f"{entry['name']}_Ch6.tif")
        top, left = tile // cols * TILE, tile % cols * TILE
        np.testing.assert_array_equal(ds.images[i, 1], source[top : top + TILE, left : left + TILE])
        np.testing.assert_array_equal(ds.images[i, 0], tile_image(cells[i], 3))
        np.testing.assert_array_equal(ds.images[i, 1], tile_image(cells[i], 6))
    assert ds.summary["empty_tiles"] == 4 + 6 and ds.summary["n_montages"] == 3
    assert ds.summary["n_problems"] == 0 and ds.summary["n_skipped"] == 0
    assert ds.source["tile"] == TILE and ds.source["kind"] == "montage"


def test_blank_tile_inside_the_grid_is_reported_not_silent(tmp_path: Path) -> None:
    root = tmp_path / "montages"
    write_montage(root / "G1", "CP0001", [0, 1, None, 3, 4])
    ds = import_montages(root, (3, 6), TILE, TILE)
    assert ds.object_ids.tolist() == [0, 1, 3, 4]
    assert ds.summary["empty_tiles"] == 4 and ds.summary["n_skipped"] == 1
    [problem] = ds.summary["problems"]
    assert problem["path"] == str(root / "G1" / "CP0001_Ch*.tif") and "tile 2 (row 0, column 2)" in problem["reason"]
    with pytest.raises(UserError, match="tile 2"):
        import_montages(root, (3, 6), TILE, TILE, strict=True)


def test_tile_blank_in_one_channel_only_means_misaligned_files(tmp_path: Path) -> None:
    root = tmp_path / "montages"
    write_montage(root, "CP0001", [0, 1, 2, 3])
    ch6 = montage([0, 1, 2, None], 3, 3, 6)  # one cell short in Ch6
    tifffile.imwrite(root / "CP0001_Ch6.tif", ch6)
    ds = import_montages(root, (3, 6), TILE, TILE)
    assert ds.object_ids.tolist() == [0, 1, 2]
    assert "tile 3" in ds.summary["problems"][0]["reason"] and "Ch6 only" in ds.summary["problems"][0]["reason"]


def test_dimensions_not_a_multiple_of_the_tile_are_reported(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "montages"
    write_montage(root / "G1", "CP0001", [0, 1, 2])
    for channel in (3, 6):
        tifffile.imwrite(root / "G1" / f"CP0002_Ch{channel}.tif", np.ones((3 * TILE + 3, 3 * TILE), np.uint16))
    args = ["import", "montage", str(root), "--channels", "3,6", "--tile", str(TILE), "--size", str(TILE)]
    assert main([*args, "-o", str(tmp_path / "ds")]) == 0
    ds = read_dataset(tmp_path / "ds")
    assert ds.object_ids.tolist() == [0, 1, 2] and ds.summary["n_montages"] == 1
    assert ds.summary["n_montages_skipped"] == 1
    [problem] = ds.summary["problems"]
    assert problem["path"] == str(root / "G1" / "CP0002_Ch*.tif") and "not a whole number" in problem["reason"]
    capsys.readouterr()
    assert main([*args, "-o", str(tmp_path / "strict"), "--strict"]) == 2
    assert "CP0002_Ch*.tif" in capsys.readouterr().err


def test_channel_files_of_different_dimensions_are_reported(tmp_path: Path) -> None:
    root = tmp_path / "montages"
    write_montage(root, "CP0001", [0, 1])
    write_montage(root, "CP0002", [5, 6])
    tifffile.imwrite(root / "CP0002_Ch6.tif", montage([5, 6], 2, 3, 6))
    ds = import_montages(root, (3, 6), TILE, TILE)
    assert ds.object_ids.tolist() == [0, 1]
    assert "differ in size" in ds.summary["problems"][0]["reason"]


def test_unlabeled_montages_fitted_to_another_input_size(tmp_path: Path) -> None:
    root = tmp_path / "montages"
    write_montage(root, "CP0001", [0, 1, 2])
    ds = import_montages(root, (3, 6), TILE, 6)
    assert ds.class_names == () and (ds.labels == UNLABELED).all()
    assert ds.images.shape == (3, 2, 6, 6) and ds.summary["fit"]["cropped"] == 3
    np.testing.assert_array_equal(ds.images[1, 0], tile_image(1, 3)[1:7, 1:7])
