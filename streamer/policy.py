"""The sort policy: from engine outputs to decision columns, vectorized over a batch.

Gates are tried in their configured order; a cell goes to the first gate it
passes, otherwise it is not sorted. A cell passes a gate when

* the summed probability of the gate's classes is at least ``min_probability``
  (a gate over one class is that class's probability; a gate over the four
  mitotic stages accepts a cell split between two of them), and
* it is not flagged dead, unless the gate sets ``exclude_dead = false``.

The label of a cell is its most probable class. Lateness is applied when the
decision leaves (:func:`apply_late`): a late cell is never sorted.

A model's probabilities hold for the class mix it was trained on. A sample
with another mix (a real acquisition is ~98% interphase; a training set is
enriched for mitoses) is told to the policy as ``sample_prior``, and
:meth:`Policy.adjust` re-weights every cell's probabilities by Bayes' rule,
p'(c|x) ~ p(c|x) * sample(c) / training(c) (Saerens et al. 2002, Neural
Comput 14:21), before labels and gates are decided. Without it a rare-class
gate's purity collapses on a real sample: most of what it sorts is the
common class.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from engines.bundle import Bundle
from flowsort.errors import UserError
from streamer.config import GateConfig, StreamerConfig

NO_GATE = -1


class Columns(NamedTuple):
    """Per-cell results of one batch (fresh arrays, safe to keep)."""

    label: np.ndarray  # int16 class index
    probability: np.ndarray  # float32
    dead: np.ndarray  # bool
    dead_score: np.ndarray  # float32
    gate: np.ndarray  # int16 gate index, NO_GATE for no-sort


@dataclass(frozen=True)
class Policy:
    class_names: tuple[str, ...]
    gates: tuple[GateConfig, ...]
    dead_threshold: float
    prior_weights: np.ndarray | None = field(default=None, compare=False)  # sample / training class frequency

    def __post_init__(self) -> None:
        k, g = len(self.class_names), len(self.gates)
        membership = np.zeros((k, max(g, 1)), np.float32)
        for j, gate in enumerate(self.gates):
            for name in gate.classes:
                if name not in self.class_names:
                    raise UserError(
                        f"gate {gate.name!r}: class {name!r} is not one of the bundle's classes "
                        f"({', '.join(self.class_names)})"
                    )
                membership[self.class_names.index(name), j] = 1.0
        object.__setattr__(self, "_membership", membership[:, :g])
        object.__setattr__(self, "_min_probability", np.array([gt.min_probability for gt in self.gates], np.float32))
        object.__setattr__(self, "_exclude_dead", np.array([gt.exclude_dead for gt in self.gates], bool))
        # Names indexed by label / gate, with index -1 (the last entry) for "none".
        object.__setattr__(self, "label_names", np.array([*self.class_names, ""], dtype=object))
        object.__setattr__(self, "gate_names", np.array([*(gt.name for gt in self.gates), ""], dtype=object))
        object.__setattr__(self, "gate_streams", np.array([*(gt.stream for gt in self.gates), 0], np.int64))

    def adjust(self, probabilities: np.ndarray) -> np.ndarray:
        """[N, K] probabilities for the configured sample's class mix (the input itself without one)."""
        if self.prior_weights is None:
            return probabilities
        return reweight(probabilities, self.prior_weights)

    def decide(self, probabilities: np.ndarray, dead_score: np.ndarray) -> Columns:
        """Label, probability, dead flag and gate for N cells from [N, K] probabilities and [N] dead scores."""
        n = len(probabilities)
        label = probabilities.argmax(axis=1)
        probability = probabilities[np.arange(n), label]
        dead_score = np.array(dead_score, np.float32)
        dead = dead_score > self.dead_threshold
        gate = np.full(n, NO_GATE, np.int16)
        if self.gates:
            gate_probability = probabilities @ self._membership  # [N, G]
            # float32 sums of probabilities can miss 1.0 by an ulp: allow for it.
            passes = gate_probability >= self._min_probability - 1e-6
            passes &= ~(dead[:, None] & self._exclude_dead[None, :])
            matched = passes.any(axis=1)
            gate[matched] = passes[matched].argmax(axis=1)
        return Columns(label.astype(np.int16), probability.astype(np.float32), dead, dead_score, gate)


def policy_for(bundle: Bundle, config: StreamerConfig) -> Policy:
    """The sort policy the service runs: the config's gates, dead threshold and sample prior, else the bundle's."""
    threshold = config.policy.dead_threshold
    return Policy(bundle.class_names, config.gates, bundle.dead_threshold if threshold is None else threshold,
                  prior_weights(bundle, dict(config.policy.sample_prior)))


def prior_weights(bundle: Bundle, sample_prior: dict[str, float]) -> np.ndarray | None:
    """Per class, the sample's frequency over the training data's (None without a sample prior)."""
    if not sample_prior:
        return None
    return mix_weights(bundle.class_names, sample_prior, bundle.class_prior, "[policy] sample_prior")


def mix_weights(names: Sequence[str], mix: Mapping[str, float], training: np.ndarray | None, setting: str) -> np.ndarray:
    """Bayes' rule's per-class factor, mix(c) / training(c), that moves probabilities to another class mix.

    ``setting`` names where the mix came from, for the error messages.
    """
    unknown = sorted(set(mix) - set(names))
    missing = [name for name in names if name not in mix]
    if unknown or missing:
        raise UserError(f"{setting} must give every class of the model ({', '.join(names)}) a frequency"
                        + (f"; unknown: {', '.join(unknown)}" if unknown else "")
                        + (f"; missing: {', '.join(missing)}" if missing else ""))
    sample = np.array([mix[name] for name in names], np.float64)
    if not np.all(np.isfinite(sample)) or np.any(sample <= 0):
        raise UserError(f"{setting} frequencies must be positive numbers, got {dict(mix)}")
    if training is None:
        raise UserError(f"the bundle does not record its training class frequencies, so {setting} "
                        f"cannot be applied: retrain it with this flowsort version, or remove {setting}")
    unseen = [name for name, share in zip(names, training) if share <= 0]
    if unseen:
        raise UserError(f"{setting}: the model saw no training cells of {', '.join(unseen)}, "
                        "so its probabilities cannot be re-weighted to another class mix")
    return (sample / sample.sum() / training).astype(np.float32)


def reweight(probabilities: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """[N, K] probabilities times per-class ``weights``, renormalized (a new array)."""
    weighted = probabilities * weights
    weighted /= weighted.sum(axis=1, keepdims=True)
    return weighted


def apply_late(gate: np.ndarray, deadlines: np.ndarray, now_ns: int, margin_ns: int) -> np.ndarray:
    """Mark cells whose decision leaves after their deadline (less margin) late, and unsort them (in place)."""
    late = deadlines < now_ns + margin_ns
    gate[late] = NO_GATE
    return late
