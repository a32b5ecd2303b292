"""Distillation: a tinier student taught by the tiny bundle, its bundle, and the inputs it refuses.

The teacher is ``tiny_bundle`` (width 0.25, 6 epochs on 1,600 simulated cells).
Both students are width 0.125 and see the same 240 labeled cells with the same
seed and schedule; the distilled one also learns from the teacher's soft
targets and from 600 simulated cells the teacher labels. Scored on 600 fresh
simulated cells, the distilled student must not fall more than
``TOLERANCE`` below the student trained on the labels alone (with these seeds it
is well above it; see the printed figures). Everything is seeded, so the
figures repeat from run to run on one machine.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import engines
from engines.base import predict_all
from engines.bundle import load_bundle
from flowsort.errors import UserError
from trainer.dataset import read_dataset
from trainer.distill import DistillConfig, distill
from trainer.merges import apply_merges
from trainer.synthetic import generate
from trainer.train import TrainConfig, fit

TOLERANCE = 0.02  # accuracy points the distilled student may trail the label-only student by
STUDENT = TrainConfig(epochs=4, width=0.125, batch_size=32, lr=0.1, seed=1, monitor="loss")
QUICK = DistillConfig(teacher_views=1, beta=0.5)


@pytest.fixture(scope="module")
def split(synthetic_dataset: Path) -> tuple[np.ndarray, np.ndarray]:
    """240 labeled training cells and 60 validation cells drawn from the synthetic dataset."""
    labels = read_dataset(synthetic_dataset).labels
    chosen = np.random.default_rng(0).choice(np.flatnonzero(labels >= 0), 300, replace=False)
    return np.sort(chosen[:240]), np.sort(chosen[240:])


@pytest.fixture(scope="module")
def fresh() -> tuple[np.ndarray, np.ndarray]:
    cells = generate(600, seed=99, size=40, prior="uniform", dead_fraction=0.0, debris_fraction=0.0)
    return cells.images, cells.stage


@pytest.fixture(scope="module")
def student(tiny_bundle: Path, synthetic_dataset: Path, split, tmp_path_factory: pytest.TempPathFactory) -> Path:
    extra = generate(600, seed=5, size=40, prior="uniform", dead_fraction=0.0, debris_fraction=0.0).images
    out = tmp_path_factory.mktemp("student") / "bundle"
    return distill([tiny_bundle], read_dataset(synthetic_dataset), *split, out, STUDENT, QUICK, extra, ["simulator"])


def accuracy(probabilities: np.ndarray, labels: np.ndarray) -> float:
    return float((probabilities.argmax(1) == labels).mean())


def test_distilled_student_is_at_least_as_good_as_one_trained_on_labels_alone(
    student: Path, synthetic_dataset: Path, split, fresh
) -> None:
    from engines.deployed_model import load_deployed
    from trainer.predictions import predict

    images, stages = fresh
    alone = fit(read_dataset(synthetic_dataset), *split, STUDENT).module.cpu().eval()
    distilled = accuracy(predict(load_deployed(load_bundle(student)), images).probabilities, stages)
    label_only = accuracy(predict(alone, images).probabilities, stages)
    print(f"distilled student {distilled:.3f}, label-only student {label_only:.3f} on {len(stages)} fresh cells")
    assert distilled >= label_only - TOLERANCE


def test_student_bundle_round_trip(student: Path, tiny_bundle: Path, fresh) -> None:
    bundle = load_bundle(student)
    record = bundle.manifest["distillation"]
    assert record["teachers"][0]["content_hash"] == load_bundle(tiny_bundle).content_hash
    assert record["alpha"] == QUICK.alpha and record["temperature"] == QUICK.temperature and record["beta"] == QUICK.beta
    assert record["labeled_cells"] == 240 and record["unlabeled_cells"] == 600
    assert bundle.manifest["model"]["width"] == 0.125
    assert bundle.manifest["dead_cell_detector"]["threshold_from"] == "labels"  # its own detector, set on dead cells
    images, _ = fresh
    with engines.load(bundle, "openvino", "fp32", max_batch=64) as engine:
        outputs = predict_all(engine, images[:100])
    assert outputs.probabilities.shape == (100, 7)
    assert np.allclose(outputs.probabilities.sum(1), 1, atol=1e-4)
    assert outputs.embedding.shape == (100, bundle.embedding_dim)
    assert np.isfinite(outputs.dead_score).all()


def test_distill_command_records_the_held_out_fold(quick_bundle: Path, tmp_path: Path) -> None:
    from flowsort.cli import main

    out = tmp_path / "student"
    dataset = quick_bundle.parent / "dataset"
    assert main(["distill", str(quick_bundle), str(dataset), "-o", str(out), "--width", "0.125", "--epochs", "1",
                 "--batch-size", "32", "--hold-out", "1/3", "--synthetic", "40", "--teacher-views", "8"]) == 0
    manifest = json.loads((out / "bundle.json").read_text())
    assert manifest["held_out"]["fold"] == 1 and manifest["held_out"]["folds"] == 3
    assert manifest["distillation"]["unlabeled_cells"] == 40
    assert manifest["distillation"]["teacher_views"] == 8
    labeled = int((read_dataset(dataset).labels >= 0).sum())
    trained_on = manifest["provenance"]["n_train"] + manifest["provenance"]["n_validation"]
    assert trained_on + manifest["held_out"]["n_cells"] == labeled


def test_teacher_whose_classes_differ_from_the_dataset_is_refused(tiny_bundle: Path, synthetic_dataset: Path,
                                                                   tmp_path: Path) -> None:
    merged = apply_merges(read_dataset(synthetic_dataset), ["G1,S_phase,G2=Interphase"])
    index = np.flatnonzero(merged.labels >= 0)
    with pytest.raises(UserError, match="give the --merge the teacher was trained with"):
        distill([tiny_bundle], merged, index[:100], index[100:150], tmp_path / "s", STUDENT, QUICK)


def test_teacher_of_another_input_size_is_refused(quick_bundle: Path, synthetic_dataset: Path, tmp_path: Path) -> None:
    dataset = read_dataset(synthetic_dataset)
    index = np.flatnonzero(dataset.labels >= 0)
    with pytest.raises(UserError, match="32x32"):
        distill([quick_bundle], dataset, index[:100], index[100:150], tmp_path / "s", STUDENT, QUICK)


def test_unlabeled_cells_of_another_shape_are_refused(tiny_bundle: Path, synthetic_dataset: Path, tmp_path: Path) -> None:
    dataset = read_dataset(synthetic_dataset)
    index = np.flatnonzero(dataset.labels >= 0)
    wrong = np.zeros((5, 2, 32, 32), np.uint16)
    with pytest.raises(UserError, match="same channels and size"):
        distill([tiny_bundle], dataset, index[:100], index[100:150], tmp_path / "s", STUDENT, QUICK, wrong)


@pytest.mark.parametrize(("flag", "value", "message"), [
    ("--alpha", "1.5", "--alpha"), ("--temperature", "0", "--temperature"), ("--hold-out", "6/5", "--hold-out"),
])
def test_bad_distill_settings_are_refused(quick_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                         flag: str, value: str, message: str) -> None:
    from flowsort.cli import main

    dataset = quick_bundle.parent / "dataset"
    assert main(["distill", str(quick_bundle), str(dataset), "-o", str(tmp_path / "s"), flag, value]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_dataset_without_unlabeled_cells_is_refused_as_extra_data(quick_bundle: Path, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture) -> None:
    from flowsort.cli import main
    from trainer.dataset import write_dataset

    dataset = read_dataset(quick_bundle.parent / "dataset")
    labeled_only = write_dataset(tmp_path / "labeled", dataset.subset(np.flatnonzero(dataset.labels >= 0)))
    assert main(["distill", str(quick_bundle), str(quick_bundle.parent / "dataset"), "-o", str(tmp_path / "s"),
                 "--unlabeled", str(labeled_only)]) == 2
    assert "no unlabeled cells" in capsys.readouterr().err


def write_acquisition(path: Path, images: np.ndarray, channels: tuple[int, ...], labeled: int = 0) -> Path:
    """Simulated cells as an acquisition file (one message of ten cells at a time); the first ``labeled`` cells
    get truth records, the others none."""
    from streamer.codec import encode_cells
    from streamer.recording import AcquisitionWriter
    from streamer.recording_truth import Truth, write_truth
    from trainer.synthetic import STAGES

    event_ids = np.arange(1, len(images) + 1, dtype=np.uint64)
    with AcquisitionWriter(path) as writer:
        for start in range(0, len(images), 10):
            writer.write(encode_cells("run", event_ids[start:start + 10], images[start:start + 10], channels))
        if labeled:
            write_truth(writer, "run", event_ids[:labeled], Truth(STAGES, np.zeros(labeled, np.int16)))
    return path


def test_distill_learns_from_the_unlabeled_cells_of_an_acquisition_file(quick_bundle: Path, tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture) -> None:
    from flowsort.cli import main
    from trainer.synthetic import CHANNELS

    images = generate(50, seed=21, size=40, prior="uniform", dead_fraction=0.0, debris_fraction=0.0).images
    recording = write_acquisition(tmp_path / "run.fsacq", images, CHANNELS, labeled=10)
    out = tmp_path / "student"
    assert main(["distill", str(quick_bundle), str(quick_bundle.parent / "dataset"), "-o", str(out), "--width",
                 "0.125", "--epochs", "1", "--batch-size", "32", "--teacher-views", "1",
                 "--unlabeled", str(recording)]) == 0
    record = json.loads((out / "bundle.json").read_text())["distillation"]
    assert record["unlabeled_cells"] == 40  # the 10 cells the file's truth labels stay out
    assert record["unlabeled_sources"] == [f"{recording} (40 of 50 cells unlabeled, 40x40 fitted to 32x32)"]
    assert "40x40 fitted to 32x32" in capsys.readouterr().out


def test_acquisition_whose_cells_are_all_labeled_is_refused_as_extra_data(quick_bundle: Path, tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture) -> None:
    from flowsort.cli import main
    from trainer.dataset_acquisition import write_dataset_acquisition

    dataset = read_dataset(quick_bundle.parent / "dataset")
    labeled = dataset.subset(np.flatnonzero(dataset.labels >= 0)[:30])
    recording = tmp_path / "labeled.fsacq"
    write_dataset_acquisition(labeled, recording)
    assert main(["distill", str(quick_bundle), str(quick_bundle.parent / "dataset"), "-o", str(tmp_path / "s"),
                 "--unlabeled", str(recording)]) == 2
    error = capsys.readouterr().err
    assert "all 30 cells are labeled" in error and "come in through DATASET" in error
    assert not (tmp_path / "s").exists()


def test_acquisition_of_other_channels_is_refused_as_extra_data(quick_bundle: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture) -> None:
    from flowsort.cli import main

    recording = write_acquisition(tmp_path / "other.fsacq", np.zeros((10, 2, 32, 32), np.uint16), (1, 9))
    assert main(["distill", str(quick_bundle), str(quick_bundle.parent / "dataset"), "-o", str(tmp_path / "s"),
                 "--unlabeled", str(recording)]) == 2
    assert "channels [1, 9] but the dataset's are [3, 6]" in capsys.readouterr().err
