"""Ingest: reads the PULL socket, validates every message, queues cells, answers what it cannot use.

The service loop (:mod:`streamer.loop`) calls :meth:`Ingest.read` whenever the
socket has messages; nothing here waits or runs a thread of its own.

Per message it does little: decode the header, view the pixel frame in
place, check it against the model (channels, dtype, size). Messages read back
to back are admitted to the queue together, once per burst: small ones are
merged into one :class:`~streamer.batcher.Segment` (their per-cell times
computed in one go) and admitted in one call, so a flood of one-cell messages
costs little more than their decoding. Each cell's latency starts at its
capture (``capture_ns``, receipt where that is later) and the wait before
receipt is measured.

Cells it cannot use are answered at once with error decisions carrying their
event ids (where the message let them be read), counted per reason and logged
at a limited rate with the acquisition and event ids: bad input, and at
admission the cells that cannot make their deadline (expired, or refused
behind the queue). Images of another size go through the one preprocessing
contract, :func:`engines.preprocessing.fit_to_size` (counted).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import zmq
from prometheus_client import Counter
from zmq.utils.monitor import recv_monitor_message

from engines.preprocessing import fit_to_size
from streamer import protocol as p
from streamer.batcher import NEVER, Admission, Marker, Piece, Segment
from streamer.codec import Limits, decode_ingest
from streamer.config import DeadlineConfig
from streamer.emitter import DecisionBlock, Emitter, EndReport, Pong
from streamer.metrics import Metrics, StageClock
from streamer.protocol import Reason, Rejected
from streamer.ratelog import RateLimitedLog, describe_ids
from streamer.recording import AcquisitionWriter

log = logging.getLogger(__name__)
MERGE_CELLS = 8  # messages of up to this many cells are merged into one segment per burst (copied once)
MAX_DEADLINE = 1 << 62
NO_IDS = np.empty(0, p.UINT64)  # a message's non-finite cells when there are none (shared: never written)
STALE_CAPTURE_NS = 1_000_000_000  # a capture stamp this far behind our clock says the clocks disagree


@dataclass(slots=True)
class Arrival:
    """A cells message read and brought to the model's input, waiting to be admitted with its burst."""

    acquisition: str
    event_ids: np.ndarray
    pixels: np.ndarray  # uint16 [N, C, S, S]
    capture_ns: np.ndarray
    deadline_ns: int | np.ndarray | None
    received: int  # service clock
    received_wall: int  # CLOCK_REALTIME

    @property
    def key(self) -> tuple[str, bool] | None:
        """Arrivals with the same key can share a segment (every model input has the same shape); large
        messages (None) keep their own, a view of the received frame, rather than being copied."""
        return (self.acquisition, self.deadline_ns is None) if len(self.event_ids) <= MERGE_CELLS else None


@dataclass(slots=True)
class Prepared:
    """A cells message brought to the model's input: the usable cells, and the ids of those left out."""

    pixels: np.ndarray  # uint16 [n, C, S, S]
    event_ids: np.ndarray
    capture_ns: np.ndarray
    deadline_ns: int | np.ndarray | None
    non_finite: np.ndarray  # event ids of float cells holding NaN or inf (empty when none)


@dataclass(slots=True)
class BurstTally:
    """A burst's stage times and message counts, added to the metrics once per burst: per message, a stage
    clock call and two Prometheus counters would cost more than the stages they time."""

    receive_ns: int = 0
    decode_ns: int = 0
    decoded: int = 0
    admit_ns: int = 0
    admitted: int = 0  # cells messages brought to the queue (admit calls)
    cells_messages: int = 0
    cells: int = 0

    def flush(self, received: int, stages: StageClock, cells_messages: Counter, cells: Counter) -> None:
        """Add the tallies of a burst of ``received`` messages to ``stages`` and the two counters; start over."""
        if received:
            stages.add("receive", self.receive_ns, received)
        if self.decoded:
            stages.add("decode", self.decode_ns, self.decoded)
        if self.admitted:
            stages.add("admit", self.admit_ns, self.admitted)
        if self.cells_messages:
            cells_messages.inc(self.cells_messages)
            cells.inc(self.cells)
        self.receive_ns = self.decode_ns = self.decoded = self.admit_ns = self.admitted = 0
        self.cells_messages = self.cells = 0


class InputAdapter:
    """Brings a message's pixels to the model's input: channel order, uint16, size."""

    def __init__(self, channels: tuple[int, ...], size: int, metrics: Metrics) -> None:
        self.channels = tuple(channels)
        self.size = size
        self._orders: dict[tuple[int, ...], np.ndarray] = {}
        self._resized = metrics.cells_resized
        self._converted = {name: metrics.cells_converted.labels(name) for name in p.DTYPES}

    def channel_order(self, channels: tuple[int, ...]) -> np.ndarray:
        order = self._orders.get(channels)
        if order is None:
            missing = [c for c in self.channels if c not in channels]
            if missing:
                raise Rejected(Reason.CHANNEL_MISMATCH,
                               f"message has channels {list(channels)}; the model needs {list(self.channels)} "
                               f"(missing {missing})")
            if len(self._orders) > 64:
                self._orders.clear()
            order = self._orders[channels] = np.array([channels.index(c) for c in self.channels])
        return order

    def prepare(self, message: p.CellsMessage) -> Prepared:
        """The message's cells as model input; float cells holding NaN or inf are left out (and named)."""
        pixels = message.pixels
        if message.channels != self.channels:
            pixels = pixels[:, self.channel_order(message.channels)]
        bad = None
        if message.dtype != p.NATIVE_DTYPE:
            n = len(pixels)
            if pixels.dtype.kind == "f":
                finite = np.isfinite(pixels).all(axis=(1, 2, 3))
                if not finite.all():
                    bad = ~finite
            pixels = p.to_native(pixels)
            self._converted[message.dtype].inc(n)
        if pixels.shape[-2:] != (self.size, self.size):
            pixels = fit_to_size(pixels, self.size)
            self._resized.inc(len(pixels))
        ids, capture, deadline = message.event_ids, message.capture_ns, message.deadline_ns
        if bad is None:
            return Prepared(pixels, ids, capture, deadline, NO_IDS)
        good = ~bad
        return Prepared(pixels[good], ids[good], capture[good],
                        deadline[good] if isinstance(deadline, np.ndarray) else deadline, ids[bad])


class Ingest:
    def __init__(self, socket: zmq.Socket, monitor: zmq.Socket | None, *, limits: Limits, adapter: InputAdapter,
                 queue: Callable[[list[Segment]], list[Admission]], queue_marker: Callable[[Marker], None],
                 emitter: Emitter, metrics: Metrics, deadline: DeadlineConfig, bundle_hash: Callable[[], str],
                 status: Callable[[], dict[str, Any]], reject_interval: float,
                 recorder: AcquisitionWriter | None = None) -> None:
        self.socket = socket
        self.monitor = monitor
        self.limits = limits
        self.adapter = adapter
        self.queue = queue
        self.queue_marker = queue_marker
        self.emitter = emitter
        self.metrics = metrics
        self.reconfigure(deadline)
        self.bundle_hash = bundle_hash
        self.status = status
        self.hard_limit = socket.getsockopt(zmq.MAXMSGSIZE)
        self.recorder = recorder
        self._ratelog = RateLimitedLog(log, reject_interval)
        self._received = {t: metrics.messages_received.labels(t) for t in p.INGEST_TYPES}
        self._cells = metrics.cells_received
        self._waited = metrics.ingest_wait
        self._pending: list[Arrival] = []  # read, not yet admitted
        self._tally = BurstTally()

    def reconfigure(self, deadline: DeadlineConfig) -> None:
        """``[deadline]``'s budget and where it counts from (at start, and on a reload)."""
        self.budget_ns = int(deadline.budget_us * 1000)
        self.budget_from_capture = deadline.budget_from == "capture"

    def file_descriptors(self) -> list[int]:
        """What to wait on for new messages: ZeroMQ's edge-triggered descriptors (check :meth:`has_input`
        before sleeping on them)."""
        sockets = [self.socket] if self.monitor is None else [self.socket, self.monitor]
        return [s.getsockopt(zmq.FD) for s in sockets]

    def has_input(self) -> bool:
        """Whether a message or a monitor event is waiting (also re-arms the descriptors)."""
        if self.monitor is not None and self.monitor.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            self._monitor_events()
        return bool(self.socket.getsockopt(zmq.EVENTS) & zmq.POLLIN)

    def close(self) -> None:
        self.socket.close(linger=0)
        if self.monitor is not None:
            self.monitor.close(linger=0)
        if self.recorder is not None:
            self.recorder.close()

    def read(self, limit: int, every: int = 0, interrupted: Callable[[], bool] | None = None) -> int:
        """Read and handle up to ``limit`` waiting messages, admit their cells; how many were read.
        ``interrupted``, asked after each ``every`` messages, ends the burst early."""
        socket = self.socket
        clock = time.perf_counter_ns
        tally = self._tally
        count = 0
        try:
            while count < limit:
                began = clock()
                try:
                    # Frames, not copies: a frame says itself whether more follow (no getsockopt per frame).
                    frame = socket.recv(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                frames: list[Any] = [frame]
                while frame.more:
                    frame = socket.recv(copy=False)
                    frames.append(frame)
                tally.receive_ns += clock() - began
                count += 1
                try:
                    self.handle(frames)
                except Exception:  # bad input must never end the service
                    log.exception("unexpected error handling an ingest message")
                if interrupted is not None and count % every == 0 and interrupted():
                    break
        finally:
            self._admit()
            tally.flush(count, self.metrics.stages, self._received[p.CELLS], self._cells)
        return count

    def _monitor_events(self) -> None:
        while True:
            try:
                event = recv_monitor_message(self.monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            except zmq.ZMQError:
                return
            try:
                name = zmq.Event(event["event"]).name.lower()
            except ValueError:
                name = str(event["event"])
            self.metrics.connection_events.labels(name).inc()
            if name == "disconnected":
                self._ratelog.log(logging.WARNING, "disconnect",
                                  "an ingest peer disconnected (or sent a frame above ZMQ_MAXMSGSIZE, %d bytes)",
                                  self.hard_limit)
            elif name.startswith("handshake_failed"):
                self._ratelog.log(logging.WARNING, name, "ingest handshake failed (%s)", name)

    # ------------------------------------------------------------------ one message

    def handle(self, frames: list[Any]) -> None:
        received = time.perf_counter_ns()
        received_wall = time.time_ns()
        if self.recorder is not None:
            try:
                self.recorder.write(frames, received_wall)
                self.metrics.records_written.inc()
            except (OSError, ValueError) as exc:
                self._ratelog.log(logging.ERROR, "record", "could not record a message: %s", exc)
        try:
            message = decode_ingest(frames, self.limits)
        except Rejected as rejected:
            self.reject(rejected, received, whole=True)
            return
        decoded = time.perf_counter_ns()
        tally = self._tally
        tally.decode_ns += decoded - received
        tally.decoded += 1
        kind = type(message)
        if kind is p.CellsMessage:
            tally.cells_messages += 1
            tally.cells += len(message.event_ids)
            try:
                self._cells_message(message, received, received_wall)
                tally.admit_ns += time.perf_counter_ns() - decoded
                tally.admitted += 1
            except Rejected as rejected:
                rejected.acquisition = rejected.acquisition or message.acquisition
                rejected.event_ids = message.event_ids if rejected.event_ids is None else rejected.event_ids
                self.reject(rejected, received, whole=True)
        elif kind is p.EndMessage:
            self._received[p.END].inc()
            self._admit()  # the end follows every cell sent before it
            self.queue_marker(Marker(EndReport(message.acquisition, received_wall)))
        else:
            self._received[p.PING].inc()
            self.emitter.post(Pong(message.nonce, message.acquisition, received_wall, self.status()))

    def _times(self, capture: np.ndarray, deadline_ns: int | np.ndarray | None, received: Any,
               received_wall: Any) -> tuple[np.ndarray, np.ndarray]:
        """Each cell's origin (capture on the service clock; receipt where the capture stamp is later, a clock
        ahead of ours) and deadline (``deadline_ns``, else origin + the configured budget)."""
        waited = received_wall - capture
        np.maximum(waited, 0, out=waited)
        self._waited.observe(waited / 1e9)
        if waited[-1] > STALE_CAPTURE_NS:
            self._ratelog.log(logging.WARNING, "stale-capture",
                              "capture_ns is %.1f s behind this machine's clock: either the cells waited that long "
                              "before the service read them (a sender far ahead of the service: see "
                              "flowsort_ingest_wait_seconds) or the instrument's and this clock are not in sync "
                              "(NTP/PTP). Latency counts from capture; a budget counted from receipt needs "
                              "[deadline] budget_from = \"receipt\"", waited[-1] / 1e9)
        origins = received - waited
        if deadline_ns is None:
            if not self.budget_ns:
                return origins, np.full(len(capture), NEVER, np.int64)
            start = origins if self.budget_from_capture else np.broadcast_to(np.asarray(received, np.int64), origins.shape)
            return origins, start + self.budget_ns
        if type(deadline_ns) is int:
            deadline = min(max(deadline_ns, 0), MAX_DEADLINE) - received_wall + received
            return origins, np.broadcast_to(np.asarray(deadline, np.int64), capture.shape).copy()
        deadlines = np.maximum(deadline_ns, 0)  # not np.clip: twice the cost for one or two cells
        np.minimum(deadlines, MAX_DEADLINE, out=deadlines)
        deadlines += received - received_wall
        return origins, deadlines

    def _cells_message(self, message: p.CellsMessage, received: int, received_wall: int) -> None:
        cells = self.adapter.prepare(message)
        if len(cells.non_finite):
            if not len(cells.event_ids):
                raise Rejected(Reason.NON_FINITE, "every cell holds NaN or inf pixels")
            self.reject(Rejected(Reason.NON_FINITE, f"{len(cells.non_finite)} of {message.count} cells hold NaN or "
                                 "inf pixels", message.acquisition, cells.non_finite), received, whole=False)
        self._pending.append(Arrival(message.acquisition, cells.event_ids, cells.pixels, cells.capture_ns,
                                     cells.deadline_ns, received, received_wall))

    def _segments(self, arrivals: list[Arrival]) -> list[Segment]:
        """One segment per run of consecutive arrivals that can share one (same acquisition, image shape and
        kind of deadline): what a burst of one-cell messages costs is then paid once per burst."""
        segments: list[Segment] = []
        run: list[Arrival] = []
        run_key = None
        for arrival in arrivals:
            key = arrival.key
            if run and (key is None or key != run_key):
                segments.append(self._segment(run))
                run = []
            run.append(arrival)
            run_key = key
        if run:
            segments.append(self._segment(run))
        return segments

    def _segment(self, run: list[Arrival]) -> Segment:
        first = run[0]
        if len(run) == 1:
            ids, pixels, capture, deadline = first.event_ids, first.pixels, first.capture_ns, first.deadline_ns
            received, received_wall = first.received, first.received_wall
        else:
            counts = [len(a.event_ids) for a in run]
            ids = np.concatenate([a.event_ids for a in run])
            pixels = np.concatenate([a.pixels for a in run])
            capture = np.concatenate([a.capture_ns for a in run])
            received = np.repeat(np.array([a.received for a in run], np.int64), counts)
            received_wall = np.repeat(np.array([a.received_wall for a in run], np.int64), counts)
            deadline = None if first.deadline_ns is None else np.concatenate(
                [np.broadcast_to(np.asarray(a.deadline_ns, np.int64), (n,)) for a, n in zip(run, counts)])
        origins, deadlines = self._times(capture, deadline, received, received_wall)
        return Segment(first.acquisition, ids, pixels, first.received, deadlines, origins, capture_ns=capture)

    def _admit(self) -> None:
        """Queue the pending segments in one call; answer at once the cells that will not run."""
        if not self._pending:
            return
        began = time.perf_counter_ns()
        arrivals, self._pending = self._pending, []
        admissions = self.queue(self._segments(arrivals))
        self.metrics.stages.add("admit", time.perf_counter_ns() - began, 0)
        for admission in admissions:
            if not (admission.expired or admission.shed or admission.dropped):
                continue
            bundle = self.bundle_hash()
            self._answer(admission.expired, Reason.EXPIRED, bundle, "deadline passed before receipt", late=True)
            self._answer(admission.shed, Reason.OVERLOAD_REFUSED, bundle,
                         "the queue ahead would make it miss its deadline")
            reason = Reason.OVERLOAD_REFUSED if admission.refused else Reason.OVERLOAD_DROPPED
            self._answer(admission.dropped, reason, bundle,
                         "queue full: refused" if admission.refused else "queue full: dropped the oldest")

    def _answer(self, pieces: list[Piece], reason: str, bundle: str, why: str, late: bool = False) -> None:
        """Answer cells that will not run with ``reason``: counted, logged at a limited rate, sent at once."""
        if not pieces:
            return
        cells = sum(piece.count for piece in pieces)
        self.metrics.cells_rejected.labels(reason).inc(cells)
        first = pieces[0]
        self._ratelog.log(logging.WARNING, reason, "%s: %d cells (%s; acquisition %s, event ids %s)", reason, cells,
                          why, first.segment.acquisition, describe_ids(first.segment.event_ids[first.index]))
        for piece in pieces:
            self.emitter.post(error_block(piece, reason, bundle, late=late))

    def reject(self, rejected: Rejected, received: int, whole: bool) -> None:
        ids = rejected.event_ids
        if whole:
            self.metrics.messages_rejected.labels(rejected.reason).inc()
        self._ratelog.log(logging.WARNING, rejected.reason, "rejected %s (acquisition %s, event ids %s): %s",
                          "message" if whole else "cells", rejected.acquisition or "unknown", describe_ids(ids),
                          rejected.detail)
        if ids is not None and len(ids):
            self.metrics.cells_rejected.labels(rejected.reason).inc(len(ids))
            self.emitter.post(DecisionBlock(rejected.acquisition or "", np.asarray(ids, np.uint64), received, None,
                                            self.bundle_hash(), error=rejected.reason))


def error_block(piece: Piece, reason: str, bundle: str, late: bool = False) -> DecisionBlock:
    segment = piece.segment
    return DecisionBlock(segment.acquisition, segment.event_ids[piece.index], segment.origins[piece.index],
                         segment.deadlines[piece.index], bundle, error=reason, late=late)
