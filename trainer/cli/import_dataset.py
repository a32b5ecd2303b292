"""`flowsort import dataset DIR --to-acquisition FILE`: a dataset cache (e.g. the imported Jurkat sample) as an acquisition file."""

from __future__ import annotations

import argparse
from pathlib import Path

from flowsort.errors import UserError


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "dataset",
        help="turn a dataset folder (from another import) into an acquisition file for `flowsort replay`",
        description="Write the cells of a flowsort dataset folder as an acquisition file: one cell per message in "
        "a shuffled order, Poisson timing at 1,000 cells/s, the labels (and the simulator's dead/debris truth) as "
        "ground-truth records, so replaying it scores purity and yield on these cells.",
    )
    parser.add_argument("dir", type=Path, metavar="DIR", help="dataset folder (dataset.json, images.npy, ...)")
    parser.add_argument("--to-acquisition", type=Path, required=True, metavar="FILE", help="acquisition file to write")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from trainer.dataset_acquisition import print_acquisition_summary, write_dataset_acquisition
    from trainer.dataset import read_dataset

    if args.to_acquisition.exists() and args.to_acquisition.stat().st_size:
        raise UserError(f"{args.to_acquisition} exists: choose a new file for --to-acquisition")
    dataset = read_dataset(args.dir)
    print_acquisition_summary(write_dataset_acquisition(dataset, args.to_acquisition))
    return 0
