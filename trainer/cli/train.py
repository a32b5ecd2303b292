"""`flowsort train DATASET -o BUNDLE`: train, calibrate and package a DeepFlow model."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from flowsort.errors import UserError
from trainer.class_mix import ClassMix, parse_class_mix


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
    import numpy as np
    import torch

    from trainer.crossval import cross_validate
    from trainer.dataset import read_dataset
    from trainer.merges import apply_merges
    from trainer.package import write_bundle
    from trainer.train import TrainConfig, fit, stratified_split

    if args.threads:
        torch.set_num_threads(args.threads)
    if not 0 < args.val_fraction < 1:
        raise UserError("--val-fraction must be between 0 and 1")
    if args.folds == 1 or args.folds < 0:
        raise UserError("--folds must be 0 (no cross-validation) or at least 2")
    if args.cv_merge and not args.folds:
        raise UserError("--cv-merge reports cross-validation: give --folds K as well")
    if args.class_mix and not args.folds:
        raise UserError("--class-mix reports cross-validation: give --folds K as well "
                        "(or score a bundle with `flowsort evaluate --class-mix`)")
    if not 0 < args.dead_quantile < 1:
        raise UserError("--dead-quantile must be between 0 and 1")
    dataset = apply_merges(read_dataset(args.dataset), args.merge)
    if not dataset.is_labeled:
        raise UserError(f"{args.dataset} has no labeled cells: training needs class folders")
    labeled = np.flatnonzero(dataset.labels >= 0)
    if args.class_mix:  # refuse a mix that names the wrong classes now, not after the folds have trained
        ClassMix.of(dataset.class_names, args.class_mix,
                    np.bincount(dataset.labels[labeled], minlength=len(dataset.class_names)) / len(labeled))
    config = TrainConfig(
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, width=args.width, balance=args.balance,
        monitor=args.monitor, patience=args.patience, seed=args.seed, precision=args.precision,
    )
    checkpoints = args.output / "checkpoints"
    counts = ", ".join(f"{name} {count}" for name, count in dataset.class_counts().items())
    print(f"training on {len(labeled)} labeled cells ({counts}), input {dataset.input_size}x{dataset.input_size}, "
          f"channels {list(dataset.channels)}")

    extra = {}
    if args.folds:
        cv = cross_validate(dataset, labeled, args.folds, config, checkpoints, args.resume, args.cv_merge, args.class_mix)
        extra["cross_validation"] = cv
        for title, block in (("", cv), (" (merged)", cv.get("merged")), (" at the class mix", cv.get("class_mix"))):
            if block:
                print(f"{args.folds}-fold cross-validation{title}: accuracy {block['accuracy']['mean']:.4f} ± "
                      f"{block['accuracy']['sd']:.4f}, balanced accuracy {block['balanced_accuracy']['mean']:.4f} ± "
                      f"{block['balanced_accuracy']['sd']:.4f}")

    train_part, val_part = stratified_split(dataset.labels[labeled], args.val_fraction, args.seed)
    train_index, val_index = labeled[train_part], labeled[val_part]
    fitted = fit(dataset, train_index, val_index, config, checkpoints / "final.pt", args.resume, description="final model")
    write_bundle(args.output, fitted, dataset, train_index, val_index, config, args.dead_quantile, extra)
    shutil.rmtree(checkpoints, ignore_errors=True)
    manifest = json.loads((args.output / "bundle.json").read_text())
    val = manifest["metrics"]["validation"]
    detector = manifest["dead_cell_detector"]
    print(f"bundle written to {args.output}: validation accuracy {val.get('accuracy', float('nan')):.4f}, "
          f"balanced accuracy {val.get('balanced_accuracy', float('nan')):.4f} (epoch {manifest['metrics']['best_epoch']}), "
          f"temperature {manifest['temperature']:.3f}, dead threshold {detector['threshold']:.2f} ({detector['threshold_from']})")
    return 0
