"""The streamer arguments `simulate` and `replay` share, and the :class:`~bench.link.LinkOptions` they make.

Kept free of heavy imports (``flowsort --help``): bench.link is imported when a command runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from bench.defaults import DEFAULT_GATE_THRESHOLD, ENGINES

if TYPE_CHECKING:
    from bench.link import LinkOptions


def add_link_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("streamer")
    group.add_argument("--serve", type=Path, default=None, metavar="BUNDLE",
                       help="start `flowsort serve BUNDLE` for this run (loopback, ephemeral ports) instead of "
                       "sending to a running streamer")
    group.add_argument("--bundle", type=Path, default=None,
                       help="the running streamer's bundle: classes and merges to score against, image size")
    group.add_argument("--config", type=Path, default=None,
                       help="streamer.toml: its gates are scored (default with --serve: a mitotic gate); "
                       "without --serve its endpoints are used")
    group.add_argument("--ingest", default=None, metavar="ENDPOINT",
                       help="the running streamer's ingest endpoint (default: the config's, or tcp://127.0.0.1:5555)")
    group.add_argument("--decisions", default=None, metavar="ENDPOINT",
                       help="its decision (PUSH) endpoint (default: the config's, or tcp://127.0.0.1:5556)")
    group.add_argument("--engine", choices=ENGINES, default=None, help="engine for --serve (default: the config's)")
    group.add_argument("--gate-threshold", type=float, default=None, metavar="P",
                       help=f"min_probability of the gates (default: the config's, else {DEFAULT_GATE_THRESHOLD})")
    group.add_argument("--record", type=Path, default=None, metavar="FILE",
                       help="with --serve: the streamer also records what it receives to this acquisition file")


def link_options(args: argparse.Namespace) -> LinkOptions:
    """The streamer that the arguments of :func:`add_link_arguments` name."""
    from bench.link import LinkOptions

    return LinkOptions(serve=args.serve, bundle=args.bundle, config=args.config, ingest=args.ingest,
                       decisions=args.decisions, engine=args.engine, gate_threshold=args.gate_threshold,
                       record=args.record)
