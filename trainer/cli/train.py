"""`flowsort train DATASET -o BUNDLE`: train, calibrate and package a DeepFlow model."""

from __future__ import annotations

import argparse
from pathlib import Path

from trainer.class_mix import parse_class_mix
from trainer.cli.training_options import add_training_options, held_out_fold, training_config


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train DeepFlow on a dataset and write a model bundle",
        description="Train DeepFlow (SGD, warmup + cosine schedule, balanced sampling, early stopping), "
        "calibrate it, fit the dead-cell detector and write a bundle directory.",
    )
    parser.add_argument("dataset", type=Path, help="dataset directory from `flowsort import`")
    add_training_options(parser, width=1.0)
    parser.add_argument("--folds", type=int, default=0, help="K-fold cross-validation before the final model")
    parser.add_argument("--cv-merge", action="append", default=[], metavar="A,B=NEW",
                        help="also report cross-validation with these classes merged (repeatable)")
    parser.add_argument("--class-mix", type=parse_class_mix, metavar="CLASS=N,...",
                        help="also report cross-validation for a population with this class mix (counts or fractions), "
                             "e.g. the paper's Interphase=31550,Prophase=606,Metaphase=68,Anaphase=15,Telophase=27; "
                             "see `flowsort evaluate --class-mix`")
    parser.add_argument("--final-on-all-cells", action="store_true",
                        help="train the final model on every labeled cell for the median of the folds' best epochs, "
                             "calibrated on the folds' held-out predictions (needs --folds)")
    parser.add_argument("--keep-folds", action="store_true",
                        help="also write each fold's model as a bundle under BUNDLE/folds/ (teachers for `flowsort "
                             "distill`; needs --folds)")
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoints in the bundle directory")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from trainer.training_run import train_bundle

    train_bundle(args.dataset, args.output, training_config(args), merges=args.merge, val_fraction=args.val_fraction,
                 folds=args.folds, cv_merges=args.cv_merge, class_mix=args.class_mix, dead_quantile=args.dead_quantile,
                 threads=args.threads, resume=args.resume, held_out=held_out_fold(args),
                 final_on_all_cells=args.final_on_all_cells, keep_folds=args.keep_folds)
    return 0
