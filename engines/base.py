"""What every engine is: uint16 cells in, probabilities, embedding and dead score out.

An engine owns ``depth`` (at least ``DEPTH``) preallocated buffer sets sized
for its ``max_batch``. ``submit`` copies a batch into the next free set and
starts it; ``collect`` waits for the oldest batch and returns views of its
set's output buffers. Two sets let a caller (or a GPU's copy engine) fill the
next batch while the current one computes; an engine that computes several
batches at once (OpenVINO streams) has a set per batch it can run. (A second
set per stream, a batch queued behind each running one, kept the streams
busier near saturation but committed cells to batches early: at 1,000
cells/s on AVX2 it made more cells late, so it is not used.)
``infer`` is the plain synchronous call, submit then collect. Nothing on this path allocates array memory or loops over cells.

This module needs numpy only: the streamer imports it without torch.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from engines.bundle import Bundle
from flowsort.errors import UserError

DEPTH = 2
DEFAULT_MAX_BATCH = 256


class Outputs(NamedTuple):
    """Views of an engine's output buffers for one batch of N cells.

    They stay valid until the next-but-one ``submit``, so the result of one
    ``infer`` call survives the next call; copy them to keep them longer.
    """

    probabilities: np.ndarray  # float32 [N, K], calibrated
    embedding: np.ndarray  # float32 [N, D]
    dead_score: np.ndarray  # float32 [N]


class OutputBuffers:
    """One set of preallocated float32 outputs for ``max_batch`` cells, with its views per batch size."""

    def __init__(self, max_batch: int, num_classes: int, embedding_dim: int, empty: Any = np.empty) -> None:
        self.probabilities = empty((max_batch, num_classes), np.float32)
        self.embedding = empty((max_batch, embedding_dim), np.float32)
        self.dead_score = empty((max_batch,), np.float32)
        self.arrays = (self.probabilities, self.embedding, self.dead_score)
        self._views: dict[int, Outputs] = {}

    def first(self, n: int) -> Outputs:
        """The first ``n`` rows of every output; cached, so the hot path builds no objects."""
        views = self._views.get(n)
        if views is None:
            views = self._views[n] = Outputs(*(array[:n] for array in self.arrays))
        return views


class Engine(ABC):
    """A loaded model ready for batches of up to ``max_batch`` cells shaped ``input_shape``."""

    name: str = ""

    def __init__(self, bundle: Bundle, precision: str, device: str, max_batch: int, parallel: int = 1) -> None:
        if max_batch < 1:
            raise UserError(f"max batch must be at least 1, got {max_batch}")
        self.bundle = bundle
        self.precision = precision
        self.device = device
        self.max_batch = max_batch
        self.parallel = parallel  # batches computed at the same time (OpenVINO streams); 1 = one after another
        self.depth = max(DEPTH, parallel)  # batches that may be in flight at once
        channels, size = len(bundle.channels), bundle.input_size
        self.input_shape = (channels, size, size)
        self.num_classes = len(bundle.class_names)
        self.embedding_dim = bundle.embedding_dim
        self._pending: deque[tuple[int, int]] = deque()
        self._next_slot = 0
        # The last collected batch's time from its start to its completion, where the engine knows it (None:
        # it does not). A caller that notices completions late would otherwise learn its own lateness as cost.
        self.last_run_ns: int | None = None

    def infer(self, cells: np.ndarray) -> Outputs:
        """Probabilities, embedding and dead score for uint16 ``cells`` [N, C, S, S], N <= ``max_batch``."""
        if self._pending:
            raise RuntimeError("infer() while submitted batches are in flight: collect() them first")
        self.submit(cells)
        return self.collect()

    def submit(self, cells: np.ndarray) -> None:
        """Copy ``cells`` into the next free buffer set and start computing them."""
        if len(self._pending) == self.depth:
            raise RuntimeError(f"{self.depth} batches are already in flight: collect() one before submitting another")
        n = self._check(cells)
        slot = self._next_slot
        self._next_slot = (slot + 1) % self.depth
        self._start(slot, cells, n)
        self._pending.append((slot, n))

    def done(self) -> bool:
        """Whether the oldest submitted batch has finished, without waiting: a caller with several batches in
        flight can start another on an idle stream meanwhile. Engines that cannot tell say True: collect()
        then simply waits for it."""
        return True

    def notify(self, wake: Callable[[], None]) -> bool:
        """Have ``wake()`` called (from any thread) whenever a submitted batch ends, so a caller can sleep
        until then instead of looking; False: this engine cannot, and the caller looks at :meth:`done`."""
        return False

    def collect(self) -> Outputs:
        """Wait for the oldest submitted batch; views of its outputs."""
        if not self._pending:
            raise RuntimeError("collect() without a submitted batch")
        slot, n = self._pending.popleft()
        return self._finish(slot, n)

    def describe(self) -> dict[str, Any]:
        """What runs, for logs and metrics."""
        return {
            "engine": self.name,
            "precision": self.precision,
            "device": self.device,
            "max_batch": self.max_batch,
            "parallel": self.parallel,
            "bundle_hash": self.bundle.content_hash,
        }

    def close(self) -> None:
        """Release device resources; the default engine holds none beyond its arrays."""

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check(self, cells: np.ndarray) -> int:
        if not isinstance(cells, np.ndarray) or cells.dtype != np.uint16:
            raise TypeError(f"cells must be a uint16 numpy array, got {getattr(cells, 'dtype', type(cells).__name__)}")
        if cells.ndim != 4 or cells.shape[1:] != self.input_shape:
            raise ValueError(f"cells must be shaped [N, {', '.join(map(str, self.input_shape))}], got {list(cells.shape)}")
        n = cells.shape[0]
        if not 1 <= n <= self.max_batch:
            raise ValueError(f"batch of {n} cells: this engine takes 1 to {self.max_batch} (max_batch)")
        return n

    @abstractmethod
    def _start(self, slot: int, cells: np.ndarray, n: int) -> None:
        """Copy ``cells`` into buffer set ``slot`` and start the computation."""

    @abstractmethod
    def _finish(self, slot: int, n: int) -> Outputs:
        """Wait for buffer set ``slot``; views of its first ``n`` outputs."""


def predict_all(engine: Engine, cells: np.ndarray) -> Outputs:
    """Outputs for any number of cells, batch by batch, copied out (offline use: guards, tests, reports)."""
    n = len(cells)
    result = Outputs(
        np.empty((n, engine.num_classes), np.float32),
        np.empty((n, engine.embedding_dim), np.float32),
        np.empty((n,), np.float32),
    )
    for start in range(0, n, engine.max_batch):
        batch = engine.infer(cells[start : start + engine.max_batch])
        for store, value in zip(result, batch):
            store[start : start + len(value)] = value
    return result
