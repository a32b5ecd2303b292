"""Wire protocol v1: encoding, decoding and every validation rule (no sockets)."""

from __future__ import annotations

import math

import msgpack
import numpy as np
import pytest

from streamer import codec
from streamer import protocol as p
from streamer.codec import Limits, decode_ingest
from streamer.protocol import Reason, Rejected


def cells(n: int = 3, c: int = 2, size: int = 8, dtype: str = "uint16") -> np.ndarray:
    rng = np.random.default_rng(n)
    return rng.integers(0, 4000, (n, c, size, size)).astype(p.DTYPES[dtype])


def header(**overrides: object) -> dict:
    base = {"version": 1, "type": "cells", "acquisition": "acq-1", "event_ids": [10, 11], "capture_ns": [1, 2],
            "shape": [2, 2, 4, 4], "dtype": "uint16", "channels": [3, 6]}
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def frames(head: dict, pixels: bytes | None = None) -> list[bytes]:
    if pixels is None:
        pixels = bytes(2 * 2 * 4 * 4 * 2)
    return [msgpack.packb(head, use_bin_type=True), pixels]


def rejected(frame_list: list, limits: Limits = codec.DEFAULT_LIMITS) -> Rejected:
    with pytest.raises(Rejected) as info:
        decode_ingest(frame_list, limits)
    return info.value


def test_encoder_round_trip_with_prebuilt_header() -> None:
    encoder = codec.CellsEncoder("run-7", (3, 6), 8)
    pixels = cells(5)
    sent = encoder.encode(np.arange(100, 105), pixels, capture_ns=123, deadline_ns=[9, 8, 7, 6, 5])
    # The pre-built header is plain msgpack any library reads.
    plain = msgpack.unpackb(sent[0], raw=False)
    assert plain["version"] == 1 and plain["type"] == "cells" and plain["shape"] == [5, 2, 8, 8]
    message = decode_ingest([sent[0], memoryview(sent[1]).cast("B")])
    assert isinstance(message, p.CellsMessage)
    assert message.acquisition == "run-7" and message.channels == (3, 6) and message.dtype == "uint16"
    np.testing.assert_array_equal(message.event_ids, np.arange(100, 105))
    np.testing.assert_array_equal(message.capture_ns, [123] * 5)
    np.testing.assert_array_equal(message.deadline_ns, [9, 8, 7, 6, 5])
    np.testing.assert_array_equal(message.pixels, pixels)


def test_single_cell_and_array_columns_from_a_plain_sender() -> None:
    # What a C or LabVIEW sender writes: arrays of ints, one cell, one deadline for all.
    head = header(event_ids=[42], capture_ns=[1_700_000_000_000_000_000], shape=[1, 2, 4, 4], deadline_ns=5)
    message = decode_ingest(frames(head, bytes(2 * 4 * 4 * 2)))
    assert message.count == 1 and int(message.event_ids[0]) == 42 and message.deadline_ns == 5
    assert message.pixels.shape == (1, 2, 4, 4)


def test_pixels_are_a_view_not_a_copy() -> None:
    buffer = bytearray(2 * 2 * 4 * 4 * 2)
    message = decode_ingest([msgpack.packb(header()), buffer])
    buffer[0] = 7
    assert message.pixels[0, 0, 0, 0] == 7


def test_end_and_ping() -> None:
    end = decode_ingest(codec.encode_end("acq-9"))
    assert isinstance(end, p.EndMessage) and end.acquisition == "acq-9"
    ping = decode_ingest(codec.encode_ping(nonce=17))
    assert isinstance(ping, p.PingMessage) and ping.nonce == 17


@pytest.mark.parametrize(
    ("head", "pixels", "reason", "ids_known"),
    [
        (None, None, Reason.MALFORMED, False),
        ([1, 2, 3], None, Reason.MALFORMED, False),
        (header(version=2), None, Reason.UNSUPPORTED_VERSION, True),
        (header(version=None), None, Reason.UNSUPPORTED_VERSION, True),
        (header(version="1"), None, Reason.UNSUPPORTED_VERSION, True),
        (header(type="cellz"), None, Reason.UNKNOWN_TYPE, True),
        (header(capture_ns=None), None, Reason.MISSING_FIELD, True),
        (header(acquisition=""), None, Reason.BAD_FIELD, True),
        (header(event_ids=[1, -2]), None, Reason.BAD_FIELD, False),
        (header(event_ids=[1, 2.5]), None, Reason.BAD_FIELD, False),
        (header(event_ids=[1, 2, 3]), None, Reason.BAD_FIELD, True),
        (header(capture_ns="now"), None, Reason.BAD_FIELD, True),
        (header(shape=[2, 2, 4]), None, Reason.BAD_SHAPE, True),
        (header(shape=[2, 2, 0, 4]), None, Reason.BAD_SHAPE, True),
        (header(shape=[0, 2, 4, 4], event_ids=[], capture_ns=[]), b"", Reason.NO_CELLS, False),
        (header(shape=[10**12, 2, 4, 4]), None, Reason.TOO_MANY_CELLS, True),
        (header(dtype="int32"), None, Reason.BAD_DTYPE, True),
        (header(dtype="float64"), None, Reason.BAD_DTYPE, True),
        (header(channels=[3]), None, Reason.CHANNEL_MISMATCH, True),
        (header(channels=[3, 3]), None, Reason.CHANNEL_MISMATCH, True),
        (header(deadline_ns="soon"), None, Reason.BAD_FIELD, True),
        (header(), bytes(100), Reason.LENGTH_MISMATCH, True),
    ],
)
def test_rejections_name_the_reason_and_keep_known_ids(head, pixels, reason, ids_known) -> None:
    if head is None:
        frame_list = [b"\xc1 not msgpack", bytes(64)]
    else:
        frame_list = [msgpack.packb(head, use_bin_type=True), bytes(2 * 2 * 4 * 4 * 2) if pixels is None else pixels]
    error = rejected(frame_list)
    assert error.reason == reason, error
    assert error.detail
    if ids_known:
        assert error.event_ids is not None and len(error.event_ids) >= 1
    else:
        assert error.event_ids is None


def test_frame_count_and_oversized() -> None:
    assert rejected([msgpack.packb(header())]).reason == Reason.FRAME_COUNT
    assert rejected([*frames(header()), b"extra"]).reason == Reason.FRAME_COUNT
    assert rejected([]).reason == Reason.FRAME_COUNT
    small = Limits(max_message_bytes=64)
    error = rejected(frames(header()), small)
    assert error.reason == Reason.OVERSIZED and list(error.event_ids) == [10, 11]
    assert rejected([bytes(2048), b""], Limits(max_header_bytes=1024)).reason == Reason.OVERSIZED


def test_absurd_n_is_rejected_before_anything_is_allocated() -> None:
    error = rejected(frames(header(shape=[2**40, 2, 1024, 1024]), b""))
    assert error.reason == Reason.TOO_MANY_CELLS


def test_float_and_uint8_are_accepted_as_declared() -> None:
    pixels = cells(2, size=4, dtype="float32")
    message = decode_ingest(frames(header(dtype="float32"), pixels.tobytes()))
    assert message.dtype == "float32" and message.pixels.dtype == np.float32
    pixels8 = cells(2, size=4, dtype="uint8")
    assert decode_ingest(frames(header(dtype="uint8"), pixels8.tobytes())).pixels.dtype == np.uint8


def test_decisions_encode_and_decode() -> None:
    nan = float("nan")
    columns = {
        "event_ids": [1, 2], "label": ["G1", ""], "probability": [0.75, nan], "dead": [False, False],
        "dead_score": [1.5, nan], "gate": ["g", ""], "stream": [2, 0], "late": [False, True],
        "latency_us": [120, 80], "error": ["", "bad_dtype"],
    }
    payload = codec.encode_decisions("w1", 5, "acq", "abc", [columns[name] for name in p.DECISION_COLUMNS])
    raw = msgpack.unpackb(payload, raw=False)
    assert set(p.DECISION_COLUMNS) <= set(raw) and raw["count"] == 2 and raw["type"] == "decisions"
    decoded = codec.decode_output([payload])
    assert isinstance(decoded, p.Decisions)
    assert decoded.worker == "w1" and decoded.seq == 5 and decoded.count == 2
    assert decoded.label == ["G1", ""] and decoded.gate == ["g", ""] and decoded.error == ["", "bad_dtype"]
    assert decoded.probability[0] == pytest.approx(0.75) and math.isnan(decoded.probability[1])
    assert list(decoded.late) == [False, True] and list(decoded.stream) == [2, 0]
    with pytest.raises(ValueError, match="columns"):
        codec.encode_decisions("w1", 6, "acq", "abc", [[1]])


def test_one_cells_header_builder_for_the_encoder_and_templates() -> None:
    """CellsEncoder's messages and the bench's patchable templates come from cells_header, and decode as sent."""
    pixels = np.arange(2 * 2 * 4 * 4, dtype=np.uint16).reshape(2, 2, 4, 4)
    encoder = codec.CellsEncoder("acq", [3, 6], 4)
    first = codec.decode_ingest(encoder.encode([7, 8], pixels, capture_ns=[100, 200], deadline_ns=300))
    second = codec.decode_ingest(encoder.encode([9, 10], pixels, capture_ns=[400, 500]))  # same size, no deadline
    assert list(first.event_ids) == [7, 8] and list(first.capture_ns) == [100, 200]
    assert list(first.deadline_ns) == [300, 300] and second.deadline_ns is None and list(second.event_ids) == [9, 10]
    inner = codec.HeaderBuilder()
    inner.add("note", "x")
    inner.add_column("flag", np.dtype("u1"), 2, "x_flag")
    header, views = codec.cells_header("acq", [3, 6], (2, 2, 4, 4), deadline=True, maps={"x_extra": inner})
    views[p.EVENT_IDS][:] = [1, 2]
    views[p.CAPTURE_NS][:] = [5, 6]
    views[p.DEADLINE_NS][:] = [9, 9]
    views["x_flag"][:] = [1, 0]
    message = codec.decode_ingest([bytes(header), pixels.tobytes()])
    assert list(message.event_ids) == [1, 2] and list(message.deadline_ns) == [9, 9]
    assert msgpack.unpackb(bytes(header), raw=False)["x_extra"] == {"note": "x", "flag": b"\x01\x00"}

def test_output_of_unknown_version_is_refused() -> None:
    with pytest.raises(ValueError, match="version"):
        codec.decode_output([msgpack.packb({"version": 9, "type": "decisions"})])
