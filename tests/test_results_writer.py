"""The results thread of `flowsort serve --results`: per-acquisition FCS files, never blocking, never overwriting."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from streamer.config import parse_config
from streamer.policy import Policy
from streamer.results_thread import ResultBlock, ResultsWriter

flowio = pytest.importorskip("flowio", reason="the independent FCS reader: pip install -e '.[dev]'")

GATES = parse_config({"gates": [{"name": "a", "classes": ["A"], "min_probability": 0.5}]}).gates


def block(acquisition: str, ids: list[int], policy: Policy | None = None, late: bool = False) -> ResultBlock:
    policy = policy or Policy(("A", "B"), GATES, 0.5)
    n, k = len(ids), len(policy.class_names)
    probabilities = np.tile(np.eye(k, dtype=np.float32)[0], (n, 1))
    columns = policy.decide(probabilities, np.zeros(n, np.float32))
    lateness = np.full(n, late)
    columns.gate[lateness] = -1  # as the emitter leaves a late cell
    return ResultBlock(acquisition, "bundlehash", policy, np.array(ids, np.uint64),
                       10**18 + np.array(ids, np.int64) * 1000, probabilities,
                       np.ones((n, 16), np.float32), columns, lateness)


def events(path: Path) -> tuple[np.ndarray, dict[str, str], list[str]]:
    data = flowio.FlowData(str(path))
    return np.asarray(data.events).reshape(data.event_count, data.channel_count), data.text, data.pnn_labels


def test_one_file_per_acquisition_finished_at_its_end(tmp_path: Path) -> None:
    (tmp_path / "acq_2.fcs").write_bytes(b"an earlier run")  # never overwritten
    writer = ResultsWriter(tmp_path / "{acquisition}.fcs", embedding=3)
    writer.start()
    writer.post(block("acq/1", [1, 2]))
    writer.post(block("acq 2", [10]))
    writer.post(block("acq/1", [3], late=True))
    writer.end("acq/1")
    writer.post(block("acq 2", [11]))
    writer.stop()
    writer.join(10)
    assert not writer.is_alive()
    first, second = tmp_path / "acq_1.fcs", tmp_path / "acq_2-2.fcs"
    assert writer.written == [first, second]
    assert (tmp_path / "acq_2.fcs").read_bytes() == b"an earlier run"
    rows, text, names = events(first)
    assert names[-3:] == ["EMB_1", "EMB_2", "EMB_3"]
    column = dict(zip(names, rows.T))
    assert column["EVENT_ID"].tolist() == [1, 2, 3] and column["LATE"].tolist() == [0, 0, 1]
    assert column["GATE"].tolist() == [1, 1, 0]  # the late cell was not sorted
    np.testing.assert_allclose(column["TIME"], [0, 1e-6, 2e-6], atol=1e-9)
    assert text["flowsort_acquisition"] == "acq/1" and text["flowsort_dropped_events"] == "0"
    assert events(second)[0][:, 0].tolist() == [10, 11]


def test_post_never_blocks_and_counts_what_it_drops(tmp_path: Path) -> None:
    dropped: list[int] = []
    writer = ResultsWriter(tmp_path / "run.fcs", capacity=2, on_drop=dropped.append)
    for ids in ([1, 2], [3], [4, 5, 6]):  # the thread is not running yet: the queue fills
        writer.post(block("x", ids))
    writer.start()
    writer.stop()
    writer.join(10)
    rows, text, _ = events(tmp_path / "run.fcs")
    assert dropped == [2] and text["flowsort_dropped_events"] == "2"
    assert rows[:, 0].tolist() == [3, 4, 5, 6]


def test_a_reload_with_other_classes_starts_a_new_file(tmp_path: Path) -> None:
    writer = ResultsWriter(tmp_path / "run.fcs")
    writer.start()
    writer.post(block("x", [1]))
    writer.post(block("x", [2], Policy(("A", "B", "C"), GATES, 0.5)))
    writer.stop()
    writer.join(10)
    assert writer.written == [tmp_path / "run.fcs", tmp_path / "run-2.fcs"]
    assert "P_C" in events(tmp_path / "run-2.fcs")[2] and "P_C" not in events(tmp_path / "run.fcs")[2]


def test_a_reload_with_another_bundle_starts_a_new_file(tmp_path: Path) -> None:
    """Same classes and gates, another model: a file's FLOWSORT_BUNDLE must hold for every event in it."""
    writer = ResultsWriter(tmp_path / "run.fcs")
    writer.start()
    writer.post(block("x", [1]))
    retrained = block("x", [2])
    retrained.bundle = "otherhash"
    writer.post(retrained)
    writer.stop()
    writer.join(10)
    assert writer.written == [tmp_path / "run.fcs", tmp_path / "run-2.fcs"]
    assert events(tmp_path / "run.fcs")[1]["flowsort_bundle"] == "bundlehash"
    assert events(tmp_path / "run-2.fcs")[1]["flowsort_bundle"] == "otherhash"


def test_unclassified_cells_are_counted_in_their_file(tmp_path: Path) -> None:
    writer = ResultsWriter(tmp_path / "{acquisition}.fcs")
    writer.unclassified("a", "non_finite", 2)
    writer.unclassified("b", "expired", 5)
    writer.start()
    writer.post(block("a", [1]))
    writer.unclassified("a", "non_finite", 1)
    writer.unclassified("a", "engine_error", 4)
    writer.unclassified("c", "oversized", 1)  # no classified cell: no file
    writer.end("a")
    writer.end("c")
    writer.stop()
    writer.join(10)
    assert writer.written == [tmp_path / "a.fcs"]
    text = events(tmp_path / "a.fcs")[1]
    assert text["flowsort_unclassified_non_finite"] == "3" and text["flowsort_unclassified_engine_error"] == "4"
    assert "flowsort_unclassified_expired" not in text


def test_a_full_queue_drops_blocks_never_ends(tmp_path: Path) -> None:
    writer = ResultsWriter(tmp_path / "{acquisition}.fcs", capacity=2)
    entered, release = threading.Event(), threading.Event()
    write = writer._write

    def stalled_write(item: ResultBlock) -> None:  # a disk that stalls after the first block
        write(item)
        entered.set()
        release.wait(10)

    writer._write = stalled_write
    writer.start()
    writer.post(block("a", [1]))
    assert entered.wait(10)
    writer.end("a")  # at the head of the queue while it overflows
    for acquisition, event_id in (("b", 2), ("b", 3), ("a", 4)):
        writer.post(block(acquisition, [event_id]))  # past 2 blocks: drops [2], not the end
    release.set()
    writer.stop()
    writer.join(10)
    assert [p.name for p in writer.written] == ["a.fcs", "b.fcs", "a-2.fcs"]  # "a" finished at its end
    assert events(tmp_path / "a.fcs")[0][:, 0].tolist() == [1]
    rows, text, _ = events(tmp_path / "b.fcs")
    assert rows[:, 0].tolist() == [3] and text["flowsort_dropped_events"] == "1"
