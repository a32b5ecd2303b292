"""Contact sheets, and the `import synthetic` / `gallery` commands end to end."""

import struct
from pathlib import Path

import numpy as np
import pytest

from flowsort.cli import main
from trainer import gallery, synthetic
from trainer.cli import import_synthetic
from trainer.dataset import UNLABELED, CellDataset, read_dataset


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from the PNG header."""
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", header[16:24])


def expected_size(rows: int, per_class: int, channels: int, size: int) -> tuple[int, int]:
    cell_width = channels * size + (channels - 1) * gallery.CHANNEL_GAP + gallery.CELL_GAP
    return (
        gallery.LABEL_WIDTH + gallery.ZOOM * per_class * cell_width,
        gallery.TITLE_HEIGHT + gallery.ZOOM * rows * (size + gallery.CELL_GAP),
    )


@pytest.fixture(scope="module")
def synthetic_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "synthetic"
    code = main(["import", "synthetic", "--cells", "400", "-o", str(out), "--seed", "3", "--prior", "uniform"])
    assert code == 0
    return out


def test_import_synthetic_writes_a_dataset(synthetic_dataset: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dataset = read_dataset(synthetic_dataset)
    assert len(dataset) == 400 and dataset.class_names == synthetic.STAGES
    assert dataset.source["prior_name"] == "uniform" and dataset.source["seed"] == 3
    assert set(dataset.truth) == {"stage", "dead", "debris"}
    expected = synthetic.generate(400, seed=3, prior="uniform")
    assert dataset.images.tobytes() == expected.images.tobytes()

    code = main(["import", "synthetic", "--cells", "50", "-o", str(synthetic_dataset.parent / "small"), "--size", "64"])
    assert code == 0
    assert "dead:" in capsys.readouterr().out
    assert read_dataset(synthetic_dataset.parent / "small").images.shape == (50, 2, 64, 64)


def test_gallery_command_draws_one_row_per_class_and_kind(synthetic_dataset: Path, tmp_path: Path) -> None:
    sheet = tmp_path / "sheet.png"
    assert main(["gallery", str(synthetic_dataset), "-o", str(sheet), "--per-class", "4"]) == 0
    rows = len(gallery.default_rows(read_dataset(synthetic_dataset)))
    assert rows == len(synthetic.STAGES) + 2  # the stages, dead cells, debris
    assert png_size(sheet) == expected_size(rows, per_class=4, channels=2, size=40)


def test_same_seed_same_sheet_other_seed_other_cells(synthetic_dataset: Path, tmp_path: Path) -> None:
    dataset = read_dataset(synthetic_dataset)
    first = gallery.write_contact_sheet(dataset, tmp_path / "a.png", per_class=3, seed=1).read_bytes()
    again = gallery.write_contact_sheet(dataset, tmp_path / "b.png", per_class=3, seed=1).read_bytes()
    other = gallery.write_contact_sheet(dataset, tmp_path / "c.png", per_class=3, seed=2).read_bytes()
    assert first == again and first != other


def test_each_channel_gets_its_own_display_range(synthetic_dataset: Path) -> None:
    ranges = gallery.display_ranges(read_dataset(synthetic_dataset), np.random.default_rng(0))
    (bf_low, bf_high), (df_low, df_high) = ranges
    assert df_low < df_high < bf_low < bf_high  # a shared range would hide the darkfield


def test_any_dataset_any_channels_and_custom_rows(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    labels = np.array([0, 0, 1, UNLABELED, 1, 0], dtype=np.int16)
    dataset = CellDataset(
        images=rng.integers(0, 4096, (6, 3, 36, 36), dtype=np.uint16),
        labels=labels,
        object_ids=np.arange(6, dtype=np.int64),
        class_names=("live", "dying", "never seen"),
        channels=(1, 2, 9),
        channel_names=("bf", "fluo", "ssc"),
    )
    rows = gallery.default_rows(dataset)
    assert list(rows) == ["live", "dying", "unlabeled"]  # empty classes get no row
    np.testing.assert_array_equal(rows["unlabeled"], [3])

    sheet = gallery.write_contact_sheet(dataset, tmp_path / "three.png", per_class=2)
    assert png_size(sheet) == expected_size(3, per_class=2, channels=3, size=36)
    custom = gallery.write_contact_sheet(dataset, tmp_path / "custom.png", per_class=5, rows={"picked": np.array([1, 4])})
    assert png_size(custom) == expected_size(1, per_class=5, channels=3, size=36)
    with pytest.raises(ValueError, match="no cells"):
        gallery.write_contact_sheet(dataset, tmp_path / "empty.png", rows={"nothing": np.array([], dtype=int)})


def test_commands_refuse_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["gallery", str(tmp_path), "-o", str(tmp_path / "sheet.png")]) == 2
    assert "not a flowsort dataset" in capsys.readouterr().err
    args = ["import", "synthetic", "--cells", "10", "-o", str(tmp_path / "x"), "--dead-fraction", "0.6"]
    assert main([*args, "--debris-fraction", "0.5"]) == 2
    assert "add up to more than 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["import", "synthetic", "--cells", "10", "-o", str(tmp_path / "x"), "--size", "31"])


def test_cli_defaults_follow_the_simulator() -> None:
    """The command keeps copies so `flowsort --help` need not import numpy; they must not drift."""
    assert import_synthetic.DEFAULT_SIZE == synthetic.DEFAULT_SIZE
    assert import_synthetic.MIN_SIZE == synthetic.MIN_SIZE
    assert import_synthetic.DEAD_FRACTION == synthetic.DEAD_FRACTION
    assert import_synthetic.DEBRIS_FRACTION == synthetic.DEBRIS_FRACTION
    assert set(import_synthetic.PRIORS) == set(synthetic.PRIORS)
