"""`flowsort evaluate BUNDLE DATASET -o DIR`: how well a model does on a labeled dataset, as JSON and HTML."""

from __future__ import annotations

import argparse
from pathlib import Path

from trainer.class_mix import parse_class_mix
from trainer.cli.embed import add_label_map_argument


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="evaluate a model bundle on a labeled dataset (report.json + report.html)",
        description=(
            "Run a bundle's model on a labeled dataset and report accuracy, balanced accuracy, per-class "
            "precision/recall/F1 and the confusion matrix (also under --merge), calibration before and after "
            "temperature scaling, k-NN accuracy of the embedding, what the dead-cell detector flags, a t-SNE map "
            "and galleries of example, misclassified and flagged cells. Dataset labels are matched to the "
            "model's classes by name, after the merges the model was trained with (each maps whichever of its "
            "classes the dataset holds) and --map-labels."
        ),
    )
    parser.add_argument("bundle", type=Path, metavar="BUNDLE", help="model bundle directory from `flowsort train`")
    parser.add_argument("dataset", type=Path, metavar="DATASET", help="labeled dataset folder from `flowsort import`")
    parser.add_argument("-o", "--out", type=Path, required=True, metavar="DIR",
                        help="folder for report.json, report.html and the figures")
    parser.add_argument("--merge", action="append", default=[], metavar="A,B=NEW",
                        help="also report metrics with these model classes merged (probabilities summed), "
                             "e.g. G1,S_phase,G2=Interphase (repeatable)")
    add_label_map_argument(parser)
    parser.add_argument("--class-mix", type=parse_class_mix, metavar="CLASS=N,...",
                        help="also score the model for a population with this class mix (counts or fractions over "
                             "the model's classes): probabilities re-weighted by Bayes' rule as the streamer's "
                             "sample_prior does, each class's recall weighted by its share, e.g. the paper's "
                             "Interphase=31550,Prophase=606,Metaphase=68,Anaphase=15,Telophase=27")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from trainer.evaluation import REPORT_HTML, evaluate
    from trainer.report_text import format_summary

    report = evaluate(args.bundle, args.dataset, args.merge, args.out, args.class_mix, args.map_labels)
    print(format_summary(report, args.out / REPORT_HTML))
    return 0
