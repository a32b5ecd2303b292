"""Wire protocol v1: what travels between an instrument, flowsort and a sorter controller.

Definitions only (versions, message types, field names, dtypes, reason codes,
decoded message classes); the code that encodes, decodes and validates lives
in :mod:`streamer.codec`. ``docs/protocol.md`` is the integrator's version of
this module and the two must agree.

Every message is a ZeroMQ multipart message whose first frame is a msgpack
map carrying ``version`` and ``type``:

* ingest (instrument -> flowsort, PUSH -> PULL): ``cells`` (header + one raw
  C-order little-endian pixel frame holding N cells), ``end`` (end of an
  acquisition: flush and report), ``ping``;
* output (flowsort -> sorter controller on PUSH, monitors on PUB):
  ``decisions`` (one columnar message per batch and acquisition),
  ``end`` (the acquisition report), ``pong``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

PROTOCOL_VERSION = 1
SUPPORTED_VERSIONS = frozenset({PROTOCOL_VERSION})

# Message types.
CELLS = "cells"
END = "end"
PING = "ping"
DECISIONS = "decisions"
PONG = "pong"
INGEST_TYPES = frozenset({CELLS, END, PING})

# Header keys shared by every message.
VERSION = "version"
TYPE = "type"
ACQUISITION = "acquisition"

# Keys of a `cells` header.
EVENT_IDS = "event_ids"  # N uint64: array of unsigned ints, or bin of N little-endian uint64
CAPTURE_NS = "capture_ns"  # N int64 CLOCK_REALTIME ns (time.time_ns()): array, or bin of N little-endian int64
SHAPE = "shape"  # [N, C, H, W]
DTYPE = "dtype"  # a name from DTYPES
CHANNELS = "channels"  # C instrument channel numbers, in the order of the C axis
DEADLINE_NS = "deadline_ns"  # optional: one int (every cell) or N ints, CLOCK_REALTIME ns
CELLS_REQUIRED = (ACQUISITION, EVENT_IDS, CAPTURE_NS, SHAPE, DTYPE, CHANNELS)

# Keys of a `ping` header (and echoed in the `pong`).
NONCE = "nonce"

# Keys of outgoing messages.
WORKER = "worker"
SEQ = "seq"  # per worker and socket kind, +1 per message: a gap means the consumer missed messages
SENT_NS = "sent_ns"
COUNT = "count"
BUNDLE = "bundle"
RECEIVED_NS = "received_ns"
READY = "ready"
QUEUE_DEPTH = "queue_depth"
ENGINE = "engine"
ENGINE_SPEED = "engine_speed"
ENDPOINTS = "endpoints"
REPORT = "report"

# Decision columns: each an array of `count` values.
DECISION_COLUMNS = (
    "event_ids",  # uint64
    "label",  # str: class name, "" when the cell could not be classified
    "probability",  # float32: probability of `label`; NaN when not classified
    "dead",  # bool: dead-cell flag
    "dead_score",  # float32; NaN when not classified
    "gate",  # str: the sort gate, "" for no-sort
    "stream",  # int: the gate's sorter stream, 0 for no-sort
    "late",  # bool: the decision left after the cell's deadline (never sorted)
    "latency_us",  # int: capture (receipt where capture is later) to send, microseconds
    "error",  # str: "" or the reason the cell could not be classified
)

# Pixel types accepted in `dtype`, always little-endian. uint16 is native; others are converted (counted).
DTYPES: dict[str, np.dtype] = {
    "uint16": np.dtype("<u2"),
    "uint8": np.dtype("u1"),
    "float32": np.dtype("<f4"),
}
NATIVE_DTYPE = "uint16"


def to_native(pixels: np.ndarray) -> np.ndarray:
    """Pixels of an accepted type as uint16: float rounded and clipped to 0..65535 (NaN and inf give
    undefined values: callers that care find those cells first)."""
    if pixels.dtype.kind == "f":
        with np.errstate(invalid="ignore"):
            return np.clip(np.rint(pixels), 0, 65535).astype(np.uint16)
    return pixels.astype(np.uint16)


UINT64 = np.dtype("<u8")
INT64 = np.dtype("<i8")


class Reason:
    """Why a message or a cell was not classified: the `error` column, log lines and metric labels."""

    MALFORMED = "malformed"  # header is not a msgpack map
    UNSUPPORTED_VERSION = "unsupported_version"
    UNKNOWN_TYPE = "unknown_type"
    MISSING_FIELD = "missing_field"
    BAD_FIELD = "bad_field"  # a field of the wrong type or value
    FRAME_COUNT = "frame_count"  # not header + one pixel frame
    NO_CELLS = "no_cells"  # N = 0
    TOO_MANY_CELLS = "too_many_cells"
    BAD_SHAPE = "bad_shape"
    BAD_DTYPE = "bad_dtype"
    LENGTH_MISMATCH = "length_mismatch"  # pixel frame bytes != N*C*H*W*itemsize
    CHANNEL_MISMATCH = "channel_mismatch"  # the message lacks a channel the model needs
    NON_FINITE = "non_finite"  # NaN or inf in float pixels (per cell)
    OVERSIZED = "oversized"  # message larger than ingest.max_message_bytes
    OVERLOAD_DROPPED = "overload_dropped"  # evicted from a full queue (overload = "drop_oldest")
    OVERLOAD_REFUSED = "overload_refused"  # refused at a full queue (overload = "refuse")
    ENGINE_ERROR = "engine_error"
    EXPIRED = "expired"  # the deadline passed before the cell reached the engine (also late)


class Rejected(Exception):
    """An ingest message that cannot be used, with what is known about it (to answer and to log)."""

    def __init__(
        self,
        reason: str,
        detail: str,
        acquisition: str | None = None,
        event_ids: np.ndarray | None = None,
    ) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.acquisition = acquisition
        self.event_ids = event_ids


@dataclass(slots=True)
class CellsMessage:
    """N cells as received: pixels is a view of the pixel frame (no copy) in the message's dtype."""

    acquisition: str
    event_ids: np.ndarray  # uint64 [N]
    capture_ns: np.ndarray  # int64 [N]
    pixels: np.ndarray  # [N, C, H, W], dtype from DTYPES
    dtype: str
    channels: tuple[int, ...]
    deadline_ns: int | np.ndarray | None  # CLOCK_REALTIME ns, one for all cells or [N]

    @property
    def count(self) -> int:
        return len(self.event_ids)


@dataclass(slots=True)
class EndMessage:
    acquisition: str


@dataclass(slots=True)
class PingMessage:
    nonce: Any
    acquisition: str | None


IngestMessage = CellsMessage | EndMessage | PingMessage


@dataclass(slots=True)
class Decisions:
    """A decoded `decisions` message: the columns as numpy arrays (for tests, monitors and the bench)."""

    worker: str
    seq: int
    acquisition: str
    sent_ns: int
    bundle: str
    event_ids: np.ndarray
    label: list[str]
    probability: np.ndarray
    dead: np.ndarray
    dead_score: np.ndarray
    gate: list[str]
    stream: np.ndarray
    late: np.ndarray
    latency_us: np.ndarray
    error: list[str]

    @property
    def count(self) -> int:
        return len(self.event_ids)
