"""The real Jurkat IFC sample imports completely, with the published labels."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import tifffile

from flowsort.cli import main
from trainer.dataset import content_hash, read_dataset

STAGES = {"G1": 675, "S_phase": 675, "G2": 675, "Prophase": 454, "Metaphase": 52, "Anaphase": 12, "Telophase": 21}


def test_cli_imports_every_jurkat_cell_with_its_label(jurkat_dir: Path, tmp_path: Path) -> None:
    assert main(["import", "ideas", str(jurkat_dir), "--channels", "3,6", "-o", str(tmp_path / "ds")]) == 0
    ds = read_dataset(tmp_path / "ds")
    assert len(ds) == 2564 and ds.images.shape == (2564, 2, 40, 40)
    assert ds.class_names == tuple(STAGES) and ds.class_counts() == STAGES
    assert ds.summary["n_problems"] == 0 and ds.summary["n_skipped"] == 0
    assert ds.summary["fit"]["unchanged"] == 2564 and ds.summary["bit_depths"] == [16]

    with open(jurkat_dir / "manifest.csv", newline="") as manifest:
        expected = {int(row["object_id"]): row["label"] for row in csv.DictReader(manifest)}
    assert {int(i): ds.class_names[label] for i, label in zip(ds.object_ids, ds.labels)} == expected
    assert (np.diff(ds.labels) >= 0).all()

    i = 1000
    folder = jurkat_dir / ds.class_names[ds.labels[i]]
    np.testing.assert_array_equal(ds.images[i, 0], tifffile.imread(folder / f"{ds.object_ids[i]}_Ch3.tif"))
    np.testing.assert_array_equal(ds.images[i, 1], tifffile.imread(folder / f"{ds.object_ids[i]}_Ch6.tif"))


def test_session_fixture_holds_the_same_cells(jurkat_dataset: Path, jurkat_dir: Path, tmp_path: Path) -> None:
    ds = read_dataset(jurkat_dataset)
    assert ds.channel_names == ("brightfield", "darkfield") and len(ds) == 2564
    main(["import", "ideas", str(jurkat_dir), "--channels", "3,6", "-o", str(tmp_path / "again")])
    assert content_hash(read_dataset(tmp_path / "again")) == content_hash(ds)


def test_montages_stitched_from_jurkat_cells_import_back_unchanged(jurkat_dataset: Path, tmp_path: Path) -> None:
    """One 30x30 montage of 40x40 tiles per class, as the CellProfiler IFC workflow writes them."""
    from trainer.montage import import_montages

    cells = read_dataset(jurkat_dataset)
    grid, tile = 30, 40
    for label, name in enumerate(cells.class_names):
        tiles = np.zeros((grid * grid, 2, tile, tile), np.uint16)
        members = cells.images[cells.labels == label]
        tiles[: len(members)] = members
        stitched = tiles.reshape(grid, grid, 2, tile, tile).transpose(2, 0, 3, 1, 4)
        stitched = stitched.reshape(2, grid * tile, grid * tile)
        (tmp_path / name).mkdir()
        for channel, image in zip((3, 6), stitched):
            tifffile.imwrite(tmp_path / name / f"montage_Ch{channel}.tif", image)

    ds = import_montages(tmp_path, (3, 6), tile, 40, strict=True)
    assert ds.class_names == cells.class_names and ds.class_counts() == STAGES
    np.testing.assert_array_equal(ds.images, cells.images)
    np.testing.assert_array_equal(ds.labels, cells.labels)
    assert ds.summary["empty_tiles"] == 7 * 900 - 2564
