"""What a run achieved, as a sorting user counts it: pure functions over per-cell arrays.

* **purity** of a gate: of the cells it sorted, the share whose true class is one
  of the gate's classes (cells of unknown truth are left out and counted);
* **yield** of a gate: of the cells sent whose true class is one of the gate's
  classes, the share the gate sorted (a target cell that came back late, failed
  or never came back is a lost target);
* dead cells (and debris) wrongly sorted;
* latency percentiles, and what happened to every cell (decided, late, failed, missing).

True classes are the truth's names mapped onto the model's classes through the
merges it was trained with (``G1,S_phase,G2=Interphase``), so a 7-stage truth
scores a 5-class model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

OVERLOAD_ERRORS = ("overload_dropped", "overload_refused")
LATE_TOLERANCE = 0.01  # a run keeps its deadline when at most this share of its cells was not decided in time


@dataclass(frozen=True)
class GateSpec:
    name: str
    classes: tuple[str, ...]


def latency_summary(values: np.ndarray) -> dict[str, float | int | None]:
    """count, p50, p95, p99, max and mean of ``values`` (any unit; None when empty)."""
    values = np.asarray(values, np.float64)
    if not len(values):
        return {"count": 0, "p50": None, "p95": None, "p99": None, "max": None, "mean": None}
    p50, p95, p99 = np.percentile(values, [50, 95, 99])
    return {"count": int(len(values)), "p50": float(p50), "p95": float(p95), "p99": float(p99),
            "max": float(values.max()), "mean": float(values.mean())}


def merge_map(merges: Sequence[str]) -> dict[str, str]:
    """``["G1,S_phase,G2=Interphase"]`` -> {"G1": "Interphase", ...}."""
    target: dict[str, str] = {}
    for spec in merges:
        members, _, new = spec.partition("=")
        for name in members.split(","):
            if name.strip():
                target[name.strip()] = new.strip()
    return target


def true_classes(truth_names: Sequence[str], truth_label: np.ndarray, model_classes: Sequence[str],
                 merges: Sequence[str] = ()) -> np.ndarray:
    """Each cell's true class as an index into ``model_classes`` (-1: unknown, or a class the model lacks)."""
    target = merge_map(merges)
    mapping = np.array([model_classes.index(target.get(name, name)) if target.get(name, name) in model_classes else -1
                        for name in truth_names] + [-1], np.int16)
    label = np.asarray(truth_label, np.int64)
    return mapping[np.where(label >= 0, label, len(truth_names))]


def gate_scores(sorted_into: np.ndarray, true_class: np.ndarray, model_classes: Sequence[str],
                gates: Sequence[GateSpec], dead: np.ndarray | None = None,
                debris: np.ndarray | None = None) -> list[dict[str, Any]]:
    """Purity and yield of each gate.

    ``sorted_into``: per cell, the index of the gate that sorted it in ``gates``, -1 for none (not
    sorted, late, failed or never decided). ``true_class``: per cell, an index into ``model_classes``
    or -1. A cell's truth is known when it has a class or is known dead or debris (then it belongs
    to no gate).
    """
    n = len(sorted_into)
    dead = np.zeros(n, bool) if dead is None else np.asarray(dead, bool)
    debris = np.zeros(n, bool) if debris is None else np.asarray(debris, bool)
    known = (true_class >= 0) | dead | debris
    rows = []
    for j, gate in enumerate(gates):
        members = [model_classes.index(c) for c in gate.classes if c in model_classes]
        target = np.isin(true_class, members) & ~dead & ~debris
        chosen = sorted_into == j
        correct = int((chosen & target).sum())
        judged = int((chosen & known).sum())
        targets = int(target.sum())
        rows.append({
            "gate": gate.name, "classes": list(gate.classes),
            "sorted": int(chosen.sum()), "sorted_known": judged, "sorted_unknown": int((chosen & ~known).sum()),
            "correct": correct, "targets": targets,
            "purity": correct / judged if judged else None,
            "yield": correct / targets if targets else None,
            "dead_sorted": int((chosen & dead).sum()), "debris_sorted": int((chosen & debris).sum()),
        })
    return rows


def outcome_counts(decided: np.ndarray, late: np.ndarray, error: np.ndarray, error_names: Sequence[str]) -> dict[str, Any]:
    """Cells decided, late, failed by reason, dropped (overload errors plus cells never answered), and
    classified in time (decided without an error before the deadline: the cells a sorter could sort)."""
    decided = np.asarray(decided, bool)
    late = np.asarray(late, bool) & decided
    errors: dict[str, int] = {}
    codes, counts = np.unique(np.asarray(error)[decided], return_counts=True)
    for code, count in zip(codes.tolist(), counts.tolist()):
        name = error_names[code] if 0 <= code < len(error_names) else f"code {code}"
        if name:
            errors[name] = int(count)
    missing = int((~decided).sum())
    classified = decided & (np.asarray(error) == error_names.index("")) if "" in error_names else np.zeros_like(decided)
    return {
        "sent": int(len(decided)), "decided": int(decided.sum()), "missing": missing, "late": int(late.sum()),
        "errors": errors, "dropped": missing + sum(errors.get(name, 0) for name in OVERLOAD_ERRORS),
        "in_time": int((classified & ~late).sum()),
    }


def deadline_verdict(summary: Mapping[str, Any], deadline_ms: float,
                     tolerance: float = LATE_TOLERANCE) -> tuple[bool, str]:
    """Whether a run kept its deadline as its sorter counts it, and if not, why.

    Kept when at most ``tolerance`` of the cells sent were not classified in time (late, refused or
    dropped at the door, failed or never answered: each is a cell the sorter could not sort) and the
    p99 latency, capture to decision received, is within ``deadline_ms``. `make demo`, the levels of
    `bench e2e` and its target run all judge by this one rule; ``summary`` is
    :func:`bench.run_summary.summarize`'s.
    """
    sent = summary["sent"]
    missed = sent - summary["in_time"]
    p99 = summary["latency_ms"]["p99"]
    problems = []
    if not sent:
        problems.append("no cells were sent")
    elif missed > tolerance * sent:
        failed = sum(n for name, n in summary["errors"].items() if name not in (*OVERLOAD_ERRORS, "expired"))
        problems.append(f"{missed:,} of {sent:,} cells not decided in time ({100 * missed / sent:.2f}%, at most "
                        f"{100 * tolerance:g}%): {summary['late']:,} late, {summary['dropped']:,} refused or dropped"
                        + (f", {failed:,} failed" if failed else ""))
    if p99 is None or p99 > deadline_ms:
        problems.append(f"p99 {'-' if p99 is None else f'{p99:.2f}'} ms > {deadline_ms:g} ms")
    return not problems, "; ".join(problems)


def class_mix(label: np.ndarray, label_names: Sequence[str]) -> dict[str, int]:
    """Decisions per predicted class (codes -1 and "" left out)."""
    label = np.asarray(label)
    codes, counts = np.unique(label[label >= 0], return_counts=True)
    return {label_names[c]: int(k) for c, k in zip(codes.tolist(), counts.tolist()) if label_names[c]}


def gate_index(gate_codes: np.ndarray, gate_names: Sequence[str], gates: Sequence[GateSpec]) -> np.ndarray:
    """Decision gate codes (into ``gate_names``; -1 undecided) -> indices into ``gates`` (-1: not sorted)."""
    lookup = np.array([next((j for j, g in enumerate(gates) if g.name == name), -1) for name in gate_names] + [-1],
                      np.int16)
    codes = np.asarray(gate_codes, np.int64)
    return lookup[np.where(codes >= 0, codes, len(gate_names))]
