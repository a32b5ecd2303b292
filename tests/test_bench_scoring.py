"""Purity, yield, dead cells sorted, outcomes and latency percentiles on hand-made cases."""

from __future__ import annotations

import numpy as np
import pytest

from bench.scoring import (
    GateSpec,
    class_mix,
    deadline_verdict,
    gate_index,
    gate_scores,
    latency_summary,
    outcome_counts,
    true_classes,
)

STAGES = ("G1", "S_phase", "G2", "Prophase", "Metaphase", "Anaphase", "Telophase")
MODEL = ("Interphase", "Prophase", "Metaphase", "Anaphase", "Telophase")
MERGES = ("G1,S_phase,G2=Interphase",)


def test_true_classes_follow_the_training_merges() -> None:
    label = np.array([0, 1, 2, 3, 6, -1], np.int16)
    assert true_classes(STAGES, label, MODEL, MERGES).tolist() == [0, 0, 0, 1, 4, -1]
    # a class the model lacks is unknown to it
    assert true_classes(STAGES, label, ("G1", "Prophase"), ()).tolist() == [0, -1, -1, 1, -1, -1]


def test_purity_and_yield_by_hand() -> None:
    # Ten cells. Truth (model classes): I I I I P M A T, one dead, one debris.
    true_class = np.array([0, 0, 0, 0, 1, 2, 3, 4, -1, -1], np.int16)
    dead = np.array([0, 0, 0, 0, 0, 0, 0, 0, 1, 0], bool)
    debris = np.array([0, 0, 0, 0, 0, 0, 0, 0, 0, 1], bool)
    gates = [GateSpec("mitotic", ("Prophase", "Metaphase", "Anaphase", "Telophase")), GateSpec("interphase", ("Interphase",))]
    # Sorted: mitotic takes P, M, A (3 right), one interphase cell (wrong), the dead cell (wrong);
    # T is not sorted (lost yield). interphase takes two interphase cells and the debris.
    sorted_into = np.array([1, 1, 0, -1, 0, 0, 0, -1, 0, 1], np.int16)
    mitotic, interphase = gate_scores(sorted_into, true_class, MODEL, gates, dead, debris)
    assert mitotic["sorted"] == 5 and mitotic["correct"] == 3 and mitotic["targets"] == 4
    assert mitotic["purity"] == pytest.approx(3 / 5) and mitotic["yield"] == pytest.approx(3 / 4)
    assert mitotic["dead_sorted"] == 1 and mitotic["debris_sorted"] == 0
    assert interphase["sorted"] == 3 and interphase["correct"] == 2 and interphase["targets"] == 4
    assert interphase["purity"] == pytest.approx(2 / 3) and interphase["yield"] == pytest.approx(2 / 4)
    assert interphase["debris_sorted"] == 1


def test_unknown_truth_is_left_out_of_purity() -> None:
    true_class = np.array([1, -1, 0], np.int16)  # the middle cell: no label, not known dead
    scores = gate_scores(np.array([0, 0, -1]), true_class, MODEL, [GateSpec("p", ("Prophase",))])[0]
    assert scores["sorted"] == 2 and scores["sorted_unknown"] == 1 and scores["purity"] == 1.0
    empty = gate_scores(np.array([-1, -1, -1]), true_class, MODEL, [GateSpec("p", ("Prophase",))])[0]
    assert empty["purity"] is None and empty["yield"] == 0.0


def test_gate_index_maps_decision_codes() -> None:
    names = ["", "mitotic", "g2"]  # decision gate codes as the collector interned them
    gates = [GateSpec("g2", ("G2",)), GateSpec("mitotic", ("Prophase",))]
    assert gate_index(np.array([0, 1, 2, -1]), names, gates).tolist() == [-1, 1, 0, -1]


def test_outcomes_and_latency() -> None:
    decided = np.array([1, 1, 1, 1, 0], bool)
    late = np.array([0, 1, 1, 0, 0], bool)
    error = np.array([0, 2, 0, 1, -1], np.int16)
    counts = outcome_counts(decided, late, error, ["", "overload_dropped", "expired"])
    assert counts == {"sent": 5, "decided": 4, "missing": 1, "late": 2,
                      "errors": {"overload_dropped": 1, "expired": 1}, "dropped": 2, "in_time": 1}
    summary = latency_summary(np.arange(1, 101, dtype=float))
    assert summary["count"] == 100 and summary["max"] == 100 and summary["p50"] == pytest.approx(50.5)
    assert summary["p99"] == pytest.approx(np.percentile(np.arange(1, 101), 99))
    assert latency_summary(np.zeros(0))["p99"] is None
    assert class_mix(np.array([0, 1, 1, -1]), ["", "Interphase"]) == {"Interphase": 2}


def _run(late: int = 0, refused: int = 0, missing: int = 0, failed: int = 0, sent: int = 1000) -> dict:
    """A summary as outcome_counts makes it from per-cell arrays: ``late`` cells classified after the deadline,
    ``refused`` answered at the door, ``failed`` answered with an engine error, ``missing`` never answered."""
    n_ok = sent - late - refused - missing - failed
    decided = np.array([True] * (sent - missing) + [False] * missing)
    error = np.array([0] * (n_ok + late) + [1] * refused + [2] * failed + [-1] * missing, np.int16)
    late_flags = np.array([False] * n_ok + [True] * late + [False] * (sent - n_ok - late))
    return {**outcome_counts(decided, late_flags, error, ["", "overload_refused", "engine_failed"]),
            "latency_ms": latency_summary(np.full(sent - missing, 4.0))}


def test_deadline_verdict_counts_every_cell_the_sorter_could_not_sort() -> None:
    assert deadline_verdict(_run(late=10), 10.0) == (True, "")  # 1% late: at the bound
    kept, why = deadline_verdict(_run(late=11), 10.0)
    assert not kept and "11 of 1,000 cells not decided in time" in why and "11 late" in why
    # refusals, failures and unanswered cells count against the same 1%, each named in the reason
    kept, why = deadline_verdict(_run(late=4, refused=4, missing=2, failed=1), 10.0)
    assert not kept and "4 late, 6 refused or dropped, 1 failed" in why
    assert deadline_verdict(_run(late=4, refused=4, missing=2), 10.0)[0]
    # the p99 bound is the deadline, and a run is judged on both
    kept, why = deadline_verdict(_run(late=20), 3.0)
    assert not kept and "not decided in time" in why and "p99 4.00 ms > 3 ms" in why
    assert deadline_verdict(_run(late=20), 10.0, tolerance=0.02)[0]
    assert deadline_verdict(_run(sent=0), 10.0) == (False, "no cells were sent; p99 - ms > 10 ms")
