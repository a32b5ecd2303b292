"""`flowsort demo`: parses the options of :func:`bench.demo.run_demo` and runs it."""

from __future__ import annotations

import argparse
from pathlib import Path

from bench.defaults import DEFAULT_RATE, DEFAULT_SECONDS
from bench.demo import EPOCHS, TRAIN_CELLS, WIDTH, WIDTH_FP32, DemoSettings, run_demo


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
    parser.add_argument("--width", type=float, default=None,
                        help=f"DeepFlow width multiplier (default: {WIDTH:g} on a CPU with native bf16, else "
                             f"{WIDTH_FP32:g})")
    parser.add_argument("--cells", type=int, default=TRAIN_CELLS, help=f"training cells (default {TRAIN_CELLS})")
    parser.add_argument("--rate", type=float, default=DEFAULT_RATE, help="simulated instrument, cells/s")
    parser.add_argument("--seconds", type=float, default=DEFAULT_SECONDS, help="simulated acquisition length")
    parser.add_argument("--prior", choices=("uniform", "jurkat"), default="uniform",
                        help="the simulated sample: uniform (mitosis-enriched, default) or jurkat (97.8%% interphase, "
                        "where a small model's mitotic gate is far less pure)")
    parser.add_argument("--engine", choices=("openvino", "torch"), default=None,
                        help="streamer engine (default: openvino where it runs, else torch)")
    parser.add_argument("--no-dashboard", action="store_true", help="periodic lines instead of the live dashboard")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    run_demo(DemoSettings(out=args.out, retrain=args.retrain, epochs=args.epochs, width=args.width, cells=args.cells,
                          rate=args.rate, seconds=args.seconds, prior=args.prior, engine=args.engine,
                          dashboard=not args.no_dashboard))
    return 0
