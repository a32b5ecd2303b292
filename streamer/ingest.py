"""The ingest thread: owns the PULL socket, validates every message, queues cells, answers what it cannot use.

Per message it does little: decode the header, view the pixel frame in
place, check it against the model (channels, dtype, size), and queue a
:class:`~streamer.batcher.Segment`. Cells it cannot use are answered at once
with error decisions carrying their event ids (where the message let them be
read), counted per reason and logged at a limited rate with the acquisition
and event ids. Images of another size go through the one preprocessing
contract, :func:`engines.preprocessing.fit_to_size` (counted).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import zmq
from zmq.utils.monitor import recv_monitor_message

from engines.preprocessing import fit_to_size
from streamer import protocol as p
from streamer.batcher import NEVER, Admission, Marker, Piece, Segment
from streamer.codec import Limits, decode_ingest
from streamer.emitter import DecisionBlock, Emitter, EndReport, Pong
from streamer.metrics import Metrics
from streamer.protocol import Reason, Rejected
from streamer.ratelog import RateLimitedLog, describe_ids
from streamer.recording import AcquisitionWriter
from streamer.threadnames import INGEST, name_os_thread

log = logging.getLogger(__name__)
BURST = 512  # messages read per wakeup before looking at the monitor and the stop flag
MAX_DEADLINE = 1 << 62


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

    def prepare(self, message: p.CellsMessage) -> tuple[np.ndarray, np.ndarray | None]:
        """uint16 [N, C, S, S] model input and, for float input, which cells are not finite (or None)."""
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
                with np.errstate(invalid="ignore"):
                    pixels = np.clip(np.rint(pixels), 0, 65535).astype(np.uint16)
            else:
                pixels = pixels.astype(np.uint16)
            self._converted[message.dtype].inc(n)
        if pixels.shape[-2:] != (self.size, self.size):
            pixels = fit_to_size(pixels, self.size)
            self._resized.inc(len(pixels))
        return pixels, bad


class Ingest(threading.Thread):
    def __init__(self, socket: zmq.Socket, monitor: zmq.Socket | None, *, limits: Limits, adapter: InputAdapter,
                 queue: Callable[[Segment], Admission], queue_marker: Callable[[Marker], None],
                 emitter: Emitter, metrics: Metrics, budget_ns: int, bundle_hash: Callable[[], str],
                 status: Callable[[], dict[str, Any]], reject_interval: float, drain_s: float = 0.5,
                 recorder: AcquisitionWriter | None = None) -> None:
        super().__init__(name="flowsort-ingest", daemon=True)
        self.socket = socket
        self.monitor = monitor
        self.limits = limits
        self.adapter = adapter
        self.queue = queue
        self.queue_marker = queue_marker
        self.emitter = emitter
        self.metrics = metrics
        self.budget_ns = budget_ns
        self.bundle_hash = bundle_hash
        self.status = status
        self.drain_s = drain_s
        self.hard_limit = socket.getsockopt(zmq.MAXMSGSIZE)
        self.recorder = recorder
        self.stop_event = threading.Event()
        self._ratelog = RateLimitedLog(log, reject_interval)
        self._received = {t: metrics.messages_received.labels(t) for t in p.INGEST_TYPES}
        self._cells = metrics.cells_received
        self._waited = metrics.ingest_wait

    def stop(self) -> None:
        self.stop_event.set()

    def run(self) -> None:
        name_os_thread(INGEST)
        poller = zmq.Poller()
        poller.register(self.socket, zmq.POLLIN)
        if self.monitor is not None:
            poller.register(self.monitor, zmq.POLLIN)
        try:
            while not self.stop_event.is_set():
                events = dict(poller.poll(100))
                if self.monitor is not None and self.monitor in events:
                    self._monitor_events()
                if self.socket in events:
                    self._read(BURST)
            # Stopping: take in what has already arrived, then close.
            end = time.monotonic() + self.drain_s
            while time.monotonic() < end and self._read(BURST):
                pass
        except Exception:
            log.exception("ingest thread failed")
            raise
        finally:
            self.socket.close(linger=0)
            if self.monitor is not None:
                self.monitor.close(linger=0)
            if self.recorder is not None:
                self.recorder.close()

    def _read(self, limit: int) -> int:
        socket = self.socket
        count = 0
        while count < limit and socket.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            # The header as bytes (small: a copy is cheapest), the pixel frame as a zero-copy zmq.Frame.
            frames: list[Any] = [socket.recv()]
            while socket.getsockopt(zmq.RCVMORE):
                frames.append(socket.recv(copy=False))
            count += 1
            try:
                self.handle(frames)
            except Exception:  # bad input must never end the service
                log.exception("unexpected error handling an ingest message")
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
        kind = type(message)
        if kind is p.CellsMessage:
            self._received[p.CELLS].inc()
            self._cells.inc(message.count)
            try:
                self._cells_message(message, received, received_wall)
            except Rejected as rejected:
                rejected.acquisition = rejected.acquisition or message.acquisition
                rejected.event_ids = message.event_ids if rejected.event_ids is None else rejected.event_ids
                self.reject(rejected, received, whole=True)
        elif kind is p.EndMessage:
            self._received[p.END].inc()
            self.queue_marker(Marker(EndReport(message.acquisition, received_wall)))
        else:
            self._received[p.PING].inc()
            self.emitter.post(Pong(message.nonce, message.acquisition, received_wall, self.status()))

    def _times(self, message: p.CellsMessage, received: int, received_wall: int) -> tuple[np.ndarray, np.ndarray]:
        """Each cell's origin (capture on the service clock; receipt where the capture stamp is later, a clock
        ahead of ours) and deadline (``deadline_ns``, else origin + the configured budget)."""
        waited = received_wall - message.capture_ns
        np.maximum(waited, 0, out=waited)
        self._waited.observe(waited / 1e9)
        origins = received - waited
        if message.deadline_ns is None:
            if not self.budget_ns:
                return origins, np.full(message.count, NEVER, np.int64)
            return origins, origins + self.budget_ns
        if type(message.deadline_ns) is int:
            deadline = min(max(message.deadline_ns, 0), MAX_DEADLINE) - received_wall + received
            return origins, np.full(message.count, deadline, np.int64)
        return origins, np.clip(message.deadline_ns, 0, MAX_DEADLINE) - received_wall + received

    def _cells_message(self, message: p.CellsMessage, received: int, received_wall: int) -> None:
        pixels, bad = self.adapter.prepare(message)
        ids, capture = message.event_ids, message.capture_ns
        origins, deadlines = self._times(message, received, received_wall)
        if bad is not None:
            if bad.all():
                raise Rejected(Reason.NON_FINITE, "every cell holds NaN or inf pixels")
            self.reject(Rejected(Reason.NON_FINITE, f"{int(bad.sum())} of {len(bad)} cells hold NaN or inf pixels",
                                 message.acquisition, ids[bad]), received, whole=False)
            good = ~bad
            pixels, ids, capture, deadlines, origins = pixels[good], ids[good], capture[good], deadlines[good], origins[good]
        segment = Segment(message.acquisition, ids, pixels, received, deadlines, origins, capture_ns=capture)
        admission = self.queue(segment)
        bundle = self.bundle_hash() if (admission.expired or admission.shed or admission.dropped) else ""
        self._answer(admission.expired, Reason.EXPIRED, bundle, "deadline passed before receipt", message, late=True)
        self._answer(admission.shed, Reason.OVERLOAD_REFUSED, bundle,
                     "the queue ahead would make it miss its deadline", message)
        if admission.dropped:
            reason = Reason.OVERLOAD_REFUSED if admission.refused else Reason.OVERLOAD_DROPPED
            self._answer(admission.dropped, reason, bundle,
                         "queue full: refused" if admission.refused else "queue full: dropped the oldest", message)

    def _answer(self, pieces: list[Piece], reason: str, bundle: str, why: str, message: p.CellsMessage,
                late: bool = False) -> None:
        """Answer cells that will not run with ``reason``: counted, logged at a limited rate, sent at once."""
        if not pieces:
            return
        cells = sum(piece.count for piece in pieces)
        self.metrics.cells_rejected.labels(reason).inc(cells)
        self._ratelog.log(logging.WARNING, reason, "%s: %d cells (%s; acquisition %s, event ids %s)", reason, cells,
                          why, message.acquisition, describe_ids(message.event_ids))
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
