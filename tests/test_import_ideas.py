"""`flowsort import ideas` on real TIFF trees: good cells in, bad inputs named and skipped."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import tifffile

from flowsort.cli import main
from flowsort.errors import UserError
from trainer.dataset import UNLABELED, read_dataset
from trainer.import_report import ImportReport
from trainer.tiff_tree import import_ideas


def cell_image(object_id: int, channel: int, shape: tuple[int, int] = (40, 40), dtype: type = np.uint16) -> np.ndarray:
    """Noise around a level that encodes the object and channel, so any mix-up shows."""
    rng = np.random.default_rng(object_id * 100 + channel)
    level = 20 * object_id + channel if dtype == np.uint8 else 1000 * channel + object_id
    return (level + rng.integers(0, 5, shape)).astype(dtype)


def write_cell(folder: Path, object_id: int, channels: tuple[int, ...] = (3, 4, 6), **kwargs) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for channel in channels:
        tifffile.imwrite(folder / f"{object_id}_Ch{channel}.tif", cell_image(object_id, channel, **kwargs))


def make_tree(root: Path) -> Path:
    """G1: cells 1, 2, 3; G2: cells 4, 5; a manifest alongside like the real export."""
    for label, ids in {"G1": (1, 2, 3), "G2": (4, 5)}.items():
        for object_id in ids:
            write_cell(root / label, object_id)
    (root / "manifest.csv").write_text("object_id,label\n1,G1\n")
    return root


def run_cli(root: Path, out: Path, *extra: str) -> int:
    return main(["import", "ideas", str(root), "--channels", "3,6", "-o", str(out), *extra])


def test_good_tree_round_trips_through_the_cli(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "export")
    assert run_cli(root, tmp_path / "ds", "--channel-names", "brightfield,darkfield") == 0
    ds = read_dataset(tmp_path / "ds")
    assert ds.class_names == ("G1", "G2") and ds.channels == (3, 6)
    assert ds.channel_names == ("brightfield", "darkfield")
    assert ds.object_ids.dtype == np.int64 and ds.object_ids.tolist() == [1, 2, 3, 4, 5]
    assert ds.labels.tolist() == [0, 0, 0, 1, 1]
    for i, object_id in enumerate(ds.object_ids):
        np.testing.assert_array_equal(ds.images[i, 0], cell_image(int(object_id), 3))
        np.testing.assert_array_equal(ds.images[i, 1], cell_image(int(object_id), 6))
    assert ds.source == {"kind": "ideas", "path": str(root.resolve()), "channels": [3, 6]}
    assert ds.summary["n_problems"] == 0 and ds.summary["class_counts"] == {"G1": 3, "G2": 2}
    assert ds.summary["fit"]["unchanged"] == 5 and ds.summary["bit_depths"] == [16]


def test_channels_come_in_the_order_asked(tmp_path: Path) -> None:
    ds = import_ideas(make_tree(tmp_path / "export"), (6, 3), 40)
    assert ds.channel_names == ("Ch6", "Ch3")
    np.testing.assert_array_equal(ds.images[0, 0], cell_image(1, 6))


def test_channels_are_required_and_names_must_match(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = make_tree(tmp_path / "export")
    with pytest.raises(SystemExit) as exc:
        main(["import", "ideas", str(root), "-o", str(tmp_path / "ds")])
    assert exc.value.code == 2 and "--channels" in capsys.readouterr().err
    assert run_cli(root, tmp_path / "ds", "--channel-names", "brightfield") == 2
    assert "one name per channel" in capsys.readouterr().err
    assert not (tmp_path / "ds").exists()


def test_wrong_channel_numbers_say_which_channels_exist(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = make_tree(tmp_path / "export")
    assert main(["import", "ideas", str(root), "--channels", "1,6", "-o", str(tmp_path / "ds")]) == 2
    err = capsys.readouterr().err
    assert "no cells imported" in err and "Ch3, Ch4, Ch6" in err


def corrupt(root: Path) -> Path:
    path = root / "G1" / "2_Ch3.tif"
    path.write_bytes(b"these are not the bytes of a TIFF file")
    return path


def truncated(root: Path) -> Path:
    path = root / "G1" / "2_Ch6.tif"
    path.write_bytes(path.read_bytes()[:2000])
    return path


def missing_channel(root: Path) -> Path:
    path = root / "G1" / "2_Ch6.tif"
    path.unlink()
    return path


def folder_named_like_a_tiff(root: Path) -> Path:
    path = root / "G1" / "2_Ch3.tif"
    path.unlink()
    path.mkdir()
    return path


def broken_symlink(root: Path) -> Path:
    path = root / "G1" / "2_Ch3.tif"
    path.unlink()
    path.symlink_to(root / "nowhere.tif")
    return path


def multi_page(root: Path) -> Path:
    path = root / "G1" / "2_Ch3.tif"
    with tifffile.TiffWriter(path) as tif:
        tif.write(cell_image(2, 3))
        tif.write(cell_image(2, 3))
    return path


def rgb(root: Path) -> Path:
    path = root / "G1" / "2_Ch3.tif"
    tifffile.imwrite(path, np.zeros((40, 40, 3), np.uint8), photometric="rgb")
    return path


def float_pixels(root: Path) -> Path:
    path = root / "G1" / "2_Ch3.tif"
    tifffile.imwrite(path, cell_image(2, 3).astype(np.float32))
    return path


def channels_differ_in_size(root: Path) -> Path:
    tifffile.imwrite(root / "G1" / "2_Ch6.tif", cell_image(2, 6, shape=(30, 30)))
    return root / "G1" / "2_Ch*.tif"


def non_numeric_id(root: Path) -> Path:
    for channel in (3, 6):
        tifffile.imwrite(root / "G1" / f"cell9_Ch{channel}.tif", cell_image(9, channel))
    return root / "G1" / "cell9_Ch3.tif"


def repeated_id(root: Path) -> Path:
    write_cell(root / "G2", 2)
    return root / "G1" / "2_Ch*.tif"


def unexpected_name(root: Path) -> Path:
    path = root / "G1" / "cell 9.tif"
    tifffile.imwrite(path, cell_image(9, 3))
    return path


WITHOUT_2 = [1, 3, 4, 5]
ALL = [1, 2, 3, 4, 5]
# damage(root) -> offending path, reason, the ids still imported, objects skipped
BAD_INPUTS: dict[str, tuple[Callable[[Path], Path], str, list[int], int]] = {
    "corrupt": (corrupt, "corrupt", WITHOUT_2, 1),
    "truncated": (truncated, "truncated", WITHOUT_2, 1),
    "missing channel": (missing_channel, "no Ch6 file", WITHOUT_2, 1),
    "folder named like a tiff": (folder_named_like_a_tiff, "unreadable", WITHOUT_2, 1),
    "broken symlink": (broken_symlink, "unreadable", WITHOUT_2, 1),
    "multi-page": (multi_page, "2-page", WITHOUT_2, 1),
    "rgb": (rgb, "2-D", WITHOUT_2, 1),
    "float pixels": (float_pixels, "float32", WITHOUT_2, 1),
    "channels differ in size": (channels_differ_in_size, "differ in size", WITHOUT_2, 1),
    "non-numeric id": (non_numeric_id, "not a number", ALL, 1),
    "repeated id": (repeated_id, "occurs 2 times", WITHOUT_2, 2),
    "unexpected name": (unexpected_name, "unexpected file", ALL, 0),
}


@pytest.mark.parametrize("damage", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_input_is_reported_and_skipped_or_fatal_with_strict(
    tmp_path: Path, capsys: pytest.CaptureFixture, damage: tuple[Callable[[Path], Path], str, list[int], int]
) -> None:
    make_file_problem, reason, imported, skipped = damage
    root = make_tree(tmp_path / "export")
    path = make_file_problem(root)

    assert run_cli(root, tmp_path / "ds") == 0
    assert str(path) in capsys.readouterr().out  # the printed summary names it too
    ds = read_dataset(tmp_path / "ds")
    assert ds.object_ids.tolist() == imported and ds.summary["n_skipped"] == skipped
    problems = ds.summary["problems"]
    assert any(p["path"] == str(path) and reason in p["reason"] for p in problems), problems

    assert run_cli(root, tmp_path / "strict", "--strict") == 2
    err = capsys.readouterr().err
    assert str(path) in err and reason in err and "--strict" in err
    assert not (tmp_path / "strict").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_permission_denied_is_reported(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "export")
    path = root / "G1" / "2_Ch3.tif"
    path.chmod(0)
    ds = import_ideas(root, (3, 6), 40)
    assert ds.object_ids.tolist() == [1, 3, 4, 5]
    [problem] = ds.summary["problems"]
    assert problem["path"] == str(path) and "permission denied" in problem["reason"]


def test_empty_class_folder_is_reported_and_left_out(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "export")
    (root / "S_phase").mkdir()
    ds = import_ideas(root, (3, 6), 40)
    assert ds.class_names == ("G1", "G2") and len(ds) == 5 and ds.summary["n_skipped"] == 0
    assert ds.summary["problems"][0]["path"] == str(root / "S_phase")
    assert "empty class folder" in ds.summary["problems"][0]["reason"]
    with pytest.raises(UserError, match=f"{root / 'S_phase'}: empty class folder"):
        import_ideas(root, (3, 6), 40, strict=True)


def test_sizes_are_cropped_centered_and_padded_with_the_border_median(tmp_path: Path) -> None:
    root = tmp_path / "export"
    write_cell(root / "G1", 1, shape=(40, 40))
    write_cell(root / "G1", 2, shape=(50, 50))
    small = np.full((2, 30, 30), [[[700]], [[90]]], np.uint16)
    small[:, 0, :7] = 5000  # a few bright border pixels must not move the median
    small[:, 10:20, 10:20] = 3000
    for channel, image in zip((3, 6), small):
        tifffile.imwrite(root / "G1" / f"3_Ch{channel}.tif", image)
    write_cell(root / "G1", 4, shape=(44, 36))

    ds = import_ideas(root, (3, 6), 40)
    assert ds.images.shape == (4, 2, 40, 40)
    np.testing.assert_array_equal(ds.images[1, 0], cell_image(2, 3, shape=(50, 50))[5:45, 5:45])
    padded = ds.images[2]
    np.testing.assert_array_equal(padded[:, 5:35, 5:35], small)
    padding = np.ones((40, 40), bool)
    padding[5:35, 5:35] = False
    assert (padded[0][padding] == 700).all() and (padded[1][padding] == 90).all()
    mixed = cell_image(4, 3, shape=(44, 36))
    np.testing.assert_array_equal(ds.images[3, 0, :, 2:38], mixed[2:42])
    assert ds.summary["fit"] == {"unchanged": 1, "cropped": 1, "padded": 1, "cropped_and_padded": 1}
    assert ds.summary["source_sizes"] == {"40x40": 1, "50x50": 1, "30x30": 1, "44x36": 1}


def test_8_and_16_bit_tiffs_keep_their_raw_values(tmp_path: Path) -> None:
    root = tmp_path / "export"
    write_cell(root / "G1", 1, dtype=np.uint8)
    write_cell(root / "G1", 2, dtype=np.uint16)
    ds = import_ideas(root, (3, 6), 40)
    assert ds.images.dtype == np.uint16
    np.testing.assert_array_equal(ds.images[0, 1], cell_image(1, 6, dtype=np.uint8))
    np.testing.assert_array_equal(ds.images[1, 1], cell_image(2, 6))
    assert ds.summary["bit_depths"] == [8, 16]


def test_unlabeled_tree_orders_ids_numerically(tmp_path: Path) -> None:
    root = tmp_path / "export"
    for object_id in (10, 2, 33):
        write_cell(root, object_id)
    (root / "manifest.csv").write_text("object_id\n")
    ds = import_ideas(root, (3, 6), 40)
    assert ds.class_names == () and (ds.labels == UNLABELED).all() and not ds.is_labeled
    assert ds.object_ids.tolist() == [2, 10, 33]


def test_cell_cycle_stages_keep_biological_order_other_names_sort(tmp_path: Path) -> None:
    stages = tmp_path / "stages"
    for object_id, label in enumerate(("Telophase", "G1", "Metaphase", "S_phase", "G2")):
        write_cell(stages / label, object_id)
    ds = import_ideas(stages, (3, 6), 40)
    assert ds.class_names == ("G1", "S_phase", "G2", "Metaphase", "Telophase")
    assert ds.object_ids.tolist() == [1, 3, 4, 2, 0]  # by class, then id
    other = tmp_path / "other"
    for object_id, label in enumerate(("live", "dead", "G1")):
        write_cell(other / label, object_id)
    assert import_ideas(other, (3, 6), 40).class_names == ("G1", "dead", "live")


def test_stored_problem_list_is_capped_but_counted() -> None:
    report = ImportReport(max_stored=3)
    for i in range(5):
        report.problem(f"/x/{i}_Ch3.tif", "corrupt")
    assert report.n_problems == 5 and [p["path"] for p in report.problems] == [f"/x/{i}_Ch3.tif" for i in range(3)]


def test_output_folder_with_other_files_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = make_tree(tmp_path / "export")
    assert run_cli(root, root) == 2
    assert "not a flowsort dataset" in capsys.readouterr().err
