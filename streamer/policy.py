"""The sort policy: from engine outputs to decision columns, vectorized over a batch.

Gates are tried in their configured order; a cell goes to the first gate it
passes, otherwise it is not sorted. A cell passes a gate when

* the summed probability of the gate's classes is at least ``min_probability``
  (a gate over one class is that class's probability; a gate over the four
  mitotic stages accepts a cell split between two of them), and
* it is not flagged dead, unless the gate sets ``exclude_dead = false``.

The label of a cell is its most probable class. Lateness is decided when the
decision leaves (:class:`~streamer.emitter.Emitter`): a late cell is never sorted.

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
        for gate in self.gates:
            for name in gate.classes:
                if name not in self.class_names:
                    raise UserError(
                        f"gate {gate.name!r}: class {name!r} is not one of the bundle's classes "
                        f"({', '.join(self.class_names)})"
                    )
        # Per gate in order: its class indices, the bound their summed probability must reach (less an allowance
        # for float32 probabilities summing an ulp short of 1.0) and whether a dead cell is kept out.
        object.__setattr__(self, "_rules", tuple(
            (tuple(self.class_names.index(name) for name in dict.fromkeys(gate.classes)),
             gate.min_probability - 1e-6, gate.exclude_dead) for gate in self.gates))
        # Names indexed by label / gate, with index -1 (the last entry) for "none".
        object.__setattr__(self, "label_names", (*self.class_names, ""))
        object.__setattr__(self, "gate_names", (*(gt.name for gt in self.gates), ""))
        object.__setattr__(self, "gate_streams", (*(gt.stream for gt in self.gates), 0))

    def adjust(self, probabilities: np.ndarray) -> np.ndarray:
        """[N, K] probabilities for the configured sample's class mix (the input itself without one)."""
        if self.prior_weights is None:
            return probabilities
        return reweight(probabilities, self.prior_weights)

    def decide(self, probabilities: np.ndarray, dead_score: np.ndarray) -> Columns:
        """Label, probability, dead flag and gate for N cells from [N, K] probabilities and [N] dead scores.

        Cell by cell in Python over the rows as lists: a service batch holds one to a few cells, where each
        numpy call costs microseconds of dispatch (a dozen of them took 40 µs for two cells on a Zen 3,
        this loop 3 µs), and a large batch costs about a microsecond per cell either way.
        """
        threshold, rules = self.dead_threshold, self._rules
        labels, chosen, deads, gates = [], [], [], []
        for row, score in zip(probabilities.tolist(), dead_score.tolist()):
            best = max(row)
            dead = score > threshold
            gate = NO_GATE
            for j, (members, minimum, exclude_dead) in enumerate(rules):
                if not (dead and exclude_dead) and sum([row[c] for c in members]) >= minimum:
                    gate = j
                    break
            labels.append(row.index(best))
            chosen.append(best)
            deads.append(dead)
            gates.append(gate)
        return Columns(np.array(labels, np.int16), np.array(chosen, np.float32), np.array(deads, bool),
                       np.array(dead_score, np.float32), np.array(gates, np.int16))


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
