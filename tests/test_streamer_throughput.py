"""What keeps the service at its engine's speed: admission at the door, latency from capture, thread layout.

Real sockets on loopback and a real bundle; the overload tests use an engine
double that takes a fixed time per batch, so what the service can decide in
time is known exactly.
"""

from __future__ import annotations

import os
import re
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from bench.overhead import NullEngine
from engines.cpu import MAX_STREAMS, choose_threading
from engines.base import Outputs
from streamer.client import Receiver, Sender
from streamer.protocol import Reason
from streamer.service import Service
from streamer.testing import make_config, metrics

CHANNELS = (3, 6)
PROTOCOL_DOC = Path(__file__).resolve().parents[1] / "docs" / "protocol.md"
BATCH_S = 0.010


class SlowEngine(NullEngine):
    """Computes each batch, of any size, for BATCH_S from its submission (after the batch before it, one at a
    time), as an asynchronous engine does: a ceiling of max_batch / BATCH_S cells/s. Like OpenVINO it says
    whether a batch is done without waiting and reports each batch's submission-to-completion time, so the
    planner learns BATCH_S however late a busy machine wakes the service loop; unlike it, it cannot report
    its completions, so the loop looks when a batch should be done."""

    def __init__(self, *args: object) -> None:
        super().__init__(*args)
        self._free = 0.0
        self._done = [0.0] * self.depth
        self._submitted = [0.0] * self.depth

    def _start(self, slot: int, cells: np.ndarray, n: int) -> None:
        self._submitted[slot] = time.monotonic()
        self._free = self._done[slot] = max(self._submitted[slot], self._free) + BATCH_S

    def done(self) -> bool:
        return not self._pending or time.monotonic() >= self._done[self._pending[0][0]]

    def _finish(self, slot: int, n: int) -> Outputs:
        time.sleep(max(0.0, self._done[slot] - time.monotonic()))
        self.last_run_ns = int(1e9 * (self._done[slot] - self._submitted[slot]))
        return super()._finish(slot, n)


class LateNoticedEngine(NullEngine):
    """Reports RUN_NS as each batch's own time, but its collect() returns NOTICE_S later, as a completion noticed
    late by a busy thread does."""

    RUN_NS = 1_000_000
    NOTICE_S = 0.015

    def _finish(self, slot: int, n: int) -> Outputs:
        time.sleep(self.NOTICE_S)
        self.last_run_ns = self.RUN_NS
        return super()._finish(slot, n)


class NotifyingEngine(NullEngine):
    """Takes LONG_S per batch and, like OpenVINO with its completion callback, wakes the service when done."""

    LONG_S = 0.5

    def __init__(self, *args: object) -> None:
        super().__init__(*args)
        self._ends = [0.0] * self.depth
        self._wake = None

    def notify(self, wake: object) -> bool:
        self._wake = wake
        return True

    def _start(self, slot: int, cells: np.ndarray, n: int) -> None:
        self._ends[slot] = time.monotonic() + self.LONG_S
        if self._wake is not None:  # the start-up timing runs before the service asks to be woken
            threading.Timer(self.LONG_S, self._wake).start()

    def done(self) -> bool:
        return not self._pending or time.monotonic() >= self._ends[self._pending[0][0]]


def thread_cpu_s(native_id: int) -> float:
    fields = Path(f"/proc/self/task/{native_id}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.fixture(scope="module")
def cells() -> np.ndarray:
    from trainer.synthetic import generate

    return generate(64, seed=4, size=32).images


def start(bundle: Path, engine: type | None = None, **sections: object) -> tuple[Service, Sender, Receiver]:
    factory = None if engine is None else (lambda b, c: engine(b, c.batching.max_batch))
    service = Service(bundle, make_config(pub={"endpoint": ""}, **sections), engine_factory=factory).start()
    sender, receiver = Sender(service.endpoints["ingest"]), Receiver(service.endpoints["push"])
    for nonce in range(200):
        sender.ping(nonce)
        if receiver.wait_other("pong", 0.05, nonce=nonce):
            return service, sender, receiver
    raise TimeoutError("the decision socket never connected")


def stop(service: Service, sender: Sender, receiver: Receiver) -> None:
    sender.close(linger=0)
    receiver.close()
    service.stop()


def test_overload_is_shed_at_the_door_and_no_cell_is_decided_late(quick_bundle: Path, cells: np.ndarray) -> None:
    """Offered far more than the engine can decide by the deadline: the excess is refused at once, the rest is
    decided in time, every cell is answered, and the counters say so."""
    service, sender, receiver = start(quick_bundle, SlowEngine, batching={"batch_sizes": [1, 2, 4, 8]})
    try:
        ids = np.arange(1, 401, dtype=np.uint64)
        deadline = time.time_ns() + 200_000_000  # 200 ms: about 17 batches of 8 fit with the margin, 400 cells do not
        captured = {}
        for i in ids:
            captured[int(i)] = time.time_ns()
            sender.cells("flood", [i], cells[int(i) % len(cells)], CHANNELS, capture_ns=[captured[int(i)]],
                         deadline_ns=deadline)
        assert receiver.wait_for(ids.tolist(), 20)
        rows = [receiver.rows[int(i)] for i in ids]
        refused = [r for r in rows if r["error"] == Reason.OVERLOAD_REFUSED]
        decided = [r for r in rows if r["error"] == ""]
        assert len(refused) + len(decided) + sum(r["error"] == Reason.EXPIRED for r in rows) == len(ids)
        # The engine could decide about 150 of them in time; how many it does depends on how busy this machine
        # is (admission plans on the engine times it measured): some, but nowhere near all. Most of the excess is
        # refused at the door; on a loaded machine a share of the admitted cells expires in the queue instead
        # (answered late, never run: seen 195 refused and 101 expired in one CI run).
        assert len(decided) >= 20 and len(refused) >= 100 and len(decided) <= 300, (len(decided), len(refused))
        late = {i: r for i, r in zip(ids.tolist(), rows) if r["error"] == "" and r["late"]}
        # Admission plans with a margin; on a busy machine a thread woken late can still make the batches running
        # at the deadline late (never sorted): seen 2 batches 53 ms late with both cores taken by other work.
        # Without admission about 250 of the cells would be decided late, by up to 300 ms.
        overdue_ms = [(captured[i] + 1000 * r["latency_us"] - deadline) / 1e6 for i, r in late.items()]
        assert len(late) <= 4 * 8 and max(overdue_ms, default=0) < 10 * BATCH_S * 1000, overdue_ms
        assert not any(r["stream"] for r in late.values()) and not any(r["stream"] for r in refused)
        scraped = metrics(service.endpoints["health"])
        assert scraped[f'flowsort_cells_rejected_total{{reason="{Reason.OVERLOAD_REFUSED}"}}'] == len(refused)
        assert scraped.get("flowsort_cells_late_total", 0) == sum(r["late"] for r in rows)
        assert scraped["flowsort_queue_depth"] == 0
    finally:
        stop(service, sender, receiver)


def test_latency_starts_at_capture_and_the_wait_before_receipt_is_measured(quick_bundle: Path,
                                                                          cells: np.ndarray) -> None:
    service, sender, receiver = start(quick_bundle, deadline={"budget_us": 5_000_000.0})
    try:
        captured = time.time_ns() - 40_000_000  # the cell waited 40 ms before it was sent
        sender.cells("old", [7], cells[0], CHANNELS, capture_ns=captured)
        assert receiver.wait_for([7], 10)
        assert receiver.rows[7]["error"] == "" and receiver.rows[7]["latency_us"] >= 40_000
        scraped = metrics(service.endpoints["health"])
        assert scraped["flowsort_ingest_wait_seconds_sum"] >= 0.04
        assert scraped["flowsort_ingest_wait_seconds_count"] == 1
        assert scraped["flowsort_decision_latency_seconds_sum"] >= 0.04
        assert scraped['flowsort_stage_calls_total{stage="decode"}'] >= 1
        assert scraped['flowsort_stage_seconds_total{stage="engine"}'] > 0
    finally:
        stop(service, sender, receiver)


def test_each_stage_clock_counts_its_own_time_only(quick_bundle: Path, cells: np.ndarray,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The stages add up to where a cell's time went: sending a decision is the emit stage's, not the policy's
    (which once counted it too, so the breakdown double-counted the emit)."""
    from streamer import emitter

    encode = emitter.codec.encode_decisions

    def slow_encode(*args: object) -> bytes:
        time.sleep(0.05)
        return encode(*args)

    monkeypatch.setattr(emitter.codec, "encode_decisions", slow_encode)
    service, sender, receiver = start(quick_bundle, deadline={"budget_us": 5_000_000.0})
    try:
        before = metrics(service.endpoints["health"])
        sender.cells("timed", [3], cells[0], CHANNELS)
        assert receiver.wait_for([3], 10)
        after = metrics(service.endpoints["health"])
        spent = {stage: after[f'flowsort_stage_seconds_total{{stage="{stage}"}}']
                 - before[f'flowsort_stage_seconds_total{{stage="{stage}"}}'] for stage in ("policy", "emit")}
        assert spent["emit"] >= 0.05 and spent["policy"] < 0.02, spent
    finally:
        stop(service, sender, receiver)


@pytest.mark.parametrize("budget_from, error", [("capture", Reason.EXPIRED), ("receipt", "")])
def test_the_budget_counts_from_capture_unless_configured(quick_bundle: Path, cells: np.ndarray, budget_from: str,
                                                          error: str) -> None:
    service, sender, receiver = start(quick_bundle, deadline={"budget_us": 20_000.0, "budget_from": budget_from})
    try:
        sender.cells("stale", [9], cells[0], CHANNELS, capture_ns=time.time_ns() - 50_000_000)  # 50 ms old
        assert receiver.wait_for([9], 10)
        assert receiver.rows[9]["error"] == error and receiver.rows[9]["late"] == (error == Reason.EXPIRED)
    finally:
        stop(service, sender, receiver)


def test_the_planner_learns_the_engine_own_time_not_when_its_end_was_noticed(quick_bundle: Path,
                                                                              cells: np.ndarray) -> None:
    """Batch times come from the engine's clock where it has one: a completion noticed 15 ms late must not teach
    the planner a 16 ms batch, which would make admission refuse cells the engine has time for."""
    service, sender, receiver = start(quick_bundle, LateNoticedEngine, batching={"batch_sizes": [1, 2, 4]})
    try:
        planner = service.model.planner
        assert planner.measured[1] == pytest.approx(LateNoticedEngine.RUN_NS)
        ids = list(range(1, 41))
        deadline = time.time_ns() + 10_000_000_000
        for i in ids:
            sender.cells("noticed-late", [i], cells[i % len(cells)], CHANNELS, deadline_ns=deadline)
        assert receiver.wait_for(ids, 20)
        assert all(receiver.rows[i]["error"] == "" for i in ids)
        assert max(planner.costs.values()) < 2 * LateNoticedEngine.RUN_NS, planner.costs
    finally:
        stop(service, sender, receiver)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads a thread's CPU time from /proc")
def test_the_service_loop_sleeps_while_a_batch_runs_and_wakes_when_it_ends(quick_bundle: Path,
                                                                           cells: np.ndarray) -> None:
    """One service thread, which neither polls while the engine computes (earlier versions looked every 0.2 ms:
    about 0.1 s of CPU per LONG_S) nor misses the end: the decision leaves when the engine says it is done."""
    service, sender, receiver = start(quick_bundle, NotifyingEngine, batching={"batch_sizes": [1]},
                                      deadline={"budget_us": 0.0})
    try:
        names = [t.name for t in threading.enumerate() if t.name.startswith("flowsort-")]
        assert names.count("flowsort-loop") == 1 and not {"flowsort-ingest", "flowsort-inference",
                                                         "flowsort-emitter"} & set(names)
        loop = service.loop.native_id
        before, sent = thread_cpu_s(loop), time.monotonic()
        sender.cells("sleepy", [1], cells[0], CHANNELS)
        assert receiver.wait_for([1], 10)
        took = time.monotonic() - sent
        used = thread_cpu_s(loop) - before
        assert NotifyingEngine.LONG_S <= took < NotifyingEngine.LONG_S + 0.2, took
        assert used <= 0.03, f"the loop used {used:.3f} s of CPU while the batch ran"
    finally:
        stop(service, sender, receiver)


def test_threading_is_chosen_for_the_cores_and_can_be_set() -> None:
    assert (lambda t: (t.streams, t.threads_per_stream))(choose_threading(cores=1)) == (1, 1)
    assert (lambda t: (t.streams, t.threads_per_stream))(choose_threading(cores=2)) == (2, 1)
    # more cores: one is left to the service's own threads
    assert choose_threading(cores=4).threads == 3 and choose_threading(cores=4).streams == 3
    assert choose_threading(cores=16).streams == MAX_STREAMS and choose_threading(cores=16).threads == 12
    assert choose_threading(streams=1, cores=2).threads == 2 and choose_threading(streams=1, cores=2).streams == 1
    assert choose_threading(threads=1, cores=8).streams == 1
    set_both = choose_threading(streams=2, threads=4, cores=2)
    assert (set_both.streams, set_both.threads_per_stream, set_both.chosen) == (2, 2, "set")
    with pytest.raises(ValueError):
        choose_threading(streams=-1)


def test_the_service_runs_the_engine_as_configured_and_says_so(quick_bundle: Path) -> None:
    pytest.importorskip("openvino")
    service = Service(quick_bundle, make_config(engine={"engine": "openvino", "streams": 1, "threads": 1},
                                                pub={"endpoint": ""})).start()
    try:
        engine = service.model.engine
        assert engine.parallel == 1 and service.model.planner.parallel == 1
        described = service.model.description
        assert (described["streams"], described["threads"]) == (1, 1) and "(set)" in described["threading"]
    finally:
        service.stop()


def test_every_metric_protocol_md_names_is_exported(quick_bundle: Path, cells: np.ndarray) -> None:
    """docs/protocol.md is the contract: every flowsort_* name it gives must be on /metrics."""
    named = set(re.findall(r"\bflowsort_[a-z_]+[a-z]", PROTOCOL_DOC.read_text()))
    assert len(named) >= 10
    from streamer.testing import get

    service, sender, receiver = start(quick_bundle)
    try:
        sender.cells("doc", [1], cells[0], CHANNELS)
        assert receiver.wait_for([1], 10)
        status, text = get(service.endpoints["health"] + "/metrics")
    finally:
        stop(service, sender, receiver)
    assert status == 200
    # Every family is declared, labelled ones before their first sample too.
    families = set(re.findall(r"^# TYPE (flowsort_\w+) ", text, re.MULTILINE))
    missing = sorted(name for name in named if name not in families)
    assert not missing, f"protocol.md names metrics the service does not export: {missing}"


def test_overhead_bench_runs_the_service_path_with_a_no_work_engine(quick_bundle: Path, tmp_path: Path) -> None:
    import json

    from flowsort.cli import main

    assert main(["bench", "overhead", str(quick_bundle), "--messages", "3000", "--cells", "3000",
                 "--cells-per-message", "1,16", "-o", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "overhead.json").read_text())
    assert [row["cells_per_message"] for row in report["rows"]] == [1, 16]
    for row in report["rows"]:
        assert row["cells_decided"] == row["cells_sent"] > 0 and row["errors"] == 0
        assert row["messages_per_s"] > 0 and row["stage_us_per_message"]["decode"] > 0
    assert report["machine"]["cpu_model"] and (tmp_path / "overhead.png").stat().st_size > 0


def test_a_burst_of_messages_is_admitted_in_one_call_and_counted_once(cells: np.ndarray) -> None:
    """Messages waiting on the socket are read as one burst: their cells reach the queue in one admission (one
    segment, in order), and every message and cell is counted, however long reading them took."""
    import zmq

    from streamer.codec import Limits
    from streamer.config import DeadlineConfig
    from streamer.emitter import Emitter
    from streamer.ingest import Ingest, InputAdapter
    from streamer.metrics import Metrics

    context = zmq.Context()
    pull = context.socket(zmq.PULL)
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    sender, admissions = Sender(f"tcp://127.0.0.1:{port}", context=context), []
    m = Metrics()
    ingest = Ingest(pull, None, limits=Limits(), adapter=InputAdapter(CHANNELS, cells.shape[-1], m),
                    queue=lambda segments: admissions.append(segments) or [], queue_marker=lambda marker: None,
                    emitter=Emitter({}, m, "w", 0), metrics=m, deadline=DeadlineConfig(),
                    bundle_hash=lambda: "", status=dict, reject_interval=1.0)
    try:
        ids = np.arange(1, 61, dtype=np.uint64)
        for i, event_id in enumerate(ids):
            sender.cells("acq-burst", [event_id], cells[i % len(cells)], CHANNELS)
        end = time.monotonic() + 5
        while pull.getsockopt(zmq.EVENTS) & zmq.POLLIN == 0 and time.monotonic() < end:
            time.sleep(0.01)
        time.sleep(0.2)  # every message is across
        assert ingest.read(64) == 60
    finally:
        ingest.close()
        sender.close(linger=0)
        context.term()
    assert len(admissions) == 1 and len(admissions[0]) == 1
    segment = admissions[0][0]
    assert segment.acquisition == "acq-burst" and np.array_equal(segment.event_ids, ids)
    values = {sample.name + str(sample.labels): sample.value for family in m.registry.collect()
              for sample in family.samples}
    assert values["flowsort_messages_received_total{'type': 'cells'}"] == 60
    assert values["flowsort_cells_received_total{}"] == 60
    assert m.stages.calls["receive"] == m.stages.calls["decode"] == m.stages.calls["admit"] == 60
