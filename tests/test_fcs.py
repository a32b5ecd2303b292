"""FCS 3.1 results: the writer read back by an independent parser, and export-fcs against a live service.

The independent reader is FlowIO, the FCS parser FlowKit reads files with
(fcsparser pins numpy < 2, and FlowKit itself pulls in bokeh and pyarrow).
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

import numpy as np
import pytest

from streamer.fcs import HEADER_LIMIT, FcsWriter, Parameter, encode_text, header

flowio = pytest.importorskip("flowio", reason="the independent FCS reader: pip install -e '.[dev]'")

CHANNELS = (3, 6)
GATES = [
    {"name": "mitotic", "classes": ["Prophase", "Metaphase", "Anaphase", "Telophase"], "min_probability": 0.5,
     "stream": 1},
    {"name": "interphase", "classes": ["G1", "S_phase", "G2"], "min_probability": 0.0, "stream": 2},
]


def read(path: Path) -> tuple[np.ndarray, dict[str, str], flowio.FlowData]:
    """Events [N, P], TEXT keywords (lower case, without '$', as FlowIO gives them) and the FlowData."""
    data = flowio.FlowData(str(path))
    events = np.asarray(data.events, np.float64).reshape(data.event_count, data.channel_count)
    return events, data.text, data


# ---------------------------------------------------------------------------- the format


def test_round_trip_with_flowio(tmp_path: Path) -> None:
    parameters = [Parameter("EVENT_ID"), Parameter("TIME", "seconds"), Parameter("P_G1", "G1"),
                  Parameter("P_x_y", "x|y/z")]  # a label holding the usual delimiters
    rng = np.random.default_rng(1)
    batches = [rng.normal(size=(n, 4)) * 100 for n in (5, 1, 0, 17)]
    path = tmp_path / "run.fcs"
    with FcsWriter(path, parameters, {"$TIMESTEP": "1", "FLOWSORT_CLASS_0": "G1"}) as writer:
        for batch in batches:
            writer.append(batch)
    expected = np.concatenate(batches).astype(np.float32)
    events, text, data = read(path)
    np.testing.assert_array_equal(events, expected)
    assert data.version == "3.1" and data.pnn_labels == ["EVENT_ID", "TIME", "P_G1", "P_x_y"]
    assert data.pns_labels == ["", "seconds", "G1", "x|y/z"]
    assert data.time_index == 1  # TIME is recognized as the time parameter
    assert text["datatype"] == "F" and text["mode"] == "L" and text["byteord"] == "1,2,3,4"
    assert text["tot"] == "23" and text["par"] == "4" and text["p1b"] == "32" and text["p1e"] == "0,0"
    assert text["flowsort_class_0"] == "G1" and text["timestep"] == "1"
    assert text["beginanalysis"] == text["endanalysis"] == "0"
    assert int(text["p1r"]) == int(np.ceil(expected[:, 0].max()))
    # DATA ends exactly at the end of the file, where $ENDDATA says
    assert int(text["enddata"]) == path.stat().st_size - 1
    assert int(text["enddata"]) - int(text["begindata"]) + 1 == expected.nbytes
    assert not (tmp_path / "run.fcs.partial").exists()


def test_float64_keeps_large_event_ids_exact(tmp_path: Path) -> None:
    ids = np.array([[2**40 + 1], [2**24 + 1]], np.float64)
    with FcsWriter(tmp_path / "d.fcs", [Parameter("EVENT_ID")], datatype="D") as writer:
        writer.append(ids)
    events, text, _ = read(tmp_path / "d.fcs")
    assert text["datatype"] == "D" and text["p1b"] == "64"
    np.testing.assert_array_equal(events, ids)


def test_header_offsets_past_99999999_are_zero_and_text_keywords_hold_them() -> None:
    small = header(58, 900, 3000, 3999)
    assert len(small) == 58 and small[:10] == b"FCS3.1    "
    assert [int(small[i:i + 8]) for i in range(10, 58, 8)] == [58, 900, 3000, 3999, 0, 0]
    large = header(58, 900, 3000, HEADER_LIMIT + 1)
    assert [int(large[i:i + 8]) for i in range(10, 58, 8)] == [58, 900, 0, 0, 0, 0]
    edge = header(58, 900, 3000, HEADER_LIMIT)  # the last byte a HEADER field can hold
    assert int(edge[34:42]) == HEADER_LIMIT


def test_a_file_larger_than_the_header_can_address(tmp_path: Path) -> None:
    """100 MB of zeros and one marked row: FlowIO finds the DATA through $BEGINDATA/$ENDDATA."""
    width = 25
    rows = HEADER_LIMIT // (width * 4) + 1
    chunk = np.zeros((100_000, width), np.float32)
    path = tmp_path / "big.fcs"
    with FcsWriter(path, [Parameter(f"C{i}") for i in range(width)]) as writer:
        for start in range(0, rows, len(chunk)):
            writer.append(chunk[:min(len(chunk), rows - start)])
        writer.append(np.arange(width, dtype=np.float32)[None])
    raw = path.read_bytes()[:58]
    assert int(raw[26:34]) == 0 and int(raw[34:42]) == 0  # DATA offsets: 0 in the HEADER
    events, text, data = read(path)
    assert data.header["data_start"] == 0 and int(text["enddata"]) > HEADER_LIMIT
    assert len(events) == rows + 1
    np.testing.assert_array_equal(events[-1], np.arange(width))
    path.unlink()


def test_unfinished_file_is_only_a_partial(tmp_path: Path) -> None:
    path = tmp_path / "live.fcs"
    writer = FcsWriter(path, [Parameter("A")])
    writer.append(np.ones((3, 1)))
    # A crash now (no close) leaves NAME.fcs.partial and no NAME.fcs.
    assert not path.exists() and (tmp_path / "live.fcs.partial").exists()
    writer.close()
    assert path.exists() and not (tmp_path / "live.fcs.partial").exists()
    # An error inside `with` throws the partial away.
    with pytest.raises(RuntimeError):
        with FcsWriter(tmp_path / "failed.fcs", [Parameter("A")]) as failed:
            failed.append(np.ones((1, 1)))
            raise RuntimeError("engine failed")
    assert not list(tmp_path.glob("failed.fcs*"))


def test_text_delimiter_is_one_no_value_contains_and_is_escaped_otherwise() -> None:
    assert encode_text({"$A": "x|y"}).startswith(b"/")
    every = "|/\\*!^~"
    text = encode_text({"$A": every})
    assert text == b"|$A|" + every.replace("|", "||").encode() + b"|"
    with pytest.raises(ValueError, match="empty"):
        encode_text({"$A": ""})
    with pytest.raises(ValueError, match="commas"):
        FcsWriter("unused.fcs", [Parameter("A,B")])


# ---------------------------------------------------------------------------- the results layout


def test_results_rows_and_codes() -> None:
    from streamer.config import parse_config
    from streamer.policy import Policy
    from streamer.fcs_layout import ResultLayout, closing_keywords

    gates = parse_config({"gates": [{"name": "a", "classes": ["A"], "min_probability": 0.6, "stream": 3}]}).gates
    policy = Policy(("A", "B c"), gates, 0.5)
    layout = ResultLayout.for_policy(policy, embedding_dim=4, embedding=8)
    assert layout.embedding == 4  # no more than the bundle has
    names = [p.name for p in layout.parameters()]
    assert names == ["EVENT_ID", "TIME", "CLASS", "PROBABILITY", "P_A", "P_B_c", "DEAD_SCORE", "DEAD", "GATE",
                     "LATE", "EMB_1", "EMB_2", "EMB_3", "EMB_4"]
    probabilities = np.array([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3]], np.float32)
    dead_score = np.array([0.1, 0.2, 0.9], np.float32)
    columns = policy.decide(probabilities, dead_score)
    late = np.array([False, False, False])
    embedding = np.arange(15, dtype=np.float32).reshape(3, 5)
    rows = layout.rows(np.array([7, 8, 9], np.uint64), np.array([10**9, 2 * 10**9, 4 * 10**9]), 10**9,
                       probabilities, embedding, columns, late)
    assert rows[:, 0].tolist() == [7, 8, 9] and rows[:, 1].tolist() == [0, 1, 3]
    assert rows[:, 2].tolist() == [0, 1, 0]  # class codes
    assert rows[:, 7].tolist() == [0, 0, 1]  # dead
    assert rows[:, 8].tolist() == [1, 0, 0]  # gate 1 = "a"; the dead third cell is not sorted
    np.testing.assert_array_equal(rows[:, 10:], embedding[:, :4])
    keywords = layout.keywords("acq 1", "abc", 10**9)
    assert keywords["FLOWSORT_CLASS_1"] == "B c" and keywords["FLOWSORT_GATE_0"] == "no-sort"
    assert keywords["FLOWSORT_GATE_1"] == "a" and keywords["FLOWSORT_GATE_1_STREAM"] == "3"
    assert re.fullmatch(r"\d\d-[A-Z]{3}-19(69|70)", keywords["$DATE"])  # local time
    assert re.fullmatch(r"\d\d:\d\d:01", keywords["$BTIM"])
    # event ids float32 cannot hold are flagged in the file
    assert closing_keywords(10**9, {"non_finite": 2}, 2.0**24, "F")["FLOWSORT_EVENT_ID_ROUNDED"] == "1"
    exact = closing_keywords(10**9, {"non_finite": 2}, 2.0**24, "D")
    assert "FLOWSORT_EVENT_ID_ROUNDED" not in exact and exact["FLOWSORT_UNCLASSIFIED_NON_FINITE"] == "2"


# ---------------------------------------------------------------------------- export-fcs against a live service


@pytest.fixture(scope="module")
def served_run(quick_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A real `flowsort serve --record` run: the recording, the config, and every decision it sent."""
    from trainer.synthetic import generate
    from streamer.client import Receiver, Sender
    from streamer.testing import Served, config_dict, write_toml

    folder = tmp_path_factory.mktemp("fcs-serve")
    config = write_toml(folder / "streamer.toml", config_dict(deadline={"budget_us": 5_000_000.0},
                                                              pub={"endpoint": ""}, gates=GATES))
    record = folder / "run.fsacq"
    cells = generate(96, seed=4, size=32, prior="uniform", dead_fraction=0.15).images
    ids = np.arange(5000, 5096, dtype=np.uint64)
    t0 = time.time_ns()
    capture = t0 + (ids.astype(np.int64) - 5000) * 1_000_000  # one cell per millisecond
    with Served(quick_bundle, config, folder, ["--record", str(record)]) as served:
        receiver = Receiver(served["push"])
        sender = Sender(served["ingest"])
        try:
            for nonce in range(200):  # PUSH drops while no consumer is connected
                sender.ping(nonce)
                if receiver.wait_other("pong", 0.05, nonce=nonce):
                    break
            for start in range(0, 96, 8):
                sender.cells("acq-fcs", ids[start:start + 8], cells[start:start + 8], CHANNELS,
                             capture_ns=capture[start:start + 8])
            bad = cells[:2].astype(np.float32)
            bad[0, 0, 0, 0] = np.nan  # one cell the service cannot classify
            sender.cells("acq-fcs", [9000, 9001], bad, CHANNELS, capture_ns=t0 + 200_000_000)
            assert receiver.wait_for([*ids.tolist(), 9000, 9001], 30), served.log()
            rows = dict(receiver.rows)
        finally:
            sender.close(linger=0)
            receiver.close()
        assert served.stop() == 0, served.log()
    return {"record": record, "config": config, "rows": rows, "ids": ids, "folder": folder}


def export_cli(argv: list[str]) -> int:
    """`flowsort export-fcs` through its own parser (independent of its registration in `flowsort`)."""
    from streamer.cli import export_fcs

    parser = argparse.ArgumentParser()
    export_fcs.add_parser(parser.add_subparsers())
    args = parser.parse_args(["export-fcs", *argv])
    return args.run(args)


def test_export_fcs_matches_the_live_decisions(served_run: dict, quick_bundle: Path, tmp_path: Path) -> None:
    from streamer.testing import engine_for_tests

    output = tmp_path / "run.fcs"
    assert export_cli([str(served_run["record"]), str(quick_bundle), "-o", str(output), "--config",
                       str(served_run["config"]), "--engine", engine_for_tests()]) == 0
    events, text, data = read(output)
    names = data.pnn_labels
    column = {name: events[:, i] for i, name in enumerate(names)}
    classes = [text[f"flowsort_class_{i}"] for i in range(7)]
    gates = [text[f"flowsort_gate_{j}"] for j in range(3)]
    assert gates == ["no-sort", "mitotic", "interphase"]
    assert names[4:11] == [f"P_{c}" for c in classes] and names[-8:] == [f"EMB_{i}" for i in range(1, 9)]
    assert text["flowsort_acquisition"] == "acq-fcs" and text["flowsort_unclassified_non_finite"] == "1"

    # One event per classified cell: the 96 sent plus the finite one of the NaN message.
    ids = column["EVENT_ID"].astype(np.int64)
    assert sorted(ids.tolist()) == sorted([*served_run["ids"].tolist(), 9001])
    live = served_run["rows"]
    assert live[9000]["error"] == "non_finite" and live[9001]["error"] == ""
    assert not any(live[int(i)]["late"] for i in ids)  # a 5 s budget: nothing late
    # Batches differ from the live run's, and with them the last bits: allow a near tie to flip.
    differ = {"class": 0, "dead": 0, "gate": 0}
    for k, event_id in enumerate(ids.tolist()):
        row = live[event_id]
        assert column["PROBABILITY"][k] == pytest.approx(row["probability"], abs=2e-3)
        assert column["DEAD_SCORE"][k] == pytest.approx(row["dead_score"], rel=1e-3, abs=1e-3)
        differ["class"] += classes[int(column["CLASS"][k])] != row["label"]
        differ["dead"] += bool(column["DEAD"][k]) != row["dead"]
        differ["gate"] += gates[int(column["GATE"][k])] != (row["gate"] or "no-sort")
    assert max(differ.values()) <= 2, differ
    assert (column["LATE"] == 0).all()
    probabilities = events[:, 4:11]
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-4)
    np.testing.assert_allclose(probabilities.max(axis=1), column["PROBABILITY"], atol=1e-6)
    # TIME: seconds since the first cell (capture times were one millisecond apart)
    sent = ids < 9000
    np.testing.assert_allclose(column["TIME"][sent], (ids[sent] - 5000) * 1e-3, atol=1e-5)
    assert data.time_index == 1


def test_export_fcs_needs_a_choice_between_acquisitions(quick_bundle: Path, tmp_path: Path) -> None:
    from flowsort.errors import UserError
    from streamer import codec
    from streamer.recording import AcquisitionWriter
    from streamer.testing import engine_for_tests
    from trainer.synthetic import generate

    cells = generate(6, seed=2, size=32).images
    record = tmp_path / "two.fsacq"
    with AcquisitionWriter(record) as writer:
        writer.write(codec.encode_cells("first", [1, 2, 3], cells[:3], CHANNELS, capture_ns=10**18))
        writer.write([b"\xc1 not msgpack"])  # recorded as received, skipped
        writer.write(codec.encode_cells("second", [4, 5, 6], cells[3:], CHANNELS, capture_ns=10**18))
    common = [str(record), str(quick_bundle), "--engine", engine_for_tests()]
    with pytest.raises(UserError, match="several acquisitions \\('first', 'second'\\).*--acquisition"):
        export_cli([*common, "-o", str(tmp_path / "x.fcs")])
    assert not list(tmp_path.glob("x.fcs*"))
    assert export_cli([*common, "-o", str(tmp_path / "second.fcs"), "--acquisition", "second",
                       "--embedding", "0", "--datatype", "D"]) == 0
    events, text, data = read(tmp_path / "second.fcs")
    assert events[:, 0].tolist() == [4, 5, 6] and text["datatype"] == "D"
    assert not any(name.startswith("EMB_") for name in data.pnn_labels)
    assert "flowsort_gate_1" not in text and text["flowsort_gate_0"] == "no-sort"  # default config: no gates
    assert (events[:, data.pnn_labels.index("GATE")] == 0).all()
    with pytest.raises(UserError, match="no cells of acquisition 'third'"):
        export_cli([*common, "-o", str(tmp_path / "y.fcs"), "--acquisition", "third"])


def test_export_fcs_is_a_flowsort_command(served_run: dict, quick_bundle: Path, tmp_path: Path) -> None:
    """Needs `export_fcs.add_parser(subparsers)` in streamer/cli/__init__.py."""
    from flowsort.cli import main
    from streamer.testing import engine_for_tests

    output = tmp_path / "cli.fcs"
    assert main(["export-fcs", str(served_run["record"]), str(quick_bundle), "-o", str(output),
                 "--engine", engine_for_tests(), "--embedding", "2"]) == 0
    events, _, data = read(output)
    assert len(events) == 97 and data.pnn_labels[-2:] == ["EMB_1", "EMB_2"]
