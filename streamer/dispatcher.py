"""Dispatch: forms batches with the :class:`~streamer.batcher.Batcher`, runs them and hands on the results.

The service loop (:mod:`streamer.loop`) calls :meth:`Dispatcher.step`, which
does whatever is due and says when it wants to run next. It keeps up to the
engine's ``depth`` batches in flight (the engines' ``submit``/``collect``
double buffering, or one batch per OpenVINO stream): while the engine
computes on its own threads, the loop reads and queues the next cells. An
engine that reports its completions (:meth:`~engines.base.Engine.notify`:
OpenVINO) wakes the loop the moment a batch ends; with one that cannot, the
loop looks again when the batch should be done and, once every buffer is
taken, waits in ``collect``. Cells of a batch are copied
once, into the engine's input (a single-message batch is handed over as the
received frame's view; a merged one is gathered into one preallocated
buffer first). Results go through the policy as whole arrays and out through the
emitter per acquisition.

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
from collections.abc import Callable, Iterator
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

log = logging.getLogger(__name__)
POLL_NS = 200_000  # an engine that cannot report its completions: how often to look once a batch should be done


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


class Dispatcher:
    def __init__(self, model: Model, batcher: Batcher, emitter: Emitter, metrics: Metrics,
                 max_failures: int, reject_interval: float, wake: Callable[[], None],
                 results_embedding: int | None = None) -> None:
        """``wake``: wakes the service loop from any thread (engine completions, a swap from the reload thread)."""
        self.model = model
        # --results: embedding components to keep with each block's outputs; None: results off, nothing copied.
        self.results_embedding = results_embedding
        self.batcher = batcher
        self.emitter = emitter
        self.metrics = metrics
        self.max_failures = max_failures
        self.wake = wake
        self.inflight: deque[Flight] = deque()
        self.failing = False
        self.failures_in_row = 0
        self._notifies = model.engine.notify(wake)
        # Handed over by the reload thread, taken by the loop between two batches.
        self._pending_swap: Model | None = None
        self._pending_batching: tuple[BatchingConfig, int] | None = None
        self._handover = threading.Lock()
        self._swapped = threading.Event()
        self._stopping = False
        self._buffer = self._allocate(model)
        # When the last batches ended (engine clock where it has one), oldest first, one per parallel batch: a batch
        # queued behind them starts when the one ``parallel`` places ahead of it ended.
        self._ends: deque[int] = deque(maxlen=model.planner.parallel)
        self._ratelog = RateLimitedLog(log, reject_interval)
        self._failed = metrics.cells_rejected.labels(Reason.ENGINE_ERROR)
        self._expired = metrics.cells_rejected.labels(Reason.EXPIRED)
        self.on_swap: Any = None  # called with the new model after a swap (from the loop)

    @staticmethod
    def _allocate(model: Model) -> np.ndarray:
        return np.zeros((model.engine.max_batch, *model.engine.input_shape), np.uint16)

    # ------------------------------------------------------------------ the loop's calls

    def queue(self, segments: list[Segment]) -> list[Admission]:
        """Admit ``segments`` (cells read back to back) in one go."""
        now = time.perf_counter_ns()
        return [self.batcher.admit(segment, now) for segment in segments]

    def queue_marker(self, marker: Marker) -> None:
        self.batcher.add_marker(marker)

    def drain(self) -> None:
        """From now on run everything queued without waiting for company (the service is stopping)."""
        self._stopping = True
        self.batcher.draining = True

    @property
    def drained(self) -> bool:
        """Stopping, and nothing is queued or running any more."""
        return self._stopping and not self.batcher.queue and not self.inflight

    def queued(self) -> int:
        return self.batcher.queued

    def step(self) -> int | None:
        """Collect the batches that ended, start those that are due; when to be called again at the latest
        (service clock, ns; None: only when woken or when cells arrive)."""
        while True:
            now = time.perf_counter_ns()
            due = None
            if self._pending_swap is not None and not self.inflight:
                self._swap()
                continue
            if len(self.inflight) < self.model.engine.depth and self._pending_swap is None:
                backlog = self._backlog(now)
                due = self.batcher.due(now, backlog)
                if due is not None and due <= now:
                    self._run(self.batcher.take(now, backlog), now)
                    continue
            if self.inflight and self._collect_now():
                self._run(None, now)
                continue
            break
        if self.inflight and not self._notifies:  # look again when the oldest batch should be done
            check = max(now + POLL_NS, self.inflight[0].finish_ns)
            due = check if due is None else min(due, check)
        return due

    def _run(self, batch: Batch | None, now: int) -> None:
        """Start ``batch``, or collect the oldest batch in flight (None)."""
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
        # For admission: when the engine can take another batch.
        now = time.perf_counter_ns()
        self.batcher.engine_free_ns = now + int(self._backlog(now))

    # ------------------------------------------------------------------ other threads

    def swap(self, model: Model, timeout: float = 30.0) -> bool:
        """Run ``model`` from the next batch on; returns once swapped (False on timeout or shutdown)."""
        self._swapped.clear()
        with self._handover:
            if self._stopping:
                return False
            self._pending_swap = model
        self.wake()
        return self._swapped.wait(timeout)

    def reconfigure(self, batching: BatchingConfig, max_failures: int) -> None:
        """A reload's ``[batching]`` and failure bound, taken by the loop between two batches."""
        with self._handover:
            self._pending_batching = (batching, max_failures)
        self.wake()

    def release(self) -> None:
        """The loop has ended: a reload waiting for its swap gives up."""
        self._swapped.set()

    def take_handover(self) -> None:
        """Apply a reload's ``[batching]`` (the loop calls this first in every turn, before reading cells)."""
        if self._pending_batching is None:
            return
        with self._handover:
            (batching, self.max_failures), self._pending_batching = self._pending_batching, None
        self.batcher.configure(batching)

    def _collect_now(self) -> bool:
        """Whether to collect the oldest batch in flight now: it is done (an engine that cannot tell says it
        is, and collect then waits for it). Otherwise the loop reads cells meanwhile, woken by the engine when
        it reports completions, else looking again when the batch should be done."""
        oldest = self.inflight[0]
        return oldest.model is None or oldest.model.engine.done()

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

    def _swap(self) -> None:
        with self._handover:
            model, self._pending_swap = self._pending_swap, None
        old = self.model
        self.model = model
        self._notifies = model.engine.notify(self.wake)
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
            self.batcher.observe_overrun(elapsed / model.planner.cost(batch.size))  # before it learns this one
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
        blocks = []
        for acquisition, span in acquisition_spans(flight):
            part = columns if span.stop - span.start == n else type(columns)(*(c[span] for c in columns))
            block = DecisionBlock(acquisition, flight.event_ids[span], flight.origins[span], flight.deadlines[span],
                                  model.bundle_hash, model.policy, part)
            if probabilities is not None:
                block.capture_ns = flight.capture_ns[span]
                block.probabilities = probabilities[span]
                block.embedding = embedding[span]
            blocks.append(block)
        self.metrics.stages.add("policy", time.perf_counter_ns() - done)  # sending is the emitter's stage
        for block in blocks:
            self.emitter.post(block)
        self._pass_markers(batch)

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
