"""The model's speed on this machine, measured when serving starts, against the event rate expected.

An operator picks a model for an event rate (docs/benchmarks.md, the frontier);
this says at start whether the machine can keep up, from the engine times per
batch size that the service's planner measures anyway (streamer/model.py), and
the pong's ``engine_speed`` tells clients (`make demo` asks it). End to end,
with Poisson arrivals and a p99 budget of 20 ms, ``flowsort serve`` sustained
about 30% of the engine's best-batch rate on the 2-core reference machine
(full width 156 of 474 cells/s, width 0.5 500 of 1,645), because only small
batches fit the latency budget and the streamer shares the cores; that ratio
is the estimate used here. A 10 ms budget keeps less: on a Zen 3 without
AVX-512 the demo model held 400 cells/s but not 600 against an estimate of
740-980 (docs/benchmarks.md, The demo).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

SUSTAINED_SHARE = 0.3  # measured e2e max sustained / engine best-batch rate (docs/benchmarks.md)


@dataclass(frozen=True)
class EngineSpeed:
    batch1_cells_per_s: float
    best_cells_per_s: float
    best_batch: int

    @property
    def sustainable_cells_per_s(self) -> float:
        return SUSTAINED_SHARE * self.best_cells_per_s

    def as_dict(self) -> dict[str, float]:
        """The pong's ``engine_speed`` map (docs/protocol.md)."""
        return {"batch1_cells_per_s": round(self.batch1_cells_per_s, 1),
                "best_cells_per_s": round(self.best_cells_per_s, 1), "best_batch": self.best_batch,
                "sustainable_cells_per_s": round(self.sustainable_cells_per_s, 1)}


def speed_from_costs(costs: dict[int, float]) -> EngineSpeed:
    """Cells/s per batch size from the engine times (ns per call) the service's planner measured at start.

    One call at a time, as `bench engines` timed the rates ``SUSTAINED_SHARE`` was measured against
    (the planner's ceiling also counts the engine's parallel streams).
    """
    rates = {batch: batch * 1e9 / cost for batch, cost in costs.items()}
    best = max(rates, key=rates.__getitem__)
    return EngineSpeed(batch1_cells_per_s=rates[min(rates)], best_cells_per_s=rates[best], best_batch=best)


def capacity_message(speed: EngineSpeed, expected_rate: float | None) -> tuple[int, str]:
    """(logging level, line) describing the speed and, given an expected rate, whether it is reachable."""
    line = (f"engine speed here: {speed.batch1_cells_per_s:,.0f} cells/s at the smallest batch, {speed.best_cells_per_s:,.0f} "
            f"at batch {speed.best_batch}, one call at a time; about {speed.sustainable_cells_per_s:,.0f} cells/s sustainable end to end")
    if not expected_rate:
        return logging.INFO, line
    if expected_rate > speed.best_cells_per_s:
        return logging.WARNING, (f"{line}: the expected {expected_rate:,.0f} cells/s is above what this model can "
                                 "classify on this machine at all; serve a smaller model (see `flowsort bench frontier`)")
    if expected_rate > speed.sustainable_cells_per_s:
        return logging.WARNING, (f"{line}: at the expected {expected_rate:,.0f} cells/s expect late decisions; "
                                 "serve a smaller model or INT8 (see `flowsort bench frontier`)")
    return logging.INFO, f"{line}: the expected {expected_rate:,.0f} cells/s fits"


def log_engine_speed(costs: dict[int, float], expected_rate: float | None, log: logging.Logger) -> EngineSpeed:
    """Log the speed the planner's profile shows; the service calls this once the engine is warm."""
    speed = speed_from_costs(costs)
    level, line = capacity_message(speed, expected_rate)
    log.log(level, "%s", line)
    return speed
