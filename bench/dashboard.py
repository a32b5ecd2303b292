"""A live terminal dashboard for a run: plain ANSI, redrawn about four times a second.

:class:`LiveView` folds the collector's new decisions into running counts
(rate, latency over the last seconds, class mix, dead flags, gate counts, and
purity and yield where the truth is known); :class:`Dashboard` draws them. On
a terminal the block is redrawn in place (cursor up, clear); when the output is
not a terminal (a log file, CI) it prints one line every few seconds instead.
"""

from __future__ import annotations

import collections
import sys
import time
from collections.abc import Sequence
from typing import Any, TextIO

import numpy as np

from bench.scoring import GateSpec, gate_index, true_classes
from bench.traffic import Chunk, Collector, PacedSender, Plan

WINDOW_S = 2.0
LINE_EVERY_S = 5.0


class LiveView:
    """Running numbers of one run, updated from the collector's chunks as they arrive."""

    def __init__(self, plan: Plan, collector: Collector, gates: Sequence[GateSpec], model_classes: Sequence[str] = (),
                 merges: Sequence[str] = (), first_chunk: int = 0, target_rate: float | None = None) -> None:
        self.plan = plan
        self.collector = collector
        self.gates = list(gates)
        self.next = first_chunk
        self.target_rate = target_rate
        self.acquisitions = set(plan.acquisitions)
        self.decided = self.late = self.errors = self.dead = 0
        self.labels: collections.Counter[str] = collections.Counter()
        self.sorted = np.zeros(len(self.gates), np.int64)
        self.correct = np.zeros(len(self.gates), np.int64)
        self.judged = np.zeros(len(self.gates), np.int64)
        self.targets_decided = np.zeros(len(self.gates), np.int64)
        self.recent_s = np.zeros(0)  # arrival (s, CLOCK_REALTIME) and latency (ms) of the last WINDOW_S seconds' cells
        self.recent_latency = np.zeros(0)
        self.all_latency: list[np.ndarray] = []
        self.t0_wall_ns = 0
        self._order = np.argsort(plan.event_ids, kind="stable")
        self._sorted_ids = plan.event_ids[self._order]
        self._truth_class = None
        self._known = None
        if plan.truth is not None and model_classes:
            self._truth_class = true_classes(plan.truth.class_names, plan.truth.label, list(model_classes), merges)
            dead = plan.truth.dead if plan.truth.dead is not None else np.zeros(plan.cells, bool)
            debris = plan.truth.debris if plan.truth.debris is not None else np.zeros(plan.cells, bool)
            self._alive = ~dead & ~debris
            self._known = (self._truth_class >= 0) | dead | debris
            self._members = [np.isin(self._truth_class, [list(model_classes).index(c) for c in g.classes
                                                         if c in model_classes]) & self._alive for g in self.gates]

    @property
    def has_truth(self) -> bool:
        return self._truth_class is not None

    def update(self, t0_wall_ns: int) -> None:
        """Fold the chunks that arrived since the last call into the counts.

        Vectorized over all new chunks at once: this runs in the process (and under the GIL) that
        paces the simulated instrument, and a per-chunk loop over thousands of one-cell chunks held
        the GIL long enough to delay the sender by hundreds of milliseconds.
        """
        self.t0_wall_ns = t0_wall_ns
        chunks = self.collector.chunks
        end = len(chunks)
        new = [chunk for chunk in chunks[self.next:end] if chunk.acquisition in self.acquisitions]
        self.next = end
        if new:
            self._fold(new, t0_wall_ns)
        keep = self.recent_s >= time.time() - WINDOW_S
        self.recent_s, self.recent_latency = self.recent_s[keep], self.recent_latency[keep]

    def _fold(self, chunks: list[Chunk], t0_wall_ns: int) -> None:
        event_ids = np.concatenate([chunk.event_ids for chunk in chunks])
        self.decided += len(event_ids)
        self.late += int(np.concatenate([chunk.late for chunk in chunks]).sum())
        self.errors += int(np.count_nonzero(np.concatenate([chunk.error for chunk in chunks])))  # code 0 is ""
        self.dead += int(np.concatenate([chunk.dead for chunk in chunks]).sum())
        label = np.concatenate([chunk.label for chunk in chunks])
        for code, count in enumerate(np.bincount(label.astype(np.int64))):
            if count:
                self.labels[self.collector.labels.names[code]] += int(count)
        position = np.minimum(np.searchsorted(self._sorted_ids, event_ids), len(self._sorted_ids) - 1)
        cells = self._order[position]
        capture = self.plan.capture_offset_ns
        if capture is not None:
            received_ns = np.repeat(np.array([chunk.received_ns for chunk in chunks], np.int64),
                                    [len(chunk.event_ids) for chunk in chunks])
            latency = (received_ns - (capture[cells] + t0_wall_ns)) / 1e6
            self.recent_s = np.concatenate([self.recent_s, received_ns / 1e9])
            self.recent_latency = np.concatenate([self.recent_latency, latency])
            self.all_latency.append(latency)
        if self.gates:
            into = gate_index(np.concatenate([chunk.gate for chunk in chunks]), self.collector.gates.names, self.gates)
            for j in range(len(self.gates)):
                chosen = into == j
                self.sorted[j] += int(chosen.sum())
                if self._truth_class is not None:
                    self.correct[j] += int((chosen & self._members[j][cells]).sum())
                    self.judged[j] += int((chosen & self._known[cells]).sum())
                    self.targets_decided[j] += int(self._members[j][cells].sum())

    def snapshot(self, sender: PacedSender, elapsed: float) -> dict[str, Any]:
        recent = self.recent_latency
        if len(recent):
            span = max(time.time() - float(self.recent_s[0]), 0.25)
            decided_rate = len(recent) / min(span, WINDOW_S)
        else:
            decided_rate = 0.0
        start = self.plan.start
        # Cells sent in the last WINDOW_S seconds, from the sender's own send times.
        sent_at = sender.sent_at[:sender.count]
        recent_sent = np.searchsorted(sent_at, max(elapsed - WINDOW_S, 0.0))
        cells_recent = int(start[sender.count] - start[recent_sent]) if sender.count else 0
        sent_rate = cells_recent / min(max(elapsed, 1e-3), WINDOW_S)
        every = np.concatenate(self.all_latency) if self.all_latency else np.zeros(0)
        return {
            "elapsed_s": elapsed, "duration_s": self.plan.duration_s, "target_rate": self.target_rate,
            "sent": sender.cells_sent, "sent_rate": sent_rate, "decided": self.decided, "decided_rate": decided_rate,
            "late": self.late, "errors": self.errors, "dead": self.dead, "labels": dict(self.labels),
            "latency_recent": _percentiles(recent), "latency_all": _percentiles(every),
            "gates": [{"gate": g.name, "sorted": int(self.sorted[j]),
                       "purity": self.correct[j] / self.judged[j] if self.has_truth and self.judged[j] else None,
                       "yield": self.correct[j] / self.targets_decided[j] if self.has_truth and self.targets_decided[j]
                       else None} for j, g in enumerate(self.gates)],
        }


def _percentiles(values: np.ndarray) -> dict[str, float] | None:
    if not len(values):
        return None
    p50, p99 = np.percentile(values, [50, 99])
    return {"p50": float(p50), "p99": float(p99), "max": float(values.max())}


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} ms"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


class Dashboard:
    """Draws :meth:`LiveView.snapshot` s; ``title`` heads the block."""

    def __init__(self, title: str, stream: TextIO | None = None, interval_s: float = 0.25,
                 force_tty: bool | None = None) -> None:
        self.title = title
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty() if force_tty is None else force_tty
        self.interval_s = interval_s if self.tty else LINE_EVERY_S
        self._lines = 0
        self._last = 0.0

    def due(self) -> bool:
        return time.monotonic() - self._last >= self.interval_s

    def draw(self, snap: dict[str, Any], final: bool = False) -> None:
        if not final and not self.due():
            return
        self._last = time.monotonic()
        if self.tty:
            lines = self.render(snap)
            prefix = f"\x1b[{self._lines}A\r\x1b[J" if self._lines else ""  # up, column 1, clear below
            self.stream.write(prefix + "\n".join(lines) + "\n")
            self._lines = len(lines)
        else:
            self.stream.write(self.line(snap) + "\n")
        self.stream.flush()

    def render(self, s: dict[str, Any]) -> list[str]:
        bold, dim, reset = "\x1b[1m", "\x1b[2m", "\x1b[0m"
        duration = s["duration_s"] or 1e-9
        done = min(s["elapsed_s"] / duration, 1.0)
        bar = "#" * int(30 * done) + "." * (30 - int(30 * done))
        target = f"   target {s['target_rate']:,.0f}" if s.get("target_rate") else ""
        recent, overall = s["latency_recent"] or {}, s["latency_all"] or {}
        total = sum(s["labels"].values()) or 1
        mix = "  ".join(f"{name} {100 * count / total:.1f}%" for name, count in
                        sorted(s["labels"].items(), key=lambda kv: -kv[1]) if name) or "-"
        lines = [
            f"{bold}{self.title}{reset}  [{bar}] {s['elapsed_s']:5.1f} / {duration:.0f} s",
            f"  rate      sent {s['sent_rate']:8,.0f} cells/s   decided {s['decided_rate']:8,.0f} cells/s{target}",
            f"  latency   p50 {_ms(recent.get('p50'))}   p99 {_ms(recent.get('p99'))}   "
            f"{dim}(last {WINDOW_S:.0f} s; whole run p99 {_ms(overall.get('p99'))}, max {_ms(overall.get('max'))}){reset}",
            f"  cells     sent {s['sent']:,}   decided {s['decided']:,}   late {s['late']:,}   errors {s['errors']:,}",
            f"  classes   {mix}",
            f"  dead      flagged {s['dead']:,} ({100 * s['dead'] / max(s['decided'], 1):.1f}%)",
        ]
        for gate in s["gates"]:
            lines.append(f"  gate      {gate['gate']}: sorted {gate['sorted']:,}   purity {_pct(gate['purity'])}   "
                         f"yield {_pct(gate['yield'])}")
        return lines

    def line(self, s: dict[str, Any]) -> str:
        recent = s["latency_recent"] or {}
        gates = "; ".join(f"{g['gate']} {g['sorted']} sorted, purity {_pct(g['purity'])}, yield {_pct(g['yield'])}"
                          for g in s["gates"])
        return (f"[{s['elapsed_s']:5.1f} s] sent {s['sent']:,} ({s['sent_rate']:,.0f}/s), decided {s['decided']:,} "
                f"({s['decided_rate']:,.0f}/s), p50 {_ms(recent.get('p50'))}, p99 {_ms(recent.get('p99'))}, "
                f"late {s['late']}, errors {s['errors']}, dead {s['dead']}" + (f"; {gates}" if gates else ""))
