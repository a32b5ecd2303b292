"""`flowsort bench overhead BUNDLE`: what the service path costs per message, with an engine that does no work.

A GPU engine decides a batch of 64 cells in well under a millisecond, so the
path around it (receive, decode, admission, batching, policy, emitting) must
not be what limits a GPU box. This benchmark takes the engine out: it starts
the service (the real sockets, threads, batcher, policy and emitter) in its
own process on **one core**, with :class:`NullEngine` in place of the model,
and sends pre-built messages as fast as ZeroMQ takes them from another core.
For each message size it reports the messages and cells decided per second
and the service's own per-stage time per message (``flowsort_stage_*``).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from engines.base import Engine, OutputBuffers, Outputs
from engines.bundle import Bundle
from flowsort.errors import UserError

DEFAULT_SIZES = "1,64"  # cells per message
DEFAULT_MESSAGES = 60_000
TARGET_MESSAGES_PER_S = 30_000  # single-cell messages through the service on one core


class NullEngine(Engine):
    """A test double that does no work: every cell gets the same uniform probabilities."""

    name = "null"

    def __init__(self, bundle: Bundle, max_batch: int) -> None:
        super().__init__(bundle, "none", "CPU", max_batch)
        self._outputs = OutputBuffers(max_batch, self.num_classes, self.embedding_dim)
        self._outputs.probabilities[:] = 1.0 / self.num_classes
        self._outputs.embedding[:] = 0.0
        self._outputs.dead_score[:] = 0.0

    def _start(self, slot: int, cells: np.ndarray, n: int) -> None:
        pass

    def _finish(self, slot: int, n: int) -> Outputs:
        return self._outputs.first(n)


def serve_null(bundle: str, config: str, ready_file: str, core: int | None, stop: Any = None) -> None:
    """A spawned process's body: the service with :class:`NullEngine`, on ``core`` (None: any), until SIGTERM or
    until ``stop`` (a multiprocessing Event) is set."""
    import logging

    from streamer.config import load_config
    from streamer.service import Service

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if core is not None:
        os.sched_setaffinity(0, {core})  # before any thread starts: they all inherit it
    sys.setswitchinterval(0.0005)  # as `flowsort serve` does
    service = Service(bundle, load_config(config), ready_file=ready_file,
                      engine_factory=lambda b, c: NullEngine(b, c.batching.max_batch))
    signal.signal(signal.SIGTERM, lambda *_: service.request_stop())
    service.start()

    def wait(timeout: float) -> None:
        if stop is not None and stop.wait(timeout):
            service.request_stop()
        elif stop is None:
            time.sleep(timeout)

    service.run_forever(wait)


def stage_costs(before: dict[str, float], after: dict[str, float], messages: int) -> dict[str, float]:
    """Microseconds per message in each stage between two scrapes."""
    from streamer.metrics import STAGES

    key = 'flowsort_stage_seconds_total{{stage="{}"}}'
    return {stage: 1e6 * (after.get(key.format(stage), 0.0) - before.get(key.format(stage), 0.0)) / max(messages, 1)
            for stage in STAGES}


def measure(link: Any, cells: Any, per_message: int, messages: int, first_id: int) -> dict[str, Any]:
    """Send ``messages`` messages of ``per_message`` cells back to back; what the service decided, how fast."""
    from bench.link import cpu_use, switch_rates, thread_switches
    from bench.traffic import CellMessages, run_plan

    plan = CellMessages(cells, per_message, deadline=False).plan(
        np.zeros(messages * per_message), f"overhead-{per_message}", first_id, None)
    before_cpu, before, switches = link.streamer_cpu_s(), link.metrics(), thread_switches(link.pid)
    record = run_plan(link.socket, link.collector, plan, drain_timeout_s=30.0)
    after_cpu, after = link.streamer_cpu_s(), link.metrics()
    out = record.outcome
    decided = int(out.decided.sum())
    last = int(out.received_ns[out.decided].max()) if decided else record.t0_wall_ns
    span_s = max((last - record.t0_wall_ns) / 1e9, 1e-9)
    return {
        "cells_per_message": per_message, "messages_sent": record.messages_sent, "cells_sent": record.cells_sent,
        "cells_decided": decided, "errors": int((out.error[out.decided] != 0).sum()),
        "messages_per_s": decided / per_message / span_s, "cells_per_s": decided / span_s,
        "sender_messages_per_s": record.messages_sent / max(record.sent_at[-1], 1e-9) if record.messages_sent else 0,
        "stage_us_per_message": stage_costs(before, after, record.messages_sent),
        "context_switches_per_s": switch_rates(switches, thread_switches(link.pid), span_s),
        **cpu_use(before_cpu, after_cpu, span_s),
    }


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    labels = [f"{row['cells_per_message']} cell{'s' if row['cells_per_message'] > 1 else ''}/msg" for row in rows]
    left.bar(labels, [row["messages_per_s"] for row in rows], color="#4c72b0")
    left.axhline(TARGET_MESSAGES_PER_S, color="#c44e52", ls="--", label=f"target {TARGET_MESSAGES_PER_S:,} msg/s")
    left.set(ylabel="messages decided per second", title="Service path, no-work engine, one core")
    left.legend()
    bottom = np.zeros(len(rows))
    for stage in rows[0]["stage_us_per_message"]:
        values = np.array([row["stage_us_per_message"][stage] for row in rows])
        if stage in ("engine", "queue_wait") or not values.any():
            continue
        right.bar(labels, values, bottom=bottom, label=stage)
        bottom += values
    right.set(ylabel="service time per message (us)", title="Where a message's time goes")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def measure_overhead(bundle: Path, sizes: list[int], messages: int = DEFAULT_MESSAGES, cells: int = DEFAULT_MESSAGES,
                     core: int = 0, out: Path = Path("runs/bench/overhead")) -> dict[str, Any]:
    """Per message size in ``sizes``: the service on ``core`` with a no-work engine, sent at most ``messages``
    messages (and ``cells`` cells) back to back; writes overhead.json and overhead.png to ``out``."""
    import multiprocessing

    import zmq

    from bench.cell_sources import synthetic_cells
    from bench.link import ModelInfo
    from bench.traffic import handshake
    from engines.cpu import describe, usable_cores
    from streamer.testing import config_dict, write_toml

    if not sizes or min(sizes) < 1 or max(sizes) > 4096:
        raise UserError("cells per message must be 1..4096")
    model = ModelInfo.load(bundle)
    cores = sorted(os.sched_getaffinity(0))
    if core not in cores:
        raise UserError(f"core {core} is not one this process may use ({cores})")
    out.mkdir(parents=True, exist_ok=True)
    # Logging as deployed (one line per reason per second): the sender queues far ahead of the service, so every
    # message would otherwise log its capture stamp as stale.
    config = config_dict(batching={"queue_cells": 65536, "batch_sizes": [1, 2, 4, 8, 16, 32, 64, 128, 256]},
                         deadline={"budget_us": 0}, engine={"engine": "openvino"}, logging={"reject_interval_s": 1.0})
    config["engine"].pop("engine")
    config_path = write_toml(out / "overhead.toml", config)
    ready = out / "overhead.ready.json"
    ready.unlink(missing_ok=True)
    child = multiprocessing.get_context("spawn").Process(
        target=serve_null, args=(str(bundle), str(config_path), str(ready), core), daemon=True)
    child.start()
    others = [c for c in cores if c != core]
    own_affinity = set(cores)
    if others:
        os.sched_setaffinity(0, set(others))  # the sender and collector keep off the service's core
    context = zmq.Context(io_threads=1)
    rows: list[dict[str, Any]] = []
    try:
        info = wait_ready(child, ready)
        link = _Link(info, context, child.pid)
        handshake(link.socket, link.collector)
        pool = synthetic_cells(256, model.input_size, seed=1)
        first_id = 1
        for per_message in sizes:
            count = max(1, min(messages, cells // per_message))
            row = measure(link, pool, per_message, count, first_id)
            first_id += count * per_message
            rows.append(row)
            print(f"{per_message:5d} cells/message: {row['messages_per_s']:9,.0f} messages/s, "
                  f"{row['cells_per_s']:10,.0f} cells/s decided ({row['cells_decided']:,} of {row['cells_sent']:,}); "
                  f"service {row['streamer_cpu_core_fraction'] or 0:.2f} cores; per message "
                  + ", ".join(f"{k} {v:.1f}" for k, v in row["stage_us_per_message"].items() if v and k != "queue_wait")
                  + " us", flush=True)
        link.close()
    finally:
        if child.is_alive():
            os.kill(child.pid, signal.SIGTERM)
            child.join(30)
        if child.is_alive():
            child.kill()
        context.destroy(linger=0)
        os.sched_setaffinity(0, own_affinity)
    result = {"machine": describe(), "service_core": core, "service_cores": 1, "cores": usable_cores(),
              "target_single_cell_messages_per_s": TARGET_MESSAGES_PER_S, "rows": rows}
    (out / "overhead.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(rows, out / "overhead.png")
    print(f"written {out / 'overhead.json'} and {out / 'overhead.png'}")
    return result


def wait_ready(child: Any, ready: Path, timeout: float = 120.0) -> dict[str, Any]:
    from streamer.testing import get

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if not child.is_alive():
            raise UserError(f"the service process exited with {child.exitcode} before it was ready")
        if ready.exists():
            info = json.loads(ready.read_text())
            if get(info["health"] + "/readyz")[0] == 200:
                return info
        time.sleep(0.05)
    raise UserError(f"the service was not ready after {timeout:.0f} s")


class _Link:
    """The sender socket, the decision collector and the service's metrics and CPU, for :func:`measure`."""

    def __init__(self, info: dict[str, Any], context: Any, pid: int) -> None:
        from bench.traffic import Collector, push_socket
        from streamer.testing import metrics

        self.socket = push_socket(context, info["ingest"])
        self.collector = Collector(info["push"], context)
        self.pid = pid
        self._health = info["health"]
        self._metrics = metrics

    def metrics(self) -> dict[str, float]:
        return self._metrics(self._health)

    def streamer_cpu_s(self) -> dict[str, float] | None:
        from bench.link import thread_cpu_s

        return thread_cpu_s(self.pid)

    def close(self) -> None:
        self.collector.close()
        self.socket.close(linger=0)
