"""`flowsort import montage`: CellProfiler IFC montages into a dataset."""

from __future__ import annotations

import argparse

from trainer.cli.import_ideas import add_common_arguments, checked_arguments, finish, positive_int


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "montage",
        help="import CellProfiler IFC montages (grids of square tiles, one TIFF per channel)",
        description=(
            "Import CellProfiler IFC montages: <label>/<montage>_Ch<k>.tif (or <montage>_Ch<k>.tif in DIR for "
            "unlabeled cells), each a row-major grid of --tile x --tile cells at the same position in every "
            "channel file. Blank padding tiles after the last cell are skipped."
        ),
    )
    add_common_arguments(parser)
    parser.add_argument("--tile", type=positive_int, required=True, metavar="PX", help="tile edge in pixels, e.g. 40")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from trainer.montage import import_montages

    checked_arguments(args)
    dataset = import_montages(
        args.dir, args.channels, args.tile, args.size, args.channel_names, strict=args.strict
    )
    return finish(dataset, args.out, args.to_acquisition)
