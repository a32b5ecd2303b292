"""`flowsort bench e2e BUNDLE`: parses the options of :func:`bench.e2e.sweep_engines` and runs it."""

from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path

from bench.defaults import DEFAULT_POOL
from bench.e2e import (
    CEILING_SECONDS, DEFAULT_LEVELS, DEFAULT_SECONDS, GROWTH, MAX_BATCH, MAX_P99_MS, MAX_RATE, REFINE_STEPS,
    TARGET_RATE, TARGET_SECONDS, TARGET_TRANSIT_MS, SweepSettings, sweep_engines,
)
from bench.scoring import LATE_TOLERANCE


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "e2e",
        help="end to end: sweep offered load through a live streamer; latency, throughput, max sustained rate",
        description="Start `flowsort serve BUNDLE` per engine and sweep the offered load (Poisson arrivals) until it "
        "saturates. Per level: achieved throughput, latency p50/p95/p99/max from capture to decision received, "
        "drops and late decisions, sender/receiver/streamer CPU. Then the engine alone at the same max batch "
        "(the ceiling) and the ratio max sustained / ceiling. Writes e2e.json and e2e.html (plots) to --out.",
    )
    parser.add_argument("bundle", type=Path, help="model bundle from `flowsort train`")
    parser.add_argument("--engines", default=None, metavar="A,B",
                        help="engines to compare (default: every one available here)")
    parser.add_argument("--levels", default=",".join(map(str, DEFAULT_LEVELS)), metavar="R,R",
                        help=f"offered loads in cells/s, before growing (default {','.join(map(str, DEFAULT_LEVELS))})")
    parser.add_argument("--seconds", type=float, default=DEFAULT_SECONDS,
                        help=f"per level (default {DEFAULT_SECONDS:g})")
    parser.add_argument("--growth", type=float, default=GROWTH,
                        help=f"factor between levels after the list while sustained (default {GROWTH}; 0 = none)")
    parser.add_argument("--max-rate", type=float, default=MAX_RATE, help="never offer more than this (cells/s)")
    parser.add_argument("--refine", type=int, default=REFINE_STEPS,
                        help=f"bisection steps between the last sustained and the first failed level (default {REFINE_STEPS})")
    parser.add_argument("--late-tolerance", type=float, default=LATE_TOLERANCE,
                        help=f"share of cells a sustained level may leave undecided in time: late, refused at the door, "
                             f"failed or unanswered (default {LATE_TOLERANCE})")
    parser.add_argument("--max-p99-ms", type=float, default=MAX_P99_MS,
                        help=f"p99 latency a sustained level may have (default {MAX_P99_MS:g})")
    parser.add_argument("--transit-ms", type=float, default=MAX_P99_MS,
                        help=f"sweep: each cell's deadline after capture (default {MAX_P99_MS:g}, the p99 bound)")
    parser.add_argument("--target-rate", type=float, default=TARGET_RATE,
                        help=f"target run: cells/s an instrument needs (default {TARGET_RATE:g}; 0 skips it)")
    parser.add_argument("--target-seconds", type=float, default=TARGET_SECONDS,
                        help=f"target run length (default {TARGET_SECONDS:g})")
    parser.add_argument("--target-transit-ms", type=float, default=TARGET_TRANSIT_MS,
                        help=f"target run: deadline after capture (default {TARGET_TRANSIT_MS:g})")
    parser.add_argument("--max-batch", type=int, default=MAX_BATCH,
                        help="the streamer's largest batch, and the ceiling's")
    parser.add_argument("--cells", default="synthetic", metavar="SOURCE",
                        help="cells to send: synthetic (default), an acquisition file (e.g. the Jurkat sample "
                        "from `flowsort import ideas ... --to-acquisition`) or a dataset folder")
    parser.add_argument("--prior", choices=("jurkat", "uniform"), default="jurkat", help="synthetic stage mix")
    parser.add_argument("--pool", type=int, default=DEFAULT_POOL, help="distinct synthetic cells")
    parser.add_argument("--cells-per-message", type=int, default=1, metavar="N", help="cells per message (default 1)")
    parser.add_argument("--config", type=Path, default=None, help="streamer.toml to start from (endpoints are replaced)")
    parser.add_argument("--gate-threshold", type=float, default=None, metavar="P", help="gates' min_probability")
    parser.add_argument("--ceiling-seconds", type=float, default=CEILING_SECONDS, help="engine-only timing")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save-decisions", action="store_true",
                        help="also write every level's per-cell arrays (levels/<engine>-<rate>.npz)")
    parser.add_argument("-o", "--out", type=Path, default=Path("runs/bench/e2e"), help="output folder")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    sweep_engines(SweepSettings(**{field.name: getattr(args, field.name) for field in fields(SweepSettings)}))
    return 0
