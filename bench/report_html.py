"""HTML reports of the bench: one self-contained page, plots inlined as PNG data URIs.

Why not :mod:`trainer.report_html`: it imports the evaluation stack (torch), which
a streaming benchmark on a 2-core machine should not load; the page style is
the same.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flowsort.html_page import escape as e
from flowsort.html_page import page, png_figure, table

def figure(fig: Any, caption: str) -> str:
    """A matplotlib figure inlined (and closed)."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return png_figure(buffer.getvalue(), caption)


def write(path: Path, title: str, sections: Sequence[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page(title, sections))
    return path


def pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def fmt(value: Any, unit: str = "", digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}{unit}"
    if isinstance(value, int):
        return f"{value:,}{unit}"
    return f"{value}{unit}"


def pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


# ---------------------------------------------------------------------------- one run (simulate, replay, demo)

def series_figure(series: dict[str, Any], title: str = "", deadline_ms: float | None = None,
                  marks: Sequence[tuple[float, str]] = ()) -> Any:
    """Throughput and latency over time (one run, or a sweep's runs end to end)."""
    plt = pyplot()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(11, 6), sharex=True)
    t = series["t_s"]
    nan = float("nan")
    top.plot(t, [nan if v is None else v for v in series["sent_per_s"]], label="sent (cells/s)", lw=1)
    top.plot(t, [nan if v is None else v for v in series["decided_per_s"]], label="decisions received (cells/s)", lw=1)
    top.set(ylabel="cells/s", title=title or "Throughput and latency over time")
    p50 = [float("nan") if v is None else v for v in series["latency_p50_ms"]]
    p99 = [float("nan") if v is None else v for v in series["latency_p99_ms"]]
    bottom.plot(t, p50, label="p50", lw=1)
    bottom.plot(t, p99, label="p99", lw=1)
    if deadline_ms:
        bottom.axhline(deadline_ms, color="#b00", ls="--", lw=1, label="deadline")
    bottom.set(xlabel="time (s)", ylabel="capture to decision (ms)", yscale="log")
    plain_log_labels(bottom)
    for x, label in marks:
        for axes in (top, bottom):
            axes.axvline(x, color="#999", lw=0.6)
        top.annotate(label, (x, 1), xycoords=("data", "axes fraction"), fontsize=7, rotation=90, va="top",
                     xytext=(2, -2), textcoords="offset points")
    for axes in (top, bottom):
        axes.grid(True, alpha=0.3)
        axes.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    return fig


def plain_log_labels(axes: Any) -> None:
    """Log-scale y ticks written 0.5, 2, 10 rather than 5x10^-1."""
    from matplotlib.ticker import FuncFormatter

    formatter = FuncFormatter(lambda value, _: f"{value:g}")
    axes.yaxis.set_major_formatter(formatter)
    axes.yaxis.set_minor_formatter(formatter)
    axes.tick_params(axis="y", which="minor", labelsize=7)


def run_sections(summary: dict[str, Any], deadline_ms: float | None = None) -> list[str]:
    """Tables and plots of one run's summary (bench.run_summary.summarize)."""
    latency, service = summary["latency_ms"], summary["service_latency_ms"]
    rows = [
        ("offered", fmt(summary["offered_cells_per_s"], " cells/s", 0)),
        ("achieved throughput (classified)", fmt(summary["throughput_cells_per_s"], " cells/s", 0)),
        ("cells sent / decided", f"{summary['cells_sent']:,} / {summary['decided']:,}"),
        ("late (never sorted)", fmt(summary["late"])),
        ("dropped (overload or never answered)", fmt(summary["dropped"])),
        ("errors", ", ".join(f"{k}: {v}" for k, v in summary["errors"].items()) or "none"),
        ("latency capture to decision received, p50 / p95 / p99 / max",
         " / ".join(fmt(latency[k], " ms") for k in ("p50", "p95", "p99", "max"))),
        ("service latency (capture to send), p50 / p99",
         " / ".join(fmt(service[k], " ms") for k in ("p50", "p99"))),
        ("sender pacing: rate error, lag p50 / p99",
         f"{100 * summary['pacing']['rate_error']:+.2f}%, {summary['pacing']['lag_p50_us']:.0f} / "
         f"{summary['pacing']['lag_p99_us']:.0f} µs"),
        ("CPU: sender / receiver (share of one core)",
         f"{pct(summary['cpu']['sender_core_fraction'])} / {pct(summary['cpu']['receiver_core_fraction'])}"),
        ("CPU: the instrument's whole process (cores), machine idle",
         f"{summary['cpu']['instrument_core_fraction'] or 0:.2f}, {pct(summary['cpu']['machine_idle_share'])}"),
    ]
    if summary.get("streamer_cpu_core_fraction") is not None:
        rows.append(("CPU: streamer process (cores)", f"{summary['streamer_cpu_core_fraction']:.2f}"))
        from bench.link import service_and_engine_cores

        service, engine = service_and_engine_cores(summary)
        if service is not None:
            rows.append(("CPU: streamer's own threads / engine and other (cores)", f"{service:.2f} / {engine:.2f}"))
    sections = ["<h2>Run</h2>" + table(("", "value"), rows)]
    gates = summary.get("gates") or []
    if gates:
        gate_rows = [(g["gate"], ", ".join(g["classes"]), fmt(g["sorted"]), fmt(g.get("targets")), pct(g.get("purity")),
                      pct(g.get("yield")), fmt(g.get("dead_sorted")), fmt(g.get("debris_sorted"))) for g in gates]
        sections.append("<h2>Sort gates</h2>" + table(
            ("gate", "classes", "sorted", "target cells sent", "purity", "yield", "dead sorted", "debris sorted"),
            gate_rows) + "<p class='note'>purity: share of sorted cells whose true class is one of the gate's; "
            "yield: share of the target cells sent that the gate sorted (late, failed and missing cells are lost "
            "yield).</p>")
    mix = summary.get("class_mix") or {}
    total = sum(mix.values()) or 1
    dead_line = f"<p>dead-cell flags: {summary['dead_flagged']:,} of {summary['decided']:,} decided"
    if "truth_dead" in summary:
        dead_line += (f"; flagged: {summary['dead_flagged_truly_dead']:,} of {summary['truth_dead']:,} truly dead cells, "
                      f"{summary['dead_flagged_debris']:,} of {summary['truth_debris']:,} debris and "
                      f"{summary['dead_flagged_live']:,} of {summary['decided_live']:,} live cells; "
                      f"dead cells sorted: {summary['dead_sorted']:,}")
    sections.append("<h2>Class mix</h2>" + table(("predicted class", "cells", "share"),
                                                   [(k, fmt(v), pct(v / total)) for k, v in
                                                    sorted(mix.items(), key=lambda kv: -kv[1])]) + dead_line + "</p>")
    sections.append("<h2>Over time</h2>" + figure(series_figure(summary["series"], deadline_ms=deadline_ms),
                                                  "cells sent and decisions received per second; latency p50/p99 of "
                                                  "the cells decided in each interval"))
    return sections
