"""Scoring a model for a population whose class mix differs from the labeled cells' (``--class-mix``).

Why: labeled samples are enriched for the rare stages (the Jurkat sample is 79%
interphase, a real acquisition about 98%), and accuracy depends on the mix twice
over. The decisions change: probabilities are re-weighted to the mix by Bayes'
rule, as the streamer's ``[policy] sample_prior`` does on the instrument. And
each class's recall counts by its share of the mix. The result is the accuracy
expected on a population with that mix, measured on cells labeled in another.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from flowsort.errors import UserError
from streamer.policy import mix_weights, reweight

SETTING = "--class-mix"


def parse_class_mix(text: str) -> dict[str, float]:
    """``"Interphase=31550,Prophase=606,..."`` (counts or fractions) -> {class: frequency}."""
    mix: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, value = item.partition("=")
        try:
            frequency = float(value)
        except ValueError:
            frequency = float("nan")
        if not sep or not name.strip() or not np.isfinite(frequency) or frequency <= 0:
            raise UserError(f"{SETTING}: {item!r} is not CLASS=FREQUENCY with a positive number, "
                            "e.g. --class-mix Interphase=31550,Prophase=606,Metaphase=68,Anaphase=15,Telophase=27")
        if name.strip() in mix:
            raise UserError(f"{SETTING}: class {name.strip()} is given twice")
        mix[name.strip()] = frequency
    if not mix:
        raise UserError(f"{SETTING} is empty: give every class a frequency, e.g. Interphase=31550,Prophase=606,...")
    return mix


@dataclass(frozen=True)
class ClassMix:
    """A population's class mix over a model's classes, checked against what the model was trained on."""

    class_names: tuple[str, ...]
    share: np.ndarray  # per class, summing to 1
    weights: np.ndarray  # Bayes' rule's factor from the training mix to this one

    @classmethod
    def of(cls, class_names: Sequence[str], mix: Mapping[str, float], training_prior: np.ndarray | None) -> ClassMix:
        weights = mix_weights(class_names, mix, training_prior, SETTING)
        share = np.array([mix[name] for name in class_names], np.float64)
        return cls(tuple(class_names), share / share.sum(), weights)

    def metrics(self, probabilities: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
        """Accuracy and per-class recall of re-weighted decisions, each class weighted by its share.

        ``probabilities`` hold for the training mix; ``labels`` index the classes
        (negative: unlabeled, ignored).
        """
        return self.score(self.decide(probabilities), labels)

    def decide(self, probabilities: np.ndarray) -> np.ndarray:
        """Each cell's class once its probabilities (for the training mix) are moved to this mix by Bayes' rule."""
        return reweight(probabilities, self.weights).argmax(axis=1)

    def score(self, predicted: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
        """Accuracy and per-class recall at this mix of decisions made by :meth:`decide`.

        Separate from :meth:`decide` so that decisions of models trained on different
        mixes (cross-validation folds) can be pooled first. A class without labeled
        cells has no recall to weigh, so the accuracy is then undefined and refused.
        """
        labeled = labels >= 0
        truth = labels[labeled].astype(np.int64)
        support = np.bincount(truth, minlength=len(self.class_names))
        hits = np.bincount(truth[predicted[labeled] == truth], minlength=len(self.class_names))
        absent = [name for name, n in zip(self.class_names, support) if n == 0]
        if absent:
            raise UserError(f"{SETTING}: no labeled cells of {', '.join(absent)}, so their recall at the mix is unknown")
        recall = hits / support
        return {
            "mix": {name: float(s) for name, s in zip(self.class_names, self.share)},
            "accuracy": float((self.share * recall).sum()),
            "balanced_accuracy": float(recall.mean()),
            "recall": {name: float(r) for name, r in zip(self.class_names, recall)},
        }
