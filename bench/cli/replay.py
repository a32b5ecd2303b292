"""`flowsort replay FILE`: send an acquisition file to a streamer and score what comes back."""

from __future__ import annotations

import argparse
from pathlib import Path

from bench.cli.link_arguments import add_link_arguments, link_options


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "replay",
        help="send an acquisition file (flowsort record, serve --record, import --to-acquisition) to a streamer",
        description="Send the messages of an acquisition file to a streamer: with their recorded timing (default; "
        "--speed scales it), at a fixed --rate in messages/s (--poisson for Poisson gaps), or as fast as possible "
        "(--max); --loop repeats it. Cells get fresh capture times and deadlines (shifted with their send time, or "
        "--transit-ms after capture) and, after the first loop, fresh event ids; --verbatim sends every byte as "
        "recorded. Decisions are collected and scored like `flowsort simulate`, with purity and yield where the file "
        "holds ground truth. A torn last record (a recording cut by a crash) is skipped.",
    )
    parser.add_argument("file", type=Path, metavar="FILE", help="acquisition file")
    add_link_arguments(parser)
    timing = parser.add_mutually_exclusive_group()
    timing.add_argument("--rate", type=float, default=None, help="messages/s, evenly spaced (or --poisson)")
    timing.add_argument("--max", action="store_true", help="as fast as possible")
    timing.add_argument("--speed", type=float, default=None, help="recorded timing, this many times faster")
    parser.add_argument("--poisson", action="store_true", help="with --rate: Poisson gaps instead of even ones")
    parser.add_argument("--loop", type=int, default=1, metavar="N", help="send the file N times (default 1)")
    parser.add_argument("--verbatim", action="store_true",
                        help="send every message byte for byte as recorded (old capture times and deadlines)")
    parser.add_argument("--transit-ms", type=float, default=None,
                        help="give every cell a deadline this long after capture (default: as recorded)")
    parser.add_argument("--no-decisions", action="store_true",
                        help="only send (to a recorder, or a streamer whose decisions go elsewhere)")
    parser.add_argument("--no-dashboard", action="store_true", help="no live dashboard")
    parser.add_argument("--seed", type=int, default=0, help="seed of --poisson")
    parser.add_argument("-o", "--out", type=Path, default=Path("runs/bench/replay"),
                        help="folder for replay.json and replay.html (default runs/bench/replay)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from bench.replay import ReplaySettings, replay

    replay(args.file, link_options(args), ReplaySettings(
        rate=args.rate, max=args.max, speed=args.speed, poisson=args.poisson, loops=args.loop, verbatim=args.verbatim,
        transit_ms=args.transit_ms, decisions=not args.no_decisions, dashboard=not args.no_dashboard, seed=args.seed,
        out=args.out))
    return 0
