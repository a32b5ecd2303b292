"""Deadline-aware micro-batching, in the manner of Triton's dynamic batcher.

Pure logic on a caller's clock (integer nanoseconds), so it is tested with a
fake one. Cells arrive in :class:`Segment` s (one per ingest message, 1 to
thousands of cells); the batcher queues them in arrival order and says when a
batch is due and which cells it holds:

* a batch is due when the queue holds the largest batch size, when the oldest
  queued cell has waited ``max_delay`` (at once on an engine for which bigger
  batches cost as much per cell, or on one that computes several batches at
  once while one of them is idle: the queue grows while all are busy), or
  when waiting longer would make the earliest deadline among the cells of the
  next batch impossible to meet given the engine's measured time for that
  batch (plus whatever is still running);
  an end-of-acquisition :class:`Marker` or draining makes everything due now;
* a batch merges small segments and splits large ones; its size comes from the
  :class:`Planner`, which knows what each allowed batch size costs on this
  engine and picks the first step of the plan that clears the queue soonest
  (padding up to an allowed size where that is cheaper than two batches),
  capped at the largest size that still finishes before the earliest deadline
  among the cells it takes (a backlog on an engine whose big batches are only
  slightly cheaper per cell must not turn into one batch that makes every
  cell late), but not shrunk where no size would make that deadline;
* cells whose deadline has already passed are not run: they come back as
  ``expired`` to be answered late at once;
* cells are shed at the door: a cell whose deadline has passed when it arrives
  comes back ``expired`` at once, and one that the work already queued and
  running would make miss its deadline comes back ``refused`` (answered before
  its deadline, never run), so under overload the engine spends its time on
  cells it can still decide in time and nothing waits only to expire; the plan
  allows for batches running longer than the planner expects by how much they
  did while serving (:meth:`Batcher.observe_overrun`);
* the queue is bounded in cells: when full, ``drop_oldest`` evicts the oldest
  cells to make room and ``refuse`` turns the new segment away; either way the
  caller gets the cells back to answer them.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from streamer.config import BatchingConfig

NEVER = (1 << 63) - 1  # a deadline that never comes
EWMA = 0.1  # weight of a new engine time measurement
COST_RANGE = (0.5, 3.0)  # learned engine times stay within these multiples of the ones measured at start
RESOLVE_EVERY = 64  # measurements between two re-plans
BATCHING_GAIN = 0.9  # a bigger batch must cost at most this share per cell to be worth waiting for
LEAD_NS = 100_000  # a batch for a busy engine is formed this long before the engine should be free
# Admission plans with engine times this much longer than the planner's: at least ADMISSION_SAFETY, and as much
# as the 95th percentile of how far batches overran the planner while serving (up to SAFETY_MAX). Under overload
# admission keeps the queue at the edge of the deadline, so a plan that is right on average leaves half of the
# admitted cells late; on two cores shared with the instrument, batch times vary by 2x (docs/benchmarks.md).
ADMISSION_SAFETY = 1.15
SAFETY_MAX = 3.0
SAFETY_QUANTILE, SAFETY_STEP = 0.95, 0.02


class Planner:
    """Batch sizes to run for a queue of q cells, from the measured cost of each allowed size.

    ``clear[q]`` is the least time to run q cells as a sequence of allowed batches and
    ``first[q]`` the size of that sequence's first batch (dynamic programming over q).
    """

    def __init__(self, sizes: Sequence[int], costs_ns: dict[int, float] | None = None, parallel: int = 1) -> None:
        """``costs_ns``: one batch's time per size; ``parallel``: batches the engine computes at once."""
        self.parallel = max(1, int(parallel))
        self.sizes = tuple(sorted(set(int(s) for s in sizes)))
        if not self.sizes or self.sizes[0] < 1:
            raise ValueError(f"batch sizes must be positive, got {sizes}")
        self.max_size = self.sizes[-1]
        # Without measurements: a fixed overhead and a per-cell cost, so bigger batches pay off.
        self.costs = {s: float((costs_ns or {}).get(s, 200_000 + 50_000 * s)) for s in self.sizes}
        # What was measured at start bounds what is learned later: a burst of slow batches (a busy machine, a
        # late collect) must not teach a cost so high that admission refuses every cell and never learns again.
        self.measured = dict(self.costs)
        self._updates = 0
        self._pad = [0] * (self.max_size + 1)
        for q in range(self.max_size, 0, -1):
            self._pad[q] = next(s for s in self.sizes if s >= q)
        self.solve()

    def solve(self) -> None:
        m = self.max_size
        clear = [0.0] * (m + 1)
        first = [0] * (m + 1)
        for q in range(1, m + 1):
            best, best_size = math.inf, self.sizes[0]
            for s in self.sizes:
                cost = self.costs[s] + clear[max(0, q - s)]
                if cost < best * (1 - 1e-9):
                    best, best_size = cost, s
                if s >= q:
                    break  # larger sizes only pad more
            clear[q], first[q] = best, best_size
        self.clear, self.first = clear, first
        self._clear = np.asarray(clear)
        # Waiting for company only makes sense where a bigger batch costs less per cell.
        single = self.costs[self.sizes[0]] / self.sizes[0]
        self.batching_pays = any(self.costs[s] / s < BATCHING_GAIN * single for s in self.sizes[1:])

    def size_for(self, queued: int) -> int:
        """The batch size to run next with ``queued`` cells waiting."""
        return self.first[min(queued, self.max_size)] if queued > 0 else 0

    def fit(self, size: int, budget_ns: float) -> int:
        """The largest allowed size up to ``size`` that runs within ``budget_ns``; ``size`` itself if none does:
        the earliest cells are late whatever runs, and a smaller batch would only make the cells behind them
        later (a queue drained one cell at a time on an engine whose batches cost about the same collapses)."""
        for s in reversed(self.sizes):
            if s <= size and self.costs[s] <= budget_ns:
                return s
        return size

    def pad_size(self, cells: int) -> int:
        """The smallest allowed size holding ``cells`` cells."""
        return self._pad[min(cells, self.max_size)]

    def cost(self, size: int) -> float:
        return self.costs[size]

    def drain_ns(self, cells: Any) -> Any:
        """Engine time to run ``cells`` queued cells (a count, or an array of counts), its parallel batches busy."""
        if isinstance(cells, int):  # the common case, one per message: no numpy
            whole, rest = divmod(cells, self.max_size)
            return (whole * self.clear[self.max_size] + self.clear[rest]) / self.parallel
        whole, rest = np.divmod(cells, self.max_size)
        return (whole * self._clear[self.max_size] + self._clear[rest]) / self.parallel

    def ceiling(self) -> float:
        """Cells/s the engine sustains at its most efficient size, all its parallel batches busy."""
        return max(size / cost for size, cost in self.costs.items()) * 1e9 * self.parallel

    def observe(self, size: int, elapsed_ns: float) -> None:
        """Fold in a measured time of one batch of ``size`` (an allowed size)."""
        if size not in self.costs:
            return
        measured = self.measured[size]
        elapsed_ns = min(max(elapsed_ns, COST_RANGE[0] * measured), COST_RANGE[1] * measured)
        self.costs[size] += EWMA * (elapsed_ns - self.costs[size])
        self._updates += 1
        if self._updates % RESOLVE_EVERY == 0:
            self.solve()


@dataclass(eq=False, slots=True)
class Segment:
    """Cells of one ingest message still to run; ``pos`` is how many were taken or dropped."""

    acquisition: str
    event_ids: np.ndarray  # uint64 [n]
    pixels: np.ndarray  # uint16 [n, C, S, S] (a view of the received frame where possible)
    arrival_ns: int  # receipt, on the service's clock
    deadlines: np.ndarray  # int64 [n], service clock
    origins: np.ndarray  # int64 [n], capture on the service's clock (receipt where capture is later): latency's start
    pos: int = 0
    min_deadline: int = -1  # computed from deadlines unless given
    capture_ns: np.ndarray | None = None  # int64 [n], the instrument's capture time (for --results)

    def __post_init__(self) -> None:
        if self.min_deadline < 0:
            self.min_deadline = int(self.deadlines.min()) if len(self.deadlines) else NEVER

    @property
    def remaining(self) -> int:
        return len(self.event_ids) - self.pos


@dataclass(eq=False, slots=True)
class Marker:
    """Something that must pass through after every cell queued before it (an end of acquisition)."""

    payload: Any


@dataclass(slots=True)
class Piece:
    """Cells of one segment: ``index`` is a slice or an index array into the segment."""

    segment: Segment
    index: Any

    @property
    def count(self) -> int:
        if isinstance(self.index, slice):
            return self.index.stop - self.index.start
        return len(self.index)


def _cells_of(segment: Segment, index: np.ndarray) -> Segment:
    """A new segment holding ``index`` of ``segment``'s cells."""
    return Segment(segment.acquisition, segment.event_ids[index], segment.pixels[index], segment.arrival_ns,
                   segment.deadlines[index], segment.origins[index],
                   capture_ns=None if segment.capture_ns is None else segment.capture_ns[index])


@dataclass(slots=True)
class Admission:
    """What :meth:`Batcher.add` did with a segment: cells queued, and the cells to answer instead."""

    queued: bool
    expired: list[Piece] = field(default_factory=list)  # deadline passed on arrival: answer late
    shed: list[Piece] = field(default_factory=list)  # would miss the deadline behind the queue: refuse
    dropped: list[Piece] = field(default_factory=list)  # the queue was full: evicted (drop_oldest) or refused
    refused: bool = False  # ``dropped`` holds this segment, turned away whole (queue full, overload = refuse)
    keep: np.ndarray | None = None  # after shedding: the indices of the cells that can still make it


@dataclass(slots=True)
class Batch:
    """What to do now: run ``pieces`` (``cells`` cells) as an engine batch of ``size``; answer
    ``expired`` late; then pass ``markers`` on after this batch's decisions."""

    pieces: list[Piece] = field(default_factory=list)
    cells: int = 0
    size: int = 0
    expired: list[Piece] = field(default_factory=list)
    markers: list[Marker] = field(default_factory=list)


class Batcher:
    def __init__(self, planner: Planner, max_delay_ns: int, capacity: int, overload: str = "drop_oldest",
                 adaptive_delay: bool = True) -> None:
        if overload not in ("drop_oldest", "refuse"):
            raise ValueError(f"overload must be drop_oldest or refuse, got {overload!r}")
        self.planner = planner
        self.max_delay_ns = int(max_delay_ns)
        self.adaptive_delay = adaptive_delay
        self.capacity = int(capacity)
        self.overload = overload
        self.queue: deque[Segment | Marker] = deque()
        self.queued = 0  # cells
        self.markers = 0
        self.draining = False
        self.lead_ns = LEAD_NS
        self.engine_free_ns = 0  # when the engine can start another batch (set by the dispatcher)
        self.safety = ADMISSION_SAFETY  # see ADMISSION_SAFETY
        self._head_deadline: int | None = None  # min deadline over the next batch's cells (cache)

    @classmethod
    def from_config(cls, planner: Planner, batching: BatchingConfig) -> Batcher:
        """A batcher for ``[batching]`` (a :class:`~streamer.config.BatchingConfig`)."""
        return cls(planner, int(batching.max_delay_us * 1000), batching.queue_cells, batching.overload,
                   batching.adaptive_delay)

    def configure(self, batching: BatchingConfig) -> None:
        """Take a reload's delay, bound and overload policy (``[batching]``, validated with the config)."""
        self.max_delay_ns = int(batching.max_delay_us * 1000)
        self.capacity = batching.queue_cells
        self.overload = batching.overload
        self.adaptive_delay = batching.adaptive_delay

    # ------------------------------------------------------------------ arrivals

    def admit(self, segment: Segment, now: int) -> Admission:
        """At the door: answer the cells that cannot be decided in time, queue the rest (:meth:`add`)."""
        if segment.min_deadline < NEVER and not self.draining and segment.remaining > 0:
            shed = self._shed(segment, now)
            if shed.queued is False:
                return shed
            if shed.expired or shed.shed:
                segment = _cells_of(segment, shed.keep)
            admission = self.add(segment)
            admission.expired, admission.shed = shed.expired, shed.shed
            return admission
        return self.add(segment)

    def add(self, segment: Segment) -> Admission:
        """Queue ``segment`` within the queue's bound (evicting the oldest cells, or refusing it, when full)."""
        admission = Admission(queued=True)
        n = segment.remaining
        if n <= 0:
            return admission
        if self.queued + n > self.capacity:
            if self.overload == "refuse" or n > self.capacity:
                admission.queued, admission.refused = False, True
                admission.dropped.append(Piece(segment, slice(segment.pos, len(segment.event_ids))))
                return admission
            admission.dropped = self._evict(self.queued + n - self.capacity)
        if self._head_deadline is not None and self.queued < self.planner.max_size:
            self._head_deadline = min(self._head_deadline, segment.min_deadline)
        self.queue.append(segment)
        self.queued += n
        return admission

    def finish_estimates(self, cells: int, now: int, each: bool = True) -> Any:
        """When each of ``cells`` more cells would be decided if queued now, behind all queued and running
        (``each=False``: only the last of them, as a number)."""
        planner = self.planner
        start = max(now, self.engine_free_ns)
        # The queue drains at the parallel rate; the batch holding the cell itself takes its whole time; and
        # engine times vary, and sending takes a little: admit only what fits with a margin.
        last = planner.cost(planner.pad_size(cells)) * (1 - 1 / planner.parallel)
        ahead = self.queued + np.arange(1, cells + 1) if each else self.queued + cells
        return start + self.safety * (planner.drain_ns(ahead) + last) + self.lead_ns

    def observe_overrun(self, ratio: float) -> None:
        """Fold in one batch's time over the planner's estimate for it: ``safety`` follows its 95th
        percentile (a stochastic quantile estimate: up by 0.95 steps when exceeded, down by 0.05 otherwise)."""
        step = SAFETY_STEP * (SAFETY_QUANTILE if ratio > self.safety else SAFETY_QUANTILE - 1)
        self.safety = min(SAFETY_MAX, max(ADMISSION_SAFETY, self.safety + step))

    def _shed(self, segment: Segment, now: int) -> Admission:
        """Which of the segment's cells cannot make their deadline: already expired, or behind the queue."""
        admission = Admission(queued=True)
        n = segment.remaining
        if segment.min_deadline > self.finish_estimates(n, now, each=False):
            return admission
        first = segment.pos
        deadlines = segment.deadlines[first:]
        expired = deadlines <= now
        shed = ~expired & (deadlines <= self.finish_estimates(n, now))
        if expired.any():
            admission.expired.append(Piece(segment, np.flatnonzero(expired) + first))
        if shed.any():
            admission.shed.append(Piece(segment, np.flatnonzero(shed) + first))
        admission.keep = np.flatnonzero(~(expired | shed)) + first
        admission.queued = bool(len(admission.keep))
        return admission

    def add_marker(self, marker: Marker) -> None:
        self.queue.append(marker)
        self.markers += 1

    def _evict(self, cells: int) -> list[Piece]:
        """Drop the ``cells`` oldest queued cells (markers stay in place)."""
        dropped: list[Piece] = []
        kept: deque[Segment | Marker] = deque()
        while cells > 0 and self.queue:
            item = self.queue.popleft()
            if isinstance(item, Marker):
                kept.append(item)
                continue
            take = min(cells, item.remaining)
            dropped.append(Piece(item, slice(item.pos, item.pos + take)))
            item.pos += take
            cells -= take
            self.queued -= take
            if item.remaining:
                kept.append(item)
        self.queue.extendleft(reversed(kept))
        self._head_deadline = None
        return dropped

    # ------------------------------------------------------------------ dispatch

    def _head_min_deadline(self) -> int:
        """The earliest deadline among the cells the next batch would take (cached)."""
        if self._head_deadline is None:
            best, seen = NEVER, 0
            for item in self.queue:
                if isinstance(item, Marker):
                    continue
                best = min(best, item.min_deadline)
                seen += item.remaining
                if seen >= self.planner.max_size:
                    break
            self._head_deadline = best
        return self._head_deadline

    def _oldest_arrival(self) -> int:
        for item in self.queue:
            if isinstance(item, Segment):
                return item.arrival_ns
        return NEVER

    def due(self, now: int, backlog_ns: float = 0.0) -> int | None:
        """When the next batch should start (<= now: at once), or None with nothing queued.

        ``backlog_ns``: the engine time still ahead of a batch started now (batches in flight);
        while it lasts, a batch is not due for its delay alone (it keeps growing instead).
        """
        if not self.queue:
            return None
        if self.queued == 0 or self.draining or self.markers or self.queued >= self.planner.max_size:
            return now
        size = self.planner.size_for(self.queued)
        wait = self.max_delay_ns if self.planner.batching_pays or not self.adaptive_delay else 0
        if self.adaptive_delay and self.planner.parallel > 1 and backlog_ns <= 0:
            wait = 0  # one of the engine's parallel batches is idle: waiting for company would only leave it idle
        by_delay = self._oldest_arrival() + wait
        if backlog_ns > 0:
            # The engine is busy: committing a batch now would only fix its size early. Let it grow until the
            # engine is about free, unless a deadline says otherwise.
            by_delay = max(by_delay, now + int(backlog_ns) - self.lead_ns)
        by_deadline = self._head_min_deadline() - int(self.planner.cost(size) + backlog_ns)
        return min(by_delay, by_deadline)

    def take(self, now: int, backlog_ns: float = 0.0) -> Batch:
        """The cells of the next batch, taken off the queue (call when ``due`` says so, with the same backlog)."""
        batch = Batch()
        size = self.planner.size_for(self.queued)
        earliest = self._head_min_deadline() if self.queued else NEVER
        if now < earliest < NEVER:  # (cells already past their deadline leave as expired, not as a reason to shrink)
            size = self.planner.fit(size, earliest - now - backlog_ns)
        want = min(size, self.queued)
        while self.queue and batch.cells < want:
            item = self.queue[0]
            if isinstance(item, Marker):
                self.queue.popleft()
                self.markers -= 1
                batch.markers.append(item)
                break
            start = item.pos
            stop = start + min(item.remaining, want - batch.cells)
            item.pos = stop
            self.queued -= stop - start
            if item.min_deadline > now:
                batch.pieces.append(Piece(item, slice(start, stop)))
                batch.cells += stop - start
            else:
                late = item.deadlines[start:stop] <= now
                good = np.flatnonzero(~late) + start
                if len(good):
                    batch.pieces.append(Piece(item, good))
                    batch.cells += len(good)
                batch.expired.append(Piece(item, np.flatnonzero(late) + start))
            if not item.remaining:
                self.queue.popleft()
        # Markers now at the head follow this batch: nothing queued before them is left.
        while self.queue and isinstance(self.queue[0], Marker):
            batch.markers.append(self.queue.popleft())
            self.markers -= 1
        self._head_deadline = None
        batch.size = self.planner.pad_size(batch.cells) if batch.cells else 0
        return batch

    def __len__(self) -> int:
        return self.queued
