"""`flowsort serve` as a process: SIGTERM drain, SIGHUP swap, --record through kill -9, two workers."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from streamer import codec
from streamer.client import Receiver, Sender
from streamer.recording import AcquisitionReader, scan_file
from streamer.testing import Served, config_dict, write_toml

CHANNELS = (3, 6)
ALL = ["G1", "S_phase", "G2", "Prophase", "Metaphase", "Anaphase", "Telophase"]


@pytest.fixture(scope="module")
def cells() -> np.ndarray:
    from trainer.synthetic import generate

    return generate(64, seed=8, size=32).images


def handshake(sender: Sender, receiver: Receiver, workers: int = 1, timeout: float = 20) -> set[str]:
    """Ping until ``workers`` distinct workers have answered (every connection is up)."""
    seen: set[str] = set()
    end = time.monotonic() + timeout
    nonce = 0
    while len(seen) < workers and time.monotonic() < end:
        nonce += 1
        sender.ping(nonce)
        pong = receiver.wait_other("pong", 0.05, nonce=nonce)
        if pong:
            seen.add(pong["worker"])
    assert len(seen) == workers, f"only {seen} answered"
    return seen


def test_sigterm_drains_every_queued_cell_and_records(quick_bundle: Path, tmp_path: Path, cells: np.ndarray) -> None:
    # A long max_delay keeps the cells queued: only the drain can decide them in time.
    config = write_toml(tmp_path / "s.toml", config_dict(
        batching={"batch_sizes": [1, 2, 4, 8, 16, 32, 64, 128, 256], "max_delay_us": 20_000_000.0,
                  "adaptive_delay": False},
        deadline={"budget_us": 0.0}, pub={"endpoint": ""}))
    record = tmp_path / "run.fsacq"
    with Served(quick_bundle, config, tmp_path, ["--record", str(record)]) as served:
        receiver = Receiver(served["push"])
        sender = Sender(served["ingest"])
        try:
            handshake(sender, receiver)
            ids = list(range(1000, 1150))
            for i in ids:
                sender.cells("acq-drain", [i], cells[i % 64], CHANNELS)
            deadline = time.monotonic() + 20
            while served.metrics().get("flowsort_cells_received_total", 0) < len(ids):
                assert time.monotonic() < deadline
                time.sleep(0.05)
            assert served.metrics()["flowsort_queue_depth"] == len(ids)  # all still waiting
            assert not set(ids) & set(receiver.rows)
            started = time.monotonic()
            served.signal(signal.SIGTERM)
            assert served.process.wait(30) == 0, served.log()
            assert time.monotonic() - started < 15
            assert receiver.wait_for(ids, 10), f"{len(set(ids) - set(receiver.rows))} cells lost"
            assert all(receiver.rows[i]["error"] == "" and not receiver.rows[i]["late"] for i in ids)
            assert "drained 150 queued cells" in served.log()
        finally:
            sender.close(linger=0)
            receiver.close()
    scan = scan_file(record)
    assert scan.intact and scan.messages == 1 + len(ids)  # the ping and every cell, as received
    recorded = [codec.decode_ingest(frames) for _, frames in AcquisitionReader(record).messages()]
    assert [int(m.event_ids[0]) for m in recorded[1:]] == ids


TGKILL = {"x86_64": 234, "aarch64": 131}  # the syscall's number: Python has no tgkill


def test_sigterm_on_a_thread_that_does_not_block_it_still_drains(quick_bundle: Path, tmp_path: Path) -> None:
    """A thread started before `flowsort serve` blocks its signals (numpy's BLAS pool starts one at import) may be
    handed the SIGTERM: the service must still drain and exit cleanly, not die of the signal's default action."""
    import ctypes
    import json
    import platform
    import subprocess
    import sys

    if platform.machine() not in TGKILL or not Path("/proc/self/task").is_dir():
        pytest.skip("needs Linux's tgkill and /proc")
    config = write_toml(tmp_path / "s.toml", config_dict(pub={"endpoint": ""}))
    ready, log = tmp_path / "ready.json", tmp_path / "serve.log"
    early = ("import sys, threading, time; threading.Thread(target=time.sleep, args=(600,), daemon=True).start(); "
             "from flowsort.cli import main; sys.exit(main(sys.argv[1:]))")
    with open(log, "w") as output:
        process = subprocess.Popen([sys.executable, "-c", early, "serve", str(quick_bundle), "--config", str(config),
                                    "--ready-file", str(ready)], stdout=output, stderr=subprocess.STDOUT)
    try:
        end = time.monotonic() + 60
        while not ready.exists():
            assert time.monotonic() < end and process.poll() is None, log.read_text()
            time.sleep(0.1)
        assert json.loads(ready.read_text())["pid"] == process.pid
        term = 1 << (signal.SIGTERM - 1)
        open_to_it = [int(task.name) for task in Path(f"/proc/{process.pid}/task").iterdir()
                      if int(task.name) != process.pid and not term & int(next(
                          line.split()[1] for line in (task / "status").read_text().splitlines()
                          if line.startswith("SigBlk")), 16)]
        assert open_to_it, "the thread started before serve should not block SIGTERM"
        assert ctypes.CDLL(None).syscall(TGKILL[platform.machine()], process.pid, open_to_it[0], signal.SIGTERM) == 0
        assert process.wait(30) == 0, log.read_text()
        assert "SIGTERM: draining and stopping" in log.read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_sighup_swaps_config_and_engine_without_dropping_a_cell(quick_bundle: Path, tmp_path: Path,
                                                               cells: np.ndarray) -> None:
    every_cell = {"name": "all", "classes": ALL, "min_probability": 0.0, "exclude_dead": False, "stream": 3}
    path = tmp_path / "s.toml"
    base = config_dict(deadline={"budget_us": 0.0}, pub={"endpoint": ""})
    write_toml(path, {**base, "gates": [every_cell]})
    with Served(quick_bundle, path, tmp_path) as served:
        receiver = Receiver(served["push"])
        sender = Sender(served["ingest"])
        sent: list[int] = []
        stop = threading.Event()

        def stream() -> None:
            i = 0
            while not stop.is_set():
                sender.cells("acq-hup", [i], cells[i % 64], CHANNELS)
                sent.append(i)
                i += 1
                time.sleep(0.004)

        try:
            handshake(sender, receiver)
            streamer = threading.Thread(target=stream)
            streamer.start()
            time.sleep(0.5)
            write_toml(path, base)  # no gates: nothing sorted from now on
            reload_at = len(sent)
            served.signal(signal.SIGHUP)
            deadline = time.monotonic() + 30
            while served.metrics().get('flowsort_reloads_total{result="ok"}', 0) < 1:
                assert time.monotonic() < deadline, served.log()
                time.sleep(0.05)
            after_reload = len(sent)
            time.sleep(0.5)
            stop.set()
            streamer.join()
            assert receiver.wait_for(sent, 20), f"{len(set(sent) - set(receiver.rows))} cells lost"
            rows = [receiver.rows[i] for i in sent]
            assert all(r["error"] == "" for r in rows)
            assert all(r["gate"] == "all" and r["stream"] == 3 for r in rows[:reload_at])
            assert all(r["gate"] == "" for r in rows[after_reload + 5:])
            counts = served.metrics()
            assert counts["flowsort_cells_received_total"] == len(sent)
            assert counts.get('flowsort_reloads_total{result="failed"}', 0) == 0
            assert served.stop() == 0
        finally:
            stop.set()
            sender.close(linger=0)
            receiver.close()


def test_record_survives_kill_9(quick_bundle: Path, tmp_path: Path, cells: np.ndarray) -> None:
    config = write_toml(tmp_path / "s.toml", config_dict(pub={"endpoint": ""}, push={"endpoint": ""}))
    record = tmp_path / "crash.fsacq"
    with Served(quick_bundle, config, tmp_path, ["--record", str(record)]) as served:
        sender = Sender(served["ingest"])
        try:
            block = np.ascontiguousarray(np.tile(cells, (2, 1, 1, 1)))  # 128 cells, 512 kB per message
            for k in range(10):
                sender.cells("acq-crash", np.arange(128) + 128 * k, block, CHANNELS)
            deadline = time.monotonic() + 20
            while served.metrics().get("flowsort_records_written_total", 0) < 5:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            for k in range(10, 40):  # still arriving and being written when the kill lands
                sender.cells("acq-crash", np.arange(128) + 128 * k, block, CHANNELS)
            time.sleep(0.05)
            os.kill(served.process.pid, signal.SIGKILL)
            served.process.wait(10)
        finally:
            sender.close(linger=0)
    reader = AcquisitionReader(record)
    decoded = [codec.decode_ingest(frames) for _, frames in reader.messages()]
    assert len(decoded) >= 5
    for k, message in enumerate(decoded):  # every record before the tail intact and in order
        assert int(message.event_ids[0]) == 128 * k
        np.testing.assert_array_equal(message.pixels, block)


def test_two_workers_share_one_instrument_stream(quick_bundle: Path, tmp_path: Path, cells: np.ndarray) -> None:
    instrument = Sender("tcp://127.0.0.1:*", mode="bind")
    sorter = Receiver("tcp://127.0.0.1:*", mode="bind")
    workers: list[Served] = []
    try:
        config = write_toml(tmp_path / "worker.toml", config_dict(
            ingest={"endpoint": instrument.endpoint, "mode": "connect"},
            push={"endpoint": sorter.endpoint, "mode": "connect"},
            pub={"endpoint": ""}, deadline={"budget_us": 0.0}))
        workers = [Served(quick_bundle, config, tmp_path, ["--worker", f"worker-{k}"], name=f"w{k}") for k in (1, 2)]
        assert handshake(instrument, sorter, workers=2) == {"worker-1", "worker-2"}
        ids = list(range(5000, 5400))
        for i in ids:
            instrument.cells("acq-shared", [i], cells[i % 64], CHANNELS)
        assert sorter.wait_for(ids, 60), f"{len(set(ids) - set(sorter.rows))} cells lost"
        assert sorter.duplicates == 0
        shares = {w: sum(1 for i in ids if sorter.rows[i]["worker"] == w) for w in ("worker-1", "worker-2")}
        assert min(shares.values()) >= 80, shares  # ZeroMQ spreads the messages over both
        for worker in workers:
            assert worker.stop() == 0
    finally:
        for worker in workers:
            worker.kill()
        instrument.close(linger=0)
        sorter.close()


def test_a_tracer_waking_the_signal_wait_does_not_stop_the_service(monkeypatch: pytest.MonkeyPatch) -> None:
    """A profiler attaching (py-spy, gdb) ends sigtimedwait with no signal (si_signo 0): nothing happens; a real
    SIGTERM still stops and SIGHUP still reloads."""
    from types import SimpleNamespace

    from streamer.cli import serve

    class Service:
        stopped = reloaded = 0

        def request_stop(self) -> None:
            self.stopped += 1

        def request_reload(self) -> None:
            self.reloaded += 1

    service = Service()
    for signo in (0, signal.SIGHUP, signal.SIGTERM):
        monkeypatch.setattr(signal, "sigtimedwait", lambda signals, timeout, signo=signo: SimpleNamespace(si_signo=signo))
        serve.take_signal(service, 0.01)
    assert (service.stopped, service.reloaded) == (1, 1)
