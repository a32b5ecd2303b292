"""Replay an acquisition file to a streamer: as recorded, at a fixed (or Poisson) rate, or as fast as possible.

The file's messages are read and turned into pre-built templates before the
clock starts (:func:`bench.traffic.recording_plan`); :func:`send_only` sends
them without waiting for decisions (to a recorder, or a streamer whose
decisions go elsewhere), :func:`bench.simulator.live_run` sends them and
scores the decisions against the file's ground truth.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq

from bench.link import LinkOptions, connect_endpoint, open_link
from bench.run_summary import describe_machine
from bench.simulator import json_default, live_run, print_summary, write_outputs
from bench.traffic import Plan, RunRecord, push_socket, recording_plan, run_plan
from flowsort.errors import UserError
from streamer.recording_truth import read_recording

__all__ = ["load_plan", "send_only"]


def load_plan(path: str, *, timing: str, rate: float | None, speed: float, poisson: bool, loops: int,
              verbatim: bool, transit_ms: float | None, seed: int = 0) -> Plan:
    recording = read_recording(path)
    if recording.tail:
        print(f"note: {path} ends in a {recording.tail}; replaying the {len(recording.messages):,} messages before it")
    return recording_plan(recording, timing=timing, rate=rate, speed=speed, poisson=poisson, loops=loops,
                          verbatim=verbatim, transit_ns=None if transit_ms is None else int(transit_ms * 1e6), seed=seed)


class _NoDecisions:
    """A stand-in collector for a run that reads no decisions."""

    chunks: list[Any] = []
    cpu_s = 0.0

    class _Codes:
        names = [""]

    labels = gates = errors = _Codes()


def send_only(context: zmq.Context, endpoint: str, plan: Plan, linger_s: float = 10.0) -> RunRecord:
    """Send ``plan`` on its schedule and wait until ZeroMQ has handed every message over (up to ``linger_s``)."""
    socket = push_socket(context, endpoint)
    try:
        record = run_plan(socket, _NoDecisions(), plan, drain_timeout_s=0.0)  # type: ignore[arg-type]
    finally:
        started = time.monotonic()
        socket.close(linger=int(linger_s * 1000))
        record_linger = time.monotonic() - started
    record.drain_s = record_linger
    return record


@dataclass(frozen=True)
class ReplaySettings:
    """How `flowsort replay` sends a file (its options, one field each)."""

    rate: float | None = None  # messages/s, evenly spaced (or Poisson)
    max: bool = False  # as fast as possible
    speed: float | None = None  # recorded timing, this many times faster
    poisson: bool = False
    loops: int = 1
    verbatim: bool = False
    transit_ms: float | None = None
    decisions: bool = True  # False: only send
    dashboard: bool = True
    seed: int = 0
    out: Path = Path("runs/bench/replay")


def replay(file: Path, streamer: LinkOptions, settings: ReplaySettings) -> dict[str, Any]:
    """Send the acquisition file ``file`` to ``streamer`` and score the decisions (or only send), print the
    summary and write replay.json (and replay.html) to ``settings.out``; returns the summary."""
    if settings.loops < 1:
        raise UserError("--loop must be at least 1")
    if settings.rate is not None and settings.rate <= 0 or settings.speed is not None and settings.speed <= 0:
        raise UserError("--rate and --speed must be positive")
    if settings.poisson and settings.rate is None:
        raise UserError("--poisson goes with --rate")
    timing = "max" if settings.max else "rate" if settings.rate else "recorded"
    plan = load_plan(str(file), timing=timing, rate=settings.rate, speed=settings.speed or 1.0,
                     poisson=settings.poisson, loops=settings.loops, verbatim=settings.verbatim,
                     transit_ms=settings.transit_ms, seed=settings.seed)
    print(f"replaying {plan.messages:,} messages ({plan.cells:,} cells) over {plan.duration_s:.1f} s "
          f"({timing}{f' {settings.rate:g}/s' if settings.rate else ''}{', verbatim' if settings.verbatim else ''})",
          flush=True)
    described = {"file": str(file), **plan.description, "transit_ms": settings.transit_ms}
    if not settings.decisions:
        return _send_without_decisions(plan, streamer, described, settings.out)
    with open_link(streamer, settings.out) as link:
        if link.model is None and link.gates:
            print("note: without --bundle (or --serve) the model's classes are unknown: no purity or yield")
        _, summary = live_run(link, plan, title=f"flowsort replay {file.name}", dashboard=settings.dashboard,
                              target_rate=plan.cells / plan.duration_s if plan.duration_s else None)
    print_summary(summary, settings.transit_ms)
    described.update({"bundle": str(streamer.serve or streamer.bundle or ""), "gates": [g.__dict__ for g in link.gates],
                      "engine": summary.get("engine")})
    json_path, html_path = write_outputs(settings.out, "replay", f"flowsort replay {file.name}", summary, described,
                                         settings.transit_ms)
    print(f"written {json_path} and {html_path}")
    return summary


def _send_without_decisions(plan: Plan, streamer: LinkOptions, described: dict[str, Any], out: Path) -> dict[str, Any]:
    """Only send (to a recorder, or a streamer whose decisions go elsewhere); writes replay.json."""
    from streamer.config import load_config

    endpoint = streamer.ingest or connect_endpoint(load_config(streamer.config).ingest.endpoint)
    context = zmq.Context()
    try:
        record = send_only(context, endpoint, plan)
    finally:
        context.destroy(linger=0)
    pacing = record.pacing
    print(f"sent {record.messages_sent:,} messages ({record.cells_sent:,} cells) at {pacing.achieved_rate:,.1f} "
          f"messages/s (scheduled {pacing.scheduled_rate:,.1f}, {100 * pacing.rate_error:+.2f}%), "
          f"lag p99 {pacing.lag_p99_us:.0f} µs; sender CPU {record.sender_cpu_s:.2f} s")
    summary = {"messages_sent": record.messages_sent, "cells_sent": record.cells_sent, "pacing": pacing.as_dict(),
               "sender_cpu_s": record.sender_cpu_s, "send_s": float(record.sent_at[-1]) if len(record.sent_at) else 0.0}
    out.mkdir(parents=True, exist_ok=True)
    path = out / "replay.json"
    path.write_text(json.dumps({"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": describe_machine(),
                                "settings": described, "summary": summary}, indent=2, default=json_default) + "\n")
    print(f"written {path}")
    return summary
