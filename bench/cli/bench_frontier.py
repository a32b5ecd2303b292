"""`flowsort bench frontier TEACHER [TEACHER ...] DATASET --students S ...`: parses the options of
:func:`bench.frontier.measure_frontier` and runs it."""

from __future__ import annotations

import argparse
from pathlib import Path

from bench.cli.bench_engines import batch_sizes
from trainer.class_mix import parse_class_mix


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from bench import frontier

    parser = subparsers.add_parser(
        "frontier",
        help="cross-validated accuracy on held-out cells against engine and end-to-end speed, per model and precision",
        description="Every bundle holds out one fold of the same split (--hold-out K/N when trained). The teachers, one "
        "bundle per fold, form the teacher model; the students form one model per width and recipe (distilled or "
        "trained on the labels only, rotation, final model on all cells), each covering exactly the teacher's folds; "
        "the ensembles one model per width and recipe, the bundles holding out the same fold averaged. For each "
        "model and each precision "
        "the OpenVINO engine can run for all its bundles: 5-class accuracy with each bundle scoring its own fold's "
        "held-out cells, pooled over the folds (the cross-validation accuracy, at this sample's class mix and at "
        "--class-mix; per fold, and against the teacher's at fp32), engine cells/s at batch 1 and the best batch "
        "and the dead/debris AUROC on simulated cells (on the model's first bundle), and end-to-end max sustained "
        "cells/s through `flowsort serve` unless --skip-e2e. Writes frontier.json and frontier.png (accuracy "
        "against cells/s).",
    )
    defaults = frontier.FrontierSettings(teachers=(), dataset=Path())
    parser.add_argument("teachers", type=Path, nargs="+", metavar="TEACHER",
                        help="the teacher's bundles, one per held-out fold (one keeps a single-fold frontier)")
    parser.add_argument("dataset", type=Path, help="the labeled dataset every model was trained on")
    parser.add_argument("--students", type=Path, nargs="*", default=[], metavar="BUNDLE",
                        help="student bundles of any widths, one per fold of each student model")
    parser.add_argument("--ensembles", type=Path, nargs="*", default=[], metavar="BUNDLE",
                        help="bundles forming ensembles: those of one width and recipe holding out the same fold are "
                             "averaged, e.g. the folds/ of `flowsort train --hold-out K/N --folds M --keep-folds`")
    parser.add_argument("--class-mix", type=parse_class_mix, default=None, metavar="CLASS=N,...",
                        help=f"the second class mix to score at (default the paper's, {frontier.PAPER_MIX})")
    parser.add_argument("--batch-sizes", type=batch_sizes, default=defaults.batch_sizes, metavar="N,N",
                        help=f"engine batch sizes (default {','.join(map(str, defaults.batch_sizes))})")
    parser.add_argument("--seconds", type=float, default=defaults.seconds, help="engine timing per batch size")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for OpenVINO (default: all)")
    parser.add_argument("--skip-e2e", action="store_true", help="skip the end-to-end sweep through `flowsort serve`")
    parser.add_argument("--e2e-seconds", type=float, default=defaults.e2e_seconds, help="seconds per end-to-end level")
    parser.add_argument("-o", "--out", type=Path, default=defaults.out, help="output folder")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from bench.frontier import FrontierSettings, measure_frontier

    measure_frontier(FrontierSettings(
        teachers=tuple(args.teachers), dataset=args.dataset, students=tuple(args.students),
        ensembles=tuple(args.ensembles), class_mix=args.class_mix,
        batch_sizes=args.batch_sizes, seconds=args.seconds, threads=args.threads, skip_e2e=args.skip_e2e,
        e2e_seconds=args.e2e_seconds, out=args.out,
    ))
    return 0
