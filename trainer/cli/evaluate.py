"""`flowsort evaluate BUNDLE DATASET -o DIR`: how well a model does on a labeled dataset, as JSON and HTML."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="evaluate a model bundle on a labeled dataset (report.json + report.html)",
        description=(
            "Run a bundle's model on a labeled dataset and report accuracy, balanced accuracy, per-class "
            "precision/recall/F1 and the confusion matrix (also under --merge), calibration before and after "
            "temperature scaling, k-NN accuracy of the embedding, what the dead-cell detector flags, a t-SNE map "
            "and galleries of example, misclassified and flagged cells. Dataset labels are matched to the "
            "model's classes by name."
        ),
    )
    parser.add_argument("bundle", type=Path, metavar="BUNDLE", help="model bundle directory from `flowsort train`")
    parser.add_argument("dataset", type=Path, metavar="DATASET", help="labeled dataset folder from `flowsort import`")
    parser.add_argument("-o", "--out", type=Path, required=True, metavar="DIR",
                        help="folder for report.json, report.html and the figures")
    parser.add_argument("--merge", action="append", default=[], metavar="A,B=NEW",
                        help="also report metrics with these model classes merged (probabilities summed), "
                             "e.g. G1,S_phase,G2=Interphase (repeatable)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from trainer.evaluation import evaluate, format_summary

    report = evaluate(args.bundle, args.dataset, args.merge, args.out)
    print(format_summary(report, args.out))
    return 0
