"""Acquisition files: append-only, checksummed records that survive a crash mid-write."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from flowsort.errors import UserError
from streamer import codec
from streamer.codec import decode_ingest
from streamer.recording import (
    KIND_HEADER,
    KIND_MESSAGE,
    PREFIX,
    AcquisitionReader,
    AcquisitionWriter,
    scan_file,
)


def messages(n: int) -> list[list[bytes]]:
    encoder = codec.CellsEncoder("acq", (3, 6), 8)
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        frames = encoder.encode([i], rng.integers(0, 4000, (1, 2, 8, 8)).astype(np.uint16), capture_ns=i)
        out.append([frames[0], frames[1].tobytes()])
    return out


def write(path: Path, items: list[list[bytes]]) -> None:
    with AcquisitionWriter(path, {"worker": "test"}) as writer:
        for i, frames in enumerate(items):
            writer.write(frames, time_ns=1000 + i)


def test_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "a.fsacq"
    items = messages(5) + [[b"\xc1garbage"]]  # malformed messages are recorded as received
    write(path, items)
    reader = AcquisitionReader(path)
    records = list(reader)
    assert records[0].kind == KIND_HEADER and records[0].header["format"] == "flowsort-acquisition"
    assert records[0].header["format_version"] == 1 and records[0].header["worker"] == "test"
    read = [(r.time_ns, r.frames) for r in records if r.kind == KIND_MESSAGE]
    assert [t for t, _ in read] == [1000 + i for i in range(6)]
    assert [f for _, f in read] == items
    assert reader.scan.intact and reader.scan.messages == 6
    # and they decode as the wire messages they were
    assert int(decode_ingest(read[2][1]).event_ids[0]) == 2


def test_every_truncation_of_the_last_record_is_detected(tmp_path: Path) -> None:
    path = tmp_path / "a.fsacq"
    write(path, messages(3))
    data = path.read_bytes()
    intact = scan_file(path)
    last_start = intact.valid_bytes - (len(data) - _record_start(data, 3))
    for cut in range(last_start + 1, len(data), 7):
        torn = tmp_path / "torn.fsacq"
        torn.write_bytes(data[:cut])
        scan = scan_file(torn)
        assert scan.tail is not None, cut
        assert scan.messages == 2 and scan.valid_bytes == last_start


def _record_start(data: bytes, index: int) -> int:
    """Byte offset of record ``index`` (0 = the header record)."""
    offset = 0
    for _ in range(index):
        _, length, _ = PREFIX.unpack_from(data, offset)
        offset += PREFIX.size + length
    return offset


def test_corrupt_byte_stops_reading_there(tmp_path: Path) -> None:
    path = tmp_path / "a.fsacq"
    write(path, messages(4))
    data = bytearray(path.read_bytes())
    data[_record_start(data, 3) + PREFIX.size + 20] ^= 0xFF
    path.write_bytes(bytes(data))
    scan = scan_file(path)
    assert scan.messages == 2 and scan.tail.startswith("corrupt")


def test_appending_after_a_crash_cuts_the_torn_tail(tmp_path: Path) -> None:
    path = tmp_path / "a.fsacq"
    write(path, messages(3))
    size = path.stat().st_size
    with path.open("r+b") as handle:
        handle.truncate(size - 5)
    write(path, messages(2))
    scan = scan_file(path)
    assert scan.intact and scan.messages == 2 + 2 and len(scan.headers) == 2


def test_not_an_acquisition_file(tmp_path: Path) -> None:
    path = tmp_path / "x.bin"
    path.write_bytes(b"hello world, not records" * 4)
    with pytest.raises(UserError, match="not a flowsort acquisition file"):
        scan_file(path)
    with pytest.raises(UserError):
        AcquisitionWriter(path)


WRITER = textwrap.dedent("""
    import sys, numpy as np
    from streamer.recording import AcquisitionWriter
    payload = np.arange(20000, dtype=np.uint16).tobytes()  # 40 kB records: a kill lands mid-write
    writer = AcquisitionWriter(sys.argv[1])
    print("ready", flush=True)
    i = 0
    while True:
        writer.write([i.to_bytes(8, "little"), payload])
        i += 1
""")


def test_kill_9_mid_write_leaves_a_readable_file(tmp_path: Path) -> None:
    path = tmp_path / "crash.fsacq"
    process = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE)
    try:
        assert process.stdout.readline().strip() == b"ready"
        time.sleep(0.3)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.kill()
        process.wait(10)
    reader = AcquisitionReader(path)
    count = 0
    for record in reader.messages():
        assert int.from_bytes(record[1][0], "little") == count  # every record before the tail, in order
        count += 1
    assert count > 0
    # whatever the tail looks like, appending continues from the last whole record
    with AcquisitionWriter(path) as writer:
        writer.write([b"after"])
    scan = scan_file(path)
    assert scan.intact and scan.messages == count + 1
