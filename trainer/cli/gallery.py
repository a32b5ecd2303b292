"""`flowsort gallery DATASET -o sheet.png`: a contact sheet of example cells per class."""

from __future__ import annotations

import argparse
from pathlib import Path

from flowsort.errors import UserError


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "gallery",
        help="draw a contact sheet of example cells per class (PNG)",
        description=(
            "Draw a contact sheet: one row per class (and unlabeled, dead, debris where present), "
            "each cell with all its channels side by side, contrast from robust percentiles per channel."
        ),
    )
    parser.add_argument("dataset", type=Path, metavar="DATASET", help="a flowsort dataset folder")
    parser.add_argument("-o", "--out", type=Path, required=True, help="PNG file to write")
    parser.add_argument("--per-class", type=_cell_count, default=8, help="cells shown per row (default 8)")
    parser.add_argument("--seed", type=int, default=0, help="picks the example cells reproducibly (default 0)")
    parser.add_argument("--title", help="heading for the sheet (default: the dataset folder's name)")
    parser.set_defaults(run=run)


def _cell_count(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= 100:
        raise argparse.ArgumentTypeError(f"expected a whole number of cells from 1 to 100, got {text!r}")
    return int(text)


def run(args: argparse.Namespace) -> int:
    from trainer.dataset import read_dataset
    from trainer.gallery import write_contact_sheet

    dataset = read_dataset(args.dataset)
    if len(dataset) == 0:
        raise UserError(f"dataset {args.dataset} holds no cells to show")
    if args.out.suffix.lower() != ".png":
        raise UserError(f"the contact sheet is a PNG: give -o a .png file name, not {args.out.name!r}")
    path = write_contact_sheet(
        dataset, args.out, per_class=args.per_class, seed=args.seed, title=args.title or args.dataset.resolve().name
    )
    print(f"wrote {path} ({len(dataset):,} cells, channels {', '.join(dataset.channel_names)})")
    return 0
