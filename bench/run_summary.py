"""A finished run (:class:`bench.traffic.RunRecord`) summarised as JSON-ready numbers.

Every number here is computed from the decisions actually received, matched to
the cells actually sent; the tests recompute them from the raw arrays
(:func:`raw_arrays`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from bench.scoring import GateSpec, class_mix, gate_index, gate_scores, latency_summary, outcome_counts, true_classes
from bench.traffic import RunRecord

SERIES_BIN_S = 0.25


def describe_machine() -> dict[str, Any]:
    """The CPU model, its vector flags, usable cores and the load average (other work on the machine)."""
    from engines.cpu import describe

    return describe()


def e2e_latency_ms(record: RunRecord) -> np.ndarray:
    """Capture to decision received, ms, for every decided cell (in cell order)."""
    out = record.outcome
    return (out.received_ns[out.decided] - record.capture_ns[out.decided]) / 1e6


def summarize(record: RunRecord, gates: Sequence[GateSpec] = (), model_classes: Sequence[str] = (),
              merges: Sequence[str] = (), bin_s: float = SERIES_BIN_S) -> dict[str, Any]:
    plan, out = record.plan, record.outcome
    sent = record.cells_sent
    decided = out.decided.copy()
    decided[sent:] = False  # cells never sent cannot count (a run stopped early)
    capture = record.capture_ns
    span_s = record.plan.send_at[record.messages_sent - 1] if record.messages_sent else 0.0
    offered = sent / span_s if span_s > 0 else None
    classified = decided & (out.error == _code(out.error_names, ""))
    last = int(out.received_ns[decided].max()) if decided.any() else record.t0_wall_ns
    first = int(capture[:sent].min()) if sent and plan.capture_offset_ns is not None else record.t0_wall_ns
    busy_s = max((last - first) / 1e9, 1e-9)
    counts = outcome_counts(decided[:sent], out.late[:sent], out.error[:sent], out.error_names)
    latency = (out.received_ns[decided] - capture[decided]) / 1e6 if plan.capture_offset_ns is not None else np.zeros(0)
    after_deadline = None
    if plan.deadline_offset_ns is not None:
        deadline = plan.deadline_offset_ns + record.t0_wall_ns
        after_deadline = int((out.received_ns[decided] > deadline[decided]).sum())
    summary: dict[str, Any] = {
        "cells_planned": plan.cells, "cells_sent": sent, "messages_sent": record.messages_sent,
        "offered_cells_per_s": offered,
        "throughput_cells_per_s": float(classified.sum()) / busy_s if classified.any() else 0.0,
        "decided_cells_per_s": float(decided.sum()) / busy_s if decided.any() else 0.0,
        "in_time_cells_per_s": counts["in_time"] / busy_s,  # classified and not late
        **counts,
        "received_after_deadline": after_deadline,
        "duplicates": out.duplicates, "strays": out.strays,
        "latency_ms": latency_summary(latency),
        "service_latency_ms": latency_summary(out.latency_us[decided] / 1e3),
        "pacing": record.pacing.as_dict(),
        "cpu": {
            "sender_s": record.sender_cpu_s, "receiver_s": record.receiver_cpu_s, "wall_s": record.wall_s,
            "sender_core_fraction": record.sender_cpu_s / record.wall_s if record.wall_s else None,
            "receiver_core_fraction": record.receiver_cpu_s / record.wall_s if record.wall_s else None,
            "instrument_s": record.instrument_cpu_s,
            "instrument_core_fraction": record.instrument_cpu_s / record.wall_s if record.wall_s else None,
            "machine_idle_share": record.machine_idle_share,
        },
        "class_mix": class_mix(out.label[decided], out.label_names),
        "dead_flagged": int(out.dead[decided].sum()),
        "drain_s": record.drain_s,
    }
    sorted_into = gate_index(np.where(decided, out.gate, -1), out.gate_names, gates)
    summary["sorted"] = {g.name: int((sorted_into == j).sum()) for j, g in enumerate(gates)}
    truth = plan.truth
    if truth is not None and gates:
        truth_class = true_classes(truth.class_names, truth.label, list(model_classes), merges)
        sent_cells = slice(0, sent)
        summary["gates"] = gate_scores(sorted_into[sent_cells], truth_class[sent_cells], list(model_classes), gates,
                                       None if truth.dead is None else truth.dead[sent_cells],
                                       None if truth.debris is None else truth.debris[sent_cells])
        if truth.dead is not None:
            dead, flagged = truth.dead[:sent], (decided & out.dead)[:sent]
            debris = np.zeros_like(dead) if truth.debris is None else truth.debris[:sent]
            summary["truth_dead"] = int(dead.sum())
            summary["dead_sorted"] = int((dead & (sorted_into[:sent] >= 0)).sum())
            summary["dead_flagged_truly_dead"] = int((dead & flagged).sum())
            summary["truth_debris"] = int(debris.sum())
            summary["dead_flagged_debris"] = int((debris & flagged).sum())
            # The price of the flag: live cells it takes away from the gates.
            live = decided[:sent] & ~dead & ~debris
            summary["dead_flagged_live"] = int((live & flagged).sum())
            summary["decided_live"] = int(live.sum())
    elif gates:
        summary["gates"] = [{"gate": g.name, "classes": list(g.classes), "sorted": summary["sorted"][g.name],
                             "purity": None, "yield": None, "note": "no ground truth"} for g in gates]
    summary["series"] = time_series(record, bin_s)
    return summary


def _code(names: Sequence[str], name: str) -> int:
    return names.index(name) if name in names else -2


def time_series(record: RunRecord, bin_s: float = SERIES_BIN_S) -> dict[str, list[float | None]]:
    """Per ``bin_s`` from the start: cells sent/s, decisions received/s, latency p50 and p99 (ms) of the
    cells decided in the bin."""
    plan, out = record.plan, record.outcome
    sent_cells = np.diff(plan.start[: record.messages_sent + 1])
    horizon = max(float(record.sent_at[-1]) if len(record.sent_at) else 0.0, 1e-9)
    decided = out.decided
    received_s = (out.received_ns[decided] - record.t0_wall_ns) / 1e9
    if len(received_s):
        horizon = max(horizon, float(received_s.max()))
    bins = int(np.ceil(horizon / bin_s)) or 1
    sent = np.bincount(np.minimum((record.sent_at / bin_s).astype(int), bins - 1), sent_cells, bins) / bin_s
    where = np.clip((received_s / bin_s).astype(int), 0, bins - 1)
    received = np.bincount(where, minlength=bins) / bin_s
    p50: list[float | None] = [None] * bins
    p99: list[float | None] = [None] * bins
    if plan.capture_offset_ns is not None and len(received_s):
        latency = e2e_latency_ms(record)
        order = np.argsort(where, kind="stable")
        edges = np.searchsorted(where[order], np.arange(bins + 1))
        for b in range(bins):
            values = latency[order[edges[b]:edges[b + 1]]]
            if len(values):
                p50[b], p99[b] = (float(v) for v in np.percentile(values, [50, 99]))
    return {"bin_s": bin_s, "t_s": [round(bin_s * (b + 0.5), 6) for b in range(bins)],
            "sent_per_s": sent.tolist(), "decided_per_s": received.tolist(), "latency_p50_ms": p50,
            "latency_p99_ms": p99}


def raw_arrays(record: RunRecord) -> dict[str, np.ndarray]:
    """The per-cell arrays behind a summary (``--save-decisions``; tests check summaries against them)."""
    out = record.outcome
    arrays = {
        "event_ids": record.plan.event_ids, "capture_ns": record.capture_ns, "decided": out.decided,
        "received_ns": out.received_ns, "label": out.label, "gate": out.gate, "late": out.late, "dead": out.dead,
        "error": out.error, "latency_us": out.latency_us, "probability": out.probability,
        "label_names": np.array(out.label_names, dtype=str), "gate_names": np.array(out.gate_names, dtype=str),
        "error_names": np.array(out.error_names, dtype=str),
    }
    if record.plan.truth is not None:
        arrays["truth_label"] = record.plan.truth.label
        arrays["truth_class_names"] = np.array(record.plan.truth.class_names, dtype=str)
        if record.plan.truth.dead is not None:
            arrays["truth_dead"] = record.plan.truth.dead
    return arrays
