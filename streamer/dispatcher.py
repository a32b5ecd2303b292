"""The inference thread: forms batches with the :class:`~streamer.batcher.Batcher` and runs them.

It keeps up to the engine's ``depth`` batches in flight (the engines'
``submit``/``collect`` double buffering, or one batch per OpenVINO stream):
while the engine computes with the GIL released, this thread can assemble
and submit the next. Cells of a batch are copied
once, into the engine's input (a single-message batch is handed over as the
received frame's view; a merged one is gathered into one preallocated
buffer first). Results go through the policy as whole arrays and on to the
emitter per acquisition; the ingest and emitter threads never wait for it and
it never waits for them.

An engine failure answers the batch's cells with ``engine_error`` decisions;
``max_consecutive_failures`` in a row make the service not ready until a
batch succeeds again. A reload hands a new :class:`~streamer.model.Model`
to :meth:`Dispatcher.swap`: batches in flight finish on the old engine, the
queue is kept, the next batch runs on the new one.

With ``flowsort serve --results`` (``results_embedding`` set), each decision
block also carries the cells' capture times and copies of their
probabilities and first embedding components: the engine's output buffers
are reused two batches later, long before the results thread writes them.
Without it nothing is gathered or copied.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from engines.preprocessing import fit_to_size
from streamer.batcher import Admission, Batch, Batcher, Marker, Piece, Segment
from streamer.config import BatchingConfig
from streamer.emitter import DecisionBlock, Emitter
from streamer.ingest import error_block
from streamer.metrics import Metrics
from streamer.model import Model
from streamer.protocol import Reason
from streamer.ratelog import RateLimitedLog
from streamer.threadnames import INFERENCE, name_os_thread

log = logging.getLogger(__name__)
IDLE_WAIT_S = 0.05
POLL_S = 0.0002  # while a batch runs and a stream is idle: how often to look whether it ended


@dataclass(slots=True)
class Flight:
    batch: Batch
    model: Model | None  # None: nothing submitted (markers or expired cells only)
    event_ids: np.ndarray | None = None
    origins: np.ndarray | None = None
    deadlines: np.ndarray | None = None
    capture_ns: np.ndarray | None = None  # only with --results
    acquisitions: list[tuple[str, int]] | None = None  # (acquisition, cells) runs in batch order
    submitted_ns: int = 0
    finish_ns: int = 0  # when the engine should have it done (it may wait for batches ahead of it)


def acquisition_spans(flight: Flight) -> Iterator[tuple[str, slice]]:
    """Each acquisition of a batch and the slice of the batch's cells that belong to it (they are contiguous)."""
    start = 0
    for acquisition, count in flight.acquisitions or []:
        yield acquisition, slice(start, start + count)
        start += count


class Dispatcher(threading.Thread):
    def __init__(self, model: Model, batcher: Batcher, emitter: Emitter, metrics: Metrics,
                 max_failures: int, reject_interval: float, results_embedding: int | None = None) -> None:
        super().__init__(name="flowsort-inference", daemon=True)
        self.model = model
        # --results: embedding components to keep with each block's outputs; None: results off, nothing copied.
        self.results_embedding = results_embedding
        self.batcher = batcher
        self.emitter = emitter
        self.metrics = metrics
        self.max_failures = max_failures
        self.cond = threading.Condition()
        self.inflight: deque[Flight] = deque()
        self.failing = False
        self.failures_in_row = 0
        self._pending_swap: Model | None = None
        self._swapped = threading.Event()
        self._stopping = False
        self._buffer = self._allocate(model)
        # When the last batches ended (engine clock where it has one), oldest first, one per parallel batch: a batch
        # queued behind them starts when the one ``parallel`` places ahead of it ended.
        self._ends: deque[int] = deque(maxlen=model.planner.parallel)
        self._wake_at: int | None = None  # while the thread sleeps: when it wakes by itself
        self._ratelog = RateLimitedLog(log, reject_interval)
        self._failed = metrics.cells_rejected.labels(Reason.ENGINE_ERROR)
        self._expired = metrics.cells_rejected.labels(Reason.EXPIRED)
        self.on_swap: Any = None  # called with the new model after a swap (from this thread)

    @staticmethod
    def _allocate(model: Model) -> np.ndarray:
        return np.zeros((model.engine.max_batch, *model.engine.input_shape), np.uint16)

    # ------------------------------------------------------------------ other threads

    def queue(self, segments: list[Segment]) -> list[Admission]:
        """Admit ``segments`` (cells read back to back) in one go: one lock, at most one wake-up."""
        with self.cond:
            now = time.perf_counter_ns()
            admissions = [self.batcher.admit(segment, now) for segment in segments]
            # Wake the thread only if it sleeps and these arrivals bring its next batch forward.
            if self._wake_at is not None and any(a.queued for a in admissions):
                due = self.batcher.due(now)
                if due is not None and due < self._wake_at:
                    self.cond.notify()
        return admissions

    def queue_marker(self, marker: Marker) -> None:
        with self.cond:
            self.batcher.add_marker(marker)
            self.cond.notify()

    def swap(self, model: Model, timeout: float = 30.0) -> bool:
        """Run ``model`` from the next batch on; returns once swapped (False on timeout or shutdown)."""
        self._swapped.clear()
        with self.cond:
            if self._stopping:
                return False
            self._pending_swap = model
            self.cond.notify()
        return self._swapped.wait(timeout)

    def reconfigure(self, batching: BatchingConfig, max_failures: int) -> None:
        """A reload's ``[batching]`` and failure bound, taken between two batches."""
        with self.cond:
            self.batcher.configure(batching)
            self.max_failures = max_failures

    def drain(self) -> None:
        """Run everything queued without waiting for company, then end the thread."""
        with self.cond:
            self._stopping = True
            self.batcher.draining = True
            self.cond.notify()

    def queued(self) -> int:
        return self.batcher.queued

    # ------------------------------------------------------------------ the thread

    def run(self) -> None:
        name_os_thread(INFERENCE)
        try:
            self._loop()
        except Exception:
            log.exception("inference thread failed")
            raise
        finally:
            self._swapped.set()

    def _loop(self) -> None:
        while True:
            batch = None
            swap = None
            with self.cond:
                while True:
                    if self._pending_swap is not None and not self.inflight:
                        swap, self._pending_swap = self._pending_swap, None
                        break
                    now = time.perf_counter_ns()
                    due = None
                    if len(self.inflight) < self.model.engine.depth and self._pending_swap is None:
                        backlog = self._backlog(now)
                        due = self.batcher.due(now, backlog)
                        if due is not None and due <= now:
                            batch = self.batcher.take(now, backlog)
                            break
                    if self.inflight and self._collect_now():
                        break
                    if self._stopping and not self.batcher.queue and not self.inflight:
                        return
                    timeout = IDLE_WAIT_S if due is None else min(IDLE_WAIT_S, (due - now) / 1e9)
                    if self.inflight:  # look again when the oldest batch should be done, then every POLL_S
                        timeout = min(timeout, max(POLL_S, (self.inflight[0].finish_ns - now) / 1e9))
                    self._wake_at = now + int(timeout * 1e9)
                    self.cond.wait(timeout)
                    self._wake_at = None
            if swap is not None:
                self._swap(swap)
                continue
            flight = None
            try:
                if batch is not None:
                    self._start(batch, now)
                else:
                    flight = self.inflight.popleft()
                    self._finish(flight)
            except Exception:  # a bug must cost one batch, not the service
                log.exception("unexpected error on a batch; answering its cells with %s", Reason.ENGINE_ERROR)
                failed = flight.batch if flight is not None else batch
                for piece in failed.pieces:
                    self.emitter.post(error_block(piece, Reason.ENGINE_ERROR, self.model.bundle_hash))
                self._pass_markers(failed)
            # For the ingest thread's admission: when the engine can take another batch.
            now = time.perf_counter_ns()
            self.batcher.engine_free_ns = now + int(self._backlog(now))

    def _collect_now(self) -> bool:
        """Whether to collect the oldest batch in flight now: it is done, or every buffer is taken, so nothing can
        be submitted before it ends (collect then waits for it with the GIL released and returns the moment it
        completes). While a stream is idle this thread instead waits for new work and looks again every
        ``POLL_S``: OpenVINO can say when a batch ended only through a callback that needs the GIL."""
        oldest = self.inflight[0]
        engine = self.model.engine
        return oldest.model is None or len(self.inflight) >= engine.depth or oldest.model.engine.done()

    def _backlog(self, now: int) -> float:
        """Engine time still ahead of a batch submitted now, before it can start."""
        return max(0.0, self._start_time(now) - now)

    def _start_time(self, now: int) -> int:
        """When a batch submitted now would start: at once while one of the engine's parallel batches is free,
        else when enough of those ahead of it have finished (one after another: when all have)."""
        finishes = sorted(f.finish_ns for f in self.inflight if f.model is not None)
        parallel = self.batcher.planner.parallel
        if len(finishes) < parallel:
            return now
        return max(now, finishes[len(finishes) - parallel])

    def _swap(self, model: Model) -> None:
        old = self.model
        self.model = model
        self.batcher.planner = model.planner
        self._ends = deque(maxlen=model.planner.parallel)
        if self._buffer.shape[0] < model.engine.max_batch or self._buffer.shape[1:] != model.engine.input_shape:
            self._buffer = self._allocate(model)
        self.failing, self.failures_in_row = False, 0
        if self.on_swap is not None:
            self.on_swap(model)
        self._swapped.set()
        old.close()

    # ------------------------------------------------------------------ one batch

    def _start(self, batch: Batch, now: int) -> None:
        model = self.model
        for piece in batch.expired:
            self._expired.inc(piece.count)
            self.emitter.post(error_block(piece, Reason.EXPIRED, model.bundle_hash, late=True))
        if not batch.cells:
            if batch.markers:
                if self.inflight:
                    self.inflight.append(Flight(batch, None))
                else:
                    self._pass_markers(batch)
            return
        began = time.perf_counter_ns()
        flight = Flight(batch, model)
        pieces = batch.pieces
        self.metrics.stages.add("queue_wait", sum(p.count * (began - p.segment.arrival_ns) for p in pieces),
                                batch.cells)
        shape = model.engine.input_shape
        keep = self.results_embedding is not None
        if len(pieces) == 1:
            piece = pieces[0]
            segment = piece.segment
            flight.event_ids = segment.event_ids[piece.index]
            flight.origins = segment.origins[piece.index]
            flight.deadlines = segment.deadlines[piece.index]
            if keep:
                flight.capture_ns = segment.capture_ns[piece.index]
            flight.acquisitions = [(segment.acquisition, batch.cells)]
            if batch.size == batch.cells and segment.pixels.shape[1:] == shape:
                cells = segment.pixels[piece.index]
            else:
                cells = self._gather(pieces, batch.size, model)
        else:
            ids, origins, deadlines, captures, runs = [], [], [], [], []
            for piece in pieces:
                segment, index, count = piece.segment, piece.index, piece.count
                ids.append(segment.event_ids[index])
                origins.append(segment.origins[index])
                deadlines.append(segment.deadlines[index])
                if keep:
                    captures.append(segment.capture_ns[index])
                if runs and runs[-1][0] == segment.acquisition:
                    runs[-1] = (segment.acquisition, runs[-1][1] + count)
                else:
                    runs.append((segment.acquisition, count))
            flight.event_ids = np.concatenate(ids)
            flight.origins = np.concatenate(origins)
            flight.deadlines = np.concatenate(deadlines)
            if keep:
                flight.capture_ns = np.concatenate(captures)
            flight.acquisitions = runs
            cells = self._gather(pieces, batch.size, model)
        flight.submitted_ns = time.perf_counter_ns()
        flight.finish_ns = self._start_time(flight.submitted_ns) + int(model.planner.cost(batch.size))
        self.metrics.stages.add("batch", flight.submitted_ns - began)
        try:
            model.engine.submit(cells)
        except Exception as exc:
            self._engine_failed(flight, exc)
            if batch.markers:  # they still follow every batch before them
                if self.inflight:
                    self.inflight.append(Flight(Batch(markers=batch.markers), None))
                else:
                    self._pass_markers(batch)
            return
        self.inflight.append(flight)

    def _gather(self, pieces: list[Piece], size: int, model: Model) -> np.ndarray:
        """Copy the pieces' cells into the batch buffer (rows past the cells are padding)."""
        buffer = self._buffer
        position = 0
        for piece in pieces:
            cells = piece.segment.pixels[piece.index]
            if cells.shape[-1] != model.input_size or cells.shape[-2] != model.input_size:
                cells = fit_to_size(cells, model.input_size)  # queued before a reload changed the input size
                self.metrics.cells_resized.inc(len(cells))
            buffer[position:position + len(cells)] = cells
            position += len(cells)
        return buffer[:size]

    def _finish(self, flight: Flight) -> None:
        batch = flight.batch
        model = flight.model
        if model is None:
            self._pass_markers(batch)
            return
        waiting = time.perf_counter_ns()
        try:
            outputs = model.engine.collect()
        except Exception as exc:
            self._engine_failed(flight, exc)
            self._pass_markers(batch)
            return
        done = time.perf_counter_ns()
        self.metrics.stages.add("engine", done - waiting)
        # The batch's own time: from when it could start (submitted, or when the batch ``parallel`` places ahead of
        # it ended: it was queued behind that one) to when it ended, on the engine's clock where it has one (a
        # completion this thread noticed late must not be learned as engine time).
        end = flight.submitted_ns + model.engine.last_run_ns if model.engine.last_run_ns else done
        ahead = self._ends[0] if len(self._ends) == self._ends.maxlen else 0
        elapsed = end - max(flight.submitted_ns, ahead)
        self._ends.append(end)
        if self.batcher.planner is model.planner:
            model.planner.observe(batch.size, elapsed)
        self.metrics.engine_time.observe(elapsed / 1e9)
        self.metrics.batch_size.observe(batch.cells)
        n = batch.cells
        adjusted = model.policy.adjust(outputs.probabilities[:n])
        columns = model.policy.decide(adjusted, outputs.dead_score[:n])
        if self.failures_in_row:
            self.failures_in_row = 0
            if self.failing:
                self.failing = False
                log.warning("engine recovered: ready again")
        probabilities = embedding = None
        if self.results_embedding is not None:  # copies: the engine reuses these buffers two batches on
            probabilities = adjusted.copy()
            embedding = outputs.embedding[:n, :self.results_embedding].copy()
        for acquisition, span in acquisition_spans(flight):
            part = columns if span.stop - span.start == n else type(columns)(*(c[span] for c in columns))
            block = DecisionBlock(acquisition, flight.event_ids[span], flight.origins[span], flight.deadlines[span],
                                  model.bundle_hash, model.policy, part)
            if probabilities is not None:
                block.capture_ns = flight.capture_ns[span]
                block.probabilities = probabilities[span]
                block.embedding = embedding[span]
            self.emitter.post(block)
        self._pass_markers(batch)
        self.metrics.stages.add("policy", time.perf_counter_ns() - done)

    def _pass_markers(self, batch: Batch) -> None:
        for marker in batch.markers:
            self.emitter.post(marker.payload)

    def _engine_failed(self, flight: Flight, exc: Exception) -> None:
        self.metrics.engine_failures.inc()
        self.failures_in_row += 1
        n = flight.batch.cells
        self._failed.inc(n)
        self._ratelog.log(logging.ERROR, "engine", "engine failed on a batch of %d cells (%s: %s); answered as %s",
                          n, type(exc).__name__, exc, Reason.ENGINE_ERROR)
        if self.failures_in_row >= self.max_failures and not self.failing:
            self.failing = True
            log.error("engine failed %d batches in a row: not ready", self.failures_in_row)
        for acquisition, span in acquisition_spans(flight):
            self.emitter.post(DecisionBlock(acquisition, flight.event_ids[span], flight.origins[span],
                                            flight.deadlines[span], flight.model.bundle_hash, error=Reason.ENGINE_ERROR))
