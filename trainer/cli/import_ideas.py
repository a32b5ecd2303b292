"""`flowsort import ideas`: an IDEAS per-object TIFF tree into a dataset.

Also holds the arguments and the ending that `flowsort import montage` shares,
so the two importers cannot drift apart in how channels, sizes and output work.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from flowsort.errors import UserError

if TYPE_CHECKING:
    from trainer.dataset import CellDataset

DEFAULT_SIZE = 40


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "ideas",
        help="import an IDEAS per-object TIFF export (<label>/<object_id>_Ch<k>.tif)",
        description=(
            "Import an IDEAS per-object TIFF export: one folder per class holding <object_id>_Ch<k>.tif "
            "files, or the TIFFs directly in DIR for unlabeled cells. Bad files are listed and skipped."
        ),
    )
    add_common_arguments(parser)
    parser.set_defaults(run=run)


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments every TIFF importer takes."""
    parser.add_argument("dir", type=Path, metavar="DIR", help="the export folder")
    parser.add_argument(
        "--channels",
        required=True,
        type=channel_list,
        metavar="K,K",
        help=(
            "instrument channel numbers to import, in model input order, e.g. 3,6 (brightfield Ch3 and "
            "darkfield Ch6 on the ImageStream sample); required because channel numbers differ between "
            "instruments and a wrong default could feed a fluorescence channel to a label-free model"
        ),
    )
    add_output_arguments(parser)
    parser.add_argument(
        "--size",
        type=positive_int,
        default=DEFAULT_SIZE,
        metavar="PX",
        help=(
            f"model input size in pixels (default {DEFAULT_SIZE}, the size of the ImageStream sample's cells); "
            "larger cells are center-cropped, smaller ones padded with their border median"
        ),
    )
    parser.add_argument(
        "--channel-names",
        type=name_list,
        metavar="NAME,NAME",
        help="names for the channels, same order as --channels, e.g. brightfield,darkfield (default Ch<k>)",
    )
    parser.add_argument("--strict", action="store_true", help="stop at the first bad input instead of skipping it")


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    """-o DATASET and/or --to-acquisition FILE: what an importer writes."""
    parser.add_argument("-o", "--out", type=Path, default=None, help="dataset folder to write")
    parser.add_argument(
        "--to-acquisition",
        type=Path,
        default=None,
        metavar="FILE",
        help="(also) write the cells as an acquisition file for `flowsort replay`, labels included as ground truth "
        "(one cell per message, Poisson timing at 1,000 cells/s)",
    )


def channel_list(text: str) -> tuple[int, ...]:
    """``"3,6"`` -> ``(3, 6)``."""
    parts = [part.strip() for part in text.split(",")]
    if not all(part.isascii() and part.isdigit() for part in parts):
        raise argparse.ArgumentTypeError(f"expected channel numbers separated by commas, like 3,6; got {text!r}")
    channels = tuple(int(part) for part in parts)
    if len(set(channels)) != len(channels):
        raise argparse.ArgumentTypeError(f"channel listed twice in {text!r}")
    return channels


def name_list(text: str) -> tuple[str, ...]:
    names = tuple(part.strip() for part in text.split(","))
    if not all(names) or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"expected distinct non-empty names separated by commas; got {text!r}")
    return names


def positive_int(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}")
    return int(text)


def checked_arguments(args: argparse.Namespace) -> None:
    """Refuse argument combinations argparse cannot check, before any file is read."""
    if args.channel_names is not None and len(args.channel_names) != len(args.channels):
        raise UserError(
            f"--channel-names gives {len(args.channel_names)} names for {len(args.channels)} channels "
            f"({','.join(map(str, args.channels))}): give one name per channel"
        )
    if args.out is None and args.to_acquisition is None:
        raise UserError("say where to write: -o DATASET, --to-acquisition FILE, or both")
    if args.to_acquisition is not None and args.to_acquisition.exists() and args.to_acquisition.stat().st_size:
        raise UserError(f"{args.to_acquisition} exists: choose a new file for --to-acquisition")
    out: Path | None = args.out
    if out is not None and out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "dataset.json").is_file())):
        raise UserError(f"{out} exists and is not a flowsort dataset: choose a new or empty folder for -o")


def finish(dataset: CellDataset, out: Path | None, to_acquisition: Path | None = None) -> int:
    """Write the dataset and/or the acquisition file, and print the import summary."""
    from trainer.dataset import write_dataset
    from trainer.import_report import format_summary

    if out is not None:
        write_dataset(out, dataset)
        print(format_summary(dataset, out))
    if to_acquisition is not None:
        from trainer.dataset_acquisition import print_acquisition_summary, write_dataset_acquisition

        print_acquisition_summary(write_dataset_acquisition(dataset, to_acquisition))
    return 0


def run(args: argparse.Namespace) -> int:
    from trainer.tiff_tree import import_ideas

    checked_arguments(args)
    dataset = import_ideas(args.dir, args.channels, args.size, args.channel_names, strict=args.strict)
    return finish(dataset, args.out, args.to_acquisition)
