"""`flowsort serve --results`: FCS 3.1 files written live by the service, read back with FlowIO.

The files are compared with the decisions the service sent: one event per
decided cell with its event id, class, gate, late flag and probabilities,
TIME from the capture times; cells answered with an error are counted in the
file, not written. A reload that changes the gates starts a new file; an
acquisition's file is finished when its ``end`` is handled; SIGTERM finishes
the rest. Without ``--results`` nothing is gathered or copied for it.
"""

from __future__ import annotations

import argparse
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from flowsort.errors import UserError
from streamer.emitter import DecisionBlock
from streamer.service import Service
from streamer.testing import config_dict, make_config, write_toml

flowio = pytest.importorskip("flowio", reason="the independent FCS reader: pip install -e '.[dev]'")

CHANNELS = (3, 6)
MITOTIC = ["Prophase", "Metaphase", "Anaphase", "Telophase"]
GATES = [
    {"name": "mitotic", "classes": MITOTIC, "min_probability": 0.5, "stream": 1},
    {"name": "interphase", "classes": ["G1", "S_phase", "G2"], "min_probability": 0.0, "stream": 2},
]
RELOADED_GATES = [{"name": "g1-only", "classes": ["G1"], "min_probability": 0.14, "exclude_dead": False,
                   "stream": 3}]
LATE_MESSAGES = (3, 7)  # messages of acquisition A sent with a deadline the margin makes late


def read(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str], list[str]]:
    """Columns by $PnN, TEXT keywords (lower case, without '$', as FlowIO gives them), $PnN in order."""
    data = flowio.FlowData(str(path))
    events = np.asarray(data.events, np.float64).reshape(data.event_count, data.channel_count)
    return {name: events[:, i] for i, name in enumerate(data.pnn_labels)}, data.text, list(data.pnn_labels)


def handshake(sender, receiver) -> None:
    for nonce in range(400):  # PUSH drops while no consumer is connected
        sender.ping(nonce)
        if receiver.wait_other("pong", 0.05, nonce=nonce):
            return
    raise TimeoutError("the decision socket never connected")


@pytest.fixture(scope="module")
def live_run(quick_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A `flowsort serve --results 'results/{acquisition}.fcs'` process: two acquisitions, a reload, SIGTERM."""
    from streamer.client import Receiver, Sender
    from streamer.testing import Served
    from trainer.synthetic import generate

    folder = tmp_path_factory.mktemp("serve-results")
    results = folder / "results"
    # A 300 s budget and a 60 s margin: only cells sent with a 20 s deadline are decided late (and, unless the
    # service takes 20 s to reach them, never expire).
    base = config_dict(deadline={"budget_us": 300_000_000.0, "margin_us": 60_000_000.0}, pub={"endpoint": ""})
    config = write_toml(folder / "streamer.toml", {**base, "gates": GATES})
    cells = generate(128, seed=4, size=32, prior="uniform", dead_fraction=0.15).images
    t0 = time.time_ns()
    capture: dict[int, int] = {}
    run: dict = {"folder": folder, "results": results, "capture": capture}
    with Served(quick_bundle, config, folder, ["--results", str(results / "{acquisition}.fcs")]) as served:
        receiver = Receiver(served["push"])
        sender = Sender(served["ingest"])
        try:
            handshake(sender, receiver)
            # Acquisition A: 96 cells in messages of 8, one cell per millisecond, two messages late.
            ids_a = np.arange(5000, 5096, dtype=np.uint64)
            times_a = t0 + (ids_a.astype(np.int64) - 5000) * 1_000_000
            for k, start in enumerate(range(0, 96, 8)):
                deadline = time.time_ns() + 20_000_000_000 if k in LATE_MESSAGES else None
                sender.cells("acq-a", ids_a[start:start + 8], cells[start:start + 8], CHANNELS,
                             capture_ns=times_a[start:start + 8], deadline_ns=deadline)
            bad = cells[:2].astype(np.float32)
            bad[0, 0, 0, 0] = np.nan  # 9000 cannot be classified: not an event, counted in the file
            sender.cells("acq-a", [9000, 9001], bad, CHANNELS, capture_ns=t0 + 200_000_000)
            capture.update(zip(ids_a.tolist(), times_a.tolist()))
            capture[9001] = t0 + 200_000_000
            sender.end("acq-a")
            assert receiver.wait_other("end", 30, acquisition="acq-a"), served.log()
            # Its file is finished at its end, while the service runs on.
            finished = results / "acq-a.fcs"
            deadline = time.monotonic() + 15
            while not finished.exists():
                assert time.monotonic() < deadline, served.log()
                time.sleep(0.05)
            run["a_finished_while_serving"] = served.process.poll() is None

            # Acquisition B (a name that needs cleaning for a file name): 16 cells, a reload changing the
            # gates, 16 more cells. No end: SIGTERM finishes its files.
            ids_b1 = np.arange(20000, 20016, dtype=np.uint64)
            ids_b2 = np.arange(20100, 20116, dtype=np.uint64)
            for ids, offset in ((ids_b1, 0), (ids_b2, 1)):
                times = t0 + 1_000_000_000 + offset * 500_000_000 + (ids.astype(np.int64) % 100) * 2_000_000
                capture.update(zip(ids.tolist(), times.tolist()))
                if offset:
                    write_toml(config, {**base, "gates": RELOADED_GATES})
                    served.signal(signal.SIGHUP)
                    deadline = time.monotonic() + 60
                    while served.metrics().get('flowsort_reloads_total{result="ok"}', 0) < 1:
                        assert time.monotonic() < deadline, served.log()
                        time.sleep(0.05)
                sender.cells("acq/b", ids, cells[96:112], CHANNELS, capture_ns=times)
                assert receiver.wait_for(ids.tolist(), 30), served.log()
            assert receiver.wait_for([*ids_a.tolist(), 9000, 9001], 30), served.log()
            run["metrics"] = served.metrics()
            run["rows"] = dict(receiver.rows)
            run["bundles"] = {batch.bundle for batch in receiver.batches}
            status = served.stop()
            run["log"] = served.log_path.read_text(errors="replace")
            assert status == 0, run["log"][-6000:]
        finally:
            sender.close(linger=0)
            receiver.close()
    return run


def check_events(path: Path, run: dict, gate_names: list[str]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The file's events against the decisions received: one per decided cell, same columns."""
    column, text, names = read(path)
    rows, capture = run["rows"], run["capture"]
    classes = [text[f"flowsort_class_{i}"] for i in range(7)]
    assert [text[f"flowsort_gate_{j}"] for j in range(len(gate_names))] == gate_names
    assert f"flowsort_gate_{len(gate_names)}" not in text
    assert names[4:11] == [f"P_{c}" for c in classes] and names[-8:] == [f"EMB_{i}" for i in range(1, 9)]
    ids = column["EVENT_ID"].astype(np.int64).tolist()
    assert len(set(ids)) == len(ids)
    acquisition = text["flowsort_acquisition"]
    decided = {i for i, row in rows.items() if row["acquisition"] == acquisition and not row["error"]}
    assert set(ids) <= decided
    for k, event_id in enumerate(ids):
        row = rows[event_id]
        assert classes[int(column["CLASS"][k])] == row["label"]
        assert gate_names[int(column["GATE"][k])] == (row["gate"] or "no-sort")
        assert bool(column["LATE"][k]) == row["late"]
        assert bool(column["DEAD"][k]) == row["dead"]
        assert column["PROBABILITY"][k] == pytest.approx(row["probability"], abs=1e-6)
        assert column["DEAD_SCORE"][k] == pytest.approx(row["dead_score"], rel=1e-6, abs=1e-6)
    probabilities = np.stack([column[n] for n in names[4:11]], axis=1)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-4)
    np.testing.assert_array_equal(probabilities.max(axis=1), column["PROBABILITY"])
    np.testing.assert_array_equal(probabilities.argmax(axis=1), column["CLASS"])
    # TIME: seconds since the file's first cell, from the instrument's capture times
    start = int(text["flowsort_start_ns"])
    captured = np.array([capture[i] for i in ids], np.int64)
    assert start == captured.min() and column["TIME"].min() == 0
    np.testing.assert_allclose(column["TIME"], (captured - start) / 1e9, atol=2e-6)
    assert text["flowsort_bundle"] in run["bundles"] and text["flowsort_dropped_events"] == "0"
    assert text["timestep"] == "1"
    return column, text


def test_results_files_are_finished_and_named_per_acquisition(live_run: dict) -> None:
    results = live_run["results"]
    assert sorted(p.name for p in results.iterdir()) == ["acq-a.fcs", "acq_b-2.fcs", "acq_b.fcs"]
    assert live_run["a_finished_while_serving"]  # at its end message, not at stop
    assert live_run["metrics"].get("flowsort_results_dropped_total") == 0
    assert "results: 3 FCS file(s)" in live_run["log"]


def test_results_hold_every_decided_cell_as_sent(live_run: dict) -> None:
    rows = live_run["rows"]
    column, text = check_events(live_run["results"] / "acq-a.fcs", live_run, ["no-sort", "mitotic", "interphase"])
    ids = column["EVENT_ID"].astype(np.int64)
    # one event per decided cell: the 96 sent and the finite cell of the NaN message
    assert sorted(ids.tolist()) == [*range(5000, 5096), 9001]
    assert rows[9000]["error"] == "non_finite" and text["flowsort_unclassified_non_finite"] == "1"
    late = {5000 + 8 * k + j for k in LATE_MESSAGES for j in range(8)}
    assert {int(i) for i in ids[column["LATE"] == 1]} == late
    assert (column["GATE"][column["LATE"] == 1] == 0).all()  # late cells are never sorted
    on_time = column["LATE"] == 0
    assert (column["GATE"][on_time] > 0).any()  # the gates did sort
    assert (column["GATE"][on_time & (column["DEAD"] == 1)] == 0).all()
    np.testing.assert_allclose(column["TIME"][ids < 9000], (ids[ids < 9000] - 5000) * 1e-3, atol=2e-6)
    assert text["flowsort_acquisition_count"] == "1" and text["src"] == "acq-a"


def test_a_reload_changing_the_gates_starts_a_new_file(live_run: dict) -> None:
    results = live_run["results"]
    before, text_before = check_events(results / "acq_b.fcs", live_run, ["no-sort", "mitotic", "interphase"])
    after, text_after = check_events(results / "acq_b-2.fcs", live_run, ["no-sort", "g1-only"])
    assert sorted(before["EVENT_ID"].astype(int).tolist()) == list(range(20000, 20016))
    assert sorted(after["EVENT_ID"].astype(int).tolist()) == list(range(20100, 20116))
    assert text_before["flowsort_acquisition"] == text_after["flowsort_acquisition"] == "acq/b"
    np.testing.assert_array_equal(after["GATE"], (after["P_G1"] >= 0.14 - 1e-6).astype(float))


# ---------------------------------------------------------------------------- in process


def serve_and_capture(quick_bundle: Path, cells: np.ndarray, **kwargs) -> tuple[Service, list[DecisionBlock],
                                                                                  dict[int, int]]:
    """Run 40 cells through an in-process service; the DecisionBlocks its emitter was handed."""
    from streamer.client import Receiver, Sender

    config = make_config(pub={"endpoint": ""}, deadline={"budget_us": 60_000_000.0, "budget_from": "receipt"},
                         gates=GATES[:1])
    service = Service(quick_bundle, config, **kwargs).start()
    blocks: list[DecisionBlock] = []
    post = service.emitter.post
    lock = threading.Lock()

    def capture(item: object) -> None:
        if isinstance(item, DecisionBlock):
            with lock:
                blocks.append(item)
        post(item)

    service.emitter.post = capture
    receiver = Receiver(service.endpoints["push"])
    sender = Sender(service.endpoints["ingest"])
    ids = np.arange(700, 740, dtype=np.uint64)
    times = 10**18 + ids.astype(np.int64) * 1000
    try:
        handshake(sender, receiver)
        for start in range(0, 40, 5):
            sender.cells("acq-x", ids[start:start + 5], cells[start:start + 5], CHANNELS,
                         capture_ns=times[start:start + 5])
        assert receiver.wait_for(ids.tolist(), 30)
    finally:
        sender.close(linger=0)
        receiver.close()
        service.stop()
    return service, [b for b in blocks if b.acquisition == "acq-x"], dict(zip(ids.tolist(), times.tolist()))


@pytest.fixture(scope="module")
def cells() -> np.ndarray:
    from trainer.synthetic import generate

    return generate(40, seed=9, size=32).images


def test_without_results_nothing_is_copied(quick_bundle: Path, cells: np.ndarray) -> None:
    service, blocks, _ = serve_and_capture(quick_bundle, cells)
    assert sum(len(b.event_ids) for b in blocks) == 40 and all(b.columns is not None for b in blocks)
    assert all(b.capture_ns is None and b.probabilities is None and b.embedding is None for b in blocks)
    assert service.emitter.results is None and service.dispatcher.results_embedding is None
    assert "results" not in service.endpoints


def test_with_results_blocks_own_copies_of_the_outputs(quick_bundle: Path, cells: np.ndarray,
                                                       tmp_path: Path) -> None:
    path = tmp_path / "one.fcs"  # no {acquisition}: one file for the run, finished at stop
    service, blocks, capture = serve_and_capture(quick_bundle, cells, results=path)
    buffers = [array for buffer in getattr(service.model.engine, "_buffers", []) for array in buffer.arrays]
    assert sum(len(b.event_ids) for b in blocks) == 40 and all(b.columns is not None for b in blocks)
    for block in blocks:
        n = len(block.event_ids)
        assert block.probabilities.shape == (n, 7)
        assert block.embedding.shape == (n, min(8, service.model.bundle.embedding_dim))
        assert not any(np.shares_memory(block.probabilities, b) or np.shares_memory(block.embedding, b)
                       for b in buffers)
        assert block.capture_ns.tolist() == [capture[int(i)] for i in block.event_ids]
        np.testing.assert_array_equal(block.probabilities.max(axis=1), block.columns.probability)
    column, text, _ = read(path)
    assert sorted(column["EVENT_ID"].astype(int).tolist()) == list(range(700, 740))
    np.testing.assert_allclose(column["TIME"], (column["EVENT_ID"] - 700) * 1e-6, atol=1e-9)
    assert text["flowsort_acquisition"] == "acq-x" and not list(tmp_path.glob("*.partial"))


# ---------------------------------------------------------------------------- options


def test_results_option_and_config_key(quick_bundle: Path, tmp_path: Path) -> None:
    from streamer.cli import serve
    from streamer.config import load_config

    parser = argparse.ArgumentParser()
    commands = parser.add_subparsers()
    serve.add_parser(commands)
    args = parser.parse_args(["serve", "bundle", "--results", "out/{acquisition}.fcs"])
    assert args.results == "out/{acquisition}.fcs"
    assert "{acquisition}" in commands.choices["serve"].format_help()

    config_path = write_toml(tmp_path / "s.toml", {"service": {"results": "fcs/{acquisition}.fcs"}})
    config = load_config(config_path)
    assert Service(quick_bundle, config).results_path == str(tmp_path / "fcs" / "{acquisition}.fcs")
    assert Service(quick_bundle, config, results="x.fcs").results_path == "x.fcs"  # the option wins
    assert Service(quick_bundle, make_config()).results_path is None


def test_an_unwritable_results_folder_fails_the_start(quick_bundle: Path, tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    service = Service(quick_bundle, make_config(), results=tmp_path / "a-file" / "{acquisition}" / "r.fcs")
    with pytest.raises(UserError, match="cannot create the folder"):
        service.start()
    assert service.stopped and service.results is None
