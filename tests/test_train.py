"""Training end to end on synthetic cells: it learns, it is reproducible, it resumes."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import trainer.train as train_module
from engines.bundle import load_bundle
from engines.deployed_model import load_deployed
from trainer.crossval import cross_validate
from trainer.dataset import read_dataset
from trainer.predictions import predict
from trainer.synthetic import generate
from trainer.train import TrainConfig, fit, sampling_weights, stratified_split


def test_tiny_model_learns_and_generalizes(tiny_bundle: Path) -> None:
    manifest = json.loads((tiny_bundle / "bundle.json").read_text())
    history = manifest["training"]["history"]
    assert history[-1]["train_loss"] < 0.9 * history[0]["train_loss"]
    fresh = generate(700, seed=999, size=40, prior="uniform", dead_fraction=0.0, debris_fraction=0.0)
    predicted = predict(load_deployed(load_bundle(tiny_bundle)), fresh.images).probabilities.argmax(axis=1)
    accuracy = float((predicted == fresh.stage).mean())
    assert accuracy > 0.35, f"held-out accuracy {accuracy:.3f} is not well above chance (1/7)"


def test_stratified_split_keeps_rare_classes_on_both_sides() -> None:
    labels = np.array([0] * 50 + [1] * 3 + [2] * 2 + [3])
    train, val = stratified_split(labels, 0.2, seed=0)
    assert len(np.intersect1d(train, val)) == 0 and len(train) + len(val) == len(labels)
    assert set(labels[val]) == {0, 1, 2} and set(labels[train]) == {0, 1, 2, 3}


def test_sqrt_balancing_and_its_prior_correction() -> None:
    labels = np.array([0] * 900 + [1] * 100)
    weights, correction = sampling_weights(labels, 2, "sqrt")
    share = np.array([weights[labels == 0].sum(), weights[labels == 1].sum()])
    np.testing.assert_allclose(share, [0.75, 0.25])  # sqrt(900) : sqrt(100)
    np.testing.assert_allclose(correction, np.log([0.9 / 0.75, 0.1 / 0.25]), rtol=1e-6)
    weights, correction = sampling_weights(labels, 2, "none")
    np.testing.assert_allclose(correction, 0, atol=1e-7)


def small_config(**overrides) -> TrainConfig:
    return TrainConfig(**{"epochs": 3, "batch_size": 32, "width": 0.25, "lr": 0.1, "seed": 5, **overrides})


def test_seeded_run_is_reproducible_and_resumes_exactly(
    synthetic_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dataset = read_dataset(synthetic_dataset).subset(np.arange(300))
    labeled = np.flatnonzero(dataset.labels >= 0)
    train_index, val_index = labeled[:220], labeled[220:]
    # The interrupted-and-resumed run starts from scratch with the same seed, so matching the
    # uninterrupted reference shows both reproducibility and an exact resume.
    reference = fit(dataset, train_index, val_index, small_config(epochs=2))
    calls = {"n": 0}
    real_metrics = train_module.validation_metrics

    def crash_in_second_epoch(*args):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_metrics(*args)

    checkpoint = tmp_path / "checkpoint.pt"
    monkeypatch.setattr(train_module, "validation_metrics", crash_in_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        fit(dataset, train_index, val_index, small_config(epochs=2), checkpoint)
    monkeypatch.setattr(train_module, "validation_metrics", real_metrics)
    assert torch.load(checkpoint, weights_only=False)["epoch"] == 0
    resumed = fit(dataset, train_index, val_index, small_config(epochs=2), checkpoint, resume=True)
    assert [h["epoch"] for h in resumed.history] == [1, 2]
    for key, value in reference.module.state_dict().items():
        assert torch.allclose(value.float(), resumed.module.state_dict()[key].float(), atol=1e-6), key


def test_resume_refuses_other_settings(synthetic_dataset: Path, tmp_path: Path) -> None:
    dataset = read_dataset(synthetic_dataset).subset(np.arange(120))
    labeled = np.flatnonzero(dataset.labels >= 0)
    checkpoint = tmp_path / "checkpoint.pt"
    fit(dataset, labeled[:90], labeled[90:], small_config(epochs=1), checkpoint)
    with pytest.raises(Exception, match="different training settings"):
        fit(dataset, labeled[:90], labeled[90:], small_config(epochs=1, lr=0.2), checkpoint, resume=True)


def test_cross_validation_reports_mean_and_sd(synthetic_dataset: Path) -> None:
    dataset = read_dataset(synthetic_dataset).subset(np.arange(400))
    labeled = np.flatnonzero(dataset.labels >= 0)
    mix = {name: 10.0 if name == dataset.class_names[0] else 1.0 for name in dataset.class_names}
    cv = cross_validate(dataset, labeled, 3, small_config(epochs=1), class_mix=mix)
    summary = cv.summary
    assert [fold["fold"] for fold in summary["per_fold"]] == [1, 2, 3]
    assert sum(fold["n_test"] for fold in summary["per_fold"]) == len(labeled)
    accuracies = [fold["accuracy"] for fold in summary["per_fold"]]
    assert summary["accuracy"]["mean"] == pytest.approx(np.mean(accuracies))
    assert summary["accuracy"]["sd"] == pytest.approx(np.std(accuracies, ddof=1))
    pooled = np.array(summary["confusion_matrix"])
    assert pooled.sum() == len(labeled)  # each cell counted once, in the fold that held it out
    np.testing.assert_array_equal(pooled.sum(axis=1), np.bincount(dataset.labels[labeled], minlength=len(pooled)))
    assert np.trace(pooled) == pytest.approx(sum(fold["accuracy"] * fold["n_test"] for fold in summary["per_fold"]))
    at_mix = [fold["class_mix"] for fold in summary["per_fold"]]
    assert summary["class_mix"]["accuracy"]["mean"] == pytest.approx(np.mean([m["accuracy"] for m in at_mix]))
    assert summary["class_mix"]["mix"][dataset.class_names[0]] == pytest.approx(10 / (10 + len(dataset.class_names) - 1))
    # Every cell's held-out logits, from the fold that never saw it: they score what the folds report.
    evidence = cv.evidence
    assert evidence.logits.shape == (len(labeled), len(dataset.class_names))
    assert (evidence.logits.argmax(1) == evidence.labels).sum() == np.trace(pooled)
    assert evidence.live_score_stretch > 0


def test_final_model_on_all_cells_takes_epochs_and_calibration_from_the_folds(
    synthetic_dataset: Path, tiny_bundle: Path, tmp_path: Path
) -> None:
    from engines import int8
    from flowsort.errors import UserError
    from trainer.dataset import write_dataset
    from trainer.holdout import HeldOutFold
    from trainer.training_run import train_bundle

    small = write_dataset(tmp_path / "small", read_dataset(synthetic_dataset).subset(np.arange(360)))
    config = small_config(epochs=3, monitor="loss")
    with pytest.raises(UserError, match="--folds"):
        train_bundle(small, tmp_path / "no-folds", config, final_on_all_cells=True)
    # Nested: the folds split the cells outside held-out fold 1 of 3, and the final model learns all of those.
    held_out = HeldOutFold.parse("1/3")
    manifest = train_bundle(small, tmp_path / "all", config, folds=2, final_on_all_cells=True, held_out=held_out,
                            keep_folds=True)
    folds = manifest["metrics"]["cross_validation"]["per_fold"]
    trainable = held_out.split(read_dataset(small))[0]
    assert sum(fold["n_test"] for fold in folds) == len(trainable)
    assert manifest["provenance"]["n_train"] == len(trainable)  # every one, the validation cells among them
    assert manifest["provenance"]["validation_seen_in_training"] is True
    assert manifest["training"]["epochs"] == int(np.median([fold["best_epoch"] for fold in folds])) >= 2
    assert len(manifest["training"]["history"]) == manifest["training"]["epochs"]  # no early stop without validation
    assert manifest["metrics"]["calibration"]["fitted_on"] == "cross-validation held-out predictions"
    assert "cross-validation" in manifest["dead_cell_detector"]["live_scores_from"]
    bundle = load_bundle(tmp_path / "all")
    assert len(bundle.validation_cells()[0]) > 0  # sample cells for warm-up and benchmarks
    with pytest.raises(UserError, match="no unseen cells"):
        int8.require_unseen_validation(bundle)
    int8.require_unseen_validation(load_bundle(tiny_bundle))  # a model with a validation split may be quantized
    # --keep-folds: each fold model is a bundle of its own, never having seen the outer held-out fold either.
    for fold in folds:
        kept = load_bundle(tmp_path / "all" / "folds" / f"fold-{fold['fold']}")
        assert kept.manifest["held_out"] == manifest["held_out"]
        assert kept.manifest["provenance"]["n_train"] + kept.manifest["provenance"]["n_validation"] == (
            len(trainable) - fold["n_test"])
        assert kept.manifest["metrics"]["best_epoch"] == fold["best_epoch"]
