"""Acquisition files: every received ingest message, appended as it arrived.

``flowsort serve --record FILE`` writes them and ``flowsort replay`` (bench)
plays them back at their recorded pace. The format is append-only and made
to survive a crash: each record carries its length and a CRC32, so a record
torn by a kill -9 or a power cut is detected and every record before it
stays readable. Opening a file with a torn tail for appending cuts the tail
off first, so later records never sit behind garbage.

Layout (all integers little-endian)::

    record  = sync "FSAR" (4 bytes) | body length L (uint32) | CRC32 of body (uint32) | body (L bytes)
    body    = kind (uint8) | time_ns (int64, CLOCK_REALTIME) | frame count F (uint16)
              | F frame lengths (uint32 each) | the F frames, concatenated

Kind 1 is a header record, written first in every file and again at every
session that appends to it: one frame, a msgpack map with ``format``
("flowsort-acquisition"), ``format_version`` (1), ``protocol_version``,
``created_ns`` and, where known, ``worker`` and ``bundle``. Kind 2 is a
received message: its ZeroMQ frames exactly as they arrived (malformed ones
included), timed at receipt. Kind 3 is ground truth, written by the bench
(``flowsort import ... --to-acquisition``, ``flowsort record`` of a stream
that carries it) so replay can score sorting on cells whose classes are
known: one frame, a msgpack map with ``acquisition``, ``event_ids`` (bin,
uint64 little-endian), ``class_names`` (array of str), ``label`` (bin, int16:
an index into ``class_names``, -1 unknown) and optionally ``dead`` and
``debris`` (bin, one uint8 0/1 per cell); see :mod:`streamer.recording_truth`.
Readers skip kinds they do not use (:meth:`AcquisitionReader.messages`
yields kind 2 only), so truth never reaches the service or an FCS export.
"""

from __future__ import annotations

import logging
import os
import struct
import time
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import msgpack

from flowsort.errors import UserError
from streamer.protocol import PROTOCOL_VERSION

FORMAT = "flowsort-acquisition"
FORMAT_VERSION = 1
SYNC = b"FSAR"
PREFIX = struct.Struct("<4sII")  # sync, body length, crc32
BODY_HEAD = struct.Struct("<BqH")  # kind, time_ns, frame count
FRAME_LENGTH = struct.Struct("<I")
KIND_HEADER = 1
KIND_MESSAGE = 2
KIND_TRUTH = 3
MAX_FRAMES = 0xFFFF
MAX_BODY = 0xFFFFFFFF

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Record:
    kind: int
    time_ns: int
    frames: list[bytes]
    offset: int  # where the record starts in the file

    @property
    def header(self) -> dict[str, Any]:
        """The map of a header record."""
        return msgpack.unpackb(self.frames[0], raw=False)


@dataclass
class Scan:
    """What a file holds: records read, where the readable part ends and what follows it."""

    records: int = 0
    messages: int = 0
    valid_bytes: int = 0
    size: int = 0
    tail: str | None = None  # None, or why the bytes after valid_bytes were not readable
    headers: list[dict[str, Any]] = field(default_factory=list)

    @property
    def intact(self) -> bool:
        return self.tail is None


def _body_parts(kind: int, time_ns: int, frames: Sequence[Any]) -> tuple[list[Any], int, int]:
    if len(frames) > MAX_FRAMES:
        raise ValueError(f"{len(frames)} frames: a record holds at most {MAX_FRAMES}")
    views = [memoryview(frame).cast("B") for frame in frames]
    head = BODY_HEAD.pack(kind, time_ns, len(views)) + b"".join(FRAME_LENGTH.pack(v.nbytes) for v in views)
    length = len(head) + sum(v.nbytes for v in views)
    if length > MAX_BODY:
        raise ValueError(f"record of {length} bytes exceeds the format's 4 GiB limit")
    crc = zlib.crc32(head)
    for view in views:
        crc = zlib.crc32(view, crc)
    return [head, *views], length, crc


class AcquisitionReader:
    """Reads records in order and stops at the first one that is torn or corrupt (see ``scan``)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.scan = Scan()

    def __iter__(self) -> Iterator[Record]:
        scan = self.scan = Scan()
        try:
            handle: BinaryIO = self.path.open("rb")
        except OSError as exc:
            raise UserError(f"cannot open acquisition file {self.path}: {exc}") from None
        with handle:
            scan.size = os.fstat(handle.fileno()).st_size
            offset = 0
            while True:
                record, reason = _read_record(handle, offset, scan.size)
                if record is None:
                    scan.tail = reason
                    break
                if offset == 0 and (record.kind != KIND_HEADER or not _is_header(record)):
                    raise UserError(f"{self.path} is not a flowsort acquisition file (no header record)")
                if record.kind == KIND_HEADER:
                    scan.headers.append(record.header)
                else:
                    scan.messages += 1
                scan.records += 1
                offset = handle.tell()
                scan.valid_bytes = offset
                yield record
        if offset == 0 and scan.tail not in (None, "end"):
            raise UserError(f"{self.path} is not a flowsort acquisition file ({scan.tail} at its start)")
        if scan.tail == "end":
            scan.tail = None
        elif scan.tail:
            log.warning("%s: %s after %d records at byte %d of %d; the records before it are intact",
                        self.path, scan.tail, scan.records, scan.valid_bytes, scan.size)

    def messages(self) -> Iterator[tuple[int, list[bytes]]]:
        """(receipt time ns, frames) of every recorded message."""
        for record in self:
            if record.kind == KIND_MESSAGE:
                yield record.time_ns, record.frames


def _is_header(record: Record) -> bool:
    try:
        header = record.header
    except Exception:
        return False
    return isinstance(header, dict) and header.get("format") == FORMAT


def _read_record(handle: BinaryIO, offset: int, size: int) -> tuple[Record | None, str]:
    prefix = handle.read(PREFIX.size)
    if not prefix:
        return None, "end"
    if len(prefix) < PREFIX.size:
        return None, "truncated record"
    sync, length, crc = PREFIX.unpack(prefix)
    if sync != SYNC:
        return None, "bad sync marker (corrupt data)"
    if offset + PREFIX.size + length > size:
        return None, "truncated record"
    body = handle.read(length)
    if len(body) < length:
        return None, "truncated record"
    if zlib.crc32(body) != crc:
        last = offset + PREFIX.size + length == size
        return None, "torn record (CRC mismatch at the end)" if last else "corrupt record (CRC mismatch)"
    if length < BODY_HEAD.size:
        return None, "corrupt record (body too short)"
    kind, time_ns, count = BODY_HEAD.unpack_from(body)
    position = BODY_HEAD.size + FRAME_LENGTH.size * count
    if position > length:
        return None, "corrupt record (frame table)"
    lengths = struct.unpack_from(f"<{count}I", body, BODY_HEAD.size)
    if position + sum(lengths) != length:
        return None, "corrupt record (frame lengths)"
    frames = []
    for n in lengths:
        frames.append(body[position:position + n])
        position += n
    return Record(kind, time_ns, frames, offset), ""


def scan_file(path: str | Path) -> Scan:
    """Read through a file: counts, where its readable part ends, and what is wrong after that."""
    reader = AcquisitionReader(path)
    for _ in reader:
        pass
    return reader.scan


class AcquisitionWriter:
    """Appends records with one ``writev`` each, straight to the OS (a crash loses at most the record in flight)."""

    def __init__(self, path: str | Path, info: dict[str, Any] | None = None) -> None:
        self.path = Path(path)
        existing = self.path.exists() and self.path.stat().st_size > 0
        if existing:
            scan = scan_file(self.path)
            if scan.tail:
                log.warning("%s ends in a %s: cutting it off at byte %d before appending (%d records kept)",
                            self.path, scan.tail, scan.valid_bytes, scan.records)
                os.truncate(self.path, scan.valid_bytes)
        try:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as exc:
            raise UserError(f"cannot open {self.path} for recording: {exc}") from None
        self.size = os.fstat(self._fd).st_size
        self.records = 0
        header = {"format": FORMAT, "format_version": FORMAT_VERSION, "protocol_version": PROTOCOL_VERSION,
                  "created_ns": time.time_ns(), **(info or {})}
        self._append(KIND_HEADER, time.time_ns(), [msgpack.packb(header, use_bin_type=True)])

    def write(self, frames: Sequence[Any], time_ns: int | None = None) -> None:
        """Append one received message (its frames as bytes, memoryviews or zmq.Frame)."""
        self._append(KIND_MESSAGE, time.time_ns() if time_ns is None else time_ns, frames)
        self.records += 1

    def write_truth(self, fields: dict[str, Any], time_ns: int | None = None) -> None:
        """Append a ground-truth record (kind 3): ``fields`` packed as one msgpack map."""
        self._append(KIND_TRUTH, time.time_ns() if time_ns is None else time_ns,
                     [msgpack.packb(fields, use_bin_type=True)])

    def _append(self, kind: int, time_ns: int, frames: Sequence[Any]) -> None:
        if self._fd < 0:
            raise ValueError("the acquisition file is closed")
        parts, length, crc = _body_parts(kind, time_ns, frames)
        buffers = [PREFIX.pack(SYNC, length, crc), *parts]
        total = PREFIX.size + length
        try:
            written = os.writev(self._fd, buffers)
            if written < total:  # rare (a signal, a full disk): write the rest
                rest = b"".join(bytes(b) for b in buffers)[written:]
                while rest:
                    rest = rest[os.write(self._fd, rest):]
        except OSError:
            # Leave no torn record behind for the next one to hide behind.
            try:
                os.ftruncate(self._fd, self.size)
            except OSError:
                pass
            raise
        self.size += total

    def flush(self) -> None:
        if self._fd >= 0:
            os.fsync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> AcquisitionWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
