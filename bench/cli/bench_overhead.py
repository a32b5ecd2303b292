"""`flowsort bench overhead BUNDLE`: parses the options of :func:`bench.overhead.measure_overhead` and runs it."""

from __future__ import annotations

import argparse
from pathlib import Path

from bench.overhead import DEFAULT_MESSAGES, DEFAULT_SIZES, measure_overhead
from flowsort.errors import UserError


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "overhead",
        help="the service path's cost per message, with an engine that does no work (one core for the service)",
        description="Start the service on one core with an engine that does no work and send pre-built messages "
        "from another core as fast as it takes them. Per message size: messages and cells decided per second, and "
        "the service's time per message in each stage. Writes overhead.json and overhead.png to --out.",
    )
    parser.add_argument("bundle", type=Path, help="model bundle (for its input shape, classes and policy)")
    parser.add_argument("--cells-per-message", default=DEFAULT_SIZES, metavar="N,N", help="message sizes to measure")
    parser.add_argument("--messages", type=int, default=DEFAULT_MESSAGES, help="messages per size (at most)")
    parser.add_argument("--cells", type=int, default=DEFAULT_MESSAGES, help="cells per size (at most)")
    parser.add_argument("--core", type=int, default=0, help="the core the service runs on")
    parser.add_argument("-o", "--out", type=Path, default=Path("runs/bench/overhead"), help="output folder")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    try:
        sizes = [int(v) for v in args.cells_per_message.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"--cells-per-message: expected sizes separated by commas, got {args.cells_per_message!r}")
    measure_overhead(args.bundle, sizes, args.messages, args.cells, args.core, args.out)
    return 0
