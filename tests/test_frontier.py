"""`flowsort bench frontier`: a teacher and a distilled student scored on the same held-out cells."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from flowsort.cli import main
from trainer.dataset import read_dataset
from trainer.holdout import HeldOutFold

QUICK = ["--epochs", "2", "--batch-size", "32", "--lr", "0.1"]
MIX = "G1=50,S_phase=20,G2=10,Prophase=5,Metaphase=5,Anaphase=5,Telophase=5"


@pytest.fixture(scope="module")
def models(quick_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A width-0.25 teacher and a width-0.125 student, both holding out fold 1 of 3 of the quick dataset."""
    folder = tmp_path_factory.mktemp("frontier")
    dataset = quick_bundle.parent / "dataset"
    teacher, student = folder / "teacher", folder / "student"
    assert main(["train", str(dataset), "-o", str(teacher), "--width", "0.25", "--hold-out", "1/3", *QUICK]) == 0
    assert main(["distill", str(teacher), str(dataset), "-o", str(student), "--width", "0.125", "--hold-out", "1/3",
                 "--teacher-views", "1", *QUICK]) == 0
    return dataset, teacher, student


def test_frontier_scores_every_model_on_the_same_held_out_cells(models, tmp_path: Path) -> None:
    dataset, teacher, student = models
    out = tmp_path / "frontier"
    assert main(["bench", "frontier", str(teacher), str(dataset), "--students", str(student), "--skip-e2e",
                 "--batch-sizes", "1,4", "--seconds", "0.2", "--class-mix", MIX, "-o", str(out)]) == 0
    report = json.loads((out / "frontier.json").read_text())
    assert (out / "frontier.png").stat().st_size > 0
    held_out = HeldOutFold(1, 3).split(read_dataset(dataset))[1]
    assert report["held_out"]["n_cells"] == len(held_out) == sum(report["held_out"]["class_counts"].values())
    measured = [row for row in report["results"] if "accuracy" in row]
    assert {row["width"] for row in measured} == {0.25, 0.125}
    assert {row["precision"] for row in measured} >= {"fp32"}
    for row in measured:
        assert 0 <= row["accuracy"] <= 1 and 0 <= row["accuracy_at_mix"] <= 1
        assert row["engine_b1_cells_per_s"] > 0 and row["engine_best_batch"] in (1, 4)
        assert row["dead_auroc_synthetic"] is None or 0 <= row["dead_auroc_synthetic"] <= 1
    student_rows = [row for row in measured if row["width"] == 0.125]
    assert all(row["distilled_from"] for row in student_rows)


def test_models_that_held_out_different_cells_are_refused(models, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    dataset, teacher, _ = models
    other = tmp_path / "other"
    assert main(["train", str(dataset), "-o", str(other), "--width", "0.125", "--hold-out", "2/3", *QUICK]) == 0
    assert main(["bench", "frontier", str(teacher), str(dataset), "--students", str(other), "--skip-e2e",
                 "-o", str(tmp_path / "f")]) == 2
    assert "held out different cells" in capsys.readouterr().err


def test_hold_out_folds_partition_the_labeled_cells(quick_bundle: Path) -> None:
    dataset = read_dataset(quick_bundle.parent / "dataset")
    parts = [HeldOutFold(k, 3).split(dataset)[1] for k in (1, 2, 3)]
    together = np.sort(np.concatenate(parts))
    assert np.array_equal(together, np.flatnonzero(dataset.labels >= 0))
    train, test = HeldOutFold(2, 3).split(dataset)
    assert not set(train) & set(test)
