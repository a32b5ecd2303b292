"""`flowsort demo`: the live job end to end on simulated cells, on any machine, in under three minutes.

It runs what a user would: simulate a training acquisition and draw its
contact sheet, train a small DeepFlow (or reuse the one trained last time),
start `flowsort serve` on the CPU engine, and run the simulated instrument at
1,000 cells/s for 20 s with the live dashboard (rate, latency, class mix,
dead flags, gate counts, purity and yield of a mitotic gate). It ends with a
summary and an HTML report. Needs nothing but the package itself (no real
data, no network).

The training step and the model are sized for the 2-core machine it runs on:
3,000 cells of 40x40, 5 epochs (about 25 s on two idle cores), width 0.15
where the CPU has native bf16 and 0.12 where the engine must run fp32 (an
AVX2-only CPU): the headroom a 1,000 cells/s Poisson stream with a 10 ms
deadline needs once the service and the instrument share the two cores (width
0.25 decides 2,300 cells/s at batch 1 in fp32 with AVX2 kernels, 0.15 3,600).
After 5 epochs on simulated cells, width 0.15 is as accurate as 0.25 and 0.12
about 3 points less.
``--epochs``, ``--width`` and ``--cells`` trade time for accuracy (purity and
yield of the mitotic gate at its default threshold, 0.9). On the Jurkat prior
(``--prior jurkat``, 2.2% mitotic) the streamer needs that class mix as
``[policy] sample_prior`` in its config to keep the gate pure.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench.defaults import DEFAULT_RATE, DEFAULT_SECONDS
from bench.scoring import LATE_TOLERANCE, deadline_verdict

TRAIN_CELLS = 3000
EPOCHS = 5
WIDTH = 0.15  # on a CPU with native bf16
WIDTH_FP32 = 0.12  # without it, the engine runs fp32: about 1.5x the time per cell
INTERPHASE_MERGE = "G1,S_phase,G2=Interphase"
CEILING_SECONDS = 3.0


@dataclass(frozen=True)
class DemoSettings:
    """The demo's knobs (`flowsort demo`'s options)."""

    out: Path = Path("demo-output")
    retrain: bool = False
    epochs: int = EPOCHS
    width: float | None = None  # None: chosen for this CPU (demo_width)
    cells: int = TRAIN_CELLS
    rate: float = DEFAULT_RATE
    seconds: float = DEFAULT_SECONDS
    prior: str = "uniform"
    engine: str | None = None  # None: openvino where it runs, else torch
    dashboard: bool = True


def step(title: str, command: str, work: Callable[[], object]) -> float:
    """Run one step, showing the `flowsort` command that does the same."""
    print(f"\n==> {title}\n    flowsort {command}", flush=True)
    started = time.perf_counter()
    work()
    took = time.perf_counter() - started
    print(f"    ({took:.1f} s)")
    return took


def demo_width() -> float:
    """The demo model's width for this CPU: narrower where the engine cannot run bf16 natively."""
    from engines.cpu import cpu_flags, native_bf16

    flags = set(cpu_flags())
    return WIDTH if native_bf16(bool(flags & {"avx512_bf16", "amx_bf16"})) else WIDTH_FP32


def run_demo(settings: DemoSettings) -> None:
    """Simulate training cells, draw their contact sheet, train (unless a model is there) and run it live."""
    started = time.perf_counter()
    out = settings.out
    out.mkdir(parents=True, exist_ok=True)
    train_set, bundle = out / "train-cells", out / "model"
    timings: dict[str, float] = {}
    if not (train_set / "dataset.json").is_file():
        timings["simulate training cells"] = step(
            "Simulating a mitosis-enriched training acquisition",
            f"import synthetic --cells {settings.cells} --prior uniform --seed 1 -o {train_set}",
            lambda: simulate_training_cells(train_set, settings.cells))
    gallery = out / "synthetic-gallery.png"
    if not gallery.is_file():
        timings["contact sheet"] = step(
            "Drawing the contact sheet of the simulated cells",
            f"gallery {train_set} -o {gallery} --title 'simulated IFC cells'",
            lambda: draw_contact_sheet(train_set, gallery))
    if settings.retrain or not (bundle / "bundle.json").is_file():
        width = settings.width or demo_width()
        timings["training"] = step(
            "Training a small DeepFlow on the 5-class task (interphase merged, as in the paper)",
            f"train {train_set} -o {bundle} --merge {INTERPHASE_MERGE} --width {width:g} --epochs {settings.epochs}",
            lambda: train_small_model(train_set, bundle, width, settings.epochs))
    else:
        print(f"\n==> Reusing the model in {bundle} (--retrain trains a new one)")
    timings["live run"] = live(settings, bundle, out)
    total = time.perf_counter() - started
    print(f"\nDone in {total:.0f} s ({', '.join(f'{k} {v:.0f} s' for k, v in timings.items())}).")


def measure_engine(bundle: Path, engine: str, rate: float) -> dict[str, object]:
    """The engine alone first: what this machine can decide per second with this model, said before the live run."""
    from bench.e2e import engine_ceiling
    from engines.cpu import cpu_flags, cpu_model, isa_limit, usable_cores

    capped = f"; kernels capped at {isa_limit()} by ONEDNN_MAX_CPU_ISA" if isa_limit() else ""
    print(f"\n==> Measuring the engine alone ({engine}, this model) on {cpu_model()}, {usable_cores()} cores "
          f"({', '.join(cpu_flags()) or 'flags unknown'}{capped})", flush=True)
    ceiling = engine_ceiling(bundle, engine, "auto", 64, CEILING_SECONDS)
    best = ceiling["throughput_cells_per_s"]
    print(f"    {ceiling['engine']} {ceiling['precision']}, {ceiling['threading']}: at most {best:,.0f} cells/s "
          f"(batch {ceiling['batch']}); the live run offers {rate:,.0f} cells/s, {100 * rate / best:.0f}% of that")
    return ceiling


def say_if_unsustainable(speed: dict[str, float], rate: float) -> None:
    """Before the live run: the streamer's own estimate (its pong's ``engine_speed``, the same one `flowsort serve`
    logs and warns with), and plain advice when the offered rate is above it."""
    sustainable = speed.get("sustainable_cells_per_s")
    if not sustainable:
        return
    print(f"    The streamer timed its engine at start: {speed['batch1_cells_per_s']:,.0f} cells/s at batch 1, "
          f"{speed['best_cells_per_s']:,.0f} at batch {speed['best_batch']:.0f}, one call at a time; it estimates about "
          f"{sustainable:,.0f} cells/s sustainable end to end here.")
    if rate > sustainable:
        print(f"    So this machine is unlikely to sustain {rate:,.0f} cells/s with this model inside a 10 ms deadline: "
              f"random arrivals need headroom, and the service and the instrument share the cores with the engine. "
              f"The streamer will refuse the excess at the door (answered at once, counted as overload_refused, never "
              f"sorted late). For a run inside the deadline, offer at most `make demo DEMO_ARGS=\"--rate "
              f"{max(100, int(sustainable / 100) * 100)}\"`, and less still for a 10 ms deadline: the estimate holds for 20 ms deadlines, and a 10 ms "
              f"one on a CPU slow per core may need half of it (docs/benchmarks.md, The demo). A narrower model helps "
              f"little: at a few cells per batch the engine's time goes to its layers' fixed costs, not to "
              f"arithmetic.", flush=True)


def print_verdict(summary: dict[str, object], ceiling: dict[str, object], deadline_ms: float) -> None:
    """One plain line: was the deadline kept (:func:`bench.scoring.deadline_verdict`'s rule), and if not, why."""
    kept, why = deadline_verdict(summary, deadline_ms)
    sent = max(summary["sent"], 1)
    refused = sum(v for k, v in summary["errors"].items() if k.startswith("overload"))
    p99 = summary["latency_ms"]["p99"]
    print(f"\nResult: {'deadline kept' if kept else 'deadline NOT kept'}: {100 * summary['in_time'] / sent:.2f}% of "
          f"the cells decided in time (at least {100 * (1 - LATE_TOLERANCE):g}%; {100 * summary['late'] / sent:.2f}% "
          f"late, {refused:,} refused at the door), p99 {p99 or 0:.2f} ms (at most {deadline_ms:g} ms).")
    if not kept:
        print(f"  Missed: {why}.")
    if not kept or refused:
        cores = summary.get("streamer_cpu_core_fraction") or 0.0
        print(f"  Why: the engine alone decides up to {ceiling['throughput_cells_per_s']:,.0f} cells/s here, but in the "
              f"live run it shares the cores with the service's own threads and the simulated instrument (the "
              f"streamer took {cores:.2f} cores), which stretches every batch; any other work on the machine "
              "stretches them further. docs/benchmarks.md has the breakdown.")


def simulate_training_cells(path: Path, cells: int) -> None:
    from trainer.dataset import write_dataset
    from trainer.synthetic import generate, to_dataset

    write_dataset(path, to_dataset(generate(cells, seed=1, prior="uniform")))
    print(f"wrote {cells:,} synthetic cells to {path}")


def draw_contact_sheet(dataset_path: Path, path: Path) -> None:
    from trainer.dataset import read_dataset
    from trainer.gallery import write_contact_sheet

    print(f"wrote {write_contact_sheet(read_dataset(dataset_path), path, title='simulated IFC cells')}")


def train_small_model(dataset_path: Path, bundle: Path, width: float, epochs: int) -> None:
    from trainer.train import TrainConfig
    from trainer.training_run import train_bundle

    train_bundle(dataset_path, bundle, TrainConfig(epochs=epochs, width=width), merges=[INTERPHASE_MERGE])


def live(settings: DemoSettings, bundle: Path, out: Path) -> float:
    import engines
    from bench.cell_sources import synthetic_cells
    from bench.link import LinkOptions, open_link
    from bench.simulator import instrument_plan, live_run, print_summary, streamer_status, write_outputs
    from streamer import protocol as p

    began = time.perf_counter()
    engine = settings.engine or ("openvino" if engines.available()["openvino"] is None else "torch")
    ceiling = measure_engine(bundle, engine, settings.rate)
    print(f"\n==> Starting the streamer (flowsort serve {bundle}, {engine} engine, a mitotic sort gate)", flush=True)
    with open_link(LinkOptions(serve=bundle, engine=engine), out / "streamer") as link:
        print(f"    ready in {time.perf_counter() - began:.1f} s: ingest {link.ingest}, decisions {link.decisions}")
        speed = streamer_status(link).get(p.ENGINE_SPEED) or {}
        say_if_unsustainable(speed, settings.rate)
        cells = synthetic_cells(4096, link.model.input_size, seed=3, prior=settings.prior)
        plan = instrument_plan(cells, settings.rate, settings.seconds, transit_ms=10.0, seed=3, acquisition="demo")
        print(f"\n==> The simulated instrument: {settings.rate:,.0f} cells/s (Poisson) for {settings.seconds:.0f} s, "
              f"{settings.prior} sample, 10 ms to the sort point\n", flush=True)
        _, summary = live_run(link, plan, title=f"flowsort demo: {settings.rate:,.0f} cells/s", target_rate=settings.rate,
                              dashboard=settings.dashboard)
    print_summary(summary, 10.0)
    print_verdict(summary, ceiling, 10.0)
    settings = {"bundle": str(bundle), "engine": summary.get("engine"), "rate": settings.rate, "seconds": settings.seconds,
                "engine_ceiling": ceiling, "streamer_engine_speed": speed,
                "arrivals": "poisson", "transit_ms": 10.0, "sample": cells.description,
                "gates": [g.__dict__ for g in link.gates]}
    json_path, html_path = write_outputs(out, "report", "flowsort demo: a simulated instrument through the streamer",
                                         summary, settings, 10.0)
    print(f"\nReport: {html_path}\n        {json_path}\nContact sheet: {out / 'synthetic-gallery.png'}")
    print(f"Next: `flowsort evaluate {bundle} DATASET` for the model's full evaluation; "
          f"`flowsort bench e2e {bundle}` for the load sweep.")
    return time.perf_counter() - began
