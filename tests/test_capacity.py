"""The engine speed measured at start and the warning when the expected event rate is out of reach."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

import engines
from engines.bundle import load_bundle
from streamer.capacity import EngineSpeed, capacity_message, log_engine_speed
from streamer.model import profile


def test_speed_is_measured_on_the_engine_and_logged(quick_bundle: Path, caplog: pytest.LogCaptureFixture) -> None:
    bundle = load_bundle(quick_bundle)
    images, _ = bundle.validation_cells()
    with engines.load(bundle, "auto", "fp32", max_batch=8) as engine, caplog.at_level(logging.INFO):
        costs = profile(engine, images[:8], (1, 8), runs=1)  # the planner's profile, as the service takes it
        speed = log_engine_speed(costs, expected_rate=1e9, log=logging.getLogger("flowsort.test"))
    assert speed.batch1_cells_per_s > 0 and speed.best_batch in (1, 8)
    assert speed.best_cells_per_s >= speed.batch1_cells_per_s
    warning = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert warning and "above what this model can classify" in warning[0].getMessage()


@pytest.mark.parametrize(("rate", "level", "words"), [
    (None, logging.INFO, "sustainable end to end"),
    (200, logging.INFO, "fits"),
    (500, logging.WARNING, "expect late decisions"),
    (1500, logging.WARNING, "above what this model can classify"),
])
def test_capacity_message(rate: float | None, level: int, words: str) -> None:
    speed = EngineSpeed(batch1_cells_per_s=400, best_cells_per_s=1000, best_batch=32)  # ~300 sustainable
    got_level, line = capacity_message(speed, rate)
    assert got_level == level and words in line


def test_expected_rate_is_read_from_the_service_section_and_checked() -> None:
    from streamer.config import ConfigError, parse_config

    assert parse_config({}).service.expected_rate == 0.0  # not set
    assert parse_config({"service": {"expected_rate": 1000}}).service.expected_rate == 1000
    with pytest.raises(ConfigError, match=r"\[service\] expected_rate must be >= 0"):
        parse_config({"service": {"expected_rate": -5}})
