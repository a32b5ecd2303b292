"""The dataset cache round-trips and refuses truncated or mismatched files."""

from pathlib import Path

import numpy as np
import pytest

from flowsort.errors import UserError
from trainer.dataset import CellDataset, content_hash, read_dataset, write_dataset


def make_dataset(n: int = 20, size: int = 40) -> CellDataset:
    rng = np.random.default_rng(1)
    return CellDataset(
        images=rng.integers(0, 4096, (n, 2, size, size), dtype=np.uint16),
        labels=rng.integers(-1, 3, n).astype(np.int16),
        object_ids=np.arange(1000, 1000 + n, dtype=np.int64),
        class_names=("G1", "S_phase", "G2"),
        channels=(3, 6),
        channel_names=("brightfield", "darkfield"),
        truth={"dead": rng.random(n) < 0.2},
        source={"kind": "test"},
        summary={"n_imported": n},
    )


def test_round_trip_is_exact_and_memory_mapped(tmp_path: Path) -> None:
    original = make_dataset()
    write_dataset(tmp_path / "ds", original)
    loaded = read_dataset(tmp_path / "ds")
    assert isinstance(loaded.images, np.memmap)
    np.testing.assert_array_equal(loaded.images, original.images)
    np.testing.assert_array_equal(loaded.labels, original.labels)
    np.testing.assert_array_equal(loaded.object_ids, original.object_ids)
    np.testing.assert_array_equal(loaded.truth["dead"], original.truth["dead"])
    assert loaded.class_names == original.class_names and loaded.channels == (3, 6)
    assert loaded.source == {"kind": "test"} and loaded.input_size == 40
    assert content_hash(loaded) == content_hash(original)


def test_subset_and_class_counts() -> None:
    dataset = make_dataset()
    labeled = dataset.subset(dataset.labels >= 0)
    assert (labeled.labels >= 0).all() and len(labeled.truth["dead"]) == len(labeled)
    assert sum(dataset.class_counts().values()) == int((dataset.labels >= 0).sum())


def test_truncated_images_are_refused(tmp_path: Path) -> None:
    write_dataset(tmp_path / "ds", make_dataset())
    images = tmp_path / "ds" / "images.npy"
    images.write_bytes(images.read_bytes()[:-1000])
    with pytest.raises(UserError, match="images.npy.*truncated"):
        read_dataset(tmp_path / "ds")


def test_files_from_another_import_are_refused(tmp_path: Path) -> None:
    write_dataset(tmp_path / "a", make_dataset(n=20))
    write_dataset(tmp_path / "b", make_dataset(n=30))
    (tmp_path / "a" / "labels.npy").write_bytes((tmp_path / "b" / "labels.npy").read_bytes())
    with pytest.raises(UserError, match="labels.npy.*different imports"):
        read_dataset(tmp_path / "a")


def test_missing_metadata_and_missing_array(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not a flowsort dataset"):
        read_dataset(tmp_path)
    write_dataset(tmp_path / "ds", make_dataset())
    (tmp_path / "ds" / "object_ids.npy").unlink()
    with pytest.raises(UserError, match="object_ids.npy is missing"):
        read_dataset(tmp_path / "ds")


def test_inconsistent_dataset_is_refused_at_construction() -> None:
    dataset = make_dataset()
    with pytest.raises(ValueError, match="labels"):
        CellDataset(**{**dataset.__dict__, "labels": dataset.labels[:-1]})
    with pytest.raises(ValueError, match="channels"):
        CellDataset(**{**dataset.__dict__, "channels": (3,)})
