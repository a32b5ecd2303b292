"""`flowsort evaluate`: its numbers agree with the raw predictions, labels are matched by name, k-NN is right."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy.special import softmax
from sklearn.metrics import balanced_accuracy_score

from engines.bundle import load_bundle
from flowsort.cli import main
from trainer.dataset import UNLABELED, CellDataset, read_dataset, write_dataset
from trainer.evaluation import Merge, classification_metrics, knn_accuracy, labels_by_name, model_labels, uncalibrated
from trainer.synthetic import STAGES, generate, to_dataset

MERGE = "G1,S_phase,G2=Interphase"
# Eulenberg et al. 2017: 32,266 Jurkat cells
PAPER_MIX = "G1=14333,S_phase=8616,G2=8601,Prophase=606,Metaphase=68,Anaphase=15,Telophase=27"


def reorder_classes(dataset: CellDataset, names: tuple[str, ...]) -> CellDataset:
    """The same cells with the class list in another order (labels re-indexed to match)."""
    table = np.array([names.index(name) for name in dataset.class_names] + [UNLABELED], dtype=np.int16)
    return CellDataset(
        images=dataset.images, labels=table[dataset.labels], object_ids=dataset.object_ids, class_names=names,
        channels=dataset.channels, channel_names=dataset.channel_names, truth=dataset.truth,
    )


@pytest.fixture(scope="module")
def shuffled_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Fresh cells whose dataset lists the classes in reverse order, with dead cells and debris."""
    cells = generate(240, seed=21, size=32, prior="uniform", dead_fraction=0.1, debris_fraction=0.05)
    dataset = reorder_classes(to_dataset(cells), tuple(reversed(STAGES)))
    return write_dataset(tmp_path_factory.mktemp("shuffled") / "dataset", dataset)


@pytest.fixture(scope="module")
def evaluated(quick_bundle: Path, shuffled_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("evaluation") / "report"
    assert main(["evaluate", str(quick_bundle), str(shuffled_dataset), "-o", str(out), "--merge", MERGE,
                 "--class-mix", PAPER_MIX]) == 0
    return out


@pytest.fixture(scope="module")
def report(evaluated: Path) -> dict:
    return json.loads((evaluated / "report.json").read_text())


@pytest.fixture(scope="module")
def embedded(quick_bundle: Path, shuffled_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, np.ndarray]:
    out = tmp_path_factory.mktemp("embedding") / "cells.npz"
    assert main(["embed", str(quick_bundle), str(shuffled_dataset), "-o", str(out)]) == 0
    with np.load(out) as data:
        return dict(data)


def test_report_files_keys_and_self_contained_html(evaluated: Path, report: dict) -> None:
    for key in ("accuracy", "balanced_accuracy", "per_class", "confusion_matrix", "knn", "calibration", "dead_cells", "merged"):
        assert key in report, key
    assert set(report["per_class"]) == set(STAGES)
    assert set(report["per_class"]["G1"]) == {"precision", "recall", "f1", "support"}
    assert {"reliability", "embedding_map", "examples", "most_flagged"} <= set(report["figures"])
    for name in report["figures"].values():
        assert (evaluated / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (evaluated / "report.html").read_text()
    assert page.count("src='data:image/png;base64,") == len(report["figures"])
    assert page.count("<img") == len(report["figures"])  # no image is linked from outside the page


def test_accuracy_and_confusion_agree_with_embed_output(report: dict, embedded: dict, shuffled_dataset: Path) -> None:
    labels, predicted = embedded["labels"], embedded["probabilities"].argmax(axis=1)
    labeled = labels != UNLABELED
    # labels were matched to the model's classes by name although the dataset lists them reversed
    stage = read_dataset(shuffled_dataset).truth["stage"]
    np.testing.assert_array_equal(labels, stage)
    assert report["accuracy"] == pytest.approx(float((predicted[labeled] == labels[labeled]).mean()))
    assert report["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(labels[labeled], predicted[labeled]))
    confusion = np.array(report["confusion_matrix"])
    assert confusion.sum() == labeled.sum() == report["n_labeled"]
    assert [report["per_class"][name]["support"] for name in STAGES] == confusion.sum(axis=1).tolist()


def test_merged_metrics_sum_the_merged_probabilities(report: dict, embedded: dict) -> None:
    merged = report["merged"]
    assert merged["merges"] == [MERGE]
    assert merged["class_names"] == ["Interphase", *STAGES[3:]]
    labels = embedded["labels"]
    labeled = labels != UNLABELED
    probabilities = embedded["probabilities"]
    merged_probabilities = np.column_stack([probabilities[:, :3].sum(axis=1), probabilities[:, 3:]])
    merged_labels = np.maximum(labels - 2, 0)
    predicted = merged_probabilities.argmax(axis=1)
    assert merged["accuracy"] == pytest.approx(float((predicted[labeled] == merged_labels[labeled]).mean()))
    assert np.array(merged["confusion_matrix"]).sum() == labeled.sum()
    # G1, S_phase and G2 are the classes a briefly trained model confuses most
    assert merged["accuracy"] >= report["accuracy"]


def test_class_mix_reweights_the_bundle_probabilities(
    evaluated: Path, report: dict, embedded: dict, quick_bundle: Path
) -> None:
    at_mix = report["class_mix"]
    counts = dict(item.split("=") for item in PAPER_MIX.split(","))
    share = np.array([float(counts[name]) for name in STAGES])
    share /= share.sum()
    assert list(at_mix["mix"].values()) == pytest.approx(share.tolist())
    labels, probabilities = embedded["labels"], embedded["probabilities"]
    labeled = labels != UNLABELED
    predicted = (probabilities * share / load_bundle(quick_bundle).class_prior).argmax(axis=1)
    recall = np.array([(predicted[labeled & (labels == k)] == k).mean() for k in range(len(STAGES))])
    assert list(at_mix["recall"].values()) == pytest.approx(recall.tolist())
    assert at_mix["accuracy"] == pytest.approx(float(share @ recall))
    assert "At the class mix" in (evaluated / "report.html").read_text()


def test_dead_cells_and_calibration(report: dict, embedded: dict, shuffled_dataset: Path) -> None:
    dead = report["dead_cells"]
    truth = read_dataset(shuffled_dataset).truth
    assert dead["n_dead_or_debris"] == int((truth["dead"] | truth["debris"]).sum()) > 0
    assert 0.5 < dead["auroc"] <= 1.0
    assert dead["flagged_fraction"] == pytest.approx(float(embedded["dead_flag"].mean()))
    calibration = report["calibration"]
    assert 0 <= calibration["ece_after"] <= 1 and 0 <= calibration["ece_before"] <= 1
    assert sum(calibration["reliability_after"]["count"]) == report["n_labeled"]


def test_uncalibrated_undoes_temperature_scaling() -> None:
    logits = np.random.default_rng(0).normal(scale=4, size=(50, 5))
    np.testing.assert_allclose(uncalibrated(softmax(logits / 2.5, axis=1), 2.5), softmax(logits, axis=1), atol=1e-10)


def test_classification_metrics_by_hand() -> None:
    probabilities = np.eye(3)[[0, 0, 1, 1, 0, 0]]
    labels = np.array([0, 0, 1, 0, 2, UNLABELED])
    metrics = classification_metrics(probabilities, labels, ("a", "b", "c"))
    assert metrics["n_labeled"] == 5
    assert metrics["accuracy"] == pytest.approx(3 / 5)
    assert metrics["balanced_accuracy"] == pytest.approx((2 / 3 + 1 + 0) / 3)
    assert metrics["confusion_matrix"] == [[2, 1, 0], [0, 1, 0], [1, 0, 0]]
    assert metrics["per_class"]["a"] == {"precision": 2 / 3, "recall": 2 / 3, "f1": pytest.approx(2 / 3), "support": 3}
    assert metrics["per_class"]["c"] == {"precision": None, "recall": 0.0, "f1": 0.0, "support": 1}


def test_knn_separated_clusters_are_perfect_and_noise_is_chance() -> None:
    rng = np.random.default_rng(1)
    labels = np.repeat([0, 1, 2], 100)
    centers = rng.normal(size=(3, 32)) * 10
    clusters = centers[labels] + rng.normal(size=(300, 32))
    assert knn_accuracy(clusters, labels)["accuracy"] == 1.0
    noise_labels = rng.integers(0, 2, 2000)
    accuracy = knn_accuracy(rng.normal(size=(2000, 32)), noise_labels)["accuracy"]
    assert 0.45 < accuracy < 0.55


def test_knn_leaves_the_cell_out_weights_by_similarity_and_skips_unlabeled() -> None:
    # Each cell's twin carries the other label: with itself left out, every vote goes wrong.
    twins = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    assert knn_accuracy(twins, np.array([0, 1, 0, 1]), k=1)["accuracy"] == 0.0
    # One near neighbour (similarity 1) outvotes two far ones (similarity 0.5) under exp(s / 0.07) weights.
    far = [0.5, np.sqrt(0.75)]
    embedding = np.array([[1.0, 0.0], [1.0, 0.0], far, far, [-1.0, 0.0]])
    result = knn_accuracy(embedding, np.array([0, 0, 1, 1, UNLABELED]), k=3)
    assert result["accuracy"] == 1.0 and result["n_labeled"] == 4 and result["k"] == 3


def test_labels_are_matched_to_the_model_by_name(quick_bundle: Path) -> None:
    bundle = load_bundle(quick_bundle)
    dataset = to_dataset(generate(40, seed=2, size=32, prior="uniform"))
    shuffled = reorder_classes(dataset, ("Telophase", "G2", "G1", "S_phase", "Prophase", "Anaphase", "Metaphase"))
    np.testing.assert_array_equal(model_labels(bundle, shuffled), dataset.labels)


def test_unknown_class_is_refused_unless_a_merge_targets_it(quick_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    dataset = to_dataset(generate(30, seed=3, size=32, prior="uniform", dead_fraction=0, debris_fraction=0))
    renamed = CellDataset(
        images=dataset.images, labels=dataset.labels, object_ids=dataset.object_ids,
        class_names=("Interphase", *STAGES[1:]), channels=dataset.channels, channel_names=dataset.channel_names,
    )
    path = write_dataset(tmp_path / "renamed", renamed)
    assert main(["evaluate", str(quick_bundle), str(path), "-o", str(tmp_path / "out")]) == 2
    assert "Interphase, which the model does not know" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    bundle = load_bundle(quick_bundle)
    merge = Merge.of(bundle.class_names, [MERGE])
    labels = model_labels(bundle, renamed, merge)
    interphase = renamed.labels == 0
    assert (labels[interphase] == UNLABELED).all() and (labels[~interphase] == renamed.labels[~interphase]).all()
    merged = labels_by_name(renamed, merge.index_by_name())
    np.testing.assert_array_equal(merged, np.maximum(dataset.labels - 2, 0))


@pytest.fixture(scope="module")
def five_class_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model trained with the paper's merge (G1, S_phase and G2 as Interphase): the bundle records the merge."""
    folder = tmp_path_factory.mktemp("five-class")
    cells = generate(300, seed=6, size=32, prior="uniform", dead_fraction=0, debris_fraction=0)
    dataset = write_dataset(folder / "dataset", to_dataset(cells))
    bundle = folder / "bundle"
    assert main(["train", str(dataset), "-o", str(bundle), "--merge", MERGE, "--width", "0.25", "--epochs", "1",
                 "--batch-size", "32", "--seed", "0"]) == 0
    return bundle


def cells_of(names: tuple[str, ...], seed: int) -> CellDataset:
    """Synthetic cells of the stages ``names`` only, labeled with just those classes."""
    dataset = to_dataset(generate(120, seed=seed, size=32, prior="uniform", dead_fraction=0, debris_fraction=0))
    keep = np.isin(dataset.labels, [STAGES.index(name) for name in names])
    table = np.array([names.index(name) if name in names else UNLABELED for name in STAGES] + [UNLABELED], np.int16)
    return CellDataset(images=dataset.images[keep], labels=table[dataset.labels[keep]],
                       object_ids=dataset.object_ids[keep], class_names=names, channels=dataset.channels,
                       channel_names=dataset.channel_names)


def with_class_names(dataset: CellDataset, names: tuple[str, ...]) -> CellDataset:
    """The same cells and labels, their classes called ``names``."""
    return CellDataset(images=dataset.images, labels=dataset.labels, object_ids=dataset.object_ids, class_names=names,
                       channels=dataset.channels, channel_names=dataset.channel_names)


def test_a_merged_model_scores_any_subset_of_the_merged_classes(five_class_bundle: Path, tmp_path: Path) -> None:
    assert load_bundle(five_class_bundle).class_names[0] == "Interphase"
    for names in (("G1",), ("G1", "Prophase"), STAGES):
        dataset = cells_of(names, seed=7)
        path = write_dataset(tmp_path / "-".join(names)[:40], dataset)
        out = tmp_path / f"report-{len(names)}"
        assert main(["evaluate", str(five_class_bundle), str(path), "-o", str(out)]) == 0, names
        report = json.loads((out / "report.json").read_text())
        interphase = int(np.isin(dataset.labels, [names.index(n) for n in ("G1", "S_phase", "G2") if n in names]).sum())
        assert report["n_labeled"] == len(dataset)
        assert report["per_class"]["Interphase"]["support"] == interphase > 0
        embedded = tmp_path / f"cells-{len(names)}.npz"
        assert main(["embed", str(five_class_bundle), str(path), "-o", str(embedded)]) == 0
        with np.load(embedded) as data:
            assert (data["labels"] == 0).sum() == interphase and (data["labels"] >= 0).all()


def test_unknown_labels_advice_works_when_followed(
    quick_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A model that records no merge and a dataset naming a class its own way: the error says what to add."""
    renamed = with_class_names(cells_of(("G1", "S_phase"), seed=8), ("G1", "S"))
    path = write_dataset(tmp_path / "renamed", renamed)
    capsys.readouterr()
    assert main(["evaluate", str(quick_bundle), str(path), "-o", str(tmp_path / "refused")]) == 2
    error = capsys.readouterr().err
    assert "S, which the model does not know" in error
    advice = error.split("--map-labels ", 1)[1].split(" ", 1)[0]
    assert advice == "S=CLASS"
    followed = ["--map-labels", advice.replace("CLASS", "S_phase")]
    assert main(["evaluate", str(quick_bundle), str(path), "-o", str(tmp_path / "out"), *followed]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["per_class"]["S_phase"]["support"] == int((renamed.labels == 1).sum()) > 0
    assert report["n_labeled"] == len(renamed)


def test_embed_writes_labels_the_model_cannot_use_as_unlabeled(
    quick_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    renamed = with_class_names(cells_of(("G1", "Prophase"), seed=9), ("G1", "mitotic"))
    out = tmp_path / "cells.npz"
    assert main(["embed", str(quick_bundle), str(write_dataset(tmp_path / "ds", renamed)), "-o", str(out)]) == 0
    assert "mitotic (not classes of the model) are written unlabeled" in capsys.readouterr().out
    with np.load(out) as data:
        np.testing.assert_array_equal(data["labels"], np.where(renamed.labels == 0, STAGES.index("G1"), UNLABELED))


def test_map_labels_naming_no_dataset_class_is_refused(quick_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = write_dataset(tmp_path / "g1", cells_of(("G1",), seed=10))
    assert main(["evaluate", str(quick_bundle), str(path), "-o", str(tmp_path / "out"), "--map-labels", "X=G1"]) == 2
    assert "--map-labels 'X=G1': the dataset has none of X" in capsys.readouterr().err
