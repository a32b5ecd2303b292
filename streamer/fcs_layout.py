"""Per-cell results as FCS events: the one place that turns decisions into columns a cytometrist gates on.

``flowsort serve --results`` and ``flowsort export-fcs`` both build their
rows with :meth:`ResultLayout.rows`, so a live run and an offline export of
its recording give files with the same parameters and codes.

Categorical parameters are numeric codes, explained in the file itself:
CLASS is the class index (``FLOWSORT_CLASS_<i>`` names it, and its $PnS lists
every code), GATE is 0 for no-sort and 1.. for the configured gates in order
(``FLOWSORT_GATE_<j>``), DEAD and LATE are 0 or 1.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from streamer.config import GateConfig
from streamer.fcs import Parameter
from streamer.policy import Columns, Policy

DEFAULT_EMBEDDING = 8
EXACT_FLOAT32 = 1 << 24  # float32 holds every integer up to this exactly, and not the next one
NO_SORT = "no-sort"

log = logging.getLogger(__name__)


def parameter_name(text: str) -> str:
    """A $PnN-safe form of a class name: gating software splits on commas and chokes on spaces."""
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", text)


@dataclass(frozen=True)
class ResultLayout:
    """The FCS parameters of one results file: fixed by the bundle's classes, the gates and the embedding width."""

    class_names: tuple[str, ...]
    gates: tuple[GateConfig, ...]
    dead_threshold: float
    embedding: int = DEFAULT_EMBEDDING

    @classmethod
    def for_policy(cls, policy: Policy, embedding_dim: int, embedding: int = DEFAULT_EMBEDDING) -> ResultLayout:
        return cls(policy.class_names, policy.gates, policy.dead_threshold, max(0, min(embedding, embedding_dim)))

    @property
    def gate_names(self) -> tuple[str, ...]:
        """By GATE code: 0 is no-sort."""
        return (NO_SORT, *(gate.name for gate in self.gates))

    def parameters(self) -> list[Parameter]:
        classes = " ".join(f"{i}={name}" for i, name in enumerate(self.class_names))
        gates = " ".join(f"{i}={name}" for i, name in enumerate(self.gate_names))
        seen: set[str] = set()
        per_class = []
        for i, name in enumerate(self.class_names):
            safe = f"P_{parameter_name(name)}"
            safe = safe if safe not in seen else f"{safe}_{i}"
            seen.add(safe)
            per_class.append(Parameter(safe, name))
        return [
            Parameter("EVENT_ID", "instrument event id"),
            Parameter("TIME", "seconds since the acquisition's first cell"),
            Parameter("CLASS", f"predicted class: {classes}"),
            Parameter("PROBABILITY", "probability of the predicted class"),
            *per_class,
            Parameter("DEAD_SCORE", f"dead-cell score, dead above {self.dead_threshold:g}"),
            Parameter("DEAD", "1 = flagged dead"),
            Parameter("GATE", f"sort gate: {gates}"),
            Parameter("LATE", "1 = decided after the cell's deadline, not sorted"),
            *(Parameter(f"EMB_{i}", f"embedding component {i}") for i in range(1, self.embedding + 1)),
        ]

    def keywords(self, acquisition: str, bundle: str, start_ns: int) -> dict[str, str]:
        """TEXT keywords naming the codes and saying where the results came from."""
        started = time.localtime(start_ns / 1e9)  # FCS times are the instrument PC's clock
        keywords = {
            "$DATE": time.strftime("%d-%b-%Y", started).upper(),
            "$BTIM": time.strftime("%H:%M:%S", started),
            "$TIMESTEP": "1",  # TIME is in seconds already
            "$SRC": acquisition or "unnamed",
            "FLOWSORT_ACQUISITION": acquisition or "unnamed",
            "FLOWSORT_BUNDLE": bundle,
            "FLOWSORT_START_NS": str(start_ns),
            "FLOWSORT_DEAD_THRESHOLD": f"{self.dead_threshold:.9g}",
        }
        keywords.update({f"FLOWSORT_CLASS_{i}": name for i, name in enumerate(self.class_names)})
        keywords.update({f"FLOWSORT_GATE_{j}": name for j, name in enumerate(self.gate_names)})
        for j, gate in enumerate(self.gates, start=1):
            keywords[f"FLOWSORT_GATE_{j}_STREAM"] = str(gate.stream)
            keywords[f"FLOWSORT_GATE_{j}_CLASSES"] = ",".join(gate.classes)
            keywords[f"FLOWSORT_GATE_{j}_MIN_PROBABILITY"] = f"{gate.min_probability:g}"
            keywords[f"FLOWSORT_GATE_{j}_EXCLUDE_DEAD"] = str(int(gate.exclude_dead))
        return keywords

    def rows(self, event_ids: np.ndarray, capture_ns: np.ndarray, start_ns: int, probabilities: np.ndarray,
             embedding: np.ndarray, columns: Columns, late: np.ndarray) -> np.ndarray:
        """FCS events [N, parameters] for N decided cells.

        ``columns`` come from :meth:`Policy.decide`, with ``gate`` already unsorted for late
        cells (by :class:`streamer.emitter.Emitter`); ``capture_ns`` is the instrument's time of each cell.
        """
        n, k = len(event_ids), len(self.class_names)
        if probabilities.shape != (n, k):
            raise ValueError(f"probabilities must be shaped [{n}, {k}], got {list(probabilities.shape)}")
        if embedding.shape[0] != n or embedding.shape[1] < self.embedding:
            raise ValueError(f"embedding must be [{n}, >= {self.embedding}], got {list(embedding.shape)}")
        out = np.empty((n, 8 + k + self.embedding))
        out[:, 0] = event_ids
        out[:, 1] = (np.asarray(capture_ns, np.int64) - start_ns) / 1e9
        out[:, 2] = columns.label
        out[:, 3] = columns.probability
        out[:, 4:4 + k] = probabilities
        out[:, 4 + k] = columns.dead_score
        out[:, 5 + k] = columns.dead
        out[:, 6 + k] = columns.gate.astype(np.int64) + 1  # NO_GATE (-1) -> 0
        out[:, 7 + k] = late
        out[:, 8 + k:] = embedding[:, :self.embedding]
        return out


def closing_keywords(end_ns: int, unclassified: Mapping[str, int], largest_event_id: float,
                     datatype: str) -> dict[str, str]:
    """Keywords known only at the end: the last cell's time, the cells that are not events (by reason), and a
    flag (with a warning) where float32 could not hold every event id exactly."""
    keywords = {"$ETIM": time.strftime("%H:%M:%S", time.localtime(end_ns / 1e9))}
    for reason, count in sorted(unclassified.items()):
        keywords[f"FLOWSORT_UNCLASSIFIED_{reason.upper()}"] = str(count)
    if datatype == "F" and largest_event_id >= EXACT_FLOAT32:  # float32 rounds 2**24 + 1 down to 2**24
        log.warning("event ids above %d are rounded in a float32 FCS file (largest %d): use datatype D (float64) "
                    "to keep them exact", EXACT_FLOAT32, largest_event_id)
        keywords["FLOWSORT_EVENT_ID_ROUNDED"] = "1"
    return keywords
