"""`flowsort serve --results PATH`: a running service's decisions written as FCS files, on a thread of their own.

The emitter hands over each decided block with :meth:`ResultsWriter.post`
once it is sent. Posting never waits, so a stalling disk stalls only this
thread: blocks wait in a bounded queue and past it the oldest are dropped,
counted through ``on_drop`` and in the file (FLOWSORT_DROPPED_EVENTS).

A PATH containing ``{acquisition}`` gets one file per acquisition, finished
when the acquisition's ``end`` has been handled (:meth:`end`) or at stop; a
plain PATH holds every cell of the run in one file, finished at stop. A file
is never overwritten: a name in use gets ``-2``, ``-3``, ... A reload that
changes the classes, gates, dead threshold, embedding or bundle finishes the
open files and starts new ones, so every event of a file was decided by the
model and policy its keywords name. Cells answered with an error are not
events: :meth:`ResultsWriter.unclassified` counts them, by reason, in the
file's FLOWSORT_UNCLASSIFIED_<REASON> keywords. Until finished, each file is
``NAME.fcs.partial`` (see :mod:`streamer.fcs`).
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from flowsort.errors import UserError
from streamer.fcs import PARTIAL_SUFFIX, FcsWriter
from streamer.policy import Columns, Policy
from streamer.ratelog import RateLimitedLog
from streamer.fcs_layout import DEFAULT_EMBEDDING, ResultLayout, closing_keywords
from streamer.threadnames import RESULTS, name_os_thread

log = logging.getLogger(__name__)
PLACEHOLDER = "{acquisition}"


@dataclass(slots=True)
class ResultBlock:
    """Decided cells of one acquisition, as the emitter sent them; arrays owned by the block, not engine buffers."""

    acquisition: str
    bundle: str
    policy: Policy
    event_ids: np.ndarray  # uint64 [n]
    capture_ns: np.ndarray  # int64 [n], the instrument's capture time (CLOCK_REALTIME)
    probabilities: np.ndarray  # float32 [n, K]
    embedding: np.ndarray  # float32 [n, >= k]: the first k components are enough
    columns: Columns  # from Policy.decide, gate unsorted where late
    late: np.ndarray  # bool [n]


@dataclass(slots=True)
class _End:
    acquisition: str


@dataclass
class _File:
    writer: FcsWriter
    layout: ResultLayout
    bundle: str
    start_ns: int
    end_ns: int = 0
    acquisitions: set[str] = field(default_factory=set)


def safe_file_part(name: str) -> str:
    """An acquisition name usable inside a file name."""
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", name).strip(".") or "unnamed"


def check_results_path(path: str | Path) -> Path:
    """Create the folder results will be written in and check it is writable (at start, not at the first cell).

    With ``{acquisition}`` in a folder name, the folder above it. Returns the folder.
    """
    folder = Path(path).parent
    while PLACEHOLDER in str(folder):
        folder = folder.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"results {path}: cannot create the folder {folder}: {exc}") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"results {path}: the folder {folder} is not writable")
    return folder


class ResultsWriter(threading.Thread):
    def __init__(self, path: str | Path, embedding: int = DEFAULT_EMBEDDING, datatype: str = "F",
                 capacity: int = 4096, on_drop: Callable[[int], None] | None = None) -> None:
        super().__init__(name="flowsort-results", daemon=True)
        self.template = str(path)
        self.per_acquisition = PLACEHOLDER in self.template
        self.embedding = embedding
        self.datatype = datatype
        self.capacity = capacity
        self.on_drop = on_drop
        self.written: list[Path] = []  # finished files, in order
        self._files: dict[str, _File] = {}  # by file key (the acquisition, or "" for one file)
        self._dropped: Counter[str] = Counter()  # events dropped, by file key
        self._unclassified: dict[str, Counter[str]] = {}  # cells that are not events, by file key and reason
        self._queue: deque[ResultBlock | _End] = deque()
        self._blocks = 0  # ResultBlocks in the queue
        self._cond = threading.Condition()
        self._stopping = False
        self._ratelog = RateLimitedLog(log, 5.0)

    # ------------------------------------------------------------------ any thread

    def post(self, block: ResultBlock) -> None:
        """Queue decided cells; never blocks (past ``capacity`` blocks the oldest is dropped and counted)."""
        with self._cond:
            if self._blocks >= self.capacity:
                # The oldest block, not an end: that one is a few bytes and still finishes its file.
                index = next(i for i, item in enumerate(self._queue) if isinstance(item, ResultBlock))
                self._count_drop(self._queue[index])
                del self._queue[index]
                self._blocks -= 1
            self._queue.append(block)
            self._blocks += 1
            self._cond.notify()

    def unclassified(self, acquisition: str, reason: str, count: int) -> None:
        """Count cells answered with an error (``reason``): not events, but named in the file's keywords."""
        with self._cond:
            counts = self._unclassified.get(self._key(acquisition))
            if counts is None:
                counts = self._unclassified[self._key(acquisition)] = Counter()
            counts[reason] += count

    def end(self, acquisition: str) -> None:
        """The acquisition is over: finish its file (with a per-acquisition PATH) after its queued cells."""
        with self._cond:
            self._queue.append(_End(acquisition))
            self._cond.notify()

    def stop(self) -> None:
        """Write what is queued, finish every file, end the thread (join it to wait)."""
        with self._cond:
            self._stopping = True
            self._cond.notify()

    def _count_drop(self, item: ResultBlock | _End) -> None:
        if isinstance(item, ResultBlock):
            self._dropped[self._key(item.acquisition)] += len(item.event_ids)
            if self.on_drop is not None:
                self.on_drop(len(item.event_ids))

    # ------------------------------------------------------------------ the thread

    def run(self) -> None:
        name_os_thread(RESULTS)
        try:
            while True:
                with self._cond:
                    while not self._queue and not self._stopping:
                        self._cond.wait(0.5)
                    if not self._queue:
                        break
                    items = list(self._queue)
                    self._queue.clear()
                    self._blocks = 0
                for item in items:
                    try:
                        if isinstance(item, ResultBlock):
                            self._write(item)
                        elif self.per_acquisition:
                            self._finish(self._key(item.acquisition))
                    except Exception as exc:  # a full disk must not end the thread: count the cells, go on
                        self._ratelog.log(logging.ERROR, "write", "could not write results for acquisition %r "
                                          "(%s: %s): its cells are counted as dropped", item.acquisition,
                                          type(exc).__name__, exc)
                        with self._cond:
                            self._count_drop(item)
        finally:
            for key in list(self._files):
                try:
                    self._finish(key)
                except Exception:
                    log.exception("could not finish the results file %s", self._files[key].writer.partial)

    def _key(self, acquisition: str) -> str:
        return acquisition if self.per_acquisition else ""

    def _write(self, block: ResultBlock) -> None:
        key = self._key(block.acquisition)
        layout = ResultLayout.for_policy(block.policy, block.embedding.shape[1], self.embedding)
        file = self._files.get(key)
        if file is not None and (file.layout != layout or file.bundle != block.bundle):
            log.info("results: bundle, classes, gates, dead threshold or embedding changed: finishing %s",
                     file.writer.path)
            self._finish(key)
            file = None
        if file is None:
            start_ns = int(block.capture_ns.min())
            path = self._free_path(block.acquisition)
            writer = FcsWriter(path, layout.parameters(), layout.keywords(block.acquisition, block.bundle, start_ns),
                               self.datatype)
            file = self._files[key] = _File(writer, layout, block.bundle, start_ns)
            log.info("results: writing %s", writer.partial)
        file.writer.append(layout.rows(block.event_ids, block.capture_ns, file.start_ns, block.probabilities,
                                       block.embedding, block.columns, block.late))
        file.end_ns = max(file.end_ns, int(block.capture_ns.max()))
        file.acquisitions.add(block.acquisition)

    def _finish(self, key: str) -> None:
        file = self._files.pop(key, None)
        with self._cond:
            unclassified = self._unclassified.pop(key, Counter())
            if file is None:
                return
            dropped = self._dropped.pop(key, 0)
        keywords = closing_keywords(file.end_ns or time.time_ns(), unclassified, float(file.writer.maxima[0]),
                                    self.datatype)
        keywords["FLOWSORT_DROPPED_EVENTS"] = str(dropped)
        keywords["FLOWSORT_ACQUISITION_COUNT"] = str(len(file.acquisitions))
        self.written.append(file.writer.close(keywords))
        log.info("results: wrote %s (%d cells%s)", file.writer.path, file.writer.events,
                 f", {dropped} dropped" if dropped else "")

    def _free_path(self, acquisition: str) -> Path:
        """The file for ``acquisition``: never one that exists or that this writer has open."""
        path = Path(self.template.replace(PLACEHOLDER, safe_file_part(acquisition)))
        in_use = {f.writer.path for f in self._files.values()}
        candidate, n = path, 1
        def taken(path: Path) -> bool:
            return path in in_use or path.exists() or path.with_name(path.name + PARTIAL_SUFFIX).exists()

        while taken(candidate):
            n += 1
            candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")
        candidate.parent.mkdir(parents=True, exist_ok=True)
        return candidate
