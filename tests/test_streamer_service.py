"""The service end to end, in process: real ZeroMQ sockets on loopback, a real bundle and engine.

One module-scoped service answers most tests (each test uses its own event ids
and looks at metric deltas); overload runs on a second one with a tiny queue.
"""

from __future__ import annotations

import itertools
import math
import threading
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import msgpack
import numpy as np
import pytest
import zmq
from prometheus_client import generate_latest

from engines.bundle import load_bundle
from streamer import codec
from streamer.capacity import SUSTAINED_SHARE
from streamer.client import Receiver, Sender
from streamer.emitter import DecisionBlock, Emitter
from streamer.metrics import Metrics, parse_text
from streamer.policy import NO_GATE, Policy
from streamer.protocol import Reason
from streamer.service import Service
from streamer.testing import make_config, metrics

MITOTIC = ["Prophase", "Metaphase", "Anaphase", "Telophase"]
ALL = ["G1", "S_phase", "G2", *MITOTIC]
CHANNELS = (3, 6)
_ids = itertools.count(1)


def new_ids(n: int) -> np.ndarray:
    start = next(_ids)
    for _ in range(n - 1):
        next(_ids)
    return np.arange(start, start + n, dtype=np.uint64)


@pytest.fixture(scope="module")
def cells() -> np.ndarray:
    from trainer.synthetic import generate

    return generate(256, seed=21, size=32, dead_fraction=0.1).images


class Harness:
    def __init__(self, service: Service, read_push: bool = True) -> None:
        self.service = service
        self.push = Receiver(service.endpoints["push"], "pull") if read_push else None
        self.pub = Receiver(service.endpoints["pub"], "sub")
        self.sender = Sender(service.endpoints["ingest"])
        self.health = service.endpoints["health"]
        self.handshake()

    def handshake(self) -> None:
        """Ping until both decision consumers are connected (PUSH drops while no peer is)."""
        for nonce in range(200):
            self.sender.ping(nonce)
            if self.pub.wait_other("pong", 0.05, nonce=nonce) and (
                    self.push is None or self.push.wait_other("pong", 0.05, nonce=nonce)):
                return
        raise TimeoutError("decision sockets never connected")

    def metrics(self) -> dict[str, float]:
        return metrics(self.health)

    def close(self) -> None:
        self.sender.close(linger=0)
        if self.push is not None:
            self.push.close()
        self.pub.close()
        self.service.stop()


def delta(after: dict[str, float], before: dict[str, float], key: str) -> float:
    return after.get(key, 0.0) - before.get(key, 0.0)


@pytest.fixture(scope="module")
def served(quick_bundle: Path) -> Harness:
    config = make_config(
        ingest={"max_message_bytes": 1 << 20, "hard_limit_factor": 2},
        deadline={"budget_us": 2_000_000.0},
        gates=[
            {"name": "mitotic", "classes": MITOTIC, "min_probability": 0.5, "stream": 1},
            {"name": "rest", "classes": ALL, "min_probability": 0.0, "stream": 2},
        ],
    )
    harness = Harness(Service(quick_bundle, config).start())
    yield harness
    harness.close()


def test_every_cell_gets_exactly_one_decision(served: Harness, cells: np.ndarray, quick_bundle: Path) -> None:
    import engines
    from engines.base import predict_all
    from streamer.testing import engine_for_tests

    sent: dict[int, int] = {}  # event id -> cell index
    single = new_ids(40)
    for i, event_id in enumerate(single):  # one cell per message
        served.sender.cells("acq-e2e", [event_id], cells[i], CHANNELS)
        sent[int(event_id)] = i
    for start in range(40, 70, 3):  # small blocks: merged into batches
        ids = new_ids(3)
        served.sender.cells("acq-e2e", ids, cells[start:start + 3], CHANNELS)
        sent.update({int(e): start + k for k, e in enumerate(ids)})
    big = new_ids(150)  # larger than the largest batch (64): split
    served.sender.cells("acq-e2e", big, cells[70:220], CHANNELS)
    sent.update({int(e): 70 + k for k, e in enumerate(big)})

    assert served.push.wait_for(sent, 30), f"missing {len(set(sent) - set(served.push.rows))} decisions"
    assert served.pub.wait_for(sent, 10)
    assert served.push.duplicates == 0
    rows = [served.push.rows[e] for e in sent]
    assert all(r["error"] == "" and r["acquisition"] == "acq-e2e" for r in rows)
    assert all(r["label"] in ALL and 0.0 <= r["probability"] <= 1.0 and r["latency_us"] > 0 for r in rows)

    # Same answers as the engine run offline on the same cells.
    bundle = load_bundle(quick_bundle)
    with engines.load(bundle, engine=engine_for_tests(), max_batch=64) as engine:
        reference = predict_all(engine, cells[:220])
    labels = np.array([bundle.class_names.index(served.push.rows[e]["label"]) for e in sent])
    expected = reference.probabilities.argmax(axis=1)[list(sent.values())]
    assert (labels == expected).mean() >= 0.97
    dead = np.array([served.push.rows[e]["dead"] for e in sent])
    expected_dead = (reference.dead_score > bundle.dead_threshold)[list(sent.values())]
    assert (dead == expected_dead).mean() >= 0.97

    # Gates: dead cells are not sorted; every other one-time cell is, on its gate's stream.
    for r in rows:
        if r["late"]:
            assert r["gate"] == ""
        elif r["dead"]:
            assert r["gate"] == "" and r["stream"] == 0
        else:
            assert r["gate"] in ("mitotic", "rest") and r["stream"] == {"mitotic": 1, "rest": 2}[r["gate"]]
        if r["gate"] == "" and not r["dead"]:
            assert r["late"]
        if r["label"] in MITOTIC and r["probability"] >= 0.5 and r["gate"]:
            assert r["gate"] == "mitotic"


def test_metrics_count_what_was_sent(served: Harness, cells: np.ndarray) -> None:
    before = served.metrics()
    ids = new_ids(60)
    for k in range(0, 60, 6):
        served.sender.cells("acq-metrics", ids[k:k + 6], cells[k:k + 6], CHANNELS)
    assert served.push.wait_for(ids, 30)
    after = served.metrics()
    rows = [served.push.rows[int(e)] for e in ids]
    assert delta(after, before, "flowsort_cells_received_total") == 60
    assert delta(after, before, 'flowsort_messages_received_total{type="cells"}') == 10
    for label, count in Counter(r["label"] for r in rows).items():
        assert delta(after, before, f'flowsort_cells_decided_total{{label="{label}"}}') == count
    for gate, count in Counter(r["gate"] for r in rows if r["gate"]).items():
        assert delta(after, before, f'flowsort_cells_sorted_total{{gate="{gate}"}}') == count
    assert delta(after, before, "flowsort_cells_dead_total") == sum(r["dead"] for r in rows)
    assert delta(after, before, "flowsort_decision_latency_seconds_count") == 60
    assert delta(after, before, "flowsort_batch_size_cells_sum") == 60
    assert after["flowsort_engine_seconds_count"] > 0
    assert after["flowsort_ready"] == 1 and after["flowsort_queue_depth"] == 0
    info = [k for k in after if k.startswith("flowsort_engine_info{")]
    assert info and 'bundle_hash="' in info[0] and f'engine="{served.service.model.engine.name}"' in info[0]
    # latency buckets span 50 us .. 100 ms
    assert 'flowsort_decision_latency_seconds_bucket{le="5e-05"}' in after
    assert 'flowsort_decision_latency_seconds_bucket{le="0.1"}' in after


def test_past_deadline_is_late_and_never_sorted(served: Harness, cells: np.ndarray) -> None:
    past, future = new_ids(5), new_ids(5)
    now = time.time_ns()
    served.sender.cells("acq-late", past, cells[:5], CHANNELS, deadline_ns=now - 1_000_000)
    served.sender.cells("acq-late", future, cells[:5], CHANNELS, deadline_ns=[now + 60 * 10**9] * 5)
    assert served.push.wait_for([*past, *future], 20)
    for e in past:
        row = served.push.rows[int(e)]
        assert row["late"] and row["gate"] == "" and row["stream"] == 0 and row["error"] == Reason.EXPIRED
    for e in future:
        row = served.push.rows[int(e)]
        assert not row["late"] and row["error"] == ""
        assert (row["gate"] != "") == (not row["dead"])


def test_emitter_marks_late_at_send_time() -> None:
    """A decision computed in time but leaving after its deadline goes out late and unsorted."""
    context = zmq.Context()
    try:
        push = context.socket(zmq.PUSH)
        port = push.bind_to_random_port("tcp://127.0.0.1")
        pull = context.socket(zmq.PULL)
        pull.connect(f"tcp://127.0.0.1:{port}")
        push.send(b"probe")  # blocks until the consumer is connected, so the emitter's NOBLOCK send finds it
        assert pull.recv() == b"probe"
        counted = Metrics()
        emitter = Emitter({"push": push}, counted, "w", margin_ns=0)
        policy = Policy(("A", "B"), make_config(gates=[{"name": "a", "classes": ["A"], "min_probability": 0.1}]).gates, 5.0)
        columns = policy.decide(np.array([[0.9, 0.1], [0.9, 0.1]], np.float32), np.zeros(2, np.float32))
        now = time.perf_counter_ns()
        deadlines = np.array([now - 1, now + 10**10], np.int64)
        emitter.post(DecisionBlock("acq", np.array([1, 2], np.uint64), now, deadlines, "h", policy, columns))
        assert pull.poll(5000)
        decisions = codec.decode_output(pull.recv_multipart())
        assert list(decisions.late) == [True, False] and decisions.gate == ["", "a"]
        assert list(decisions.stream) == [0, 1]
        assert columns.gate.tolist() == [NO_GATE, 0]  # as the results file records it
        # The margin counts as late what would leave within it of the deadline.
        emitter.margin_ns = 5_000_000
        columns = policy.decide(np.array([[0.9, 0.1]], np.float32), np.zeros(1, np.float32))
        soon = np.array([time.perf_counter_ns() + 1_000_000], np.int64)
        emitter.post(DecisionBlock("acq", np.array([3], np.uint64), now, soon, "h", policy, columns))
        assert pull.poll(5000)
        decisions = codec.decode_output(pull.recv_multipart())
        assert list(decisions.late) == [True] and decisions.gate == [""]
        samples = parse_text(generate_latest(counted.registry).decode())
        assert samples["flowsort_cells_late_total"] == 2
        assert samples['flowsort_cells_sorted_total{gate="a"}'] == 1
        assert samples['flowsort_cells_decided_total{label="A"}'] == 3
        emitter.close()
    finally:
        context.destroy(linger=0)


def bad(served: Harness, frames: list, reason: str, ids: np.ndarray | None) -> None:
    """Send a bad message and a good cell after it: the bad one is answered (where ids are known) and
    counted, the good one still decided."""
    before = served.metrics()
    served.sender.send(frames)
    good = new_ids(1)
    served.sender.cells("acq-after", good, np.full((1, 2, 32, 32), 600, np.uint16), CHANNELS)
    assert served.push.wait_for(good, 20)
    assert served.push.rows[int(good[0])]["error"] == ""
    if ids is not None:
        assert served.push.wait_for(ids, 5)
        for e in ids:
            row = served.push.rows[int(e)]
            assert row["error"] == reason and row["gate"] == "" and row["label"] == "" and math.isnan(row["probability"])
    after = served.metrics()
    assert delta(after, before, f'flowsort_messages_rejected_total{{reason="{reason}"}}') == 1
    if ids is not None:
        assert delta(after, before, f'flowsort_cells_rejected_total{{reason="{reason}"}}') == len(ids)


def header(ids: np.ndarray, **overrides: object) -> dict:
    base = {"version": 1, "type": "cells", "acquisition": "acq-bad", "event_ids": [int(i) for i in ids],
            "capture_ns": [time.time_ns()] * len(ids), "shape": [len(ids), 2, 32, 32], "dtype": "uint16",
            "channels": list(CHANNELS)}
    base.update(overrides)
    return base


def pack(head: dict, pixels: bytes) -> list[bytes]:
    return [msgpack.packb(head, use_bin_type=True), pixels]


PIXELS_2 = bytes(2 * 2 * 32 * 32 * 2)


def test_malformed_msgpack(served: Harness) -> None:
    bad(served, [b"\xc1\xc1 definitely not msgpack", PIXELS_2], Reason.MALFORMED, None)


def test_wrong_version(served: Harness) -> None:
    ids = new_ids(2)
    bad(served, pack(header(ids, version=2), PIXELS_2), Reason.UNSUPPORTED_VERSION, ids)


def test_unknown_type(served: Harness) -> None:
    ids = new_ids(2)
    bad(served, pack(header(ids, type="image"), PIXELS_2), Reason.UNKNOWN_TYPE, ids)


def test_header_buffer_length_mismatch(served: Harness) -> None:
    ids = new_ids(2)
    bad(served, pack(header(ids), PIXELS_2[:-2]), Reason.LENGTH_MISMATCH, ids)


def test_wrong_dtype(served: Harness) -> None:
    ids = new_ids(2)
    bad(served, pack(header(ids, dtype="int32"), bytes(2 * 2 * 32 * 32 * 4)), Reason.BAD_DTYPE, ids)


def test_channels_not_matching_the_bundle(served: Harness) -> None:
    ids = new_ids(2)
    bad(served, pack(header(ids, channels=[3, 7]), PIXELS_2), Reason.CHANNEL_MISMATCH, ids)


def test_no_cells(served: Harness) -> None:
    bad(served, pack(header(new_ids(0), shape=[0, 2, 32, 32]), b""), Reason.NO_CELLS, None)


def test_absurd_n(served: Harness) -> None:
    ids = new_ids(2)
    bad(served, pack(header(ids, shape=[2**40, 2, 32, 32]), PIXELS_2), Reason.TOO_MANY_CELLS, ids)


def test_one_cell_over_the_limit_is_answered_for_every_readable_id(served: Harness) -> None:
    limit = served.service.config.ingest.max_cells_per_message
    ids = new_ids(limit + 1)
    bad(served, pack(header(ids, shape=[limit + 1, 2, 32, 32]), b""), Reason.TOO_MANY_CELLS, ids)


def test_oversized_message_is_answered(served: Harness) -> None:
    ids = new_ids(300)  # 300 cells of 4 kB: above max_message_bytes (1 MiB), below the ZeroMQ hard limit
    bad(served, pack(header(ids), bytes(300 * 2 * 32 * 32 * 2)), Reason.OVERSIZED, ids)


def test_frame_above_zmq_maxmsgsize_drops_only_that_connection(served: Harness, cells: np.ndarray) -> None:
    before = served.metrics()
    rogue = Sender(served.service.endpoints["ingest"])
    rogue.send(pack(header(new_ids(2)), bytes(3 << 20)))  # 3 MiB frame > 2 MiB hard limit
    time.sleep(0.3)
    rogue.close(linger=0)
    ids = new_ids(3)
    served.sender.cells("acq-after", ids, cells[:3], CHANNELS)
    assert served.push.wait_for(ids, 20)
    after = served.metrics()
    assert delta(after, before, 'flowsort_ingest_connection_events_total{event="disconnected"}') >= 1


def test_float_input_with_nan_answers_only_the_bad_cells(served: Harness, cells: np.ndarray) -> None:
    before = served.metrics()
    ids = new_ids(4)
    pixels = cells[:4].astype(np.float32)
    pixels[1, 0, 3, 3] = np.nan
    pixels[3, 1, 0, 0] = np.inf
    served.sender.cells("acq-float", ids, pixels, CHANNELS)
    assert served.push.wait_for(ids, 20)
    errors = [served.push.rows[int(e)]["error"] for e in ids]
    assert errors == ["", Reason.NON_FINITE, "", Reason.NON_FINITE]
    after = served.metrics()
    assert delta(after, before, f'flowsort_cells_rejected_total{{reason="{Reason.NON_FINITE}"}}') == 2
    assert delta(after, before, 'flowsort_cells_converted_total{dtype="float32"}') == 4
    # all cells NaN: the whole message is rejected
    ids = new_ids(2)
    bad(served, codec.encode_cells("acq-float", ids, np.full((2, 2, 32, 32), np.nan, np.float32), CHANNELS),
        Reason.NON_FINITE, ids)


def test_other_sizes_channel_orders_and_dtypes_are_adapted(served: Harness, cells: np.ndarray) -> None:
    from trainer.synthetic import generate

    before = served.metrics()
    large = generate(3, seed=4, size=48).images  # cropped to 32
    small = large[:, :, 12:36, 12:36]  # 24x24: padded with the border median
    ids_large, ids_small, ids_swapped, ids_extra, ids_u8 = (new_ids(3) for _ in range(5))
    served.sender.cells("acq-adapt", ids_large, large, CHANNELS)
    served.sender.cells("acq-adapt", ids_small, np.ascontiguousarray(small), CHANNELS)
    served.sender.cells("acq-adapt", ids_swapped, np.ascontiguousarray(cells[:3, ::-1]), (6, 3))
    served.sender.cells("acq-adapt", ids_extra, np.concatenate([cells[:3], cells[:3, :1]], axis=1), (3, 6, 9))
    served.sender.cells("acq-adapt", ids_u8, (cells[:3] // 16).astype(np.uint8), CHANNELS)
    every = [*ids_large, *ids_small, *ids_swapped, *ids_extra, *ids_u8]
    assert served.push.wait_for(every, 20)
    assert all(served.push.rows[int(e)]["error"] == "" for e in every)
    # the same cells in another channel order get the same answer
    plain = new_ids(3)
    served.sender.cells("acq-adapt", plain, cells[:3], CHANNELS)
    assert served.push.wait_for(plain, 20)
    for a, b in zip(plain, ids_swapped):
        assert served.push.rows[int(a)]["label"] == served.push.rows[int(b)]["label"]
    after = served.metrics()
    assert delta(after, before, "flowsort_cells_resized_total") == 6
    assert delta(after, before, 'flowsort_cells_converted_total{dtype="uint8"}') == 3


def test_end_of_acquisition_reports_and_ping_answers(served: Harness, cells: np.ndarray) -> None:
    ids = new_ids(20)
    served.sender.cells("acq-report", ids[:10], cells[:10], CHANNELS)
    served.sender.send(pack(header(ids[10:12], acquisition="acq-report", dtype="int32"), bytes(2 * 2 * 32 * 32 * 4)))
    served.sender.cells("acq-report", ids[12:], cells[10:18], CHANNELS)
    served.sender.end("acq-report")
    report = served.push.wait_other("end", 20, acquisition="acq-report")
    assert report is not None
    # the report follows every decision of its acquisition
    assert all(int(e) in served.push.rows for e in ids)
    counts = report["report"]
    assert counts["cells"] == 20 and counts["classified"] == 18 and counts["errors"] == {Reason.BAD_DTYPE: 2}
    rows = [served.push.rows[int(e)] for e in ids]
    assert sum(counts["sorted"].values()) == sum(1 for r in rows if r["gate"])
    served.sender.ping("hello")
    pong = served.pub.wait_other("pong", 10, nonce="hello")
    assert pong is not None and pong["ready"] is True and pong["worker"] == served.service.worker
    # The worker's own estimate of what it sustains, from the engine times it measured at start.
    rates = {size: size * 1e9 / cost for size, cost in served.service.model.planner.measured.items()}
    best = max(rates, key=rates.__getitem__)
    speed = pong["engine_speed"]
    assert speed["best_batch"] == best and speed["best_cells_per_s"] == pytest.approx(rates[best], abs=0.1)
    assert speed["batch1_cells_per_s"] == pytest.approx(rates[min(rates)], abs=0.1)
    assert speed["sustainable_cells_per_s"] == pytest.approx(SUSTAINED_SHARE * rates[best], abs=0.2)


def test_engine_failure_answers_the_batch_and_repeated_failures_make_not_ready(served: Harness,
                                                                              cells: np.ndarray) -> None:
    from streamer.testing import get

    engine = served.service.model.engine
    before = served.metrics()

    def broken(_cells: np.ndarray) -> None:
        raise RuntimeError("simulated device loss")

    engine.submit = broken  # instance attribute: the dispatcher calls it instead of the class method
    try:
        failed = []
        for _ in range(3):  # max_consecutive_failures = 3 (default)
            ids = new_ids(2)
            served.sender.cells("acq-fail", ids, cells[:2], CHANNELS)
            assert served.push.wait_for(ids, 20)
            failed += [served.push.rows[int(e)]["error"] for e in ids]
        assert failed == [Reason.ENGINE_ERROR] * 6
        status, body = get(served.health + "/readyz")
        assert status == 503 and "engine failed" in body
        assert get(served.health + "/healthz")[0] == 200  # alive all the same
    finally:
        del engine.submit
    ids = new_ids(2)
    served.sender.cells("acq-fail", ids, cells[:2], CHANNELS)
    assert served.push.wait_for(ids, 20)
    assert all(served.push.rows[int(e)]["error"] == "" for e in ids)
    assert get(served.health + "/readyz")[0] == 200
    after = served.metrics()
    # The batcher may run a 2-cell message as one batch or as two, so 3 to 6 failed batches; every cell is answered.
    assert 3 <= delta(after, before, "flowsort_engine_failures_total") <= 6
    assert delta(after, before, f'flowsort_cells_rejected_total{{reason="{Reason.ENGINE_ERROR}"}}') == 6


def test_an_unexpected_error_costs_one_batch_not_the_service(served: Harness, cells: np.ndarray) -> None:
    policy = served.service.model.policy

    def boom(*_: object) -> None:
        raise ValueError("a bug")

    object.__setattr__(policy, "decide", boom)  # frozen dataclass: an instance attribute shadows the method
    try:
        ids = new_ids(3)
        served.sender.cells("acq-bug", ids, cells[:3], CHANNELS)
        assert served.push.wait_for(ids, 20)
        assert {served.push.rows[int(e)]["error"] for e in ids} == {Reason.ENGINE_ERROR}
    finally:
        object.__delattr__(policy, "decide")
    ids = new_ids(3)
    served.sender.cells("acq-bug", ids, cells[:3], CHANNELS)
    assert served.push.wait_for(ids, 20)
    assert {served.push.rows[int(e)]["error"] for e in ids} == {""}
    assert served.service.loop.is_alive()


def test_health_endpoints(served: Harness) -> None:
    from streamer.testing import get

    assert get(served.health + "/healthz")[0] == 200
    status, body = get(served.health + "/readyz")
    assert status == 200 and '"ready": true' in body
    assert get(served.health + "/nope")[0] == 404


# ---------------------------------------------------------------------------- overload


@pytest.fixture(scope="module")
def overloaded(quick_bundle: Path) -> Harness:
    config = make_config(
        ingest={"max_cells_per_message": 64},
        batching={"queue_cells": 64, "batch_sizes": [1, 2, 4, 8, 16, 32, 64], "max_delay_us": 1000.0},
        deadline={"budget_us": 0.0},
    )
    harness = Harness(Service(quick_bundle, config).start())
    yield harness
    harness.close()


def blast(harness: Harness, cells: np.ndarray, messages: int) -> np.ndarray:
    ids = new_ids(64 * messages)
    for k in range(messages):
        harness.sender.cells("acq-burst", ids[64 * k:64 * (k + 1)], cells[:64], CHANNELS)
    return ids


def test_overload_drop_oldest_answers_every_cell(overloaded: Harness, cells: np.ndarray) -> None:
    before = overloaded.metrics()
    ids = blast(overloaded, cells, 30)
    assert overloaded.push.wait_for(ids, 60)
    errors = Counter(overloaded.push.rows[int(e)]["error"] for e in ids)
    assert errors[Reason.OVERLOAD_DROPPED] > 0 and errors[""] > 0
    assert set(errors) <= {"", Reason.OVERLOAD_DROPPED}
    after = overloaded.metrics()
    dropped = delta(after, before, f'flowsort_cells_rejected_total{{reason="{Reason.OVERLOAD_DROPPED}"}}')
    assert dropped == errors[Reason.OVERLOAD_DROPPED]
    assert after["flowsort_queue_depth"] <= 64


def test_overload_refuse(overloaded: Harness, cells: np.ndarray) -> None:
    service = overloaded.service
    batching = service.config.batching
    failures = service.config.engine.max_consecutive_failures
    service.dispatcher.reconfigure(replace(batching, overload="refuse"), failures)  # as a reload does
    try:
        ids = blast(overloaded, cells, 30)
        assert overloaded.push.wait_for(ids, 60)
        errors = Counter(overloaded.push.rows[int(e)]["error"] for e in ids)
        assert errors[Reason.OVERLOAD_REFUSED] > 0 and errors[""] > 0
        assert set(errors) <= {"", Reason.OVERLOAD_REFUSED}
        # refusing works per message: a refused message is refused whole
        for k in range(30):
            block = {overloaded.push.rows[int(e)]["error"] for e in ids[64 * k:64 * (k + 1)]}
            assert len(block) == 1
    finally:
        service.dispatcher.reconfigure(batching, failures)


def test_absent_or_slow_consumer_never_stalls_inference(quick_bundle: Path, cells: np.ndarray) -> None:
    config = make_config(push={"hwm": 1}, batching={"max_delay_us": 200.0}, deadline={"budget_us": 0.0})
    harness = Harness(Service(quick_bundle, config).start(), read_push=False)
    context = zmq.Context()
    try:
        # No sorter connected: every decision message to it is dropped and counted, none waits.
        before = harness.metrics()
        ids = new_ids(100)
        for k in range(0, 100, 4):
            harness.sender.cells("acq-absent", ids[k:k + 4], cells[:4], CHANNELS)
        assert harness.pub.wait_for(ids, 30)
        after = harness.metrics()
        assert delta(after, before, 'flowsort_decisions_dropped_total{socket="push"}') == 100
        assert delta(after, before, 'flowsort_decision_messages_sent_total{socket="pub"}') >= 1

        # A sorter that connects and never reads: its buffers fill, then sends drop; decisions keep
        # flowing to the monitor (PUB) without waiting for it.
        stalled = context.socket(zmq.PULL)
        stalled.setsockopt(zmq.RCVHWM, 1)
        stalled.setsockopt(zmq.RCVBUF, 4096)
        stalled.connect(harness.service.endpoints["push"])
        time.sleep(0.2)
        before = harness.metrics()
        ids = new_ids(400)
        for k in range(0, 400, 4):
            harness.sender.cells("acq-slow", ids[k:k + 4], cells[:4], CHANNELS)
        assert harness.pub.wait_for(ids, 60)
        after = harness.metrics()
        assert delta(after, before, "flowsort_cells_received_total") == 400
        assert all(harness.pub.rows[int(e)]["error"] == "" for e in ids)
        sent = delta(after, before, 'flowsort_decision_messages_sent_total{socket="push"}')
        dropped = delta(after, before, 'flowsort_decisions_dropped_total{socket="push"}')
        assert sent + dropped > 0
    finally:
        context.destroy(linger=0)
        harness.close()


def test_reload_in_process_keeps_serving_and_a_bad_config_changes_nothing(served: Harness, cells: np.ndarray,
                                                                          tmp_path: Path) -> None:
    service = served.service
    engine_before = service.model.engine
    bad_config = tmp_path / "bad.toml"
    bad_config.write_text("[batching]\nmax_delay_us = -5\n")
    service.config_path = bad_config
    try:
        assert service.reload() is False
        assert service.model.engine is engine_before
        service.config_path = None  # reload the running config and the bundle again
        ids = new_ids(30)
        sender = threading.Thread(target=lambda: [
            served.sender.cells("acq-reload", [e], cells[k], CHANNELS) or time.sleep(0.005)
            for k, e in enumerate(ids)])
        sender.start()
        assert service.reload() is True
        sender.join()
        assert service.model.engine is not engine_before
        assert served.push.wait_for(ids, 20)
        assert all(served.push.rows[int(e)]["error"] == "" for e in ids)
        counts = served.metrics()
        assert counts['flowsort_reloads_total{result="ok"}'] >= 1
        assert counts['flowsort_reloads_total{result="failed"}'] >= 1
    finally:
        service.config_path = None


def test_runtime_never_imports_torch(quick_bundle: Path) -> None:
    import subprocess
    import sys

    from streamer.testing import engine_for_tests

    if engine_for_tests() != "openvino":
        pytest.skip("only the torch engine runs here")
    code = (
        "import sys\n"
        "import streamer, streamer.service, streamer.cli, streamer.client, streamer.recording\n"
        "from streamer.service import Service\n"
        "from streamer.testing import make_config\n"
        "service = Service(sys.argv[1], make_config(engine={'engine': 'openvino'})).start()\n"
        "service.stop()\n"
        "assert 'torch' not in sys.modules, 'the runtime path imported torch'\n"
    )
    result = subprocess.run([sys.executable, "-c", code, str(quick_bundle)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
