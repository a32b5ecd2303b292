"""Ground truth of acquisition files: truth records, and reading a whole file with its truth.

The record layout is :mod:`streamer.recording`'s; this module speaks what the
truth records and the ``x_truth`` header key hold. Ground truth travels two
ways, both invisible to the service:

* in an acquisition file, as truth records (kind 3 of :mod:`streamer.recording`):
  a msgpack map with ``acquisition``, ``event_ids`` and the columns of
  :class:`Truth`;
* on the wire, as an extra ``x_truth`` key in a ``cells`` header (the protocol
  ignores unknown keys), holding the same columns for the message's cells. The
  simulator adds it with ``--truth-in-messages``; ``flowsort record`` turns it
  into truth records.

:func:`read_recording` gives every message of a file, decoded where it is a
valid cells message, with a :class:`TruthIndex` of the truth it carries;
:func:`recorded_cells` gives the cells of those messages as one array, each
with its acquisition, event id and truth.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

from flowsort.errors import UserError
from streamer import protocol as p
from streamer.codec import decode_ingest
from streamer.protocol import Rejected
from streamer.recording import KIND_MESSAGE, KIND_TRUTH, AcquisitionReader, AcquisitionWriter

TRUTH_KEY = "x_truth"
TRUTH_KEY_BYTES = msgpack.packb(TRUTH_KEY)
TRUTH_CHUNK = 4096  # cells per truth record

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Truth:
    """What each cell really is: ``label`` indexes ``class_names`` (-1 unknown); dead and debris when known."""

    class_names: tuple[str, ...]
    label: np.ndarray  # int16 [N]
    dead: np.ndarray | None = None  # bool [N]
    debris: np.ndarray | None = None  # bool [N]

    def __len__(self) -> int:
        return len(self.label)

    def fields(self) -> dict[str, Any]:
        """The msgpack-ready columns (truth records and ``x_truth``)."""
        out: dict[str, Any] = {"class_names": list(self.class_names),
                               "label": np.ascontiguousarray(self.label, "<i2").tobytes()}
        for name in ("dead", "debris"):
            value = getattr(self, name)
            if value is not None:
                out[name] = np.ascontiguousarray(value, np.uint8).tobytes()
        return out

    @classmethod
    def from_fields(cls, fields: dict[str, Any]) -> Truth:
        names = tuple(fields["class_names"])
        label = np.frombuffer(fields["label"], "<i2").astype(np.int16)
        flags = {name: np.frombuffer(fields[name], np.uint8).astype(bool) for name in ("dead", "debris")
                 if fields.get(name) is not None}
        for name, value in flags.items():
            if len(value) != len(label):
                raise ValueError(f"truth column {name} has {len(value)} values for {len(label)} cells")
        return cls(names, label, flags.get("dead"), flags.get("debris"))

    def take(self, index: np.ndarray) -> Truth:
        return Truth(self.class_names, self.label[index],
                     None if self.dead is None else self.dead[index],
                     None if self.debris is None else self.debris[index])

    @staticmethod
    def concatenate(parts: Sequence[Truth]) -> Truth:
        """One truth for several parts; class indices are remapped onto the union of their class names."""
        names: list[str] = []
        for part in parts:
            names += [name for name in part.class_names if name not in names]
        labels = []
        for part in parts:
            mapping = np.array([names.index(name) for name in part.class_names] + [-1], np.int16)
            labels.append(mapping[part.label])  # label -1 picks the trailing -1
        n = [len(part) for part in parts]

        def flags(name: str) -> np.ndarray | None:
            if all(getattr(part, name) is None for part in parts):
                return None
            return np.concatenate([np.zeros(k, bool) if getattr(part, name) is None else getattr(part, name)
                                   for part, k in zip(parts, n)])

        label = np.concatenate(labels) if labels else np.zeros(0, np.int16)
        return Truth(tuple(names), label.astype(np.int16), flags("dead"), flags("debris"))


def truth_record(acquisition: str, event_ids: np.ndarray, truth: Truth) -> dict[str, Any]:
    return {p.ACQUISITION: acquisition, p.EVENT_IDS: np.ascontiguousarray(event_ids, "<u8").tobytes(),
            **truth.fields()}


def write_truth(writer: AcquisitionWriter, acquisition: str, event_ids: np.ndarray, truth: Truth,
                chunk: int = TRUTH_CHUNK) -> None:
    """Truth records for ``event_ids`` (in chunks, so no record grows large)."""
    for start in range(0, len(event_ids), chunk):
        index = np.arange(start, min(start + chunk, len(event_ids)))
        writer.write_truth(truth_record(acquisition, event_ids[index], truth.take(index)))


def header_truth(header: dict[str, Any], count: int) -> Truth | None:
    """The ``x_truth`` of a decoded cells header, or None (absent or unreadable)."""
    fields = header.get(TRUTH_KEY)
    if not isinstance(fields, dict):
        return None
    try:
        truth = Truth.from_fields(fields)
    except (KeyError, TypeError, ValueError):
        return None
    return truth if len(truth) == count else None


class TruthIndex:
    """Truth of recorded cells, looked up by (acquisition, event id)."""

    def __init__(self) -> None:
        self._parts: dict[str, list[tuple[np.ndarray, Truth]]] = {}

    def add(self, acquisition: str, event_ids: np.ndarray, truth: Truth) -> None:
        self._parts.setdefault(acquisition, []).append((np.asarray(event_ids, np.uint64), truth))

    def __bool__(self) -> bool:
        return bool(self._parts)

    def lookup(self, acquisition: Sequence[str], event_ids: np.ndarray) -> Truth | None:
        """Truth for each cell (acquisition per cell, event ids); label -1 where not known."""
        if not self._parts:
            return None
        merged = {name: (np.concatenate([ids for ids, _ in parts]), Truth.concatenate([t for _, t in parts]))
                  for name, parts in self._parts.items()}
        everything = Truth.concatenate([truth for _, truth in merged.values()])
        names = everything.class_names
        n = len(event_ids)
        label = np.full(n, -1, np.int16)
        dead = np.zeros(n, bool) if everything.dead is not None else None
        debris = np.zeros(n, bool) if everything.debris is not None else None
        acquisition = np.asarray(acquisition, dtype=object)
        for name, (ids, truth) in merged.items():
            mine = np.flatnonzero(acquisition == name)
            if not len(mine):
                continue
            order = np.argsort(ids, kind="stable")
            position = np.searchsorted(ids[order], event_ids[mine])
            position = np.minimum(position, len(ids) - 1)
            found = ids[order][position] == event_ids[mine]
            source = order[position[found]]
            cells = mine[found]
            mapping = np.array([names.index(c) for c in truth.class_names] + [-1], np.int16)
            label[cells] = mapping[truth.label[source]]
            if dead is not None and truth.dead is not None:
                dead[cells] = truth.dead[source]
            if debris is not None and truth.debris is not None:
                debris[cells] = truth.debris[source]
        return Truth(names, label, dead, debris)


@dataclass
class RecordedMessage:
    time_ns: int
    frames: list[bytes]
    decoded: p.CellsMessage | None  # None: not a valid cells message (sent as recorded)
    header: dict[str, Any] | None  # the cells header map, when decoded


@dataclass
class Recording:
    path: Path
    messages: list[RecordedMessage]
    truth: TruthIndex
    tail: str | None  # why the file's end was not readable (a torn last record), or None


def read_recording(path: str | Path) -> Recording:
    """Every message of an acquisition file (decoded where it is a valid cells message) and its truth.

    A torn or corrupt tail is tolerated: the records before it are used (and the reason kept).
    """
    reader = AcquisitionReader(path)
    messages: list[RecordedMessage] = []
    truth = TruthIndex()
    for record in reader:
        if record.kind == KIND_TRUTH:
            try:
                fields = record.header
                truth.add(fields[p.ACQUISITION], np.frombuffer(fields[p.EVENT_IDS], "<u8"), Truth.from_fields(fields))
            except Exception as exc:  # a foreign or damaged truth record: the cells are still usable
                log.warning("%s: skipping an unreadable truth record at byte %d (%s)", path, record.offset, exc)
            continue
        if record.kind != KIND_MESSAGE:
            continue
        decoded = header = None
        try:
            message = decode_ingest(record.frames)
        except Rejected:
            message = None
        if isinstance(message, p.CellsMessage):
            decoded = message
            header = msgpack.unpackb(record.frames[0], raw=False)
            carried = header_truth(header, message.count)
            if carried is not None:
                truth.add(message.acquisition, message.event_ids, carried)
        messages.append(RecordedMessage(record.time_ns, record.frames, decoded, header))
    return Recording(Path(path), messages, truth, reader.scan.tail)


@dataclass(frozen=True)
class RecordedCells:
    """The cells of an acquisition file's valid cells messages, in file order."""

    images: np.ndarray  # uint16 [N, C, H, W]
    channels: tuple[int, ...]
    acquisitions: list[str]  # per cell
    event_ids: np.ndarray  # uint64 [N]
    truth: Truth | None  # per cell, label -1 where unknown; None: the file carries no truth

    def __len__(self) -> int:
        return len(self.images)


def recorded_cells(path: str | Path) -> RecordedCells:
    """Every cell of an acquisition file's valid cells messages as uint16 (float32 pixels rounded and clipped).

    Cells of one array share channels and size: a file that mixes them is refused.
    """
    parts: list[np.ndarray] = []
    acquisitions: list[str] = []
    ids: list[np.ndarray] = []
    channels: tuple[int, ...] | None = None
    shape: tuple[int, ...] | None = None
    recording = read_recording(path)
    for message in recording.messages:
        cells = message.decoded
        if cells is None:
            continue
        pixels = cells.pixels if cells.dtype == p.NATIVE_DTYPE else p.to_native(cells.pixels)
        if channels is None:
            channels, shape = cells.channels, pixels.shape[1:]
        elif cells.channels != channels or pixels.shape[1:] != shape:
            raise UserError(f"{path}: cells with different channels or sizes ({list(cells.channels)} "
                            f"{list(pixels.shape[1:])} after {list(channels)} {list(shape)})")
        parts.append(np.asarray(pixels))
        acquisitions += [cells.acquisition] * cells.count
        ids.append(cells.event_ids)
    if channels is None:
        raise UserError(f"{path} holds no valid cells messages")
    event_ids = np.concatenate(ids).astype(np.uint64, copy=False)
    images = np.ascontiguousarray(np.concatenate(parts), np.uint16)
    truth = recording.truth.lookup(acquisitions, event_ids) if recording.truth else None
    return RecordedCells(images, channels, acquisitions, event_ids, truth)
