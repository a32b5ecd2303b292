"""`flowsort bench gpu`: parses the options of :func:`bench.gpu_check.run_gpu_check` and runs it."""

from __future__ import annotations

import argparse
from pathlib import Path

from bench.gpu_check import PHASES, GpuCheckSettings, run_gpu_check


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "gpu",
        help="the GPU proof: build, parity, engine timing, the streamer end to end; JSON and plots",
        description="Train (or take) a full-width DeepFlow, build the GPU engines, check their parity with the "
        "CPU reference, time them over batch 1..4096, run `flowsort serve` end to end with blocks of 64 cells and "
        "single-cell messages at rising rates, and measure the service path with a no-op engine. Every phase is "
        "time-boxed; a failed one is recorded and the rest still run. --dry-run does all of it on the CPU at tiny "
        "sizes.",
    )
    parser.add_argument("-o", "--out", type=Path, default=None,
                        help="output folder (default $OUT, else runs/bench/gpu)")
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU: proves the script, not the GPU")
    parser.add_argument("--bundle", type=Path, default=None,
                        help="use this bundle instead of training one (a full-width one built elsewhere)")
    parser.add_argument("--phases", type=phase_list, default=PHASES, metavar="A,B",
                        help=f"phases to run (default all: {','.join(PHASES)})")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds for the whole run (default 420 on a GPU, 300 dry)")
    parser.add_argument("--phase", default=None, help=argparse.SUPPRESS)  # one phase, in a child process
    parser.set_defaults(run=run)


def phase_list(text: str) -> tuple[str, ...]:
    chosen = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = [name for name in chosen if name not in PHASES]
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(f"unknown phase {', '.join(unknown)}: choose from {', '.join(PHASES)}")
    return chosen


def run(args: argparse.Namespace) -> int:
    return run_gpu_check(GpuCheckSettings(out=args.out, dry_run=args.dry_run, bundle=args.bundle, phases=args.phases,
                                          budget=args.budget, phase=args.phase))
