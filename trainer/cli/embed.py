"""`flowsort embed BUNDLE DATASET -o FILE`: parses the options of :func:`trainer.embedding_export.export_embeddings`."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "embed",
        help="export per-cell embeddings, class probabilities and dead scores (.npz, .csv, .parquet)",
        description=(
            "Run a bundle's model on every cell of a dataset and write, per cell, the object id, label, "
            "predicted class, calibrated probability per class, dead-cell score and flag and the embedding. "
            "The format follows FILE's suffix: .npz (arrays), .csv (one row per cell) or .parquet (needs pyarrow)."
        ),
    )
    parser.add_argument("bundle", type=Path, metavar="BUNDLE", help="model bundle directory from `flowsort train`")
    parser.add_argument("dataset", type=Path, metavar="DATASET", help="dataset folder from `flowsort import`")
    parser.add_argument("-o", "--out", type=Path, required=True, metavar="FILE", help="output file: .npz, .csv or .parquet")
    add_label_map_argument(parser)
    parser.set_defaults(run=run)


def add_label_map_argument(parser: argparse.ArgumentParser) -> None:
    """--map-labels, shared with `flowsort evaluate`."""
    parser.add_argument("--map-labels", action="append", default=[], metavar="A,B=CLASS",
                        help="label the dataset's classes A and B as the model's CLASS, for models that record no "
                             "merge of them, e.g. S=S_phase (repeatable)")


def run(args: argparse.Namespace) -> int:
    from trainer.embedding_export import export_embeddings

    export_embeddings(args.bundle, args.dataset, args.out, args.map_labels)
    return 0
