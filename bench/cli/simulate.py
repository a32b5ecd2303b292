"""`flowsort simulate`: a simulated imaging flow cytometer sending to a streamer, scored against ground truth."""

from __future__ import annotations

import argparse
from pathlib import Path

from bench.cli.link_arguments import add_link_arguments, link_options
from bench.defaults import DEFAULT_POOL, DEFAULT_RATE, DEFAULT_SECONDS, DEFAULT_TRANSIT_MS


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "simulate",
        help="a simulated imaging flow cytometer: stream synthetic cells to a streamer and score its sorting",
        description="Send synthetic cells (known ground truth) to a streamer over ZeroMQ as an instrument would: "
        "Poisson (or evenly spaced) arrivals at --rate, one cell per message or blocks, each with a deadline "
        "(capture + --transit-ms). Collects the decisions and reports achieved rate, latency percentiles (capture "
        "to decision received), late and dropped cells, and per sort gate its purity, yield and the dead cells it "
        "sorted. --serve BUNDLE starts the streamer for the run; otherwise it sends to a running one.",
    )
    add_link_arguments(parser)
    parser.add_argument("--rate", type=float, default=DEFAULT_RATE, help=f"cells/s (default {DEFAULT_RATE:g})")
    parser.add_argument("--seconds", type=float, default=DEFAULT_SECONDS,
                        help=f"acquisition length (default {DEFAULT_SECONDS:g})")
    parser.add_argument("--arrivals", choices=("poisson", "fixed"), default="poisson",
                        help="Poisson arrivals (default) or a fixed interval")
    parser.add_argument("--cells-per-message", type=int, default=1, metavar="N",
                        help="cells per message (default 1; more sends instrument blocks)")
    parser.add_argument("--transit-ms", type=float, default=DEFAULT_TRANSIT_MS,
                        help=f"transit time to the sort point: each cell's deadline after capture "
                        f"(default {DEFAULT_TRANSIT_MS:g}; 0 sends no deadline, the streamer's budget applies)")
    parser.add_argument("--prior", choices=("jurkat", "uniform"), default="jurkat",
                        help="stage frequencies of the simulated sample (default jurkat: 97.8%% interphase)")
    parser.add_argument("--cells", default="synthetic", metavar="SOURCE",
                        help="cells to send: synthetic (default), an acquisition file or a dataset folder")
    parser.add_argument("--pool", type=int, default=DEFAULT_POOL,
                        help=f"distinct synthetic cells rendered before the run and cycled (default {DEFAULT_POOL})")
    parser.add_argument("--size", type=int, default=None, help="image size (default: the bundle's, else 40)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--acquisition", default="simulated", help="acquisition name (default simulated)")
    parser.add_argument("--truth-in-messages", action="store_true",
                        help="carry each cell's ground truth in an x_truth header key (for `flowsort record`)")
    parser.add_argument("--no-dashboard", action="store_true", help="no live dashboard")
    parser.add_argument("-o", "--out", type=Path, default=Path("runs/bench/simulate"),
                        help="folder for simulate.json and simulate.html (default runs/bench/simulate)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from bench.simulator import SimulateSettings, simulate

    simulate(link_options(args), SimulateSettings(
        rate=args.rate, seconds=args.seconds, arrivals=args.arrivals, cells_per_message=args.cells_per_message,
        transit_ms=args.transit_ms, prior=args.prior, cells=args.cells, pool=args.pool, size=args.size, seed=args.seed,
        acquisition=args.acquisition, truth_in_messages=args.truth_in_messages, dashboard=not args.no_dashboard,
        out=args.out))
    return 0
