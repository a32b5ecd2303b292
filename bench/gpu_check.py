"""`flowsort bench gpu`: the GPU proof in one run, every phase time-boxed, every figure written down.

Phases, in order of what matters most (each runs as its own process with a
time limit, so one that hangs or fails is recorded and the next one runs):

1. ``model``: train full-width DeepFlow (40x40) briefly on simulated cells, or
   take ``--bundle``; compute the CPU reference (the torch f32 module the
   bundle's ONNX was exported from) on fresh simulated cells; note the GPU.
2. ``engine-*``: build each engine variant (the cuda engine at fp16 and bf16,
   eager in CUDA graphs, then AOTInductor and torch.compile; the torch engine
   for comparison), check its parity with the CPU reference over mixed batch
   sizes (1 to the max, so padded buckets are used), and time it over batch
   1 to 4,096 (:mod:`bench.engine_bench`'s timing).
3. ``e2e-blocks`` and ``e2e-single``: `flowsort serve` on the cuda engine,
   the instrument sending blocks of 64 cells per message, then single-cell
   messages, at rising Poisson rates until a level is not sustained
   (:class:`bench.e2e.Sweep`).
4. ``service``: the same two sweeps through the service with a no-op engine:
   what the service path itself tops out at.

Writes ``summary.json`` (every phase's figures, the checks against the
targets), ``summary.png`` and ``engines.png`` into ``--out`` (default
``$OUT``), and prints a short summary. ``--dry-run`` runs the same phases on
the CPU at tiny sizes (the cuda engine's eager path on the CPU device, the
torch engine behind the streamer) so CI proves the script itself.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from engines.base import Engine, Outputs

if TYPE_CHECKING:
    from bench.e2e import SweepSettings

PARITY_SEED = 2024
PARITY_BATCHES = (1, 7, 64, 33, 300, 4096)  # cycled, each capped at the max batch
MIN_AGREEMENT = {"fp32": 0.999, "fp16": 0.995, "bf16": 0.995}
TARGETS = {"engine_cells_per_s": 100_000, "engine_p99_ms_at_64": 1.0, "e2e_blocks_cells_per_s": 50_000,
           "e2e_p99_ms": 2.0}
LEFT_FOR_SUMMARY_S = 10.0
# What the phases import beyond torch and numpy (module: pip name); `make gpu-check` installs the missing ones
# from wheels carried in .whl/. Training a bundle needs the trainer's packages too (scikit-learn, scipy, onnx,
# onnxscript): carry a bundle (`make gpu-bundle`) where they are absent.
RUNTIME_PACKAGES = {"zmq": "pyzmq", "msgpack": "msgpack", "prometheus_client": "prometheus-client", "tqdm": "tqdm",
                    "matplotlib": "matplotlib"}


class Variant(NamedTuple):
    engine: str
    precision: str
    compile: str = "none"
    device: str = "cuda"

    @property
    def name(self) -> str:
        """The engine as run, without the precision: ``cuda``, ``cuda aoti``, ``cuda (cpu)``."""
        compiled = "" if self.compile == "none" else f" {self.compile}"
        return f"{self.engine}{compiled}" + (" (cpu)" if self.device == "cpu" else "")

    @property
    def label(self) -> str:
        return f"{self.name} {self.precision}"

    @property
    def phase(self) -> str:
        parts = [self.engine, *([self.compile] if self.compile != "none" else []), self.precision]
        return "-".join(["engine", *parts, *(["cpu"] if self.device == "cpu" else [])])


@dataclass(frozen=True)
class Plan:
    """Sizes and time limits of one run: the GPU's, or the dry run's on the CPU."""

    width: float
    input_size: int
    train_cells: int
    epochs: int
    parity_cells: int
    max_batch: int
    bench_batches: tuple[int, ...]
    bench_seconds: float
    variants: tuple[Variant, ...]
    serve_engine: str
    serve_max_batch: int
    block_levels: tuple[float, ...]
    single_levels: tuple[float, ...]
    level_seconds: float
    growth: float  # between levels after the list while sustained (0: the list only)
    max_rate: float
    max_p99_ms: float
    transit_ms: float
    pool: int
    budget_s: float
    phase_s: dict[str, float]


GPU_PLAN = Plan(
    width=1.0, input_size=40, train_cells=3000, epochs=3, parity_cells=4096, max_batch=4096,
    bench_batches=tuple(1 << k for k in range(13)), bench_seconds=1.0,
    variants=(Variant("cuda", "fp16"), Variant("cuda", "bf16"), Variant("cuda", "fp16", "aoti"),
              Variant("torch", "fp16"), Variant("cuda", "fp16", "inductor")),
    serve_engine="cuda", serve_max_batch=1024,
    block_levels=(10_000, 25_000, 50_000, 100_000), single_levels=(5_000, 10_000, 20_000, 40_000),
    level_seconds=3.0, growth=1.5, max_rate=400_000, max_p99_ms=TARGETS["e2e_p99_ms"], transit_ms=10.0, pool=4096,
    budget_s=420.0,
    phase_s={"model": 120, "engine-cuda-fp16": 50, "e2e-blocks": 75, "e2e-single": 60, "engine-cuda-bf16": 40,
             "engine-cuda-aoti-fp16": 120, "service": 60, "engine-torch-fp16": 40, "engine-cuda-inductor-fp16": 90},
)
DRY_PLAN = Plan(
    width=0.125, input_size=32, train_cells=150, epochs=1, parity_cells=64, max_batch=8,
    bench_batches=(1, 8), bench_seconds=0.02,
    variants=(Variant("cuda", "fp32", device="cpu"), Variant("cuda", "bf16", device="cpu")),
    serve_engine="torch", serve_max_batch=8,
    block_levels=(256,), single_levels=(20,), level_seconds=2.0, growth=0.0, max_rate=256, max_p99_ms=1000.0,
    transit_ms=1000.0, pool=64, budget_s=300.0,
    phase_s={"model": 120, "engine-cuda-fp32-cpu": 60, "engine-cuda-bf16-cpu": 60, "e2e-blocks": 60,
             "e2e-single": 60, "service": 60},
)
PHASES = ("model", "engines", "e2e-blocks", "e2e-single", "service")
E2E = {"e2e-blocks": 64, "e2e-single": 1}


@dataclass(frozen=True)
class GpuCheckSettings:
    """What `flowsort bench gpu` runs (its options, one field each)."""

    out: Path | None = None  # None: $OUT, else runs/bench/gpu
    dry_run: bool = False
    bundle: Path | None = None  # None: train one
    phases: tuple[str, ...] = PHASES
    budget: float | None = None  # seconds for the whole run; None: the plan's
    phase: str | None = None  # one phase, in a child process


def output_folder(settings: GpuCheckSettings) -> Path:
    return settings.out or Path(os.environ.get("OUT") or "runs/bench/gpu")


# ------------------------------------------------------------------ the parent: phases in child processes


def run_gpu_check(args: GpuCheckSettings) -> int:
    """The whole proof (or, with ``phase``, one phase of it in this process); 0 when every phase passed."""
    plan = DRY_PLAN if args.dry_run else GPU_PLAN
    out = output_folder(args)
    if args.phase is not None:
        return run_phase(args.phase, plan, out, args)
    for folder in ("phases", "logs"):
        (out / folder).mkdir(parents=True, exist_ok=True)
    budget = args.budget or plan.budget_s
    scale = budget / plan.budget_s  # --budget stretches or shrinks every phase's limit alike
    deadline = time.monotonic() + budget - LEFT_FOR_SUMMARY_S
    names = [v.phase for v in plan.variants] if "engines" in args.phases else []
    order = [n for n in ("model",) if n in args.phases] + names[:1] + [n for n in E2E if n in args.phases] \
        + names[1:] + [n for n in ("service",) if n in args.phases]
    started = time.monotonic()
    results: dict[str, dict[str, Any]] = {}
    for name in order:
        left = deadline - time.monotonic()
        results[name] = run_child(name, args, out, min(plan.phase_s[name] * scale, left))
        status = "ok" if results[name]["ok"] else f"FAILED: {results[name]['error'].splitlines()[-1][:160]}"
        print(f"[{time.monotonic() - started:5.0f} s] {name}: {status} ({results[name]['seconds']:.0f} s)", flush=True)
    summary = summarize(plan, results, args.dry_run, budget, time.monotonic() - started)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    try:
        plot(summary, out)
    except Exception as exc:  # no plotting library on the GPU machine must not lose the figures
        summary["plot_error"] = f"{type(exc).__name__}: {exc}"
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    print(summary_text(summary))
    print(f"written {out / 'summary.json'}" + ("" if "plot_error" in summary else f" and {out / 'summary.png'}"))
    return 0 if all(result["ok"] for result in results.values()) else 1


def run_child(name: str, args: GpuCheckSettings, out: Path, limit_s: float) -> dict[str, Any]:
    """Run phase ``name`` in its own process group, killed after ``limit_s``; its result or the error."""
    if limit_s < 5:
        return {"ok": False, "seconds": 0.0, "error": "skipped: the run's time budget is spent"}
    command = [sys.executable, "-m", "flowsort", "bench", "gpu", "--phase", name, "--out", str(out)]
    command += ["--dry-run"] if args.dry_run else []
    command += ["--bundle", str(args.bundle)] if args.bundle else []
    result_path = out / "phases" / f"{name}.json"
    result_path.unlink(missing_ok=True)
    log_path = out / "logs" / f"{name}.log"
    started = time.monotonic()
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            process.wait(timeout=limit_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # the phase and whatever it started (a streamer)
            process.wait()
    seconds = time.monotonic() - started
    if result_path.is_file():
        return {**json.loads(result_path.read_text()), "seconds": seconds}
    tail = log_path.read_text(errors="replace")[-3000:]
    why = f"timed out after {limit_s:.0f} s" if process.returncode == -signal.SIGKILL else f"exit {process.returncode}"
    return {"ok": False, "seconds": seconds, "error": f"{why}; log {log_path}:\n{tail}"}


# ------------------------------------------------------------------ the child: one phase


def run_phase(name: str, plan: Plan, out: Path, args: GpuCheckSettings) -> int:
    """Run one phase and write its result (``ok`` and figures, or the error) as JSON."""
    import traceback

    bundle = args.bundle or out / "bundle"
    try:
        if name == "model":
            figures = model_phase(plan, out, args.bundle)
        elif name.startswith("engine-"):
            figures = engine_phase(plan, out, bundle, next(v for v in plan.variants if v.phase == name))
        elif name in E2E:
            figures = e2e_phase(plan, out, bundle, E2E[name])
        else:
            figures = service_phase(plan, out, bundle)
        result = {"ok": True, **figures}
    except Exception as exc:
        traceback.print_exc()
        result = {"ok": False, "error": "".join(traceback.format_exception_only(exc)).strip()}
    (out / "phases" / f"{name}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    return 0 if result["ok"] else 1


def simulated_cells(count: int, size: int, seed: int) -> np.ndarray:
    from trainer.synthetic import generate

    return generate(count, seed=seed, size=size, prior="uniform", dead_fraction=0.08, debris_fraction=0.04).images


def model_phase(plan: Plan, out: Path, given: Path | None) -> dict[str, Any]:
    """The bundle (trained here unless given), the CPU reference on fresh cells, and what this machine is."""
    import torch

    from engines.bundle import load_bundle
    from engines.deployed_model import load_deployed
    from trainer.predictions import predict

    figures: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda,
                               "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                               "driver": nvidia_driver()}
    if torch.cuda.is_available():
        figures["compute_capability"] = "{}.{}".format(*torch.cuda.get_device_capability())
    started = time.perf_counter()
    if given is None:
        from trainer.dataset import write_dataset
        from trainer.synthetic import generate, to_dataset
        from trainer.train import TrainConfig
        from trainer.training_run import train_bundle

        cells = generate(plan.train_cells, seed=5, size=plan.input_size, prior="uniform", dead_fraction=0.08,
                         debris_fraction=0.04)
        dataset = write_dataset(out / "dataset", to_dataset(cells))
        train_bundle(dataset, out / "bundle", TrainConfig(epochs=plan.epochs, batch_size=64, lr=0.05, width=plan.width,
                                                          seed=0))
        shutil.rmtree(dataset)  # only the bundle is kept (and carried to the GPU machine)
        figures["train_s"] = time.perf_counter() - started
    bundle = load_bundle(given or out / "bundle")
    figures["bundle"] = {"path": str(bundle.path), "hash": bundle.content_hash, "input_size": bundle.input_size,
                         "width": bundle.manifest["model"].get("width"), "classes": list(bundle.class_names)}
    cells = simulated_cells(plan.parity_cells, bundle.input_size, PARITY_SEED)
    started = time.perf_counter()
    reference = predict(load_deployed(bundle), cells)
    figures["reference_cells_per_s"] = len(cells) / (time.perf_counter() - started)
    np.savez(out / "reference.npz", cells=cells, probabilities=reference.probabilities,
             embedding=reference.embedding, dead_score=reference.dead_score)
    return figures


def nvidia_driver() -> str | None:
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() or None


def open_engine(plan: Plan, bundle: Any, variant: Variant) -> Engine:
    import engines

    if variant.device == "cpu":
        from engines.cuda_engine import CudaEngine

        return CudaEngine(bundle, variant.precision, plan.max_batch, compile=variant.compile, device="cpu")
    options = {"compile": variant.compile} if variant.engine == "cuda" else {}
    return engines.load(bundle, variant.engine, variant.precision, max_batch=plan.max_batch, **options)


def engine_phase(plan: Plan, out: Path, bundle_path: Path, variant: Variant) -> dict[str, Any]:
    """Build one variant, its parity with the CPU reference, and its timing over the batch sizes."""
    from bench.engine_bench import bench_engine
    from engines.bundle import load_bundle

    bundle = load_bundle(bundle_path)
    with np.load(out / "reference.npz") as saved:
        cells = saved["cells"]
        reference = Outputs(saved["probabilities"], saved["embedding"], saved["dead_score"])
    started = time.perf_counter()
    with open_engine(plan, bundle, variant) as engine:
        build_s = time.perf_counter() - started
        described = engine.describe()
        got = mixed_batches(engine, cells)
        parity = compare(got, reference, variant.precision)
        bench_cells = np.ascontiguousarray(np.resize(cells, (plan.bench_batches[-1], *cells.shape[1:])))
        rows = bench_engine(engine, bench_cells, plan.bench_batches, plan.bench_seconds, lambda: None)
    for row in rows:
        row["engine"], row["variant"] = variant.name, variant.label
    return {"variant": variant._asdict(), "label": variant.label, "engine": described, "build_s": build_s,
            "parity": parity, "bench": rows}


def mixed_batches(engine: Engine, cells: np.ndarray) -> Outputs:
    """Outputs for ``cells`` in batches of cycling sizes, two in flight (submit/collect), copied out."""
    n = len(cells)
    got = Outputs(np.full((n, engine.num_classes), np.nan, np.float32),
                  np.full((n, engine.embedding_dim), np.nan, np.float32), np.full(n, np.nan, np.float32))
    spans = []
    start = 0
    while start < n:
        size = min(PARITY_BATCHES[len(spans) % len(PARITY_BATCHES)], engine.max_batch, n - start)
        spans.append((start, start + size))
        start += size
    for index, (begin, end) in enumerate(spans):
        engine.submit(cells[begin:end])
        if index:
            store(got, engine.collect(), spans[index - 1])
    store(got, engine.collect(), spans[-1])
    return got


def store(got: Outputs, batch: Outputs, span: tuple[int, int]) -> None:
    for array, value in zip(got, batch):
        array[span[0] : span[1]] = value


def compare(got: Outputs, reference: Outputs, precision: str) -> dict[str, Any]:
    agreement = float((got.probabilities.argmax(1) == reference.probabilities.argmax(1)).mean())
    dead = np.abs(got.dead_score - reference.dead_score) / np.maximum(reference.dead_score, 1e-3)
    return {"cells": len(got.probabilities), "agreement": agreement,
            "min_agreement": MIN_AGREEMENT.get(precision, 0.99),
            "passed": bool(agreement >= MIN_AGREEMENT.get(precision, 0.99) and np.isfinite(got.probabilities).all()),
            "max_abs_probability_diff": float(np.abs(got.probabilities - reference.probabilities).max()),
            "dead_score_rel_error_p50_p99": [float(v) for v in np.percentile(dead, [50, 99])]}


def sweep_settings(plan: Plan, out: Path, bundle: Path, levels: tuple[float, ...],
                   cells_per_message: int) -> SweepSettings:
    """What :class:`bench.e2e.Sweep` runs: the levels, then growing until one is not sustained."""
    from bench.e2e import SweepSettings

    return SweepSettings(bundle=bundle, cells_per_message=cells_per_message, seconds=plan.level_seconds,
                         transit_ms=plan.transit_ms, seed=0, late_tolerance=0.01, max_p99_ms=plan.max_p99_ms,
                         levels=",".join(f"{rate:g}" for rate in levels), max_rate=plan.max_rate, growth=plan.growth,
                         refine=1, target_rate=0.0, save_decisions=False, out=out)


def sweep(plan: Plan, out: Path, link: Any, label: str, cells_per_message: int, bundle: Path) -> dict[str, Any]:
    """Rising rates through ``link`` with ``cells_per_message``: each level, and where it tops out."""
    from tqdm import tqdm

    from bench.cell_sources import load_cells
    from bench.e2e import Sweep
    from bench.traffic import CellMessages

    cells = load_cells("synthetic", link.model.input_size, seed=0, pool=plan.pool, prior="jurkat")
    messages = CellMessages(cells, cells_per_message, seed=0)
    levels = plan.block_levels if cells_per_message > 1 else plan.single_levels
    with tqdm(total=len(levels) * plan.level_seconds, unit="s", file=sys.stderr, desc=label) as progress:
        runner = Sweep(link, messages, sweep_settings(plan, out, bundle, levels, cells_per_message), label, progress)
        results, _ = runner.run()
    best, failed = runner.bounds()
    for level in results:
        level.pop("series", None)  # per-interval curves: more than a summary needs
    return {"engine": link.engine, "cells_per_message": cells_per_message, "max_sustained_cells_per_s": best,
            "first_failed_cells_per_s": failed, "max_p99_ms": plan.max_p99_ms, "levels": results}


def e2e_phase(plan: Plan, out: Path, bundle: Path, cells_per_message: int) -> dict[str, Any]:
    from bench.link import LinkOptions, open_link

    label = f"{plan.serve_engine}-{cells_per_message}"
    options = LinkOptions(serve=bundle, engine=plan.serve_engine, max_batch=plan.serve_max_batch)
    with open_link(options, out / "serve", name=f"serve-{label}") as link:
        return sweep(plan, out, link, label, cells_per_message, bundle)


# ------------------------------------------------------------------ the service path alone: a no-op engine


@contextmanager
def noop_service(plan: Plan, bundle: Path, workdir: Path) -> Iterator[Any]:
    """The service with the no-op engine in its own process, and a :class:`bench.link.Link` to it."""
    import multiprocessing
    from types import SimpleNamespace

    import zmq

    from bench.link import Link, ModelInfo, gate_specs, service_config
    from bench.overhead import serve_null
    from streamer.testing import write_toml

    model = ModelInfo.load(bundle)
    config = service_config(model, max_batch=plan.serve_max_batch)
    workdir.mkdir(parents=True, exist_ok=True)
    config_path = write_toml(workdir / "serve-noop.toml", config)
    ready = workdir / "serve-noop.ready.json"
    ready.unlink(missing_ok=True)
    spawn = multiprocessing.get_context("spawn")
    stop = spawn.Event()
    process = spawn.Process(target=serve_null, args=(str(bundle), str(config_path), str(ready), None, stop), daemon=True)
    process.start()
    context = zmq.Context(io_threads=1)
    try:
        end = time.monotonic() + 60
        while not ready.is_file():
            if not process.is_alive() or time.monotonic() > end:
                raise RuntimeError(f"the no-op service did not start (exit code {process.exitcode})")
            time.sleep(0.05)
        time.sleep(0.1)  # the file is written whole before the service takes cells, but give the reader a beat
        info = json.loads(ready.read_text())
        yield Link(info["ingest"], info["push"], gate_specs(config.get("gates", [])), model, context,
                   served=SimpleNamespace(process=process))
    finally:
        stop.set()
        process.join(20)
        if process.is_alive():
            process.kill()
        context.destroy(linger=0)


def service_phase(plan: Plan, out: Path, bundle: Path) -> dict[str, Any]:
    figures = {}
    for name, cells_per_message in E2E.items():
        label = f"noop-{cells_per_message}"
        with noop_service(plan, bundle, out / "serve") as link:
            link.engine = "noop"
            figures[name.removeprefix("e2e-")] = sweep(plan, out, link, label, cells_per_message, bundle)
    return figures


# ------------------------------------------------------------------ summary


def summarize(plan: Plan, results: dict[str, dict[str, Any]], dry_run: bool, budget: float,
              wall_s: float) -> dict[str, Any]:
    from bench.run_summary import describe_machine

    return {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "dry_run": dry_run, "wall_s": wall_s, "budget_s": budget,
            "machine": describe_machine(), "plan": asdict(plan), "phases": results,
            "checks": checks(results, judged=not dry_run)}


def checks(results: dict[str, dict[str, Any]], judged: bool) -> list[dict[str, Any]]:
    """The issue's targets against the figures; in a dry run the values are shown but not judged."""
    out: list[dict[str, Any]] = []

    def check(name: str, ok: bool | None, value: Any) -> None:
        out.append({"check": name, "ok": ok if judged else None, "value": value})

    engines_run = {name: r for name, r in results.items() if name.startswith("engine-") and r.get("ok")}
    for name, result in results.items():
        if name.startswith("engine-") and not result.get("ok"):
            check(f"{name}: builds and runs", False, result.get("error", "")[:300])
    for result in engines_run.values():
        parity = result["parity"]
        check(f"{result['label']}: argmax agreement with the CPU reference >= {parity['min_agreement']:.1%}",
              parity["passed"], round(parity["agreement"], 5))
    rows = [row for result in engines_run.values() for row in result["bench"]]
    if rows:
        best = max(rows, key=lambda row: row["throughput_cells_per_s"])
        check(f"engine >= {TARGETS['engine_cells_per_s']:,} cells/s at its best batch",
              best["throughput_cells_per_s"] >= TARGETS["engine_cells_per_s"],
              {"cells_per_s": round(best["throughput_cells_per_s"]), "engine": best["variant"], "batch": best["batch"]})
        worst: dict[str, float] = {}
        for row in rows:
            if row["batch"] <= 64:
                worst[row["variant"]] = max(worst.get(row["variant"], 0.0), row["latency_ms"]["p99"])
        fastest = min(worst, key=worst.get) if worst else None
        check(f"p99 <= {TARGETS['engine_p99_ms_at_64']:g} ms per batch at batch <= 64 (best engine)",
              fastest is not None and worst[fastest] <= TARGETS["engine_p99_ms_at_64"],
              {"engine": fastest, "worst_p99_ms": worst.get(fastest)})
    for name in E2E:
        result = results.get(name)
        if result is None:
            continue
        if not result.get("ok"):
            check(f"{name}: runs", False, result.get("error", "")[:300])
            continue
        best = result["max_sustained_cells_per_s"]
        if name == "e2e-blocks":
            check(f"serve, 64 cells per message: >= {TARGETS['e2e_blocks_cells_per_s']:,} cells/s sustained with "
                  f"p99 <= {TARGETS['e2e_p99_ms']:g} ms", best is not None and best >= TARGETS["e2e_blocks_cells_per_s"],
                  {"max_sustained": best, "first_failed": result["first_failed_cells_per_s"]})
        else:
            check("serve, single-cell messages: ceiling measured", best is not None,
                  {"max_sustained": best, "first_failed": result["first_failed_cells_per_s"],
                   "why_not_more": why_failed(result)})
    return out


def why_failed(result: dict[str, Any]) -> str | None:
    failed = [level for level in result["levels"] if not level["sustained"]]
    return failed[0]["reason"] if failed else None


def summary_text(summary: dict[str, Any]) -> str:
    lines = [f"GPU proof{' (DRY RUN on the CPU: tiny sizes, targets not judged)' if summary['dry_run'] else ''}: "
             f"{summary['wall_s']:.0f} s of {summary['budget_s']:.0f} s"]
    model = summary["phases"].get("model", {})
    if model.get("ok"):
        lines.append(f"  machine: {model.get('gpu') or 'no GPU'}, driver {model.get('driver') or '-'}, "
                     f"torch {model.get('torch')}, CUDA {model.get('cuda')}")
    for name, result in summary["phases"].items():
        if name.startswith("engine-") and result.get("ok"):
            best = max(result["bench"], key=lambda row: row["throughput_cells_per_s"])
            lines.append(f"  {result['label']:<22} built in {result['build_s']:.1f} s, agreement "
                         f"{result['parity']['agreement']:.4f}, best {best['throughput_cells_per_s']:,.0f} cells/s "
                         f"at batch {best['batch']}")
        elif name in E2E and result.get("ok"):
            lines.append(f"  {name:<22} max sustained {result['max_sustained_cells_per_s'] or 0:,.0f} cells/s "
                         f"({result['engine']})")
        elif name == "service" and result.get("ok"):
            for kind, part in result.items():
                if isinstance(part, dict) and "levels" in part:
                    lines.append(f"  service, no-op {kind:<9} max sustained "
                                 f"{part['max_sustained_cells_per_s'] or 0:,.0f} cells/s")
        elif not result.get("ok"):
            lines.append(f"  {name:<22} FAILED: {result.get('error', '').splitlines()[0][:150] if result.get('error') else ''}")
    for check in summary["checks"]:
        verdict = {True: "PASS", False: "FAIL", None: "----"}[check["ok"]]
        lines.append(f"{verdict} {check['check']}: {check['value']}")
    return "\n".join(lines)


def plot(summary: dict[str, Any], out: Path) -> None:
    """summary.png: engine throughput and p99 per batch size; achieved throughput and p99 against offered load."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bench.engine_bench import plot as engines_plot

    phases = summary["phases"]
    rows = [row for name, r in phases.items() if name.startswith("engine-") and r.get("ok") for row in r["bench"]]
    if rows:
        engines_plot(rows, out / "engines.png")
    sweeps = {f"serve {name.removeprefix('e2e-')}": phases[name] for name in E2E if phases.get(name, {}).get("ok")}
    if phases.get("service", {}).get("ok"):
        sweeps.update({f"no-op {kind}": part for kind, part in phases["service"].items() if isinstance(part, dict)
                       and "levels" in part})
    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    series: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        series.setdefault(row["variant"], []).append(row)
    for label, points in series.items():
        axes[0, 0].plot([p["batch"] for p in points], [p["throughput_cells_per_s"] for p in points], marker="o",
                        label=label)
        axes[0, 1].plot([p["batch"] for p in points], [p["latency_ms"]["p99"] for p in points], marker="o", label=label)
    axes[0, 0].axhline(TARGETS["engine_cells_per_s"], color="#b00", ls="--", lw=0.8, label="target")
    axes[0, 1].axhline(TARGETS["engine_p99_ms_at_64"], color="#b00", ls="--", lw=0.8, label="target (batch <= 64)")
    for label, result in sweeps.items():
        levels = sorted(result["levels"], key=lambda level: level["offered_target"])
        offered = [level["offered_cells_per_s"] or level["offered_target"] for level in levels]
        axes[1, 0].plot(offered, [level["throughput_cells_per_s"] for level in levels], marker="o", label=label)
        axes[1, 1].plot(offered, [level["latency_ms"]["p99"] or np.nan for level in levels], marker="o", label=label)
    axes[1, 1].axhline(TARGETS["e2e_p99_ms"], color="#b00", ls="--", lw=0.8, label="target")
    titles = (("batch size", "cells/s", "Engine throughput"), ("batch size", "p99 per batch (ms)", "Engine latency"),
              ("offered (cells/s)", "achieved (cells/s)", "End to end throughput"),
              ("offered (cells/s)", "p99 capture to decision (ms)", "End to end latency"))
    for ax, (xlabel, ylabel, title) in zip(axes.flat, titles):
        ax.set(yscale="log", xlabel=xlabel, ylabel=ylabel, title=title)
        ax.set_xscale("log", base=2 if xlabel == "batch size" else 10)
        ax.grid(True, which="both", alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.suptitle(("DRY RUN (CPU, tiny sizes): " if summary["dry_run"] else "") + f"GPU proof, {summary['date']}")
    fig.tight_layout()
    fig.savefig(out / "summary.png", dpi=110)
    plt.close(fig)


def missing_packages() -> list[str]:
    """pip names of the runtime packages this Python lacks."""
    from importlib.util import find_spec

    return [package for module, package in RUNTIME_PACKAGES.items() if find_spec(module) is None]


if __name__ == "__main__":  # `python -m bench.gpu_check`: what `make gpu-check` must install first
    print(" ".join(missing_packages()))
