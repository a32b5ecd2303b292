"""The results thread of `flowsort serve --results`: per-acquisition FCS files, never blocking, never overwriting."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from streamer.config import parse_config
from streamer.policy import Policy
from streamer.results_writer import ResultBlock, ResultsWriter

flowio = pytest.importorskip("flowio", reason="the independent FCS reader: pip install -e '.[dev]'")

GATES = parse_config({"gates": [{"name": "a", "classes": ["A"], "min_probability": 0.5}]}).gates


def block(acquisition: str, ids: list[int], policy: Policy | None = None, late: bool = False) -> ResultBlock:
    policy = policy or Policy(("A", "B"), GATES, 0.5)
    n, k = len(ids), len(policy.class_names)
    probabilities = np.tile(np.eye(k, dtype=np.float32)[0], (n, 1))
    columns = policy.decide(probabilities, np.zeros(n, np.float32))
    lateness = np.full(n, late)
    columns.gate[lateness] = -1  # as apply_late leaves it
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
