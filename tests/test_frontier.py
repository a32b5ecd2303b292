"""`flowsort bench frontier`: teachers and distilled students scored on the same held-out cells, fold by fold."""

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


@pytest.fixture(scope="module")
def fold_two(models, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The same teacher and student recipe holding out fold 2 of 3."""
    dataset, _, _ = models
    folder = tmp_path_factory.mktemp("frontier-fold2")
    teacher, student = folder / "teacher", folder / "student"
    assert main(["train", str(dataset), "-o", str(teacher), "--width", "0.25", "--hold-out", "2/3", *QUICK]) == 0
    assert main(["distill", str(teacher), str(dataset), "-o", str(student), "--width", "0.125", "--hold-out", "2/3",
                 "--teacher-views", "1", *QUICK]) == 0
    return teacher, student


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
    other = tmp_path / "other"  # fold 1 of a 2-fold split: other cells than fold 1 of 3
    assert main(["train", str(dataset), "-o", str(other), "--width", "0.125", "--hold-out", "1/2", *QUICK]) == 0
    assert main(["bench", "frontier", str(teacher), str(dataset), "--students", str(other), "--skip-e2e",
                 "-o", str(tmp_path / "f")]) == 2
    err = capsys.readouterr().err
    assert "held out different cells" in err and str(teacher) in err and str(other) in err


def test_a_cross_validated_frontier_pools_each_models_folds(models, fold_two, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture) -> None:
    import engines
    from engines.base import predict_all
    from engines.bundle import load_bundle
    from trainer.evaluation import model_labels

    dataset, teacher_1, student_1 = models
    teacher_2, student_2 = fold_two
    out = tmp_path / "frontier"
    assert main(["bench", "frontier", str(teacher_1), str(teacher_2), str(dataset), "--students", str(student_2),
                 str(student_1), "--skip-e2e", "--batch-sizes", "1,4", "--seconds", "0.1", "--class-mix", MIX,
                 "-o", str(out)]) == 0
    assert "w0.125 distilled" in capsys.readouterr().out
    report = json.loads((out / "frontier.json").read_text())
    cells = read_dataset(dataset)
    folds = [HeldOutFold(k, 3).split(cells)[1] for k in (1, 2)]
    sizes = np.array([len(fold) for fold in folds])
    held_out = report["held_out"]
    assert (held_out["folds"], held_out["split_seed"], held_out["folds_used"]) == (3, 0, [1, 2])
    assert held_out["n_cells"] == sizes.sum() == sum(held_out["class_counts"].values())
    rows = report["results"]
    assert len({(row["label"], row["precision"]) for row in rows}) == len(rows)
    measured = [row for row in rows if "accuracy" in row]
    assert {(row["label"], row["precision"]) for row in measured} >= {("w0.25 teacher", "fp32"),
                                                                       ("w0.125 distilled", "fp32")}
    (reference,) = [row for row in measured if row["label"] == "w0.25 teacher" and row["precision"] == "fp32"]
    for row in rows:
        assert row["folds"] == [1, 2]
    for row in measured:
        expected = [str(teacher_1), str(teacher_2)] if row["label"] == "w0.25 teacher" else [str(student_1), str(student_2)]
        assert row["bundles"] == expected
        assert row["accuracy"] == pytest.approx(np.dot(row["accuracy_folds"], sizes) / sizes.sum())
        assert row["delta_vs_teacher"] == pytest.approx(100 * (row["accuracy"] - reference["accuracy"]))
        assert 0 <= row["accuracy_at_mix"] <= 1 and row["engine_b1_cells_per_s"] > 0
    assert reference["delta_vs_teacher"] == 0
    bundle = load_bundle(teacher_2)  # fold 2's teacher scored fold 2's cells
    with engines.load(bundle, "openvino", "fp32") as engine:
        predicted = predict_all(engine, cells.images[folds[1]]).probabilities.argmax(1)
    assert reference["accuracy_folds"][1] == pytest.approx((predicted == model_labels(bundle, cells.subset(folds[1]))).mean())


@pytest.mark.parametrize("case", ["student fold missing", "teacher fold twice", "no held-out record", "teacher widths"])
def test_models_that_do_not_line_up_fold_by_fold_are_refused(case: str, models, fold_two, quick_bundle: Path,
                                                             tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    dataset, teacher_1, student_1 = models
    teacher_2, student_2 = fold_two
    bundles, students, message = {
        "student fold missing": ([teacher_1, teacher_2], [student_1], "no bundle holds out fold 2"),
        "teacher fold twice": ([teacher_1, teacher_1], [], "both hold out fold 1"),
        "no held-out record": ([teacher_1], [quick_bundle], f"{quick_bundle} records no held-out fold"),
        "teacher widths": ([teacher_1, student_2], [], "the teachers differ in width"),
    }[case]
    assert main(["bench", "frontier", *map(str, bundles), str(dataset), "--students", *map(str, students),
                 "--skip-e2e", "-o", str(tmp_path / "f")]) == 2
    assert message in capsys.readouterr().err


def test_hold_out_folds_partition_the_labeled_cells(quick_bundle: Path) -> None:
    dataset = read_dataset(quick_bundle.parent / "dataset")
    parts = [HeldOutFold(k, 3).split(dataset)[1] for k in (1, 2, 3)]
    together = np.sort(np.concatenate(parts))
    assert np.array_equal(together, np.flatnonzero(dataset.labels >= 0))
    train, test = HeldOutFold(2, 3).split(dataset)
    assert not set(train) & set(test)


def test_an_ensemble_averages_its_members_on_their_shared_fold(models, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import engines
    from engines.base import predict_all
    from engines.bundle import load_bundle
    from trainer.evaluation import model_labels

    dataset, teacher, _ = models
    other = tmp_path / "other-seed"  # the teacher's recipe with another seed, holding out the same fold
    assert main(["train", str(dataset), "-o", str(other), "--width", "0.25", "--hold-out", "1/3", "--seed", "7",
                 *QUICK]) == 0
    out = tmp_path / "frontier"
    assert main(["bench", "frontier", str(teacher), str(dataset), "--ensembles", str(teacher), str(other),
                 "--skip-e2e", "--batch-sizes", "1,4", "--seconds", "0.1", "--class-mix", MIX, "-o", str(out)]) == 0
    rows = json.loads((out / "frontier.json").read_text())["results"]
    single = next(r for r in rows if r["label"] == "w0.25 teacher" and r["precision"] == "fp32")
    ensemble = next(r for r in rows if r["label"] == "w0.25 labels only, ensemble of 2" and r["precision"] == "fp32")
    cells = read_dataset(dataset).subset(HeldOutFold(1, 3).split(read_dataset(dataset))[1])
    probabilities = []
    for path in (teacher, other):
        with engines.load(load_bundle(path), "openvino", "fp32") as engine:
            probabilities.append(predict_all(engine, cells.images).probabilities)
    expected = (np.mean(probabilities, axis=0).argmax(1) == model_labels(load_bundle(teacher), cells)).mean()
    assert ensemble["accuracy"] == pytest.approx(expected)
    assert ensemble["members"] == 2 and ensemble["dead_auroc_synthetic"] is None
    # Each cell passes through both members: the ensemble is slower than its faster member alone.
    assert ensemble["engine_best_cells_per_s"] < single["engine_best_cells_per_s"] * 1.5
    assert main(["bench", "frontier", str(teacher), str(dataset), "--ensembles", str(other),
                 "--skip-e2e", "-o", str(tmp_path / "f")]) == 2
    assert "two or more bundles on each fold" in capsys.readouterr().err
