"""Encoding, decoding and validation of wire protocol v1 (:mod:`streamer.protocol`).

The encoders are built for senders that run at thousands of messages per
second (the bench's simulated instrument, replay, tests): a
:class:`CellsEncoder` packs the fields that do not change between messages
once, and each message appends only its event ids, timestamps and shape, as
msgpack ``bin`` columns (one ``tobytes`` each, no per-cell Python).

:func:`decode_ingest` turns received frames into an
:class:`~streamer.protocol.IngestMessage` or raises
:class:`~streamer.protocol.Rejected` naming the reason, with the acquisition
and event ids wherever they could be read, so the service can answer the
sorter. It never copies pixels: the message's ``pixels`` is a view of the
received frame.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np

from streamer import protocol as p
from streamer.protocol import Reason, Rejected

MAX_ACQUISITION_CHARS = 256
NAN = float("nan")
ANSWERED_IDS_FACTOR = 16  # a rejected message's readable event ids are answered up to this many x max_cells
MAX_CHANNELS = 64
_CELLS_REQUIRED = frozenset(p.CELLS_REQUIRED)


@dataclass(frozen=True)
class Limits:
    """What the service accepts in one ingest message."""

    max_cells: int = 4096
    max_side: int = 1024
    max_message_bytes: int = 64 << 20
    max_header_bytes: int = 1 << 20


DEFAULT_LIMITS = Limits()


# ---------------------------------------------------------------------------- encoding

def _packb(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def _map_header(count: int) -> bytes:
    if count < 16:
        return bytes((0x80 | count,))
    return b"\xde" + struct.pack(">H", count)


def _bin_prefix(nbytes: int) -> bytes:
    if nbytes < 256:
        return b"\xc4" + bytes((nbytes,))
    if nbytes < 65536:
        return b"\xc5" + struct.pack(">H", nbytes)
    return b"\xc6" + struct.pack(">I", nbytes)


class HeaderBuilder:
    """A msgpack map built entry by entry; per-cell columns are ``bin`` values whose bytes can be rewritten
    in place for each message (numpy views into the header), so a sender encodes nothing per message."""

    def __init__(self) -> None:
        self._body = bytearray()
        self._entries = 0
        self._columns: dict[str, tuple[int, np.dtype, int]] = {}  # view name -> (offset in body, dtype, count)

    def add(self, key: str, value: Any) -> None:
        self._body += _packb(key) + _packb(value)
        self._entries += 1

    def add_column(self, key: str, dtype: np.dtype, count: int, name: str | None = None) -> None:
        """``key``: ``count`` values of ``dtype`` as one bin, to be written through the view ``name`` (default key)."""
        self._body += _packb(key) + _bin_prefix(count * dtype.itemsize)
        self._columns[name or key] = (len(self._body), dtype, count)
        self._body += bytes(count * dtype.itemsize)
        self._entries += 1

    def add_map(self, key: str, inner: HeaderBuilder) -> None:
        """``key``: the map ``inner`` holds, its columns writable like this map's own."""
        self._body += _packb(key)
        head = _map_header(inner._entries)
        base = len(self._body) + len(head)
        self._body += head + inner._body
        for name, (offset, dtype, count) in inner._columns.items():
            self._columns[name] = (base + offset, dtype, count)
        self._entries += 1

    def build(self) -> tuple[bytearray, dict[str, np.ndarray]]:
        """The header and a writable numpy view of each column inside it."""
        head = _map_header(self._entries)
        header = bytearray(head) + self._body
        views = {name: np.frombuffer(header, dtype, count, offset + len(head))
                 for name, (offset, dtype, count) in self._columns.items()}
        return header, views


def cells_header(acquisition: str, channels: Sequence[int], shape: Sequence[int], dtype: str = p.NATIVE_DTYPE,
                 deadline: bool = False, extra: dict[str, Any] | None = None,
                 maps: dict[str, HeaderBuilder] | None = None) -> tuple[bytearray, dict[str, np.ndarray]]:
    """The one builder of `cells` headers: ``shape`` = [N, C, H, W], the per-cell ``event_ids``, ``capture_ns``
    (and with ``deadline`` ``deadline_ns``) as writable views; ``extra`` keys and nested ``maps`` (a sender's
    own ``x_`` keys) go along."""
    if dtype not in p.DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(p.DTYPES)}, got {dtype!r}")
    n = int(shape[0])
    builder = HeaderBuilder()
    builder.add(p.VERSION, p.PROTOCOL_VERSION)
    builder.add(p.TYPE, p.CELLS)
    builder.add(p.ACQUISITION, acquisition)
    builder.add(p.DTYPE, dtype)
    builder.add(p.CHANNELS, [int(c) for c in channels])
    builder.add(p.SHAPE, [int(v) for v in shape])
    builder.add_column(p.EVENT_IDS, p.UINT64, n)
    builder.add_column(p.CAPTURE_NS, p.INT64, n)
    if deadline:
        builder.add_column(p.DEADLINE_NS, p.INT64, n)
    for key, value in (extra or {}).items():
        builder.add(key, value)
    for key, inner in (maps or {}).items():
        builder.add_map(key, inner)
    return builder.build()


class CellsEncoder:
    """Builds `cells` messages for one acquisition, channel list, image size and dtype.

    ``encode`` returns the two frames to send (``socket.send_multipart(frames, copy=False)``):
    the header bytes and the pixel array itself (sent from its buffer, not copied by Python).
    Headers come from :func:`cells_header`, one template per message size, rewritten per message.
    """

    def __init__(self, acquisition: str, channels: Sequence[int], image_size: tuple[int, int] | int,
                 dtype: str = p.NATIVE_DTYPE) -> None:
        if dtype not in p.DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(p.DTYPES)}, got {dtype!r}")
        height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
        self.acquisition = acquisition
        self.channels = tuple(int(c) for c in channels)
        self.image_shape = (len(self.channels), int(height), int(width))
        self.dtype_name = dtype
        self.dtype = p.DTYPES[dtype]
        self._templates: dict[tuple[int, bool], tuple[bytearray, dict[str, np.ndarray]]] = {}

    def encode(self, event_ids: Any, pixels: np.ndarray, capture_ns: Any = None,
               deadline_ns: Any = None) -> list[Any]:
        """Frames for ``pixels`` [N, C, H, W] (or one cell [C, H, W]) with their event ids.

        ``capture_ns`` (CLOCK_REALTIME ns, one value or N) defaults to now; ``deadline_ns`` is
        optional (one value for every cell or N).
        """
        if pixels.ndim == 3:
            pixels = pixels[None]
        n = pixels.shape[0]
        if pixels.shape[1:] != self.image_shape:
            raise ValueError(f"pixels must be shaped [N, {', '.join(map(str, self.image_shape))}], got {list(pixels.shape)}")
        pixels = np.ascontiguousarray(pixels, self.dtype)
        ids = np.asarray(event_ids, p.UINT64).reshape(-1)
        if len(ids) != n:
            raise ValueError(f"{len(ids)} event ids for {n} cells")
        key = (n, deadline_ns is not None)
        template = self._templates.get(key)
        if template is None:
            template = self._templates[key] = cells_header(self.acquisition, self.channels, (n, *self.image_shape),
                                                           self.dtype_name, deadline=deadline_ns is not None)
        header, views = template
        views[p.EVENT_IDS][:] = ids
        views[p.CAPTURE_NS][:] = time.time_ns() if capture_ns is None else capture_ns
        if deadline_ns is not None:
            views[p.DEADLINE_NS][:] = deadline_ns
        return [bytes(header), pixels]


def encode_cells(acquisition: str, event_ids: Any, pixels: np.ndarray, channels: Sequence[int],
                 capture_ns: Any = None, deadline_ns: Any = None, dtype: str | None = None) -> list[Any]:
    """One-off `cells` message (build a :class:`CellsEncoder` to send many)."""
    if dtype is None:
        dtype = next((name for name, dt in p.DTYPES.items() if dt == pixels.dtype.newbyteorder("<")), p.NATIVE_DTYPE)
    encoder = CellsEncoder(acquisition, channels, tuple(pixels.shape[-2:]), dtype)
    return encoder.encode(event_ids, pixels, capture_ns, deadline_ns)


def encode_end(acquisition: str) -> list[bytes]:
    return [_packb({p.VERSION: p.PROTOCOL_VERSION, p.TYPE: p.END, p.ACQUISITION: acquisition})]


def encode_ping(nonce: Any = None, acquisition: str | None = None) -> list[bytes]:
    header: dict[str, Any] = {p.VERSION: p.PROTOCOL_VERSION, p.TYPE: p.PING, p.NONCE: nonce}
    if acquisition is not None:
        header[p.ACQUISITION] = acquisition
    return [_packb(header)]


def encode_decisions(worker: str, seq: int, acquisition: str, bundle: str, columns: Sequence[list[Any]]) -> bytes:
    """A `decisions` message: ``columns`` holds one list per name of DECISION_COLUMNS, in that order."""
    if len(columns) != len(p.DECISION_COLUMNS):
        raise ValueError(f"{len(columns)} columns given, a decisions message has {len(p.DECISION_COLUMNS)}")
    header = {
        p.VERSION: p.PROTOCOL_VERSION, p.TYPE: p.DECISIONS, p.WORKER: worker, p.SEQ: seq,
        p.ACQUISITION: acquisition, p.BUNDLE: bundle, p.COUNT: len(columns[0]), p.SENT_NS: time.time_ns(),
    }
    header.update(zip(p.DECISION_COLUMNS, columns))
    return msgpack.packb(header, use_bin_type=True, use_single_float=True)


def encode_message(message_type: str, worker: str, seq: int, fields: dict[str, Any]) -> bytes:
    """Any other outgoing message (``end`` report, ``pong``)."""
    header = {p.VERSION: p.PROTOCOL_VERSION, p.TYPE: message_type, p.WORKER: worker, p.SEQ: seq,
              p.SENT_NS: time.time_ns()}
    header.update(fields)
    return msgpack.packb(header, use_bin_type=True)


def _floats(values: list[Any]) -> np.ndarray:
    return np.array([NAN if v is None else v for v in values], np.float32)


# How each decision column is read back, in DECISION_COLUMNS order.
_COLUMN_READERS: dict[str, Any] = {
    "event_ids": lambda v: np.array(v, np.uint64), "label": list, "probability": _floats,
    "dead": lambda v: np.array(v, bool), "dead_score": _floats, "gate": list,
    "stream": lambda v: np.array(v, np.int64), "late": lambda v: np.array(v, bool),
    "latency_us": lambda v: np.array(v, np.int64), "error": list,
}
assert tuple(_COLUMN_READERS) == p.DECISION_COLUMNS


def decode_output(frames: Sequence[Any]) -> p.Decisions | dict[str, Any]:
    """An outgoing message as a consumer sees it: :class:`Decisions` for `decisions`, else the header map."""
    header = msgpack.unpackb(memoryview(frames[0]), raw=False)
    if not isinstance(header, dict) or header.get(p.VERSION) not in p.SUPPORTED_VERSIONS:
        raise ValueError(f"unsupported protocol version {header.get(p.VERSION) if isinstance(header, dict) else header!r}")
    if header.get(p.TYPE) != p.DECISIONS:
        return header
    return p.Decisions(
        worker=header[p.WORKER], seq=header[p.SEQ], acquisition=header[p.ACQUISITION], sent_ns=header[p.SENT_NS],
        bundle=header[p.BUNDLE], **{name: read(header[name]) for name, read in _COLUMN_READERS.items()},
    )


# ---------------------------------------------------------------------------- decoding

def _int_column(value: Any, dtype: np.dtype, field: str, count: int | None) -> np.ndarray:
    """A column of ints given as a msgpack array of ints or as bin of little-endian 8-byte values."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        if len(value) % 8:
            raise ValueError(f"{field} is {len(value)} bytes of binary, not a whole number of 8-byte values")
        column = np.frombuffer(value, dtype)
    elif isinstance(value, (list, tuple)):
        if not all(type(v) is int for v in value):
            raise ValueError(f"{field} must hold integers only")
        try:
            column = np.array(value, dtype)
        except (OverflowError, ValueError) as exc:
            raise ValueError(f"{field} holds a value out of range for {dtype.name}") from exc
    else:
        raise ValueError(f"{field} must be an array of integers or binary, got {type(value).__name__}")
    if count is not None and len(column) != count:
        raise ValueError(f"{field} has {len(column)} values, shape says N={count}")
    return column


def _known_ids(header: dict[str, Any], limits: Limits) -> np.ndarray | None:
    """The message's event ids where they can be read at all (to answer a rejected message): up to
    ``ANSWERED_IDS_FACTOR`` x max_cells of them, so a message just over the cell limit is still answered."""
    value = header.get(p.EVENT_IDS)
    try:
        ids = _int_column(value, p.UINT64, p.EVENT_IDS, None)
    except ValueError:
        return None
    return ids if 0 < len(ids) <= ANSWERED_IDS_FACTOR * limits.max_cells else None


def _acquisition(header: dict[str, Any], required: bool, event_ids: np.ndarray | None = None) -> str | None:
    value = header.get(p.ACQUISITION)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not 0 < len(value) <= MAX_ACQUISITION_CHARS:
        raise Rejected(Reason.BAD_FIELD if p.ACQUISITION in header else Reason.MISSING_FIELD,
                       f"{p.ACQUISITION} must be a non-empty string of at most {MAX_ACQUISITION_CHARS} characters",
                       None, event_ids)
    return value


def decode_header(frame: Any, limits: Limits = DEFAULT_LIMITS) -> dict[str, Any]:
    """The header map of an ingest message, version-checked; Rejected when unreadable."""
    view = memoryview(frame)
    if view.nbytes > limits.max_header_bytes:
        raise Rejected(Reason.OVERSIZED, f"header frame of {view.nbytes} bytes exceeds {limits.max_header_bytes}")
    try:
        header = msgpack.unpackb(view, raw=False)
    except Exception as exc:  # msgpack raises many types for garbage; all mean the same here
        raise Rejected(Reason.MALFORMED, f"header is not valid msgpack ({type(exc).__name__}: {exc})") from None
    if not isinstance(header, dict):
        raise Rejected(Reason.MALFORMED, f"header must be a msgpack map, got {type(header).__name__}")
    version = header.get(p.VERSION)
    if type(version) is not int or version not in p.SUPPORTED_VERSIONS:
        raise Rejected(
            Reason.UNSUPPORTED_VERSION,
            f"protocol version {version!r}; this flowsort speaks {', '.join(map(str, sorted(p.SUPPORTED_VERSIONS)))}",
            _safe_str(header.get(p.ACQUISITION)), _known_ids(header, limits),
        )
    return header


def _safe_str(value: Any) -> str | None:
    return value if isinstance(value, str) and len(value) <= MAX_ACQUISITION_CHARS else None


def decode_ingest(frames: Sequence[Any], limits: Limits = DEFAULT_LIMITS) -> p.IngestMessage:
    """Validate and decode one received multipart message; raises Rejected with the reason."""
    if not frames:
        raise Rejected(Reason.FRAME_COUNT, "empty multipart message")
    header = decode_header(frames[0], limits)
    kind = header.get(p.TYPE)
    if kind == p.CELLS:
        return _decode_cells(header, frames, limits)
    acquisition_hint = _safe_str(header.get(p.ACQUISITION))
    if kind == p.END:
        if len(frames) != 1:
            raise Rejected(Reason.FRAME_COUNT, f"an end message has 1 frame, got {len(frames)}", acquisition_hint)
        return p.EndMessage(_acquisition(header, required=True))
    if kind == p.PING:
        if len(frames) != 1:
            raise Rejected(Reason.FRAME_COUNT, f"a ping message has 1 frame, got {len(frames)}", acquisition_hint)
        nonce = header.get(p.NONCE)
        if not isinstance(nonce, (int, str, bytes, type(None))):
            raise Rejected(Reason.BAD_FIELD, "nonce must be an integer, a string, binary or nil", acquisition_hint)
        return p.PingMessage(nonce, _acquisition(header, required=False))
    raise Rejected(Reason.UNKNOWN_TYPE, f"unknown message type {kind!r} (expected {', '.join(sorted(p.INGEST_TYPES))})",
                   acquisition_hint, _known_ids(header, limits))


def _decode_cells(header: dict[str, Any], frames: Sequence[Any], limits: Limits) -> p.CellsMessage:
    # Every message of a flood passes here: the checks are written out (no generators, one pass each) and the
    # event ids a rejection answers are read only when there is a rejection.
    def reject(reason: str, detail: str) -> Rejected:
        return Rejected(reason, detail, _safe_str(header.get(p.ACQUISITION)), _known_ids(header, limits))

    if not _CELLS_REQUIRED <= header.keys():
        missing = [key for key in p.CELLS_REQUIRED if key not in header]
        raise reject(Reason.MISSING_FIELD, f"a cells message needs {', '.join(missing)}")
    acquisition = header[p.ACQUISITION]
    if type(acquisition) is not str or not 0 < len(acquisition) <= MAX_ACQUISITION_CHARS:
        _acquisition(header, required=True, event_ids=_known_ids(header, limits))
    data = memoryview(frames[1]) if len(frames) == 2 else None
    total = (data.nbytes if data is not None else sum(memoryview(frame).nbytes for frame in frames[1:])) \
        + memoryview(frames[0]).nbytes
    if total > limits.max_message_bytes:
        raise reject(Reason.OVERSIZED, f"message of {total} bytes exceeds max_message_bytes {limits.max_message_bytes}")

    shape = header[p.SHAPE]
    if type(shape) is not list or len(shape) != 4 or not _non_negative_ints(shape):
        raise reject(Reason.BAD_SHAPE, f"shape must be 4 non-negative integers [N, C, H, W], got {shape!r}")
    n, c, h, w = shape
    if n == 0:
        raise reject(Reason.NO_CELLS, "N = 0: a cells message must carry at least one cell")
    if n > limits.max_cells:
        raise reject(Reason.TOO_MANY_CELLS, f"N = {n} exceeds max_cells_per_message {limits.max_cells}")
    if not 1 <= c <= MAX_CHANNELS or not 1 <= h <= limits.max_side or not 1 <= w <= limits.max_side:
        raise reject(Reason.BAD_SHAPE, f"shape {shape}: C must be 1..{MAX_CHANNELS}, H and W 1..{limits.max_side}")
    event_ids, capture_ns = header[p.EVENT_IDS], header[p.CAPTURE_NS]
    try:
        # The usual case, both columns as bin of exactly N values, without the general reader's checks.
        if type(event_ids) is bytes and type(capture_ns) is bytes and len(event_ids) == len(capture_ns) == 8 * n:
            event_ids, capture_ns = np.frombuffer(event_ids, p.UINT64), np.frombuffer(capture_ns, p.INT64)
        else:
            event_ids = _int_column(event_ids, p.UINT64, p.EVENT_IDS, n)
            capture_ns = _int_column(capture_ns, p.INT64, p.CAPTURE_NS, n)
    except ValueError as exc:
        raise reject(Reason.BAD_FIELD, str(exc)) from None

    dtype_name = header[p.DTYPE]
    dtype = p.DTYPES.get(dtype_name) if type(dtype_name) is str else None
    if dtype is None:
        raise reject(Reason.BAD_DTYPE, f"dtype {dtype_name!r} is not one of {', '.join(p.DTYPES)} (little-endian)")
    channels = header[p.CHANNELS]
    if type(channels) is not list or not _ints(channels):
        raise reject(Reason.BAD_FIELD, f"channels must be an array of integers, got {channels!r}")
    if len(channels) != c:
        raise reject(Reason.CHANNEL_MISMATCH, f"channels lists {len(channels)} numbers but shape has C = {c}")
    if len(set(channels)) != c:
        raise reject(Reason.CHANNEL_MISMATCH, f"channels {channels} repeats a channel")

    deadline: int | np.ndarray | None = header.get(p.DEADLINE_NS)
    if deadline is not None and type(deadline) is not int:
        try:
            deadline = _int_column(deadline, p.INT64, p.DEADLINE_NS, n)
        except ValueError as exc:
            raise reject(Reason.BAD_FIELD, f"{exc} (deadline_ns is one integer or N)") from None
    elif type(deadline) is int and not -(1 << 63) <= deadline < (1 << 63):
        raise reject(Reason.BAD_FIELD, "deadline_ns is out of the int64 range")

    if data is None:
        raise reject(Reason.FRAME_COUNT, f"a cells message has 2 frames (header, pixels), got {len(frames)}")
    expected = n * c * h * w * dtype.itemsize
    if data.nbytes != expected:
        raise reject(Reason.LENGTH_MISMATCH,
                     f"pixel frame has {data.nbytes} bytes; shape {shape} of {dtype_name} needs {expected}")
    pixels = np.ndarray((n, c, h, w), dtype, data)
    return p.CellsMessage(acquisition, event_ids, capture_ns, pixels, dtype_name, tuple(channels), deadline)


def _ints(values: list[Any]) -> bool:
    for value in values:
        if type(value) is not int:
            return False
    return True


def _non_negative_ints(values: list[Any]) -> bool:
    for value in values:
        if type(value) is not int or value < 0:
            return False
    return True
