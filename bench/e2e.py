"""`flowsort bench e2e BUNDLE`: the whole path under load, from an instrument's socket to its sorter's.

For each engine it starts `flowsort serve` as its own process and sweeps the
offered load: Poisson arrivals at 250, 500, 1,000, 1,500, 2,000 cells/s (by
default), then upward by a factor until a level is not sustained, then a few
bisection steps between the last sustained level and the first that was not.
A level is **sustained** when the sender kept its schedule and the run kept
its deadline by :func:`bench.scoring.deadline_verdict`'s rule: at most
``late_tolerance`` (1%) of the cells sent were not classified in time (late,
refused at the door, failed or never answered), and the p99 latency stays
within ``max_p99_ms`` (20 ms). Sweep cells carry a deadline
of that same 20 ms, so the streamer sizes its batches for it and a cell it
cannot decide in time comes back late (at its deadline) rather than making
the queue behind it later still. Each level reports achieved throughput, latency
percentiles (capture to decision received), drops and late decisions, the CPU
the sender, the receiver, the instrument's whole process (their ZeroMQ I/O
threads included) and the streamer used, how much of the machine stayed idle,
and throughput and latency over time.

Then the **target run**: the rate an instrument needs (1,000 cells/s) for
60 s with each cell's deadline 10 ms after capture, judged by the same rule
with that deadline: at least 99% of the cells classified in time, p99 within
10 ms (as `make demo` judges its live run).

After that it stops the streamer and measures the engine alone at the same
max batch and precision (:mod:`bench.engine_bench`'s timing): the engine
ceiling, and the ratio of the max sustained rate to it.

Messages are pre-built (:mod:`bench.traffic`), so the sender and receiver cost
little CPU; both are measured, because on a 2-core machine they share the
cores with the streamer.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.defaults import DEFAULT_POOL
from bench.scoring import LATE_TOLERANCE, deadline_verdict
from flowsort.errors import UserError

DEFAULT_LEVELS = (250, 500, 1000, 1500, 2000)
DEFAULT_SECONDS = 10.0
GROWTH = 1.25
REFINE_STEPS = 2
LOWER_STEPS = 3  # halvings below the lowest level while none is sustained
MAX_P99_MS = 20.0  # the bound on a sustained level's p99 latency, and the sweep's deadline
TARGET_RATE, TARGET_SECONDS, TARGET_TRANSIT_MS = 1000.0, 60.0, 10.0
SENDER_TOLERANCE = 0.02  # a level whose achieved send rate misses the schedule by more is sender-limited
PAUSE_S = 0.5
DRAIN_S = 3.0  # after a level's last cell: queued cells are decided or expire well within this
MAX_RATE = 200_000.0  # never offer more (cells/s)
MAX_BATCH = 64
CEILING_SECONDS = 5.0  # engine-only timing, over its batch sizes
TARGETS = {"late_tolerance": LATE_TOLERANCE, "ceiling_ratio": 0.8, "sustained_p99_ms": MAX_P99_MS}


@dataclass(frozen=True)
class SweepSettings:
    """What `flowsort bench e2e` sweeps, and how (the command's options, one field each)."""

    bundle: Path
    engines: str | None = None  # "a,b"; None: every engine available here
    levels: str = ",".join(map(str, DEFAULT_LEVELS))
    seconds: float = DEFAULT_SECONDS
    growth: float = GROWTH
    max_rate: float = MAX_RATE
    refine: int = REFINE_STEPS
    late_tolerance: float = LATE_TOLERANCE
    max_p99_ms: float = MAX_P99_MS
    transit_ms: float = MAX_P99_MS
    target_rate: float = TARGET_RATE
    target_seconds: float = TARGET_SECONDS
    target_transit_ms: float = TARGET_TRANSIT_MS
    max_batch: int = MAX_BATCH
    cells: str = "synthetic"
    prior: str = "jurkat"
    pool: int = DEFAULT_POOL
    cells_per_message: int = 1
    config: Path | None = None
    gate_threshold: float | None = None
    ceiling_seconds: float = CEILING_SECONDS
    seed: int = 0
    save_decisions: bool = False
    out: Path = Path("runs/bench/e2e")


def levels_list(text: str) -> list[float]:
    try:
        levels = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UserError(f"--levels: expected rates separated by commas, got {text!r}") from None
    if not levels or min(levels) <= 0:
        raise UserError("--levels: rates must be positive")
    return levels


def judge(summary: dict[str, Any], late_tolerance: float, max_p99_ms: float) -> tuple[bool, str]:
    """Sustained or not, and why not: the sender kept its schedule, and the deadline was kept."""
    pacing = summary["pacing"]
    if pacing["scheduled_rate"] and pacing["rate_error"] < -SENDER_TOLERANCE:
        return False, f"sender-limited ({100 * pacing['rate_error']:+.1f}% of the scheduled rate)"
    return deadline_verdict(summary, max_p99_ms, late_tolerance)


class Sweep:
    """Levels of one engine, run against one streamer."""

    def __init__(self, link: Any, messages: Any, settings: SweepSettings, engine: str, progress: Any) -> None:
        self.link = link
        self.messages = messages
        self.settings = settings
        self.engine = engine
        self.progress = progress
        self.levels: list[dict[str, Any]] = []
        self.next_id = 1
        self.offset_s = 0.0

    def run_level(self, rate: float) -> dict[str, Any]:
        """One sweep level, judged on drops, errors, late cells and p99."""
        settings = self.settings
        summary = self.measure(rate, settings.seconds, settings.transit_ms,
                               f"e2e-{self.engine}-{len(self.levels) + 1}-{rate:g}", seed=settings.seed + len(self.levels))
        ok, why = judge(summary, settings.late_tolerance, settings.max_p99_ms)
        summary["sustained"], summary["reason"] = ok, why
        self.levels.append(summary)
        self._show(rate, summary, "" if ok else f" - not sustained ({why})")
        return summary

    def run_target(self) -> dict[str, Any]:
        """The target run: the instrument's rate with its deadline, judged as its sorter would."""
        settings = self.settings
        summary = self.measure(settings.target_rate, settings.target_seconds, settings.target_transit_ms,
                               f"e2e-{self.engine}-target-{settings.target_rate:g}", seed=settings.seed + 10_000)
        summary["ok"], summary["reason"] = deadline_verdict(summary, settings.target_transit_ms)
        self._show(settings.target_rate, summary, " - target met" if summary["ok"] else " - target missed")
        return summary

    def measure(self, rate: float, seconds: float, transit_ms: float, acquisition: str, seed: int) -> dict[str, Any]:
        from bench.link import cpu_use
        from bench.pacing import poisson_times
        from bench.run_summary import raw_arrays, summarize
        from bench.traffic import run_plan

        settings, link = self.settings, self.link
        times = poisson_times(rate, seconds, np.random.default_rng(seed), settings.cells_per_message)
        plan = self.messages.plan(times, acquisition, self.next_id, int(transit_ms * 1e6))
        self.next_id += plan.cells
        streamer_cpu = link.streamer_cpu_s()
        shown = [0.0]

        def tick(sender: Any, first_chunk: int) -> None:
            elapsed = min(time.perf_counter() - sender.t0, seconds)
            if elapsed > shown[0]:
                self.progress.update(elapsed - shown[0])
                shown[0] = elapsed

        record = run_plan(self.socket, self.collector, plan, tick=tick, drain_timeout_s=DRAIN_S)
        self.progress.update(max(0.0, seconds - shown[0]))
        model = link.model
        summary = summarize(record, link.gates, model.class_names, model.merges)
        summary.update(cpu_use(streamer_cpu, link.streamer_cpu_s(), record.wall_s))
        summary["streamer_memory_mb"] = link.streamer_rss_mb()
        summary["offered_target"] = rate
        summary["acquisition"] = acquisition
        summary["transit_ms"] = transit_ms
        summary["start_s"] = self.offset_s
        self.offset_s += record.wall_s + PAUSE_S
        if settings.save_decisions:
            folder = settings.out / "levels"
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"{acquisition.removeprefix('e2e-')}.npz"
            np.savez(path, **raw_arrays(record))
            summary["decisions_file"] = str(path)
        time.sleep(PAUSE_S)
        return summary

    def _show(self, rate: float, summary: dict[str, Any], verdict: str) -> None:
        latency = summary["latency_ms"]
        self.progress.set_postfix_str(f"{self.engine} {rate:,.0f}/s: p99 {latency['p99'] or 0:.2f} ms, "
                                      f"late {summary['late']}, dropped {summary['dropped']}{verdict}")

    def run(self) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
        """The sweep's levels, then the target run (None when --target-rate is 0)."""
        from bench.traffic import Collector, handshake, push_socket

        settings = self.settings
        self.socket = push_socket(self.link.context, self.link.ingest)
        self.collector = Collector(self.link.decisions, self.link.context)
        try:
            pong = handshake(self.socket, self.collector)
            self.link.engine = pong.get("engine", "")
            base = levels_list(settings.levels)
            for rate in base:
                self.run_level(min(rate, settings.max_rate))
            best, failed = self.bounds()
            rate = min(base)
            for _ in range(LOWER_STEPS):  # nothing sustained: look below the list
                if best is not None:
                    break
                rate /= 2
                self.progress.total += settings.seconds
                self.run_level(round(rate))
                best, failed = self.bounds()
            rate = max(base)
            while failed is None and settings.growth > 1 and rate * settings.growth <= settings.max_rate:
                if self.levels[-1]["reason"].startswith("sender-limited"):
                    break
                rate *= settings.growth
                self.progress.total += settings.seconds
                self.run_level(round(rate))
                best, failed = self.bounds()
            for _ in range(settings.refine):
                if best is None or failed is None or failed / best < 1.05:
                    break
                if self.levels[-1]["reason"].startswith("sender-limited"):
                    break
                self.progress.total += settings.seconds
                self.run_level(round((best + failed) / 2))
                best, failed = self.bounds()
            target = self.run_target() if settings.target_rate > 0 else None
        finally:
            self.collector.close()
            self.socket.close(linger=0)
        return self.levels, target

    def bounds(self) -> tuple[float | None, float | None]:
        """The highest sustained rate, and the lowest failed rate above it (None when none)."""
        sustained = [s["offered_target"] for s in self.levels if s["sustained"]]
        best = max(sustained) if sustained else None
        failed = [s["offered_target"] for s in self.levels if not s["sustained"] and (best is None or s["offered_target"] > best)]
        return best, (min(failed) if failed else None)


CEILING_BATCHES = (1, 2, 4, 8, 16, 32, 64)


def engine_ceiling(bundle_path: Path, engine: str, precision: str, max_batch: int, seconds: float) -> dict[str, Any]:
    """The engine alone, kept full as the service runs it (bench.engine_bench.ceiling), over the batch sizes up to
    ``max_batch``: the most it decides per second here."""
    import engines
    from bench.engine_bench import ceiling
    from engines.bundle import load_bundle

    bundle = load_bundle(bundle_path)
    images, _ = bundle.validation_cells()
    cells = np.ascontiguousarray(np.resize(images, (max_batch, *images.shape[1:])))
    sizes = tuple(size for size in CEILING_BATCHES if size <= max_batch)
    with engines.load(bundle, engine, precision or "auto", max_batch=max_batch) as loaded:
        return ceiling(loaded, cells, sizes, seconds / len(sizes))


def sweep_engines(settings: SweepSettings) -> dict[str, Any]:
    """Sweep every chosen engine, write e2e.json and e2e.html to ``settings.out`` and print the table."""
    from tqdm import tqdm

    import engines
    from bench.cell_sources import load_cells
    from bench.link import LinkOptions, ModelInfo, open_link
    from bench.run_summary import describe_machine
    from bench.traffic import CellMessages

    if settings.seconds <= 0:
        raise UserError("--seconds must be positive")
    model = ModelInfo.load(settings.bundle)
    reasons = engines.available()
    chosen = [n.strip() for n in settings.engines.split(",")] if settings.engines else [n for n, r in reasons.items() if r is None]
    for name in chosen:
        if name not in reasons:
            raise UserError(f"unknown engine {name!r}: choose from {', '.join(reasons)}")
        if reasons[name]:
            raise UserError(reasons[name])
    cells = load_cells(settings.cells, model.input_size, seed=settings.seed, pool=settings.pool, prior=settings.prior)
    messages = CellMessages(cells, settings.cells_per_message, seed=settings.seed)
    settings.out.mkdir(parents=True, exist_ok=True)
    base = levels_list(settings.levels)
    results: list[dict[str, Any]] = []
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    machine_info = describe_machine()  # before the run: the load average says what else the machine was doing
    if settings.target_rate < 0 or settings.target_seconds <= 0:
        raise UserError("--target-rate must be >= 0 and --target-seconds positive")
    per_engine = len(base) * settings.seconds + (settings.target_seconds if settings.target_rate else 0)
    with tqdm(total=per_engine * len(chosen), unit="s", file=sys.stderr,
              bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} s [{elapsed}<{remaining}] {postfix}") as progress:
        for name in chosen:
            progress.set_description(f"{name}: starting the streamer")
            options = LinkOptions(serve=settings.bundle, config=settings.config, engine=name,
                                  gate_threshold=settings.gate_threshold, max_batch=settings.max_batch)
            with open_link(options, settings.out, name=f"serve-{name}") as link:
                progress.set_description(name)
                sweep = Sweep(link, messages, settings, name, progress)
                levels, target = sweep.run()
                engine_label = link.engine
                gates = [g.__dict__ for g in link.gates]
            best, failed = sweep.bounds()
            precision = engine_label.split(" ", 1)[1] if " " in engine_label else "auto"
            progress.set_description(f"{name}: engine ceiling")
            ceiling = engine_ceiling(settings.bundle, name, precision, settings.max_batch, settings.ceiling_seconds)
            rate = ceiling["throughput_cells_per_s"]
            results.append({
                "engine": name, "engine_label": engine_label, "precision": precision, "gates": gates,
                "levels": levels, "target_run": target, "max_sustained_cells_per_s": best, "first_failed_cells_per_s": failed,
                "engine_ceiling": ceiling, "ceiling_ratio": best / rate if best and rate else None,
            })
    report = {
        "command": "flowsort bench e2e " + " ".join(sys.argv[3:] if sys.argv[1:3] == ["bench", "e2e"] else sys.argv[1:]),
        "date": started, "machine": machine_info, "bundle": str(settings.bundle),
        "model": {"classes": list(model.class_names), "merges": list(model.merges), "input_size": model.input_size},
        "cells": cells.description, "targets": TARGETS,
        "settings": {"levels": base, "seconds": settings.seconds, "growth": settings.growth, "refine": settings.refine,
                     "late_tolerance": settings.late_tolerance, "max_p99_ms": settings.max_p99_ms,
                     "transit_ms": settings.transit_ms, "target_rate": settings.target_rate,
                     "target_seconds": settings.target_seconds, "target_transit_ms": settings.target_transit_ms,
                     "max_batch": settings.max_batch,
                     "cells_per_message": settings.cells_per_message, "arrivals": "poisson"},
        "engines": results,
    }
    report["checks"] = checks(report)
    from bench.simulator import json_default

    json_path = settings.out / "e2e.json"
    json_path.write_text(json.dumps(report, indent=2, default=json_default) + "\n")
    html_path = write_html(report, settings.out / "e2e.html")
    print(table(report))
    print(f"written {json_path} and {html_path}")
    return report


def checks(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The targets, per engine: the target run kept its deadline (``deadline_verdict``); max sustained >= 0.8 x
    ceiling."""
    out = []
    settings = report["settings"]
    for result in report["engines"]:
        target = result["target_run"]
        if target is not None:
            out.append({"engine": result["engine"],
                        "check": f"{settings['target_rate']:g} cells/s for {settings['target_seconds']:g} s, "
                                 f"{settings['target_transit_ms']:g} ms deadline: at most "
                                 f"{100 * LATE_TOLERANCE:g}% not decided in time, p99 <= "
                                 f"{settings['target_transit_ms']:g} ms",
                        "ok": target["ok"],
                        "value": {"achieved": round(target["throughput_cells_per_s"]), "dropped": target["dropped"],
                                  "late": target["late"], "in_time": target["in_time"], "sent": target["sent"],
                                  "p99_ms": target["latency_ms"]["p99"], "reason": target["reason"]}})
        ratio = result["ceiling_ratio"]
        out.append({"engine": result["engine"], "check": "max sustained >= 80% of the engine ceiling",
                    "ok": ratio is not None and ratio >= TARGETS["ceiling_ratio"], "value": ratio})
    return out


def table(report: dict[str, Any]) -> str:
    from bench.link import service_and_engine_cores

    lines = [f"{'engine':<18} {'offered':>9} {'achieved':>9} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'max ms':>8} "
             f"{'late':>6} {'dropped':>7} {'CPU inst/svc/eng idle':>22}  sustained"]
    for result in report["engines"]:
        rows = [(lvl, "yes" if lvl["sustained"] else "no: " + lvl["reason"]) for lvl in result["levels"]]
        if result["target_run"] is not None:
            target = result["target_run"]
            rows.append((target, f"target run ({target['transit_ms']:g} ms deadline): "
                                 + ("met" if target["ok"] else "missed: " + target["reason"])))
        for lvl, verdict in rows:
            lat = lvl["latency_ms"]
            cpu = lvl["cpu"]
            service, engine = service_and_engine_cores(lvl)
            # cores: the instrument's process, the streamer's own threads, the engine and the rest; the machine idle
            idle = cpu["machine_idle_share"]
            cpu_text = f"{100 * (cpu['instrument_core_fraction'] or 0):.0f}%/" \
                       + ("-/-" if service is None else f"{100 * service:.0f}%/{100 * engine:.0f}%") \
                       + (" -" if idle is None else f" {100 * idle:.0f}%")
            lines.append(
                f"{result['engine_label'] or result['engine']:<18} {lvl['offered_cells_per_s'] or 0:>9,.0f} "
                f"{lvl['throughput_cells_per_s']:>9,.0f} {_n(lat['p50'])} {_n(lat['p95'])} {_n(lat['p99'])} {_n(lat['max'])} "
                f"{lvl['late']:>6} {lvl['dropped']:>7} {cpu_text:>22}  {verdict}")
        ceiling = result["engine_ceiling"]["throughput_cells_per_s"]
        best = result["max_sustained_cells_per_s"]
        ratio = result["ceiling_ratio"]
        lines.append(f"{result['engine_label'] or result['engine']}: max sustained "
                     f"{'-' if best is None else f'{best:,.0f}'} cells/s; engine ceiling at batch "
                     f"{result['engine_ceiling']['batch']}: {ceiling:,.0f} cells/s; ratio "
                     f"{'-' if ratio is None else f'{100 * ratio:.0f}%'}")
    for check in report["checks"]:
        lines.append(f"{'PASS' if check['ok'] else 'FAIL'} {check['engine']}: {check['check']} ({check['value']})")
    return "\n".join(lines)


def _n(value: float | None) -> str:
    return f"{'-':>8}" if value is None else f"{value:>8.2f}"


def write_html(report: dict[str, Any], path: Path) -> Path:
    """The sweep as a page: the run's setting, the summary and checks, latency and throughput against offered
    load, and each engine's levels over time."""
    from bench.report_html import write

    deadline = report["settings"]["transit_ms"]
    sections = [_run_note(report), *_summary_tables(report), _load_figure(report)]
    sections += [section for result in report["engines"] for section in _engine_levels(result, deadline)]
    sections.append(CPU_NOTE)
    return write(path, "flowsort bench e2e", sections)


def _run_note(report: dict[str, Any]) -> str:
    from bench.report_html import e

    machine = report["machine"]
    return (f"<p class='note'>{e(report['date'])}; {e(machine['cpu_model'])}, "
            f"{machine['cores']} cores ({e(', '.join(machine['cpu_flags']))}), {e(machine['platform'])}, "
            f"load average before the run "
            f"{machine.get('load_average_1_5_15min', '?')}; bundle {e(report['bundle'])}; "
            f"cells: {e(report['cells'])}</p><p class='note'>{e(report['command'])}</p>")


def _summary_tables(report: dict[str, Any]) -> list[str]:
    """Per engine: max sustained rate, first failed level and the engine ceiling; then the checks."""
    from bench.report_html import fmt, pct
    from bench.report_html import table as html_table

    sections: list[str] = []
    summary_rows = []
    for result in report["engines"]:
        ceiling = result["engine_ceiling"]
        summary_rows.append((result["engine_label"] or result["engine"], fmt(result["max_sustained_cells_per_s"], "", 0),
                             fmt(result["first_failed_cells_per_s"], "", 0),
                             f"{ceiling['throughput_cells_per_s']:,.0f} (batch {ceiling['batch']})",
                             pct(result["ceiling_ratio"])))
    sections.append("<h2>Summary</h2>" + html_table(
        ("engine", "max sustained (cells/s)", "first not sustained", "engine ceiling (cells/s)", "ratio"), summary_rows))
    sections.append(html_table(("check", "engine", "result", "value"),
                               [(c["check"], c["engine"], "pass" if c["ok"] else "FAIL", json.dumps(c["value"]))
                                for c in report["checks"]]))
    return sections


def _load_figure(report: dict[str, Any]) -> str:
    """Latency percentiles and achieved throughput against offered load, every engine."""
    from bench.report_html import figure, plain_log_labels, pyplot

    plt = pyplot()
    settings = report["settings"]
    deadline = settings["transit_ms"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    for result in report["engines"]:
        levels = sorted(result["levels"], key=lambda s: s["offered_target"])
        offered = [lvl["offered_cells_per_s"] or lvl["offered_target"] for lvl in levels]
        label = result["engine_label"] or result["engine"]
        for key, style in (("p50", "-"), ("p95", "--"), ("p99", "-."), ("max", ":")):
            values = [lvl["latency_ms"][key] if lvl["latency_ms"][key] is not None else float("nan") for lvl in levels]
            left.plot(offered, values, style, marker="o", ms=3, label=f"{label} {key}")
        right.plot(offered, [lvl["throughput_cells_per_s"] for lvl in levels], marker="o", ms=3, label=label)
        right.axhline(result["engine_ceiling"]["throughput_cells_per_s"], ls="--", lw=0.8,
                      color=right.lines[-1].get_color(), label=f"{label} engine ceiling")
    if deadline:
        left.axhline(deadline, color="#b00", lw=0.8, ls="--", label="deadline")
    left.axhline(settings["max_p99_ms"], color="#b60", lw=0.8, ls=":", label="sustained: p99 bound")
    left.set(xlabel="offered load (cells/s)", ylabel="capture to decision (ms)", yscale="log",
             title="Latency vs offered load")
    plain_log_labels(left)
    top = max((lvl["offered_cells_per_s"] or 0 for r in report["engines"] for lvl in r["levels"]), default=1)
    right.plot([0, top], [0, top], color="#999", lw=0.6, label="achieved = offered")
    right.set(xlabel="offered load (cells/s)", ylabel="achieved (cells/s)", title="Throughput")
    for axes in (left, right):
        axes.grid(True, alpha=0.3)
        axes.legend(fontsize=7)
    fig.tight_layout()
    return "<h2>Latency and throughput vs offered load</h2>" + figure(
        fig, "per level: latency percentiles of every decided cell (capture to decision received), and achieved "
        "throughput")


def _engine_levels(result: dict[str, Any], deadline: float | None) -> list[str]:
    """One engine's levels over time, and the table of every level."""
    from bench.link import service_and_engine_cores
    from bench.report_html import e, figure, fmt, pct, series_figure
    from bench.report_html import table as html_table

    sections: list[str] = []
    label = result["engine_label"] or result["engine"]
    runs = result["levels"] + ([result["target_run"]] if result["target_run"] is not None else [])
    merged = _concatenate_series(runs)
    marks = [(lvl["start_s"], f"{lvl['offered_target']:,.0f}/s") for lvl in runs]
    sections.append(f"<h2>{e(label)}: over time</h2>" + figure(
        series_figure(merged, f"{label}: every level, one after the other", deadline, marks),
        "cells sent and decisions received per second; latency p50/p99 per interval"))
    rows = []
    for lvl in runs:
        lat, cpu = lvl["latency_ms"], lvl["cpu"]
        if lvl is result["target_run"]:
            verdict = f"target run, {lvl['transit_ms']:g} ms deadline: {'met' if lvl['ok'] else 'missed'}"
        else:
            verdict = "yes" if lvl["sustained"] else f"no ({lvl['reason']})"
        gates = "; ".join(f"{g['gate']} purity {pct(g.get('purity'))} yield {pct(g.get('yield'))}"
                          for g in lvl.get("gates") or [])
        rows.append((fmt(lvl["offered_target"], "", 0), fmt(lvl["offered_cells_per_s"], "", 0),
                     fmt(lvl["throughput_cells_per_s"], "", 0), *(fmt(lat[k], "", 2) for k in ("p50", "p95", "p99", "max")),
                     fmt(lvl["late"]), fmt(lvl["dropped"]), pct(cpu["sender_core_fraction"]),
                     pct(cpu["receiver_core_fraction"]), *(pct(v) for v in service_and_engine_cores(lvl)),
                     verdict, gates))
    sections.append(html_table(("target", "offered", "achieved", "p50 ms", "p95 ms", "p99 ms", "max ms", "late",
                                "dropped", "sender CPU", "receiver CPU", "streamer threads CPU", "engine CPU", "sustained",
                                "gates"),
                               rows))
    return sections


CPU_NOTE = ("<p class='note'>CPU is the share of one core over the level: the sender and receiver threads of "
            "the bench; the streamer's own threads (ingest, inference, emitter, results) and the rest of its "
            "process (the engine's worker threads, ZeroMQ I/O, HTTP). Latency: capture time stamped by the sender "
            "(the Poisson schedule) to the decision's arrival at the receiver.</p>")


def _concatenate_series(levels: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"t_s": [], "sent_per_s": [], "decided_per_s": [], "latency_p50_ms": [], "latency_p99_ms": []}
    for lvl in levels:
        series = lvl["series"]
        out["t_s"] += [t + lvl["start_s"] for t in series["t_s"]] + [out["t_s"][-1] if out["t_s"] else 0.0]
        out["t_s"][-1] = out["t_s"][-2] + series["bin_s"] / 2  # a gap (no line) between two levels
        for key in ("sent_per_s", "decided_per_s", "latency_p50_ms", "latency_p99_ms"):
            out[key] += [*series[key], None]
    return out

