"""`flowsort record FILE`: capture a live stream of cells to an acquisition file (optionally passing it on)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "record",
        help="capture a live stream of ingest messages to an acquisition file (for flowsort replay)",
        description="Listen where an instrument sends (a ZeroMQ PULL socket that binds, as the streamer's does) "
        "and append every message, exactly as received and timed at receipt, to FILE in the streamer's "
        "acquisition format. --forward passes every message on to a streamer, so the recorder can sit between an "
        "instrument and flowsort. Ground truth carried in x_truth header keys (flowsort simulate "
        "--truth-in-messages) is kept as truth records. Stops on Ctrl-C/SIGTERM, or at --seconds, --messages, "
        "--idle or (with --until-end) the first end message.",
    )
    parser.add_argument("file", type=Path, metavar="FILE", help="acquisition file to write (appended if it exists)")
    parser.add_argument("--listen", default="tcp://127.0.0.1:5555", metavar="ENDPOINT",
                        help="where to receive (bind)")
    parser.add_argument("--forward", default=None, metavar="ENDPOINT",
                        help="also send every message on to this streamer ingest endpoint (connect)")
    parser.add_argument("--seconds", type=float, default=None, help="stop after this long")
    parser.add_argument("--messages", type=int, default=None, help="stop after this many messages")
    parser.add_argument("--idle", type=float, default=None, metavar="S",
                        help="stop when nothing arrives for S seconds after the first message")
    parser.add_argument("--until-end", action="store_true", help="stop after the first end message")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from bench.record import record

    record(args.file, args.listen, args.forward, args.seconds, args.messages, args.until_end, args.idle)
    return 0
