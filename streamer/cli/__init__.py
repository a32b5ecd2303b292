"""Subcommands contributed by the streamer: one module per task."""

from __future__ import annotations

import argparse

from streamer.cli import export_fcs, keys, serve


def register(subparsers: argparse._SubParsersAction) -> None:
    serve.add_parser(subparsers)
    keys.add_parser(subparsers)
    export_fcs.add_parser(subparsers)
