"""The GPU proof's script, end to end on the CPU: `flowsort bench gpu --dry-run` (what `make gpu-check DRY_RUN=1` runs).

It takes the session's quick bundle instead of training one (`make gpu-check DRY_RUN=1` trains it too), runs every
other phase in its own time-boxed process (parity of the cuda engine's eager path on the CPU device, the engine
timing, `flowsort serve` with blocks of 64 cells and with single cells, the service with a no-op engine) and checks
the figures it wrote.
"""

from __future__ import annotations

import json
from pathlib import Path

from flowsort.cli import main


def test_dry_run_writes_every_figure(quick_bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "gpu"
    assert main(["bench", "gpu", "--dry-run", "--bundle", str(quick_bundle), "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    phases = summary["phases"]
    assert summary["dry_run"] and all(result["ok"] for result in phases.values()), phases
    assert set(phases) == {"model", "engine-cuda-fp32-cpu", "engine-cuda-bf16-cpu", "e2e-blocks", "e2e-single",
                           "service"}
    fp32 = phases["engine-cuda-fp32-cpu"]
    assert fp32["parity"]["agreement"] == 1.0 and fp32["parity"]["max_abs_probability_diff"] < 1e-4
    assert [row["batch"] for row in fp32["bench"]] == [1, 8]
    assert all(row["throughput_cells_per_s"] > 0 for row in fp32["bench"])
    for name, cells_per_message in (("e2e-blocks", 64), ("e2e-single", 1)):
        sweep = phases[name]
        assert sweep["cells_per_message"] == cells_per_message and sweep["levels"], sweep
        assert sweep["levels"][0]["cells_sent"] > 0
    assert phases["service"]["blocks"]["levels"][0]["throughput_cells_per_s"] > 0
    assert all(check["ok"] is None for check in summary["checks"])  # a dry run judges no target
    assert (out / "summary.png").stat().st_size > 10_000 and (out / "engines.png").is_file()


def test_a_failing_phase_is_recorded_and_the_rest_still_run(tmp_path: Path) -> None:
    out = tmp_path / "gpu"
    status = main(["bench", "gpu", "--dry-run", "--bundle", str(tmp_path / "absent"), "--out", str(out),
                   "--phases", "model,service"])
    assert status == 1
    summary = json.loads((out / "summary.json").read_text())
    assert not summary["phases"]["model"]["ok"] and "bundle.json is missing" in summary["phases"]["model"]["error"]
    assert not summary["phases"]["service"]["ok"]  # ran after the failure, and failed on its own
