"""The `flowsort` command: each package contributes its own subcommands.

Every package exposes ``<package>.cli.register(subparsers)``. Registration only
builds argparse parsers; heavy imports (torch, openvino, matplotlib) happen
inside the command that needs them, so `flowsort --help` stays instant and the
runtime commands never pull in the training stack.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from flowsort import __version__
from flowsort.errors import UserError
from flowsort.help_format import show_defaults

COMMAND_PACKAGES = ("trainer", "streamer", "bench")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flowsort",
        description="Real-time DeepFlow classification for imaging flow cytometers.",
    )
    parser.add_argument("--version", action="version", version=f"flowsort {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for package in COMMAND_PACKAGES:
        try:
            module = importlib.import_module(f"{package}.cli")
        except ModuleNotFoundError as exc:
            if exc.name != f"{package}.cli":
                raise
            continue
        module.register(subparsers)
    show_defaults(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # Libraries (ONNX exporter, OpenVINO) log chatter at INFO; only flowsort's own packages speak at INFO.
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for package in ("flowsort", "engines", *COMMAND_PACKAGES):
        logging.getLogger(package).setLevel(logging.DEBUG if args.verbose else logging.INFO)
    try:
        return int(args.run(args) or 0)
    except UserError as exc:
        print(f"flowsort {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
