"""The decision sender: owns the PUSH (sorter controller) and PUB (monitors) sockets.

Everything that leaves the service passes through :meth:`Emitter.post` as a
:class:`DecisionBlock` (decisions or errors for cells of one acquisition), an
:class:`EndReport` or a :class:`Pong`, on the service loop, the moment it is
made. It decides lateness at the last moment (a decision that would leave
after its cell's deadline goes out late and unsorted), encodes one columnar
message, and sends it without ever blocking: a full or absent consumer drops
the message (counted), so a slow sorter never stalls inference.

With ``flowsort serve --results``, each block, once sent, goes on to the
:class:`~streamer.results_thread.ResultsWriter` with the columns as sent
(late cells unsorted) and the copies of the engine outputs the inference
thread made for it; that never blocks either.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zmq

from streamer import codec
from streamer import protocol as p
from streamer.config import DeadlineConfig
from streamer.metrics import Metrics
from streamer.policy import NO_GATE, Columns, Policy
from streamer.ratelog import RateLimitedLog
from streamer.results_thread import ResultBlock, ResultsWriter

log = logging.getLogger(__name__)
MAX_ACQUISITIONS = 1024  # per-acquisition counts kept for end reports
NAN = float("nan")


@dataclass(slots=True)
class DecisionBlock:
    """Results (or an error) for cells of one acquisition."""

    acquisition: str
    event_ids: np.ndarray  # uint64 [n]
    origin_ns: np.ndarray | int  # where latency starts, service clock: capture (receipt when later), per cell or one
    deadlines: np.ndarray | None  # service clock [n]; None: no deadline
    bundle: str
    policy: Policy | None = None  # names for label and gate columns
    columns: Columns | None = None  # None for an error block
    error: str = ""
    late: bool = False  # already known late (expired before inference)
    # Only with --results (None otherwise): copies the block owns, not engine buffers.
    capture_ns: np.ndarray | None = None  # int64 [n], the instrument's capture time
    probabilities: np.ndarray | None = None  # float32 [n, K]
    embedding: np.ndarray | None = None  # float32 [n, k], the components the results file keeps


@dataclass(slots=True)
class EndReport:
    acquisition: str
    received_ns: int


@dataclass(slots=True)
class Pong:
    nonce: Any
    acquisition: str | None
    received_ns: int
    status: dict[str, Any]


@dataclass
class AcquisitionCounts:
    cells: int = 0
    classified: int = 0
    late: int = 0
    dead: int = 0
    sorted: dict[str, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"cells": self.cells, "classified": self.classified, "late": self.late, "dead": self.dead,
                "sorted": dict(self.sorted), "errors": dict(self.errors)}


class Emitter:
    def __init__(self, sockets: dict[str, zmq.Socket], metrics: Metrics, worker: str, margin_ns: int,
                 linger_ms: int = 2000, results: ResultsWriter | None = None) -> None:
        self.sockets = sockets  # "push" / "pub" -> socket, used by the service loop only
        self.results = results  # --results: decided cells go on to the FCS writer once sent
        self.metrics = metrics
        self.worker = worker
        self.margin_ns = margin_ns
        self.linger_ms = linger_ms
        self._seq = 0
        self._counts: OrderedDict[str, AcquisitionCounts] = OrderedDict()
        self._ratelog = RateLimitedLog(log, 5.0)
        self._sent = {name: metrics.decisions_sent.labels(name) for name in sockets}
        self._dropped = {name: metrics.decisions_dropped.labels(name) for name in sockets}
        self._decided: dict[str, Any] = {}
        self._sorted: dict[str, Any] = {}

    def post(self, item: DecisionBlock | EndReport | Pong) -> None:
        """Send ``item`` now (a failure to encode or send is logged, never raised: it must not stop the loop)."""
        try:
            self._handle(item)
        except Exception:
            log.exception("could not send %s", type(item).__name__)

    def reconfigure(self, deadline: DeadlineConfig) -> None:
        """A reload's ``[deadline] margin_us`` (read per block: one assignment)."""
        self.margin_ns = int(deadline.margin_us * 1000)

    def close(self) -> None:
        """Close the sockets, giving what is still queued in ZeroMQ ``linger_ms`` to leave."""
        for socket in self.sockets.values():
            socket.close(linger=self.linger_ms)

    def _handle(self, item: Any) -> None:
        if isinstance(item, DecisionBlock):
            self._decisions(item)
        elif isinstance(item, EndReport):
            counts = self._counts.pop(item.acquisition, AcquisitionCounts())
            self._send(codec.encode_message(p.END, self.worker, self._next_seq(), {
                p.ACQUISITION: item.acquisition, p.RECEIVED_NS: item.received_ns, p.REPORT: counts.as_dict()}), 0)
            if self.results is not None:
                self.results.end(item.acquisition)
        elif isinstance(item, Pong):
            fields = {p.NONCE: item.nonce, p.RECEIVED_NS: item.received_ns, **item.status}
            if item.acquisition is not None:
                fields[p.ACQUISITION] = item.acquisition
            self._send(codec.encode_message(p.PONG, self.worker, self._next_seq(), fields), 0)

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _decisions(self, block: DecisionBlock) -> None:
        n = len(block.event_ids)
        now = time.perf_counter_ns()
        try:
            self._send_decisions(block, n, now)
        finally:
            self.metrics.stages.add("emit", time.perf_counter_ns() - now)

    def _send_decisions(self, block: DecisionBlock, n: int, now: int) -> None:
        """Cell by cell in Python over the columns as lists: a block holds one to a few cells in a live stream,
        where each numpy call costs more than the loop over them (docs/benchmarks.md)."""
        cutoff = now + self.margin_ns
        if block.late:
            late = [True] * n
        elif block.deadlines is not None:
            late = [deadline < cutoff for deadline in block.deadlines.tolist()]
        else:
            late = [False] * n
        origin = block.origin_ns
        if isinstance(origin, np.ndarray):
            latency_ns = [max(now - start, 0) for start in origin.tolist()]
        else:
            latency_ns = [max(now - int(origin), 0)] * n
        columns = block.columns
        if columns is not None:
            policy = block.policy
            gate = columns.gate.tolist()
            if True in late:  # a late cell is never sorted
                gate = [NO_GATE if was_late else g for g, was_late in zip(gate, late)]
                columns.gate[:] = gate
            labels = columns.label.tolist()
            names, gate_names, gate_streams = policy.label_names, policy.gate_names, policy.gate_streams
            label = [names[k] for k in labels]
            probability = columns.probability.tolist()
            dead = columns.dead.tolist()
            dead_score = columns.dead_score.tolist()
            gate_name = [gate_names[g] for g in gate]
            stream = [gate_streams[g] for g in gate]
            error = [""] * n
        else:
            labels, gate = [], []
            label, probability, dead, dead_score = [""] * n, [NAN] * n, [False] * n, [NAN] * n
            gate_name, stream, error = [""] * n, [0] * n, [block.error] * n
        payload = codec.encode_decisions(self.worker, self._next_seq(), block.acquisition, block.bundle, (
            block.event_ids.tolist(), label, probability, dead, dead_score,
            gate_name, stream, late, [t // 1000 for t in latency_ns], error,  # in DECISION_COLUMNS order
        ))
        # Counted before sending: whoever holds a decision finds it in the metrics.
        self._account(block, n, labels, gate, dead, late, latency_ns)
        self._send(payload, n)
        if self.results is not None:
            self._post_results(block, np.array(late, bool))

    def _post_results(self, block: DecisionBlock, late: np.ndarray) -> None:
        """Hand the block, as sent, to the FCS writer: events where classified, a count where not."""
        if block.columns is None:
            self.results.unclassified(block.acquisition, block.error, len(block.event_ids))
        elif block.probabilities is None:  # cannot happen with --results: the dispatcher copies them
            self._ratelog.log(logging.ERROR, "results", "decisions without engine outputs: not in the FCS results")
            self.metrics.results_dropped.inc(len(block.event_ids))
        else:
            self.results.post(ResultBlock(block.acquisition, block.bundle, block.policy, block.event_ids,
                                          block.capture_ns, block.probabilities, block.embedding, block.columns,
                                          late))

    def _send(self, payload: bytes, cells: int) -> None:
        for name, socket in self.sockets.items():
            try:
                socket.send(payload, zmq.NOBLOCK)
                self._sent[name].inc()
            except zmq.Again:
                self._dropped[name].inc(cells)
                self._ratelog.log(logging.WARNING, f"drop-{name}",
                                  "%s consumer absent or too slow: decisions dropped (never blocking inference)", name)

    def _account(self, block: DecisionBlock, n: int, labels: list[int], gate: list[int], dead: list[bool],
                 late: list[bool], latency_ns: list[int]) -> None:
        m = self.metrics
        counts = self._counts.get(block.acquisition)
        if counts is None:
            counts = self._counts[block.acquisition] = AcquisitionCounts()
            if len(self._counts) > MAX_ACQUISITIONS:
                self._counts.popitem(last=False)
        counts.cells += n
        late_count = late.count(True)
        counts.late += late_count
        if late_count:
            m.cells_late.inc(late_count)
        m.latency.observe([t / 1e9 for t in latency_ns])
        if block.columns is None:
            counts.errors[block.error] = counts.errors.get(block.error, 0) + n
            return
        policy = block.policy
        counts.classified += n
        for index, count in Counter(labels).items():
            name = policy.class_names[index]
            child = self._decided.get(name)
            if child is None:
                child = self._decided[name] = m.cells_decided.labels(name)
            child.inc(count)
        if len(gate) > gate.count(NO_GATE):
            for index, count in Counter(gate).items():
                if index == NO_GATE:
                    continue
                name = policy.gates[index].name
                child = self._sorted.get(name)
                if child is None:
                    child = self._sorted[name] = m.cells_sorted.labels(name)
                child.inc(count)
                counts.sorted[name] = counts.sorted.get(name, 0) + count
        dead_count = dead.count(True)
        if dead_count:
            m.cells_dead.inc(dead_count)
            counts.dead += dead_count
