"""The live dashboard's running numbers (bench.dashboard.LiveView) against a cell-by-cell count.

The view folds the collector's decision chunks in whole batches of chunks; these tests feed it
one-cell chunks (as a single-cell stream produces them), in several increments and with a
stray acquisition mixed in, and check every count against a plain loop over the cells.
"""

from __future__ import annotations

import collections

import numpy as np

from bench.cell_sources import synthetic_cells
from bench.dashboard import LiveView
from bench.scoring import GateSpec, true_classes
from bench.simulator import instrument_plan
from bench.traffic import Chunk, Codes, Plan

CLASSES = ("Interphase", "Prophase", "Metaphase", "Anaphase", "Telophase")
MERGES = ("G1,S_phase,G2=Interphase",)
GATE = GateSpec("mitotic", ("Prophase", "Metaphase", "Anaphase", "Telophase"))
T0_NS = 1_700_000_000_000_000_000


class FakeCollector:
    """What LiveView reads of a Collector: its chunks and the string codes they use."""

    def __init__(self) -> None:
        self.chunks: list[Chunk] = []
        self.labels, self.gates, self.errors = Codes(), Codes(), Codes()


def decision_chunk(collector: FakeCollector, acquisition: str, event_id: int, received_ns: int, seq: int,
                   label: str, gate: str, late: bool, dead: bool, error: str) -> Chunk:
    """One cell's decision, as the collector stores it."""
    return Chunk(acquisition=acquisition, received_ns=received_ns, event_ids=np.array([event_id], np.uint64),
                 label=collector.labels.codes([label]), probability=np.ones(1, np.float32), dead=np.array([dead]),
                 gate=collector.gates.codes([gate]), late=np.array([late]), latency_us=np.zeros(1, np.float32),
                 error=collector.errors.codes([error]), seq=seq, worker="w")


def one_cell_chunks(plan: Plan, collector: FakeCollector, rng: np.random.Generator) -> list[dict]:
    """A decision chunk per cell of ``plan`` (random label, gate, late, error and dead flags); the truth per cell."""
    cells = []
    for i, event_id in enumerate(plan.event_ids):
        label = CLASSES[rng.integers(len(CLASSES))]
        error = "expired" if rng.random() < 0.05 else ""
        gate = GATE.name if not error and label != "Interphase" and rng.random() < 0.7 else ""
        cell = {"label": "" if error else label, "gate": gate, "late": bool(error) or rng.random() < 0.1,
                "dead": rng.random() < 0.2, "error": error,
                "received_ns": T0_NS + int(plan.capture_offset_ns[i]) + int(rng.integers(1, 20)) * 1_000_000}
        collector.chunks.append(decision_chunk(collector, plan.acquisitions[0], int(event_id), seq=i, **cell))
        cells.append(cell)
    return cells


def test_live_view_counts_match_a_cell_by_cell_count() -> None:
    rng = np.random.default_rng(0)
    plan = instrument_plan(synthetic_cells(200, 40, seed=1, prior="uniform"), 2000, 0.3, seed=1,
                           acquisition="run")
    collector = FakeCollector()
    view = LiveView(plan, collector, [GATE], CLASSES, MERGES)
    cells = one_cell_chunks(plan, collector, rng)
    chunks = collector.chunks
    stray = decision_chunk(collector, "another run", 1, T0_NS, 0, "Prophase", GATE.name, late=True, dead=True,
                           error="")
    every = [*chunks[:150], stray, *chunks[150:]]
    # Folded in increments, as the dashboard does while chunks keep arriving (one increment empty).
    for end in (0, 7, 7, 151, len(every)):
        collector.chunks = every[:end]
        view.update(T0_NS)

    truth_class = true_classes(plan.truth.class_names, plan.truth.label, list(CLASSES), MERGES)
    alive = ~plan.truth.dead & ~plan.truth.debris
    mitotic = np.isin(truth_class, [CLASSES.index(c) for c in GATE.classes]) & alive
    known = (truth_class >= 0) | plan.truth.dead | plan.truth.debris
    assert view.decided == len(cells)
    assert view.late == sum(c["late"] for c in cells)
    assert view.errors == sum(bool(c["error"]) for c in cells)
    assert view.dead == sum(c["dead"] for c in cells)
    assert view.labels == collections.Counter(c["label"] for c in cells)
    sorted_cells = [i for i, c in enumerate(cells) if c["gate"] == GATE.name]
    assert view.sorted[0] == len(sorted_cells) > 0
    assert view.correct[0] == sum(bool(mitotic[i]) for i in sorted_cells)
    assert view.judged[0] == sum(bool(known[i]) for i in sorted_cells)
    assert view.targets_decided[0] == int(mitotic.sum())
    latency = np.concatenate(view.all_latency)
    expected = [(c["received_ns"] - T0_NS - int(plan.capture_offset_ns[i])) / 1e6 for i, c in enumerate(cells)]
    np.testing.assert_allclose(latency, expected)
