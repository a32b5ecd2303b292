"""`flowsort simulate` and `flowsort replay` through a live streamer: truth travels via the recording."""

from __future__ import annotations

import json
from pathlib import Path

from flowsort.cli import main
from streamer.testing import engine_for_tests


def test_simulate_record_then_replay_scores_the_same_cells(quick_bundle: Path, tmp_path: Path) -> None:
    engine = engine_for_tests()
    recording = tmp_path / "run.fsacq"
    assert main(["simulate", "--serve", str(quick_bundle), "--engine", engine, "--rate", "300", "--seconds", "1.5",
                 "--prior", "uniform", "--pool", "256", "--transit-ms", "50", "--truth-in-messages", "--gate-threshold", "0.5",
                 "--record", str(recording), "--no-dashboard", "-o", str(tmp_path / "sim")]) == 0
    simulated = json.loads((tmp_path / "sim" / "simulate.json").read_text())["summary"]
    assert simulated["cells_sent"] > 300 and simulated["decided"] == simulated["cells_sent"]
    assert simulated["latency_ms"]["count"] == simulated["decided"]
    (gate,) = simulated["gates"]
    assert gate["gate"] == "mitotic" and gate["targets"] > 0 and gate["purity"] is not None
    # Every decided cell is dead, debris or live, so the flags split exactly between them.
    assert simulated["truth_dead"] + simulated["truth_debris"] + simulated["decided_live"] == simulated["decided"]
    assert (simulated["dead_flagged_truly_dead"] + simulated["dead_flagged_debris"] + simulated["dead_flagged_live"]
            == simulated["dead_flagged"])
    assert simulated["streamer_reports"]["simulated"]["cells"] == simulated["cells_sent"]
    assert (tmp_path / "sim" / "simulate.html").stat().st_size > 10_000

    # The streamer recorded the stream (with x_truth); replaying it scores the same cells against the same truth.
    assert main(["replay", str(recording), "--serve", str(quick_bundle), "--engine", engine, "--speed", "2",
                 "--transit-ms", "50", "--no-dashboard", "-o", str(tmp_path / "replay")]) == 0
    replayed = json.loads((tmp_path / "replay" / "replay.json").read_text())["summary"]
    assert replayed["cells_sent"] == simulated["cells_sent"] and replayed["decided"] == replayed["cells_sent"]
    (again,) = replayed["gates"]
    assert again["targets"] == gate["targets"]  # the same truth, read back from the file
    assert again["purity"] is not None or again["sorted"] == 0
    assert replayed.get("truth_dead") == simulated.get("truth_dead")
