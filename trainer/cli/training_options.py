"""Options shared by `flowsort train` and `flowsort distill`: the recipe, the split and the dead-cell threshold."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from trainer.holdout import HeldOutFold
    from trainer.train import TrainConfig


def add_training_options(parser: argparse.ArgumentParser, width: float) -> None:
    parser.add_argument("-o", "--output", type=Path, required=True, help="bundle directory to write")
    parser.add_argument("--merge", action="append", default=[], metavar="A,B=NEW",
                        help="merge classes before training, e.g. G1,S_phase,G2=Interphase (repeatable)")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.05, help="peak learning rate (default 0.05)")
    parser.add_argument("--width", type=float, default=width,
                        help=f"width multiplier; 1.0 is the paper's DeepFlow (default {width})")
    parser.add_argument("--balance", choices=("none", "sqrt", "full"), default="sqrt",
                        help="class-balanced sampling strength (default sqrt)")
    parser.add_argument("--monitor", choices=("balanced_accuracy", "accuracy", "loss"), default="balanced_accuracy",
                        help="validation metric for early stopping and the best epoch")
    parser.add_argument("--patience", type=int, default=10, help="epochs without improvement before stopping")
    parser.add_argument("--val-fraction", type=float, default=0.2, help="stratified validation share (default 0.2)")
    parser.add_argument("--hold-out", metavar="K/N",
                        help="leave fold K of the N-fold split out of training (recorded in the bundle), so that "
                             "`flowsort bench frontier` scores several models on the same unseen cells")
    parser.add_argument("--rotation", choices=("any", "right-angle"), default="any",
                        help="any: every angle, resampled (softens the training cells); right-angle: quarter turns, "
                             "mirrors and whole-pixel shifts, as sharp as the cells served (default any)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    parser.add_argument("--dead-quantile", type=float, default=0.99,
                        help="without dead labels: flag cells beyond this quantile of the live validation cells' dead scores")


def training_config(args: argparse.Namespace) -> TrainConfig:
    from trainer.augment import Augmentation
    from trainer.train import TrainConfig

    return TrainConfig(
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, width=args.width, balance=args.balance,
        monitor=args.monitor, patience=args.patience, seed=args.seed, precision=args.precision,
        augmentation=Augmentation(rotation=args.rotation),
    )


def held_out_fold(args: argparse.Namespace) -> HeldOutFold | None:
    from trainer.holdout import HeldOutFold

    return HeldOutFold.parse(args.hold_out) if args.hold_out else None
