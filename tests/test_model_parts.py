"""Label merges, temperature scaling and the dead-cell detector on cases with known answers."""

import numpy as np
import pytest
from scipy.special import softmax

from flowsort.errors import UserError
from trainer.calibration import calibrated_probabilities, expected_calibration_error, fit_temperature
from trainer.crossval import merged_metrics
from trainer.dead_cells import fit_detector, labeled_threshold, quantile_threshold
from trainer.merges import merged_classes, parse_merge, remap_labels

STAGES = ("G1", "S_phase", "G2", "Prophase", "Metaphase", "Anaphase", "Telophase")


def test_paper_merge_gives_five_classes_in_stage_order() -> None:
    names, mapping = merged_classes(STAGES, ["G1,S_phase,G2=Interphase"])
    assert names == ("Interphase", "Prophase", "Metaphase", "Anaphase", "Telophase")
    assert mapping.tolist() == [0, 0, 0, 1, 2, 3, 4]
    assert remap_labels(np.array([2, -1, 6], np.int16), mapping).tolist() == [0, -1, 4]


@pytest.mark.parametrize(("specs", "message"), [(["G1,S=X"], "no class 'S'"), (["G1=A", "G1,G2=B"], "merged twice"), (["G1,G2"], "of the form")])
def test_bad_merges_are_explained(specs: list[str], message: str) -> None:
    with pytest.raises(UserError, match=message):
        merged_classes(STAGES, specs)
    assert parse_merge(" A , B = C ") == (("A", "B"), "C")


def test_merged_metrics_sum_member_probabilities() -> None:
    # true class 1, predicted class 0 by a hair: wrong with 3 classes, right once 0 and 1 merge
    logits = np.log(np.array([[0.4, 0.35, 0.25], [0.1, 0.1, 0.8]]))
    _, mapping = merged_classes(("a", "b", "c"), ["a,b=ab"])
    metrics = merged_metrics(logits, np.array([1, 2], np.int16), mapping)
    assert metrics["accuracy"] == 1.0


def test_temperature_recovers_a_known_overconfidence() -> None:
    rng = np.random.default_rng(0)
    true_logits = rng.normal(0, 2, (4000, 5))
    labels = np.array([rng.choice(5, p=p) for p in softmax(true_logits, axis=1)])
    overconfident = true_logits * 3.0
    temperature = fit_temperature(overconfident, labels)
    assert temperature == pytest.approx(3.0, rel=0.1)
    before = expected_calibration_error(calibrated_probabilities(overconfident, 1.0), labels)
    after = expected_calibration_error(calibrated_probabilities(overconfident, temperature), labels)
    assert after < before / 3


def test_detector_scores_outliers_far_from_every_class() -> None:
    rng = np.random.default_rng(1)
    centers = np.array([[0.0] * 8, [6.0] + [0.0] * 7])
    labels = rng.integers(0, 2, 2000)
    live = centers[labels] + rng.normal(0, 1, (2000, 8))
    detector = fit_detector(live, labels)
    live_scores = detector.score(live)
    outliers = rng.normal(0, 1, (200, 8)) + np.array([3.0, 8.0] + [0.0] * 6)
    dead_scores = detector.score(outliers)
    assert np.median(live_scores) == pytest.approx(np.sqrt(8 - 1), rel=0.25)  # chi distribution, 8 dims
    assert dead_scores.min() > np.quantile(live_scores, 0.9)
    assert quantile_threshold(live_scores, 0.99) == pytest.approx(np.quantile(live_scores, 0.99))
    threshold = labeled_threshold(live_scores, dead_scores)
    assert (live_scores > threshold).mean() < 0.02 and (dead_scores > threshold).all()
