"""`flowsort train DATASET -o BUNDLE`: train, calibrate and package a DeepFlow model."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from flowsort.errors import UserError
from trainer.class_mix import ClassMix, parse_class_mix
from trainer.cli.training_options import (
    add_training_options, check_training_options, final_split, held_out_fold, trainable_cells, training_config,
)


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
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoints in the bundle directory")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from trainer.crossval import cross_validate
    from trainer.dataset import read_dataset
    from trainer.holdout import MANIFEST_KEY
    from trainer.merges import apply_merges
    from trainer.package import write_bundle
    from trainer.train import fit

    check_training_options(args)
    if args.folds == 1 or args.folds < 0:
        raise UserError("--folds must be 0 (no cross-validation) or at least 2")
    if args.cv_merge and not args.folds:
        raise UserError("--cv-merge reports cross-validation: give --folds K as well")
    if args.class_mix and not args.folds:
        raise UserError("--class-mix reports cross-validation: give --folds K as well "
                        "(or score a bundle with `flowsort evaluate --class-mix`)")
    held_out = held_out_fold(args)
    if held_out and args.folds:
        raise UserError("--hold-out and --folds both choose what to train on: give one of them")
    dataset = apply_merges(read_dataset(args.dataset), args.merge)
    labeled = trainable_cells(dataset, held_out, args.dataset)
    if args.class_mix:  # refuse a mix that names the wrong classes now, not after the folds have trained
        ClassMix.of(dataset.class_names, args.class_mix,
                    np.bincount(dataset.labels[labeled], minlength=len(dataset.class_names)) / len(labeled))
    config = training_config(args)
    checkpoints = args.output / "checkpoints"
    counts = ", ".join(f"{name} {count}" for name, count in zip(
        dataset.class_names, np.bincount(dataset.labels[labeled], minlength=len(dataset.class_names))))
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

    train_index, val_index = final_split(dataset, labeled, args)
    fitted = fit(dataset, train_index, val_index, config, checkpoints / "final.pt", args.resume, description="final model")
    write_bundle(args.output, fitted, dataset, train_index, val_index, config, args.dead_quantile, extra,
                 {MANIFEST_KEY: held_out.record(dataset)} if held_out else None)
    shutil.rmtree(checkpoints, ignore_errors=True)
    print_bundle_summary(args.output)
    return 0


def print_bundle_summary(output: Path) -> None:
    manifest = json.loads((output / "bundle.json").read_text())
    val = manifest["metrics"]["validation"]
    detector = manifest["dead_cell_detector"]
    print(f"bundle written to {output}: validation accuracy {val.get('accuracy', float('nan')):.4f}, "
          f"balanced accuracy {val.get('balanced_accuracy', float('nan')):.4f} (epoch {manifest['metrics']['best_epoch']}), "
          f"temperature {manifest['temperature']:.3f}, dead threshold {detector['threshold']:.2f} ({detector['threshold_from']})")
