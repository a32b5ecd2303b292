"""`flowsort demo`: the live job end to end on simulated cells, on any machine, in under three minutes.

It runs what a user would: simulate a training acquisition and draw its
contact sheet, train a small DeepFlow (or reuse the one trained last time),
start `flowsort serve` on the CPU engine, and run the simulated instrument at
1,000 cells/s for 20 s with the live dashboard (rate, latency, class mix,
dead flags, gate counts, purity and yield of a mitotic gate). It ends with a
summary and an HTML report. Needs nothing but the package itself (no real
data, no network).

The training step is sized for a 2-core machine: width 0.25, 3,000 cells of
40x40, 5 epochs, about 130 CPU-seconds (roughly 75 s on two idle cores).
``--epochs``, ``--width`` and ``--cells`` trade time for accuracy (purity and
yield of the mitotic gate at its default threshold, 0.9). On the Jurkat prior
(``--prior jurkat``, 2.2% mitotic) the streamer needs that class mix as
``[policy] sample_prior`` in its config to keep the gate pure.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from flowsort.errors import UserError

TRAIN_CELLS = 3000
EPOCHS = 5
WIDTH = 0.25
INTERPHASE_MERGE = "G1,S_phase,G2=Interphase"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="train a small model on simulated cells, serve it and stream a simulated instrument through it "
        "(the `make demo` job)",
        description="Simulate a training acquisition, train a small DeepFlow (reused when present), start the "
        "streamer on the CPU engine and run the simulated instrument through it with a live dashboard; writes an "
        "HTML report.",
    )
    parser.add_argument("--out", type=Path, default=Path("demo-output"), help="working folder (default demo-output)")
    parser.add_argument("--retrain", action="store_true", help="train a new model even if one is there")
    parser.add_argument("--epochs", type=int, default=EPOCHS, help=f"training epochs (default {EPOCHS})")
    parser.add_argument("--width", type=float, default=WIDTH, help=f"DeepFlow width multiplier (default {WIDTH})")
    parser.add_argument("--cells", type=int, default=TRAIN_CELLS, help=f"training cells (default {TRAIN_CELLS})")
    parser.add_argument("--rate", type=float, default=1000.0, help="simulated instrument, cells/s (default 1000)")
    parser.add_argument("--seconds", type=float, default=20.0, help="simulated acquisition length (default 20)")
    parser.add_argument("--prior", choices=("uniform", "jurkat"), default="uniform",
                        help="the simulated sample: uniform (mitosis-enriched, default) or jurkat (97.8%% interphase, "
                        "where a small model's mitotic gate is far less pure)")
    parser.add_argument("--engine", choices=("openvino", "torch"), default=None,
                        help="streamer engine (default: openvino where it runs, else torch)")
    parser.add_argument("--no-dashboard", action="store_true", help="periodic lines instead of the live dashboard")
    parser.set_defaults(run=run)


def step(title: str, argv: list[str]) -> float:
    from flowsort.cli import main

    print(f"\n==> {title}\n    flowsort {' '.join(argv)}", flush=True)
    started = time.perf_counter()
    if main(argv) != 0:
        raise UserError(f"demo step failed: flowsort {' '.join(argv)}")
    took = time.perf_counter() - started
    print(f"    ({took:.1f} s)")
    return took


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    train_set, bundle = out / "train-cells", out / "model"
    timings: dict[str, float] = {}
    if not (train_set / "dataset.json").is_file():
        timings["simulate training cells"] = step(
            "Simulating a mitosis-enriched training acquisition",
            ["import", "synthetic", "--cells", str(args.cells), "--prior", "uniform", "--seed", "1", "-o", str(train_set)])
    gallery = out / "synthetic-gallery.png"
    if not gallery.is_file():
        timings["contact sheet"] = step("Drawing the contact sheet of the simulated cells",
                                        ["gallery", str(train_set), "-o", str(gallery), "--title", "simulated IFC cells"])
    if args.retrain or not (bundle / "bundle.json").is_file():
        timings["training"] = step(
            "Training a small DeepFlow on the 5-class task (interphase merged, as in the paper)",
            ["train", str(train_set), "-o", str(bundle), "--merge", INTERPHASE_MERGE,
             "--width", str(args.width), "--epochs", str(args.epochs)])
    else:
        print(f"\n==> Reusing the model in {bundle} (--retrain trains a new one)")
    timings["live run"] = live(args, bundle, out)
    total = time.perf_counter() - started
    print(f"\nDone in {total:.0f} s ({', '.join(f'{k} {v:.0f} s' for k, v in timings.items())}).")
    return 0


def live(args: argparse.Namespace, bundle: Path, out: Path) -> float:
    import engines
    from bench.cell_sources import synthetic_cells
    from bench.link import open_link
    from bench.simulator import instrument_plan, live_run, print_summary, write_outputs

    began = time.perf_counter()
    engine = args.engine or ("openvino" if engines.available()["openvino"] is None else "torch")
    print(f"\n==> Starting the streamer (flowsort serve {bundle}, {engine} engine, a mitotic sort gate)", flush=True)
    link_args = argparse.Namespace(serve=bundle, bundle=None, config=None, ingest=None, decisions=None, engine=engine,
                                   gate_threshold=None, record=None)
    with open_link(link_args, out / "streamer") as link:
        print(f"    ready in {time.perf_counter() - began:.1f} s: ingest {link.ingest}, decisions {link.decisions}")
        cells = synthetic_cells(4096, link.model.input_size, seed=3, prior=args.prior)
        plan = instrument_plan(cells, args.rate, args.seconds, transit_ms=10.0, seed=3, acquisition="demo")
        print(f"\n==> The simulated instrument: {args.rate:,.0f} cells/s (Poisson) for {args.seconds:.0f} s, "
              f"{args.prior} sample, 10 ms to the sort point\n", flush=True)
        _, summary = live_run(link, plan, title=f"flowsort demo: {args.rate:,.0f} cells/s", target_rate=args.rate,
                              dashboard=not args.no_dashboard)
    print_summary(summary, 10.0)
    settings = {"bundle": str(bundle), "engine": summary.get("engine"), "rate": args.rate, "seconds": args.seconds,
                "arrivals": "poisson", "transit_ms": 10.0, "sample": cells.description,
                "gates": [g.__dict__ for g in link.gates]}
    json_path, html_path = write_outputs(out, "report", "flowsort demo: a simulated instrument through the streamer",
                                         summary, settings, 10.0)
    print(f"\nReport: {html_path}\n        {json_path}\nContact sheet: {out / 'synthetic-gallery.png'}")
    print(f"Next: `flowsort evaluate {bundle} DATASET` for the model's full evaluation; "
          f"`flowsort bench e2e {bundle}` for the load sweep.")
    return time.perf_counter() - began
