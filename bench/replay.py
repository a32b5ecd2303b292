"""Replay an acquisition file to a streamer: as recorded, at a fixed (or Poisson) rate, or as fast as possible.

The file's messages are read and turned into pre-built templates before the
clock starts (:func:`bench.traffic.recording_plan`); :func:`send_only` sends
them without waiting for decisions (to a recorder, or a streamer whose
decisions go elsewhere), :func:`bench.simulator.live_run` sends them and
scores the decisions against the file's ground truth.
"""

from __future__ import annotations

import time
from typing import Any

import zmq

from streamer.recording_truth import read_recording
from bench.traffic import Plan, RunRecord, push_socket, recording_plan, run_plan

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
