"""Scoring for another class mix: Bayes re-weighted decisions, recalls weighted by the mix, clear errors."""

from __future__ import annotations

import numpy as np
import pytest

from flowsort.errors import UserError
from trainer.class_mix import ClassMix, parse_class_mix

NAMES = ("A", "B")


def test_parse_counts_and_fractions() -> None:
    assert parse_class_mix("Interphase=31550, Prophase=606") == {"Interphase": 31550.0, "Prophase": 606.0}
    assert parse_class_mix("A=0.9,B=0.1,") == {"A": 0.9, "B": 0.1}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("A=0.9,B", "'B' is not CLASS=FREQUENCY"),
        ("A=lots", "'A=lots' is not CLASS=FREQUENCY"),
        ("A=-1", "positive"),
        ("A=nan", "positive"),
        ("=3", "not CLASS=FREQUENCY"),
        ("A=1,A=2", "class A is given twice"),
        (" , ", "empty"),
    ],
)
def test_parse_refuses_what_is_not_a_mix(text: str, message: str) -> None:
    with pytest.raises(UserError, match=message):
        parse_class_mix(text)


def test_decisions_are_reweighted_and_recalls_weighted_by_the_mix() -> None:
    probabilities = np.array([[0.4, 0.6], [0.3, 0.7], [0.05, 0.95], [0.9, 0.1], [0.5, 0.5]])
    labels = np.array([0, 1, 1, 0, -1])  # the last cell is unlabeled and ignored
    mix = ClassMix.of(NAMES, {"A": 90, "B": 10}, np.array([0.5, 0.5]))
    metrics = mix.metrics(probabilities, labels)
    # weights 1.8 and 0.2: the first cell turns into A (right), the second into A (wrong), the third stays B
    assert metrics["recall"] == {"A": 1.0, "B": 0.5}
    assert metrics["accuracy"] == pytest.approx(0.9 * 1.0 + 0.1 * 0.5)
    assert metrics["balanced_accuracy"] == pytest.approx(0.75)
    assert metrics["mix"] == {"A": pytest.approx(0.9), "B": pytest.approx(0.1)}
    # at the training mix the decisions are the plain argmax: recall A 1/2, recall B 2/2
    same = ClassMix.of(NAMES, {"A": 1, "B": 1}, np.array([0.5, 0.5])).metrics(probabilities, labels)
    assert same["recall"] == {"A": 0.5, "B": 1.0}


@pytest.mark.parametrize(
    ("mix", "prior", "message"),
    [
        ({"A": 1}, np.array([0.5, 0.5]), "missing: B"),
        ({"A": 1, "B": 1, "C": 1}, np.array([0.5, 0.5]), "unknown: C"),
        ({"A": 1, "B": 1}, np.array([1.0, 0.0]), "no training cells of B"),
        ({"A": 1, "B": 1}, None, "does not record its training class frequencies"),
    ],
)
def test_mix_must_fit_the_model(mix: dict, prior: np.ndarray | None, message: str) -> None:
    with pytest.raises(UserError, match=message):
        ClassMix.of(NAMES, mix, prior)


def test_a_class_without_labeled_cells_has_no_recall_to_weigh() -> None:
    mix = ClassMix.of(NAMES, {"A": 1, "B": 1}, np.array([0.5, 0.5]))
    with pytest.raises(UserError, match="no labeled cells of B"):
        mix.metrics(np.array([[0.9, 0.1]]), np.array([0]))
