"""Subcommands contributed by the trainer: one module per task."""

from __future__ import annotations

import argparse

from trainer.cli import gallery, import_dataset, import_ideas, import_montage, import_synthetic, train
from trainer.cli import distill, embed, evaluate, quantize


def register(subparsers: argparse._SubParsersAction) -> None:
    importer = subparsers.add_parser(
        "import",
        help="import cells into a flowsort dataset or an acquisition file (IDEAS TIFF tree, montages, synthetic, dataset)",
        description="Write a compact, memory-mappable flowsort dataset from instrument exports or the simulator.",
    )
    sources = importer.add_subparsers(dest="source", metavar="SOURCE", required=True)
    import_ideas.add_parser(sources)
    import_montage.add_parser(sources)
    import_synthetic.add_parser(sources)
    import_dataset.add_parser(sources)
    gallery.add_parser(subparsers)
    train.add_parser(subparsers)
    distill.add_parser(subparsers)
    evaluate.add_parser(subparsers)
    embed.add_parser(subparsers)
    quantize.add_parser(subparsers)
