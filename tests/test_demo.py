"""`flowsort demo`: the model it trains is sized for the CPU it runs on."""

from __future__ import annotations

import pytest

from bench.demo import WIDTH, WIDTH_FP32, demo_width


@pytest.mark.parametrize(("flags", "cap", "width"), [
    (["avx2", "fma", "avx512f", "avx512_bf16"], "", WIDTH),
    (["avx2", "fma", "amx_tile", "amx_bf16"], "", WIDTH),
    (["avx2", "fma"], "", WIDTH_FP32),  # an AVX2-only CPU: the engine runs fp32
    (["avx2", "fma", "avx512f", "avx512_bf16"], "AVX2", WIDTH_FP32),  # kernels capped below bf16
])
def test_the_demo_model_is_narrower_where_the_engine_runs_fp32(monkeypatch: pytest.MonkeyPatch, flags: list[str],
                                                               cap: str, width: float) -> None:
    monkeypatch.setattr("engines.cpu.cpu_flags", lambda: flags)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
    assert demo_width() == width
    assert WIDTH_FP32 < WIDTH


def test_the_demo_says_plainly_when_the_streamer_estimates_the_rate_out_of_reach(
        capsys: pytest.CaptureFixture[str]) -> None:
    from bench.demo import say_if_unsustainable
    from streamer.capacity import EngineSpeed

    speed = EngineSpeed(batch1_cells_per_s=1400, best_cells_per_s=3100, best_batch=8).as_dict()  # ~930 sustainable
    say_if_unsustainable(speed, 1000)
    out = capsys.readouterr().out
    assert "about 930 cells/s sustainable" in out and "unlikely to sustain 1,000 cells/s" in out
    assert 'DEMO_ARGS="--rate 900"' in out
    say_if_unsustainable(speed, 900)
    out = capsys.readouterr().out
    assert "about 930 cells/s sustainable" in out and "unlikely" not in out
    say_if_unsustainable({}, 1000)  # a streamer that sent no estimate: nothing to say
    assert capsys.readouterr().out == ""


def test_the_demo_verdict_counts_refused_cells_against_the_deadline(capsys: pytest.CaptureFixture[str]) -> None:
    import numpy as np

    from bench.demo import print_verdict
    from bench.scoring import latency_summary, outcome_counts

    def summary(late: int, refused: int, sent: int = 2000) -> dict:
        error = np.array([0] * (sent - refused) + [1] * refused, np.int16)
        late_flags = np.arange(sent) < late
        counts = outcome_counts(np.ones(sent, bool), late_flags, error, ["", "overload_refused"])
        return {**counts, "latency_ms": latency_summary(np.full(sent, 5.0)), "streamer_cpu_core_fraction": 0.9}

    ceiling = {"throughput_cells_per_s": 9000.0}
    print_verdict(summary(late=8, refused=10), ceiling, 10.0)
    out = capsys.readouterr().out
    assert "Result: deadline kept: 99.10% of the cells decided in time" in out and "10 refused at the door" in out
    # 0.6% late is within 1% alone, but with 0.6% refused the sorter lost 1.2% of the cells
    print_verdict(summary(late=12, refused=12), ceiling, 10.0)
    out = capsys.readouterr().out
    assert "Result: deadline NOT kept: 98.80%" in out
    assert "Missed: 24 of 2,000 cells not decided in time (1.20%, at most 1%): 12 late, 12 refused" in out
