"""`flowsort embed`: per-cell outputs in .npz and .csv that agree with each other and with the bundle."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from engines.bundle import load_bundle
from flowsort.cli import main
from trainer.dataset import UNLABELED, CellDataset, read_dataset, write_dataset
from trainer.synthetic import STAGES, generate, to_dataset

N_CELLS = 60


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cells = generate(N_CELLS, seed=31, size=32, prior="uniform", dead_fraction=0.1, debris_fraction=0.05)
    return write_dataset(tmp_path_factory.mktemp("embed") / "dataset", to_dataset(cells))


@pytest.fixture(scope="module")
def npz(quick_bundle: Path, dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, np.ndarray]:
    out = tmp_path_factory.mktemp("npz") / "nested" / "cells.npz"
    assert main(["embed", str(quick_bundle), str(dataset), "-o", str(out)]) == 0
    with np.load(out) as data:  # no allow_pickle: every array must be plain
        return dict(data)


def test_npz_holds_every_cell_with_consistent_fields(npz: dict[str, np.ndarray], quick_bundle: Path, dataset: Path) -> None:
    bundle, cells = load_bundle(quick_bundle), read_dataset(dataset)
    assert set(npz) == {"object_ids", "labels", "embedding", "probabilities", "dead_score", "dead_flag", "class_names"}
    assert tuple(npz["class_names"]) == bundle.class_names == STAGES
    np.testing.assert_array_equal(npz["object_ids"], cells.object_ids)
    np.testing.assert_array_equal(npz["labels"], cells.truth["stage"])
    assert (npz["labels"] == UNLABELED).any()  # dead cells and debris are kept, unlabeled
    assert npz["embedding"].shape == (N_CELLS, bundle.embedding_dim)
    assert npz["probabilities"].shape == (N_CELLS, len(STAGES))
    np.testing.assert_allclose(npz["probabilities"].sum(axis=1), 1, atol=1e-5)
    np.testing.assert_array_equal(npz["dead_flag"], npz["dead_score"] > bundle.dead_threshold)


def test_csv_round_trip_matches_npz(npz: dict[str, np.ndarray], quick_bundle: Path, dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "cells.csv"
    assert main(["embed", str(quick_bundle), str(dataset), "-o", str(out)]) == 0
    with out.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == N_CELLS
    dim = npz["embedding"].shape[1]
    assert list(rows[0]) == ["object_id", "label", "predicted", *(f"p_{name}" for name in STAGES), "dead_score",
                             "dead_flag", *(f"emb_{i}" for i in range(dim))]

    def column(name: str, dtype: type = np.float32) -> np.ndarray:
        return np.array([row[name] for row in rows], dtype=dtype)

    names = np.array([*STAGES, ""])
    np.testing.assert_array_equal(column("object_id", np.int64), npz["object_ids"])
    np.testing.assert_array_equal(column("label", str), names[npz["labels"]])
    np.testing.assert_array_equal(column("predicted", str), names[npz["probabilities"].argmax(axis=1)])
    probabilities = np.column_stack([column(f"p_{name}") for name in STAGES])
    np.testing.assert_allclose(probabilities, npz["probabilities"], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(column("dead_score"), npz["dead_score"], rtol=1e-5)
    np.testing.assert_array_equal(column("dead_flag", int).astype(bool), npz["dead_flag"])
    embedding = np.column_stack([column(f"emb_{i}") for i in range(dim)])
    np.testing.assert_allclose(embedding, npz["embedding"], rtol=1e-5, atol=1e-6)


def test_unknown_suffix_is_refused(quick_bundle: Path, dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["embed", str(quick_bundle), str(dataset), "-o", str(tmp_path / "cells.txt")]) == 2
    assert "end -o with .npz, .csv or .parquet" in capsys.readouterr().err
    assert not (tmp_path / "cells.txt").exists()


def test_parquet_without_pyarrow_says_what_to_install(
    quick_bundle: Path, dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("pyarrow is installed")
    assert main(["embed", str(quick_bundle), str(dataset), "-o", str(tmp_path / "cells.parquet")]) == 2
    assert "pip install pyarrow" in capsys.readouterr().err


def test_mismatched_channels_are_refused(quick_bundle: Path, dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cells = read_dataset(dataset)
    wrong = CellDataset(
        images=np.asarray(cells.images), labels=cells.labels, object_ids=cells.object_ids, class_names=cells.class_names,
        channels=(3, 9), channel_names=("brightfield", "Ch9"),
    )
    path = write_dataset(tmp_path / "wrong", wrong)
    assert main(["embed", str(quick_bundle), str(path), "-o", str(tmp_path / "cells.npz")]) == 2
    error = capsys.readouterr().err
    assert "the dataset has channels [3, 9] but the model was trained on [3, 6]" in error
    assert "--channels" in error
