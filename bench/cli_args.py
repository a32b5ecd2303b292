"""Arguments the bench's commands share, and their defaults: kept free of heavy imports (``flowsort --help``)."""

from __future__ import annotations

import argparse
from pathlib import Path

DEFAULT_GATE_THRESHOLD = 0.9  # GateConfig's default min_probability
ENGINES = ("auto", "openvino", "torch", "tensorrt", "cuda")
# The simulated instrument's defaults (bench.simulator uses them too).
DEFAULT_RATE = 1000.0
DEFAULT_SECONDS = 20.0
DEFAULT_TRANSIT_MS = 10.0
DEFAULT_POOL = 4096


def add_link_arguments(parser: argparse.ArgumentParser, *, default_serve: bool = False) -> None:
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
