"""`flowsort train DATASET -o BUNDLE`: train, calibrate and package a DeepFlow model."""

from __future__ import annotations

import argparse
from pathlib import Path

from trainer.class_mix import parse_class_mix


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train DeepFlow on a dataset and write a model bundle",
        description="Train DeepFlow (SGD, warmup + cosine schedule, balanced sampling, early stopping), "
        "calibrate it, fit the dead-cell detector and write a bundle directory.",
    )
    parser.add_argument("dataset", type=Path, help="dataset directory from `flowsort import`")
    parser.add_argument("-o", "--output", type=Path, required=True, help="bundle directory to write")
    parser.add_argument("--merge", action="append", default=[], metavar="A,B=NEW",
                        help="merge classes before training, e.g. G1,S_phase,G2=Interphase (repeatable)")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.05, help="peak learning rate (default 0.05)")
    parser.add_argument("--width", type=float, default=1.0, help="width multiplier; 1.0 is the paper's DeepFlow")
    parser.add_argument("--balance", choices=("none", "sqrt", "full"), default="sqrt",
                        help="class-balanced sampling strength (default sqrt)")
    parser.add_argument("--monitor", choices=("balanced_accuracy", "accuracy", "loss"), default="balanced_accuracy",
                        help="validation metric for early stopping and the best epoch")
    parser.add_argument("--patience", type=int, default=10, help="epochs without improvement before stopping")
    parser.add_argument("--val-fraction", type=float, default=0.2, help="stratified validation share (default 0.2)")
    parser.add_argument("--folds", type=int, default=0, help="K-fold cross-validation before the final model")
    parser.add_argument("--cv-merge", action="append", default=[], metavar="A,B=NEW",
                        help="also report cross-validation with these classes merged (repeatable)")
    parser.add_argument("--class-mix", type=parse_class_mix, metavar="CLASS=N,...",
                        help="also report cross-validation for a population with this class mix (counts or fractions), "
                             "e.g. the paper's Interphase=31550,Prophase=606,Metaphase=68,Anaphase=15,Telophase=27; "
                             "see `flowsort evaluate --class-mix`")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    parser.add_argument("--dead-quantile", type=float, default=0.99,
                        help="without dead labels: flag cells beyond this quantile of the live validation cells' dead scores")
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoints in the bundle directory")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from trainer.train import TrainConfig
    from trainer.training_run import train_bundle

    config = TrainConfig(
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, width=args.width, balance=args.balance,
        monitor=args.monitor, patience=args.patience, seed=args.seed, precision=args.precision,
    )
    train_bundle(args.dataset, args.output, config, merges=args.merge, val_fraction=args.val_fraction,
                 folds=args.folds, cv_merges=args.cv_merge, class_mix=args.class_mix, dead_quantile=args.dead_quantile,
                 threads=args.threads, resume=args.resume)
    return 0
