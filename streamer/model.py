"""What the service runs: the bundle, its warmed engine, the sort policy and the batch planner.

A :class:`Model` is built whole (engine loaded, every batch size run and
timed) before it is used, so a reload can build the next one beside the
running one and swap them between two batches.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engines.base import Engine
from engines.bundle import Bundle, load_bundle
from streamer.batcher import Planner
from streamer.capacity import EngineSpeed, log_engine_speed
from streamer.config import StreamerConfig
from streamer.policy import Policy, policy_for

log = logging.getLogger(__name__)

EngineFactory = Callable[[Bundle, StreamerConfig], Engine]


def default_engine(bundle: Bundle, config: StreamerConfig) -> Engine:
    import engines

    options: dict[str, Any] = {}
    if config.engine.threads:
        options["threads"] = config.engine.threads
    if config.engine.streams:
        options["streams"] = config.engine.streams
    return engines.load(bundle, engine=config.engine.engine, precision=config.engine.precision,
                        max_batch=config.batching.max_batch, cache_dir=config.engine_cache_dir, **options)


@dataclass
class Model:
    bundle: Bundle
    engine: Engine
    policy: Policy
    planner: Planner
    description: dict[str, Any]
    speed: EngineSpeed  # measured at start; what the service estimates it sustains here

    @property
    def channels(self) -> tuple[int, ...]:
        return self.bundle.channels

    @property
    def input_size(self) -> int:
        return self.bundle.input_size

    @property
    def bundle_hash(self) -> str:
        return self.bundle.content_hash

    def close(self) -> None:
        try:
            self.engine.close()
        except Exception:  # closing must not take the service down
            log.exception("closing engine %s failed", self.engine.name)


def sample_cells(bundle: Bundle, count: int) -> np.ndarray:
    """``count`` realistic cells for warmup and timing: the bundle's validation cells, repeated."""
    try:
        cells, _ = bundle.validation_cells()
    except Exception:  # a bundle without them still warms on a flat background
        cells = np.full((1, len(bundle.channels), bundle.input_size, bundle.input_size), 600, np.uint16)
    cells = np.ascontiguousarray(cells, np.uint16)
    reps = -(-count // len(cells))
    return np.ascontiguousarray(np.tile(cells, (reps, 1, 1, 1))[:count])


def profile(engine: Engine, cells: np.ndarray, sizes: tuple[int, ...], runs: int) -> dict[int, float]:
    """Median engine time (ns) of each batch size, after ``runs`` warmup calls per size: the engine's own clock
    where it has one, else the call's."""
    costs: dict[int, float] = {}
    for size in sorted(sizes):
        batch = cells[:size]
        for _ in range(runs):
            engine.infer(batch)
        laps = []
        for _ in range(max(7, runs)):  # a median of several: one preempted call must not set the plan
            start = time.perf_counter_ns()
            engine.infer(batch)
            laps.append(engine.last_run_ns or time.perf_counter_ns() - start)  # as the service loop learns it
        costs[size] = float(statistics.median(laps))
    return costs


def build_model(bundle_path: str | Path | Bundle, config: StreamerConfig,
                engine_factory: EngineFactory | None = None) -> Model:
    """Load, warm and time a model; raises UserError for a bad bundle or gate."""
    bundle = bundle_path if isinstance(bundle_path, Bundle) else load_bundle(bundle_path)
    policy = policy_for(bundle, config)
    started = time.perf_counter()
    engine = (engine_factory or default_engine)(bundle, config)
    try:
        sizes = config.batching.batch_sizes
        if max(sizes) > engine.max_batch:
            raise ValueError(f"engine max_batch {engine.max_batch} is below the largest batch size {max(sizes)}")
        costs = profile(engine, sample_cells(bundle, max(sizes)), sizes, config.engine.warmup_runs)
    except BaseException:
        engine.close()
        raise
    planner = Planner(sizes, costs, parallel=engine.parallel)
    description = {**engine.describe(), "bundle": str(bundle.path)}
    threading = f", {description['threading']}" if "threading" in description else ""
    log.info("engine %s %s ready in %.1f s%s; batch times %s; ceiling about %.0f cells/s", engine.name,
             engine.precision, time.perf_counter() - started, threading,
             ", ".join(f"{s}: {c / 1e3:.0f} us" for s, c in sorted(costs.items())), planner.ceiling())
    speed = log_engine_speed(costs, config.service.expected_rate, log)
    return Model(bundle, engine, policy, planner, description, speed)
