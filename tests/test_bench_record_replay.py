"""Acquisition files for the bench: import with labels, record/replay round trip, truncated files."""

from __future__ import annotations

import threading
from pathlib import Path

import msgpack
import numpy as np
import pytest
import zmq

from bench.cell_sources import CellSet, recording_cells
from bench.record import Recorder
from bench.replay import load_plan, send_only
from bench.simulator import instrument_plan
from flowsort.cli import main
from streamer.codec import decode_ingest
from streamer.recording import KIND_TRUTH, PREFIX, AcquisitionReader, scan_file
from streamer.recording_truth import Truth, read_recording
from trainer.dataset import read_dataset
from trainer.dataset_acquisition import write_dataset_acquisition

ANY = "tcp://127.0.0.1:*"


@pytest.fixture(scope="module")
def acquisition(synthetic_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """300 synthetic cells as an acquisition file, through the import command."""
    from trainer.dataset import write_dataset

    small = read_dataset(synthetic_dataset).subset(np.arange(300))
    dataset = write_dataset(tmp_path_factory.mktemp("small") / "dataset", small)
    path = tmp_path_factory.mktemp("acq") / "cells.fsacq"
    assert main(["import", "dataset", str(dataset), "--to-acquisition", str(path)]) == 0
    return path


class Tap:
    """A recorder on an ephemeral port, in a thread: records until stopped."""

    def __init__(self, path: Path, context: zmq.Context) -> None:
        self.recorder = Recorder(path, ANY, context=context)
        self.endpoint = self.recorder.endpoint
        self.summary: dict = {}
        self.thread = threading.Thread(target=lambda: self.summary.update(self.recorder.run(idle_s=1.0, seconds=30)))
        self.thread.start()

    def wait(self) -> dict:
        self.thread.join(40)
        return self.summary


def test_import_writes_cells_and_labels(acquisition: Path, synthetic_dataset: Path) -> None:
    dataset = read_dataset(synthetic_dataset).subset(np.arange(300))
    recording = read_recording(acquisition)
    assert recording.tail is None and len(recording.messages) == 300
    cells = recording_cells(acquisition)
    assert cells.channels == (3, 6) and len(cells) == 300
    # every cell comes back with its own label and dead/debris truth (order: shuffled; match by pixels' id)
    ids = np.concatenate([m.decoded.event_ids for m in recording.messages])
    by_id = {int(i): k for k, i in enumerate(dataset.object_ids)}
    index = np.array([by_id[int(i)] for i in ids])
    assert np.array_equal(cells.images, dataset.images[index])
    assert np.array_equal(cells.truth.label, dataset.labels[index])
    assert np.array_equal(cells.truth.dead, dataset.truth["dead"][index])
    assert cells.truth.class_names == dataset.class_names
    with pytest.raises(Exception, match="exists"):
        write_dataset_acquisition(dataset, acquisition)


def test_verbatim_replay_records_byte_identical_messages(acquisition: Path, tmp_path: Path) -> None:
    context = zmq.Context()
    try:
        tap = Tap(tmp_path / "copy.fsacq", context)
        plan = load_plan(str(acquisition), timing="max", rate=None, speed=1.0, poisson=False, loops=1, verbatim=True,
                         transit_ms=None)
        record = send_only(context, tap.endpoint, plan)
        summary = tap.wait()
    finally:
        context.destroy(linger=0)
    assert record.messages_sent == 300 and summary["messages"] == 300 and summary["cells"] == 300
    original = [frames for _, frames in AcquisitionReader(acquisition).messages()]
    copied = [frames for _, frames in AcquisitionReader(tmp_path / "copy.fsacq").messages()]
    assert copied == original  # every frame, byte for byte, in order


def test_restamped_replay_at_a_rate_keeps_cells_and_renumbers_loops(acquisition: Path, tmp_path: Path) -> None:
    context = zmq.Context()
    try:
        tap = Tap(tmp_path / "loops.fsacq", context)
        plan = load_plan(str(acquisition), timing="rate", rate=2000.0, speed=1.0, poisson=False, loops=2,
                         verbatim=False, transit_ms=5.0)
        assert plan.truth is not None and len(plan.truth) == 600
        record = send_only(context, tap.endpoint, plan)
        tap.wait()
    finally:
        context.destroy(linger=0)
    assert abs(record.pacing.rate_error) < 0.02
    original = [decode_ingest(frames) for _, frames in AcquisitionReader(acquisition).messages()]
    sent = [decode_ingest(frames) for _, frames in AcquisitionReader(tmp_path / "loops.fsacq").messages()]
    assert len(sent) == 600
    for first, second, before in zip(sent[:300], sent[300:], original):
        assert np.array_equal(first.pixels, before.pixels) and np.array_equal(second.pixels, before.pixels)
        assert first.event_ids.tolist() == before.event_ids.tolist()  # the first pass keeps its ids
        assert second.event_ids[0] != before.event_ids[0]  # later passes get fresh ones
        assert int(first.deadline_ns[0]) - int(first.capture_ns[0]) == 5_000_000  # deadline = capture + transit
    assert len({int(m.event_ids[0]) for m in sent}) == 600
    # capture stamps are fresh and follow the 2,000/s schedule
    capture = np.array([int(m.capture_ns[0]) for m in sent])
    assert np.allclose(np.diff(capture) / 1e6, 0.5, atol=0.01)


def test_truncated_file_replays_every_intact_message(acquisition: Path, tmp_path: Path) -> None:
    data = acquisition.read_bytes()
    # find the start of the last message record before the truth records, and cut inside it
    offsets, offset = [], 0
    while offset < len(data):
        _, length, _ = PREFIX.unpack_from(data, offset)
        offsets.append(offset)
        offset += PREFIX.size + length
    records = list(AcquisitionReader(acquisition))
    last_message = max(i for i, r in enumerate(records) if r.kind == 2)
    torn = tmp_path / "torn.fsacq"
    torn.write_bytes(data[:offsets[last_message] + 30])  # the crash cut the last message and lost the truth
    assert scan_file(torn).tail is not None
    recording = read_recording(torn)
    assert len(recording.messages) == 299 and recording.tail and not recording.truth
    context = zmq.Context()
    try:
        tap = Tap(tmp_path / "after.fsacq", context)
        plan = load_plan(str(torn), timing="max", rate=None, speed=1.0, poisson=False, loops=1, verbatim=True,
                         transit_ms=None)
        send_only(context, tap.endpoint, plan)
        assert tap.wait()["messages"] == 299
    finally:
        context.destroy(linger=0)
    assert [f for _, f in AcquisitionReader(tmp_path / "after.fsacq").messages()] == \
        [f for _, f in AcquisitionReader(acquisition).messages()][:299]


def test_truth_in_messages_is_recorded_as_truth_records(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    n = 64
    truth = Truth(("A", "B"), rng.integers(-1, 2, n).astype(np.int16), rng.random(n) < 0.3, rng.random(n) < 0.1)
    cells = CellSet(rng.integers(0, 4000, (n, 2, 8, 8)).astype(np.uint16), (3, 6), truth, "test")
    plan = instrument_plan(cells, 4000.0, 0.05, poisson=False, cells_per_message=2, transit_ms=3.0,
                           acquisition="sim", truth_in_messages=True)
    context = zmq.Context()
    try:
        tap = Tap(tmp_path / "sim.fsacq", context)
        send_only(context, tap.endpoint, plan)
        summary = tap.wait()
    finally:
        context.destroy(linger=0)
    assert summary["cells"] == plan.cells and summary["truth_cells"] == plan.cells
    recording = read_recording(tmp_path / "sim.fsacq")
    # the service sees a valid cells message (x_truth is an extra key it ignores)
    header = msgpack.unpackb(recording.messages[0].frames[0], raw=False)
    assert recording.messages[0].decoded is not None and "x_truth" in header
    assert any(r.kind == KIND_TRUTH for r in AcquisitionReader(tmp_path / "sim.fsacq"))
    # the recorded truth is the plan's, cell by cell
    back = recording_cells(tmp_path / "sim.fsacq").truth
    assert np.array_equal(back.label, plan.truth.label) and np.array_equal(back.dead, plan.truth.dead)
    assert np.array_equal(back.debris, plan.truth.debris)
