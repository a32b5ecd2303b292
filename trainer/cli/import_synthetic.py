"""`flowsort import synthetic`: cells from the synthetic imaging flow cytometer."""

from __future__ import annotations

import argparse

from flowsort.errors import UserError
from trainer.cli.import_ideas import add_output_arguments, checked_arguments, finish, positive_int

# Kept in step with trainer.synthetic, which is not imported here so `flowsort --help` stays fast.
DEFAULT_SIZE, MIN_SIZE = 40, 32
DEAD_FRACTION, DEBRIS_FRACTION = 0.05, 0.03
PRIORS = ("jurkat", "uniform")
PROGRESS_FROM = 20_000  # cells; smaller imports finish before a bar would be read


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "synthetic",
        help="generate cells with the synthetic imaging flow cytometer (known ground truth)",
        description=(
            "Generate brightfield + darkfield cells of the seven cell-cycle stages, dead cells and debris "
            "with the synthetic imaging flow cytometer. Labels are the stages; dead cells and debris are "
            "unlabeled, with ground truth kept in the dataset. The same seed gives identical cells."
        ),
    )
    parser.add_argument("--cells", type=positive_int, required=True, help="number of cells to generate")
    add_output_arguments(parser)
    parser.add_argument("--seed", type=_count_or_zero, default=0, help="random seed (default 0)")
    parser.add_argument(
        "--size", type=_size, default=DEFAULT_SIZE, help=f"image size in pixels, at least {MIN_SIZE} (default {DEFAULT_SIZE})"
    )
    parser.add_argument(
        "--prior",
        choices=PRIORS,
        default="jurkat",
        help="stage frequencies: jurkat (97.8%% interphase, the default) or uniform",
    )
    parser.add_argument(
        "--dead-fraction", type=_fraction, default=DEAD_FRACTION, help=f"share of dead cells (default {DEAD_FRACTION})"
    )
    parser.add_argument(
        "--debris-fraction", type=_fraction, default=DEBRIS_FRACTION, help=f"share of debris (default {DEBRIS_FRACTION})"
    )
    # What the synthetic instrument records; lets the importers' shared output checks run unchanged.
    parser.set_defaults(run=run, channels=(3, 6), channel_names=("brightfield", "darkfield"))


def _count_or_zero(text: str) -> int:
    if not (text.isascii() and text.isdigit()):
        raise argparse.ArgumentTypeError(f"expected a whole number from 0 up, got {text!r}")
    return int(text)


def _size(text: str) -> int:
    size = positive_int(text)
    if size < MIN_SIZE:
        raise argparse.ArgumentTypeError(f"image size must be at least {MIN_SIZE} pixels, got {size}")
    return size


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"expected a fraction from 0 to 1, got {text!r}")
    return value


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from trainer.dataset import write_dataset
    from trainer.synthetic import generate, to_dataset

    if args.dead_fraction + args.debris_fraction > 1:
        raise UserError(
            f"--dead-fraction {args.dead_fraction} and --debris-fraction {args.debris_fraction} add up to more than 1"
        )
    checked_arguments(args)
    with tqdm(total=args.cells, unit="cell", disable=args.cells < PROGRESS_FROM or None) as bar:
        cells = generate(
            args.cells,
            seed=args.seed,
            size=args.size,
            prior=args.prior,
            dead_fraction=args.dead_fraction,
            debris_fraction=args.debris_fraction,
            progress=bar.update,
        )
    dataset = to_dataset(cells)
    if args.out is not None:
        write_dataset(args.out, dataset)
        counts = ", ".join(f"{name} {count:,}" for name, count in dataset.class_counts().items())
        print(f"wrote {len(dataset):,} synthetic cells ({args.size}x{args.size}, seed {args.seed}) to {args.out}")
        print(f"  stages: {counts}")
        print(f"  dead: {int(cells.dead.sum()):,}  debris: {int(cells.debris.sum()):,}")
    return finish(dataset, None, args.to_acquisition)
