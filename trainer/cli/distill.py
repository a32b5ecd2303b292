"""`flowsort distill TEACHER [TEACHER ...] DATASET -o STUDENT --width W`: a fast student taught by trained bundles."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from flowsort.errors import UserError
from trainer.cli.training_options import add_training_options, held_out_fold, training_config

if TYPE_CHECKING:
    import numpy as np

    from trainer.dataset import CellDataset


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "distill",
        help="distill trained bundles into a smaller, faster DeepFlow student bundle",
        description="Train a width-scaled DeepFlow on the teachers' soft targets (averaged over the teachers and "
        "over the cell's 90-degree rotations and mirrors) mixed with the labels, optionally matching the first "
        "teacher's embedding, with extra unlabeled cells labeled by the teachers. The student is packaged like "
        "`flowsort train`'s bundles and records its teachers and the distillation settings.",
    )
    parser.add_argument("teachers", type=Path, nargs="+", metavar="TEACHER",
                        help="teacher bundle(s); several average their soft targets (an ensemble)")
    parser.add_argument("dataset", type=Path, help="labeled dataset folder the teachers were trained on")
    add_training_options(parser, width=0.5)
    parser.add_argument("--temperature", type=float, default=4.0, help="softmax temperature of the soft targets")
    parser.add_argument("--alpha", type=float, default=0.3,
                        help="weight of the hard labels; 1 - alpha goes to the soft targets (default 0.3)")
    parser.add_argument("--beta", type=float, default=0.0,
                        help="weight of matching the first teacher's embedding (cosine; default 0: off)")
    parser.add_argument("--teacher-views", type=int, choices=(1, 8), default=8,
                        help="average the teachers over the 8 rotations/mirrors by 90 degrees (default) or use 1 view")
    parser.add_argument("--unlabeled", type=Path, action="append", default=[], metavar="DATASET or ACQUISITION",
                        help="a dataset folder or an acquisition file (`flowsort record`) whose cells without "
                             "labels join the training cells, labeled by the teachers (repeatable)")
    parser.add_argument("--synthetic", type=int, default=0, metavar="N",
                        help="add N simulated live cells (Jurkat stage mix), labeled by the teachers")
    parser.set_defaults(run=run)


def acquisition_cells(path: Path, dataset: CellDataset) -> tuple[np.ndarray, str]:
    """The cells of an acquisition file that its truth does not label, fitted to the dataset's input size."""
    import numpy as np

    from engines.preprocessing import fit_to_size
    from streamer.recording_truth import recorded_cells

    cells = recorded_cells(path)
    if cells.channels != tuple(dataset.channels):
        raise UserError(f"--unlabeled {path}: its cells have channels {list(cells.channels)} but the dataset's "
                        f"are {list(dataset.channels)}")
    chosen = np.arange(len(cells)) if cells.truth is None else np.flatnonzero(cells.truth.label < 0)
    if not len(chosen):
        raise UserError(f"--unlabeled {path}: all {len(cells)} cells are labeled in the file's truth; labeled cells "
                        "come in through DATASET (import them into it), where held-out folds are respected")
    size = dataset.input_size
    height, width = cells.images.shape[-2:]
    fitted = "" if (height, width) == (size, size) else f", {height}x{width} fitted to {size}x{size}"
    return fit_to_size(cells.images[chosen], size), f"{path} ({len(chosen)} of {len(cells)} cells unlabeled{fitted})"


def unlabeled_cells(paths: list[Path], synthetic: int, seed: int, dataset: CellDataset) -> tuple[list, list[str]]:
    """The extra cells as uint16 arrays and a description of where each block came from.

    A folder is a dataset (its cells with label < 0), a file an acquisition (its cells without truth labels).
    """
    import numpy as np

    from trainer.dataset import read_dataset
    from trainer.synthetic import generate

    blocks, sources = [], []
    for path in paths:
        if path.is_file():
            cells, source = acquisition_cells(path, dataset)
            blocks.append(cells)
            sources.append(source)
            continue
        extra = read_dataset(path)
        chosen = np.flatnonzero(extra.labels < 0)
        if not len(chosen):
            raise UserError(f"--unlabeled {path}: the dataset has no unlabeled cells")
        blocks.append(np.asarray(extra.images[chosen]))
        sources.append(f"{path} ({len(chosen)} unlabeled cells)")
    if synthetic < 0:
        raise UserError("--synthetic must be >= 0")
    if synthetic:
        cells = generate(synthetic, seed=seed + 7919, size=dataset.input_size, dead_fraction=0.0, debris_fraction=0.0)
        blocks.append(cells.images)
        sources.append(f"simulator ({synthetic} live cells, seed {seed + 7919})")
    return blocks, sources


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from trainer.dataset import read_dataset
    from trainer.distill import DistillConfig, distill
    from trainer.merges import apply_merges
    from trainer.training_run import check_run_settings, final_split, held_out_manifest, print_bundle_summary, trainable_cells

    check_run_settings(args.val_fraction, args.dead_quantile, args.threads)
    distillation = DistillConfig(temperature=args.temperature, alpha=args.alpha, beta=args.beta,
                                 teacher_views=args.teacher_views)
    held_out = held_out_fold(args)
    dataset = apply_merges(read_dataset(args.dataset), args.merge)
    labeled = trainable_cells(dataset, held_out, args.dataset)
    train_index, val_index = final_split(dataset, labeled, args.val_fraction, args.seed)
    blocks, sources = unlabeled_cells(args.unlabeled, args.synthetic, args.seed, dataset)
    extra = np.concatenate(blocks) if blocks else None
    print(f"distilling {len(args.teachers)} teacher(s) into a width-{args.width} student on {len(train_index)} "
          f"labeled cells" + (f" and {len(extra)} unlabeled cells" if extra is not None else ""))
    for source in sources:
        print(f"  unlabeled cells from {source}")
    distill(args.teachers, dataset, train_index, val_index, args.output, training_config(args), distillation,
            extra, sources, args.dead_quantile, held_out_manifest(dataset, held_out))
    print_bundle_summary(args.output)
    return 0
