"""`flowsort bench engines BUNDLE`: parses the options of :func:`bench.engine_bench.time_engines` and runs it."""

from __future__ import annotations

import argparse
from pathlib import Path

from bench import engine_bench


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "engines",
        help="throughput and latency of each engine and precision across batch sizes",
        description=engine_bench.__doc__.split("\n\n")[1].replace("\n", " "),
    )
    parser.add_argument("bundle", type=Path, help="model bundle from `flowsort train`")
    parser.add_argument("--engines", type=names, default=None, metavar="A,B",
                        help="engines to time (default: every one available here)")
    parser.add_argument("--batch-sizes", type=batch_sizes, default=engine_bench.DEFAULT_BATCHES, metavar="N,N",
                        help=f"batch sizes (default {','.join(map(str, engine_bench.DEFAULT_BATCHES))})")
    parser.add_argument("--seconds", type=float, default=engine_bench.DEFAULT_SECONDS_PER_POINT,
                        help="timing per engine and batch size")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for OpenVINO and torch (default: all)")
    parser.add_argument("--no-baseline", action="store_true", help=f"skip the {engine_bench.BASELINE} baseline")
    parser.add_argument("-o", "--out", type=Path, default=Path("runs/bench/engines"), help="output folder")
    parser.set_defaults(run=run)


def names(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def batch_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(sorted({int(part) for part in text.split(",")}))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected batch sizes separated by commas, like 1,8,64; got {text!r}") from None
    if not sizes or sizes[0] < 1:
        raise argparse.ArgumentTypeError(f"batch sizes must be positive, got {text!r}")
    return sizes


def run(args: argparse.Namespace) -> int:
    engine_bench.time_engines(args.bundle, args.out, args.engines, args.batch_sizes, args.seconds, args.threads,
                              baseline=not args.no_baseline)
    return 0
