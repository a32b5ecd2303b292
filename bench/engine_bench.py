"""`flowsort bench engines BUNDLE`: throughput and latency of every engine this machine can run.

For each available engine and precision and each batch size it times
``engine.infer`` (cells/s, and per-batch latency p50/p99), beside plain torch
eager, the baseline a researcher would otherwise write. For OpenVINO it also
times a bare infer request on the engine's own compiled model at the same
batch (input bound once, outputs left in OpenVINO's tensors), interleaved
with the engine's calls so a busy machine slows both alike:
the difference is the wrapper's overhead (checks, the uint16 -> float32 copy
into its buffers, bookkeeping), which should stay within 5%.

Writes ``engines.json`` and ``engines.png`` (throughput per batch size and the
latency/throughput frontier) into the output folder.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from engines.cpu import describe
from flowsort.errors import UserError

DEFAULT_BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
OVERHEAD_TARGET = 0.05
WARMUP_CALLS = 3
MIN_CALLS = 5
ROUND_CALLS = 4  # calls per turn when two functions are interleaved
BASELINE = "torch-eager"
DEFAULT_SECONDS_PER_POINT = 2.0


def timed(functions: dict[str, Callable[[], object]], seconds: float) -> dict[str, np.ndarray]:
    """Per-call latencies (s) of each function; several functions take turns in short rounds."""
    for function in functions.values():
        for _ in range(WARMUP_CALLS):
            function()
    laps: dict[str, list[int]] = {name: [] for name in functions}
    rounds = ROUND_CALLS if len(functions) > 1 else 1
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or min(map(len, laps.values())) < MIN_CALLS:
        for name, function in functions.items():
            for _ in range(rounds):
                start = time.perf_counter_ns()
                function()
                laps[name].append(time.perf_counter_ns() - start)
    return {name: np.asarray(values, dtype=np.float64) * 1e-9 for name, values in laps.items()}


def pipelined(engine: Any, cells: np.ndarray, seconds: float) -> float:
    """Cells/s with the engine kept full: ``engine.depth`` batches in flight, as the service runs it (on an
    engine with parallel streams this is what all of them together decide; ``infer`` times one)."""
    for _ in range(WARMUP_CALLS):
        engine.infer(cells)
    for _ in range(engine.depth):
        engine.submit(cells)
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or done < MIN_CALLS:
        engine.collect()
        engine.submit(cells)
        done += 1
    elapsed = time.perf_counter() - start
    for _ in range(engine.depth):
        engine.collect()
    return done * len(cells) / elapsed


def ceiling(engine: Any, cells: np.ndarray, sizes: tuple[int, ...], seconds: float) -> dict[str, Any]:
    """The engine's ceiling: the best pipelined throughput over ``sizes``, and the batch size that reaches it."""
    rates = {size: pipelined(engine, cells[:size], seconds) for size in sizes}
    best = max(rates, key=rates.get)
    return {"engine": engine.name, "precision": engine.precision, "batch": best,
            "throughput_cells_per_s": rates[best], "throughput_by_batch": {str(size): rate for size, rate in rates.items()},
            "threading": engine.describe().get("threading", "")}


def summary(latencies: np.ndarray, batch: int) -> dict[str, Any]:
    return {
        "calls": len(latencies),
        "throughput_cells_per_s": batch * len(latencies) / latencies.sum(),
        "latency_ms": {
            "p50": 1e3 * float(np.percentile(latencies, 50)),
            "p99": 1e3 * float(np.percentile(latencies, 99)),
            "mean": 1e3 * float(latencies.mean()),
        },
    }


def bare_openvino(engine: Any, cells: np.ndarray) -> Callable[[], object]:
    """The leanest call on the engine's compiled model: a request with its (float32) input bound once, run synchronously."""
    import openvino as ov

    request = engine.compiled_for(len(cells)).create_infer_request()
    request.set_input_tensor(ov.Tensor(cells.astype(np.float32), shared_memory=True))
    return request.infer


def eager_torch(bundle: Any, threads: int | None) -> Callable[[np.ndarray], object]:
    """What a researcher would write: the trained module in eval mode, float32 tensors, no_grad."""
    import torch

    from engines.deployed_model import load_deployed

    if threads:
        torch.set_num_threads(threads)
    module = load_deployed(bundle)

    def call(cells: np.ndarray) -> object:
        with torch.no_grad():
            return module(torch.from_numpy(cells.astype(np.float32)))

    return call


def configurations(bundle: Any, requested: tuple[str, ...] | None) -> list[tuple[str, str]]:
    import engines

    reasons = engines.available()
    chosen = requested or tuple(name for name, reason in reasons.items() if reason is None)
    unknown = [name for name in chosen if name not in reasons]
    if unknown:
        raise UserError(f"unknown engine {', '.join(unknown)}: choose from {', '.join(reasons)}")
    for name in chosen:
        if reasons[name]:
            raise UserError(reasons[name])
    return [(name, precision) for name in chosen for precision in engines.precisions(name, bundle)]


def bench_engine(
    engine: Any, cells: np.ndarray, sizes: tuple[int, ...], seconds: float, tick: Callable[[], None]
) -> list[dict[str, Any]]:
    rows = []
    for batch in sizes:
        batch_cells = cells[:batch]
        functions = {"engine": lambda: engine.infer(batch_cells)}
        if engine.name == "openvino":
            functions["bare"] = bare_openvino(engine, batch_cells)
        laps = timed(functions, seconds)
        row = {"engine": engine.name, "precision": engine.precision, "batch": batch, **summary(laps["engine"], batch),
               "pipelined_cells_per_s": pipelined(engine, batch_cells, seconds / 2)}
        if "bare" in laps:
            bare = summary(laps["bare"], batch)
            row["bare_openvino_latency_ms"] = bare["latency_ms"]
            row["wrapper_overhead"] = row["latency_ms"]["p50"] / bare["latency_ms"]["p50"] - 1
        rows.append(row)
        tick()
    return rows


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 5))
    series: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        series.setdefault(f"{row['engine']} {row['precision']}", []).append(row)
    for label, points in series.items():
        style = "--" if label.startswith(BASELINE) else "-"
        batches = [p["batch"] for p in points]
        throughput = [p["throughput_cells_per_s"] for p in points]
        latency = [p["latency_ms"]["p50"] for p in points]
        left.plot(batches, throughput, style, marker="o", label=label)
        right.plot(throughput, latency, style, marker="o", label=label)
        for point, x, y in zip(points, throughput, latency):
            right.annotate(str(point["batch"]), (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    left.set_xscale("log", base=2)
    left.set(yscale="log", xlabel="batch size", ylabel="throughput (cells/s)", title="Throughput")
    batches = sorted({row["batch"] for row in rows})
    left.set_xticks(batches, [str(b) for b in batches])
    left.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    right.set(xscale="log", yscale="log", xlabel="throughput (cells/s)", ylabel="latency per batch, p50 (ms)",
              title="Latency / throughput frontier (labels: batch size)")
    for axes in (left, right):
        axes.grid(True, which="both", alpha=0.3)
        axes.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def time_engines(bundle_path: Path, out: Path, engines_to_time: tuple[str, ...] | None = None,
                 sizes: tuple[int, ...] = DEFAULT_BATCHES, seconds: float = DEFAULT_SECONDS_PER_POINT,
                 threads: int | None = None, baseline: bool = True) -> dict[str, Any]:
    """Time every engine and precision (``engines_to_time``: all available) at each batch size; write
    engines.json and engines.png to ``out``, print the table and return the report."""
    from tqdm import tqdm

    import engines
    from engines.bundle import load_bundle

    if seconds <= 0:
        raise UserError("--seconds must be positive")
    bundle = load_bundle(bundle_path)
    configs = configurations(bundle, engines_to_time)
    images, _ = bundle.validation_cells()
    cells = np.ascontiguousarray(np.resize(images, (sizes[-1], *images.shape[1:])))
    eager = None if not baseline or engines.available()["torch"] else eager_torch(bundle, threads)
    rows: list[dict[str, Any]] = []
    described: list[dict[str, Any]] = []
    with tqdm(total=len(sizes) * (len(configs) + (eager is not None)), unit="point") as progress:
        if eager is not None:
            progress.set_description(BASELINE)
            for batch in sizes:
                batch_cells = cells[:batch]
                laps = timed({"eager": lambda: eager(batch_cells)}, seconds)["eager"]
                rows.append({"engine": BASELINE, "precision": "fp32", "batch": batch, **summary(laps, batch)})
                progress.update()
        for name, precision in configs:
            progress.set_description(f"{name} {precision}")
            options = {"threads": threads} if name != "tensorrt" else {}
            with engines.load(bundle, name, precision, max_batch=sizes[-1], **options) as engine:
                described.append(engine.describe())
                rows += bench_engine(engine, cells, sizes, seconds, progress.update)
    out.mkdir(parents=True, exist_ok=True)
    report = {
        "bundle": str(bundle.path), "bundle_hash": bundle.content_hash, "machine": describe(),
        "settings": {"batch_sizes": list(sizes), "seconds": seconds, "threads": threads},
        "engines": described, "overhead_target": OVERHEAD_TARGET, "results": rows,
    }
    (out / "engines.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(rows, out / "engines.png")
    print(table(rows))
    print(f"written {out / 'engines.json'} and {out / 'engines.png'}")
    return report


def table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'engine':<12} {'precision':<9} {'batch':>5} {'cells/s':>10} {'p50 ms':>9} {'p99 ms':>9} {'overhead':>9}"]
    for row in rows:
        overhead = f"{100 * row['wrapper_overhead']:+.1f}%" if "wrapper_overhead" in row else ""
        lines.append(
            f"{row['engine']:<12} {row['precision']:<9} {row['batch']:>5} {row['throughput_cells_per_s']:>10.0f} "
            f"{row['latency_ms']['p50']:>9.3f} {row['latency_ms']['p99']:>9.3f} {overhead:>9}"
        )
    return "\n".join(lines)
