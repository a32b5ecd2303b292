"""The simulated imaging flow cytometer, and the one-run driver that simulate, replay and the demo share.

The instrument: cells from the synthetic cytometer (ground truth known) or any
:class:`~bench.cell_sources.CellSet`, arriving as a Poisson process (or evenly)
at a given rate, sent one per message or in blocks, each with a deadline: its
capture time plus the transit time to the sort point. :func:`live_run` sends a
plan to a streamer, shows the dashboard, collects the decisions and returns
the run with its summary (rate, latency, late and dropped cells, purity and
yield per gate, dead cells sorted).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.cell_sources import CellSet, load_cells
from bench.defaults import DEFAULT_POOL, DEFAULT_RATE, DEFAULT_SECONDS, DEFAULT_TRANSIT_MS
from bench.dashboard import Dashboard, LiveView
from bench.link import Link, LinkOptions, cpu_use, open_link, service_and_engine_cores
from bench.pacing import fixed_times, poisson_times
from bench.run_summary import summarize
from bench.traffic import CellMessages, Collector, PacedSender, Plan, RunRecord, handshake, push_socket, run_plan
from flowsort.errors import UserError
from streamer import codec
from streamer import protocol as p


def arrivals(rate: float, seconds: float, poisson: bool, seed: int, cells_per_message: int = 1) -> np.ndarray:
    if poisson:
        return poisson_times(rate, seconds, np.random.default_rng(seed), cells_per_message)
    return fixed_times(rate, seconds, cells_per_message)


def instrument_plan(cells: CellSet, rate: float, seconds: float, *, poisson: bool = True, cells_per_message: int = 1,
                    transit_ms: float | None = DEFAULT_TRANSIT_MS, seed: int = 0, acquisition: str = "simulated",
                    first_event_id: int = 1, truth_in_messages: bool = False) -> Plan:
    messages = CellMessages(cells, cells_per_message, seed=seed, deadline=transit_ms is not None,
                            truth_in_messages=truth_in_messages)
    times = arrivals(rate, seconds, poisson, seed, cells_per_message)
    transit_ns = None if transit_ms is None else int(transit_ms * 1e6)
    return messages.plan(times, acquisition, first_event_id, transit_ns,
                         {"rate": rate, "seconds": seconds, "arrivals": "poisson" if poisson else "fixed",
                          "transit_ms": transit_ms, "cells": cells.description})


def streamer_status(link: Link) -> dict[str, Any]:
    """The streamer's pong (docs/protocol.md, 4.3): readiness, engine, and the rate it estimates it sustains here."""
    socket = push_socket(link.context, link.ingest)
    collector = Collector(link.decisions, link.context)
    try:
        return handshake(socket, collector)
    finally:
        collector.close()
        socket.close(linger=0)


def live_run(link: Link, plan: Plan, *, title: str, dashboard: bool = True, target_rate: float | None = None,
             drain_timeout_s: float = 5.0, send_end: bool = True) -> tuple[RunRecord, dict[str, Any]]:
    """Send ``plan`` to the link's streamer with a live dashboard; the run and its summary."""
    socket = push_socket(link.context, link.ingest)
    collector = Collector(link.decisions, link.context)
    try:
        pong = handshake(socket, collector)
        link.engine = pong.get(p.ENGINE, "")
        model = link.model
        classes = model.class_names if model else ()
        merges = model.merges if model else ()
        view = LiveView(plan, collector, link.gates, classes, merges, len(collector.chunks), target_rate)
        board = Dashboard(title) if dashboard else None
        streamer_cpu = link.streamer_cpu_s()

        def tick(sender: PacedSender, first_chunk: int) -> None:
            if board is not None and board.due():
                view.update(sender.t0_wall_ns)
                board.draw(view.snapshot(sender, time.perf_counter() - sender.t0))

        record = run_plan(socket, collector, plan, tick=tick, drain_timeout_s=drain_timeout_s)
        if board is not None:
            view.update(record.t0_wall_ns)
            final = _FinishedSender(record)
            board.draw(view.snapshot(final, record.sent_at[-1] if len(record.sent_at) else 0.0), final=True)
        summary = summarize(record, link.gates, classes, merges)
        if streamer_cpu is not None:
            summary.update(cpu_use(streamer_cpu, link.streamer_cpu_s(), record.wall_s))
        summary["engine"] = link.engine
        if send_end:
            since = len(collector.others)
            reports = {}
            for name in plan.acquisitions:
                socket.send_multipart(codec.encode_end(name))
            for name in plan.acquisitions:
                report = collector.wait_other(p.END, 5.0, since=since, acquisition=name)
                if report is not None:
                    reports[name] = report.get(p.REPORT)
            summary["streamer_reports"] = reports
        return record, summary
    finally:
        collector.close()
        socket.close(linger=0)


class _FinishedSender:
    """What the dashboard reads from a sender, for the last frame after the run."""

    def __init__(self, record: RunRecord) -> None:
        self.count = record.messages_sent
        self.cells_sent = record.cells_sent
        self.sent_at = record.sent_at


def print_summary(summary: dict[str, Any], deadline_ms: float | None = None) -> None:
    latency = summary["latency_ms"]
    offered = summary["offered_cells_per_s"]
    print(f"\nengine {summary.get('engine') or '?'}: offered {offered or 0:,.0f} cells/s, achieved "
          f"{summary['throughput_cells_per_s']:,.0f} cells/s ({summary['cells_sent']:,} cells sent, "
          f"{summary['decided']:,} decided)")
    if latency["count"]:
        print("latency capture -> decision: p50 {p50:.2f} ms, p95 {p95:.2f} ms, p99 {p99:.2f} ms, max {max:.2f} ms"
              .format(**latency) + (f" (deadline {deadline_ms:g} ms)" if deadline_ms else ""))
    errors = ", ".join(f"{k} {v}" for k, v in summary["errors"].items()) or "none"
    print(f"late {summary['late']:,}, dropped {summary['dropped']:,}, errors: {errors}")
    mix = summary["class_mix"]
    total = sum(mix.values()) or 1
    print("class mix: " + ", ".join(f"{k} {100 * v / total:.1f}%" for k, v in sorted(mix.items(), key=lambda kv: -kv[1])))
    dead = f"dead flags {summary['dead_flagged']:,}"
    if "truth_dead" in summary:
        dead += (f": {summary['dead_flagged_truly_dead']:,} of {summary['truth_dead']:,} dead cells, "
                 f"{summary['dead_flagged_debris']:,} of {summary['truth_debris']:,} debris, "
                 f"{summary['dead_flagged_live']:,} of {summary['decided_live']:,} live cells "
                 f"({100 * summary['dead_flagged_live'] / max(1, summary['decided_live']):.1f}%); "
                 f"dead cells sorted {summary['dead_sorted']:,}")
    print(dead)
    for gate in summary.get("gates") or []:
        purity = "-" if gate.get("purity") is None else f"{100 * gate['purity']:.1f}%"
        yield_ = "-" if gate.get("yield") is None else f"{100 * gate['yield']:.1f}%"
        print(f"gate {gate['gate']} ({', '.join(gate['classes'])}): sorted {gate['sorted']:,}, purity {purity}, "
              f"yield {yield_} of {gate.get('targets', 0) or 0:,} target cells")
    cpu = summary["cpu"]
    line = (f"CPU: sender {100 * (cpu['sender_core_fraction'] or 0):.1f}% of a core, receiver "
            f"{100 * (cpu['receiver_core_fraction'] or 0):.1f}% (the instrument's process "
            f"{cpu['instrument_core_fraction'] or 0:.2f} cores)")
    if summary.get("streamer_cpu_core_fraction") is not None:
        line += f", streamer {summary['streamer_cpu_core_fraction']:.2f} cores"
        service, engine = service_and_engine_cores(summary)
        if service is not None:
            line += f" (its own threads {service:.2f}, engine and other {engine:.2f})"
    if cpu["machine_idle_share"] is not None:
        line += f", machine idle {100 * cpu['machine_idle_share']:.0f}%"
    pacing = summary["pacing"]
    print(line + f"; pacing {100 * pacing['rate_error']:+.2f}% of the scheduled rate, lag p99 {pacing['lag_p99_us']:.0f} µs")


def write_outputs(out: Path, name: str, title: str, summary: dict[str, Any], settings: dict[str, Any],
                  deadline_ms: float | None) -> tuple[Path, Path]:
    """``<name>.json`` and ``<name>.html`` in ``out``."""
    from bench.report_html import e, run_sections, table, write
    from bench.run_summary import describe_machine

    out.mkdir(parents=True, exist_ok=True)
    document = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": describe_machine(), "settings": settings,
                "summary": summary}
    json_path = out / f"{name}.json"
    json_path.write_text(json.dumps(document, indent=2, default=json_default) + "\n")
    head = table(("setting", "value"), [(k, json.dumps(v, default=json_default) if not isinstance(v, str) else v)
                            for k, v in settings.items()])
    html_path = write(out / f"{name}.html", title,
                      [f"<p class='note'>{e(document['date'])}, {e(document['machine']['cpu_model'])}, "
                       f"{document['machine']['cores']} cores ({', '.join(document['machine']['cpu_flags'])}), "
                       f"load average at the end "
                       f"{document['machine'].get('load_average_1_5_15min', '?')}</p>", head, *run_sections(summary, deadline_ms)])
    return json_path, html_path


def json_default(value: Any) -> Any:
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    return str(value)


@dataclass(frozen=True)
class SimulateSettings:
    """The simulated instrument of `flowsort simulate` (its options, one field each)."""

    rate: float = DEFAULT_RATE  # cells/s
    seconds: float = DEFAULT_SECONDS
    arrivals: str = "poisson"  # or "fixed"
    cells_per_message: int = 1
    transit_ms: float = DEFAULT_TRANSIT_MS  # each cell's deadline after capture; 0: none (the streamer's budget)
    prior: str = "jurkat"
    cells: str = "synthetic"  # or an acquisition file or a dataset folder
    pool: int = DEFAULT_POOL
    size: int | None = None  # None: the bundle's, else 40
    seed: int = 0
    acquisition: str = "simulated"
    truth_in_messages: bool = False
    dashboard: bool = True
    out: Path = Path("runs/bench/simulate")


def simulate(streamer: LinkOptions, settings: SimulateSettings) -> dict[str, Any]:
    """Send simulated cells to ``streamer``, score the decisions, print the summary, write simulate.json and
    simulate.html to ``settings.out``; returns the summary."""
    if settings.rate <= 0 or settings.seconds <= 0 or settings.cells_per_message < 1:
        raise UserError("--rate, --seconds and --cells-per-message must be positive")
    transit = settings.transit_ms if settings.transit_ms > 0 else None
    with open_link(streamer, settings.out) as link:
        if link.model is None and link.gates:
            print("note: without --bundle (or --serve) the model's classes are unknown: no purity or yield")
        size = settings.size or (link.model.input_size if link.model else 40)
        cells = load_cells(settings.cells, size, seed=settings.seed, pool=settings.pool, prior=settings.prior)
        plan = instrument_plan(cells, settings.rate, settings.seconds, poisson=settings.arrivals == "poisson",
                               cells_per_message=settings.cells_per_message, transit_ms=transit, seed=settings.seed,
                               acquisition=settings.acquisition, truth_in_messages=settings.truth_in_messages)
        title = f"flowsort simulate: {settings.rate:,.0f} cells/s {settings.arrivals}"
        _, summary = live_run(link, plan, title=title, dashboard=settings.dashboard, target_rate=settings.rate)
    print_summary(summary, transit)
    described = {"rate": settings.rate, "seconds": settings.seconds, "arrivals": settings.arrivals,
                 "cells_per_message": settings.cells_per_message, "transit_ms": transit, "cells": cells.description,
                 "bundle": str(streamer.serve or streamer.bundle or ""), "gates": [g.__dict__ for g in link.gates],
                 "engine": summary.get("engine")}
    json_path, html_path = write_outputs(settings.out, "simulate", "flowsort simulate", summary, described, transit)
    print(f"written {json_path} and {html_path}")
    return summary
