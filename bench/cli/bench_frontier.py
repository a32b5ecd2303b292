"""`flowsort bench frontier TEACHER DATASET --students S ...`: parses the options of
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
        help="accuracy on held-out cells against engine and end-to-end speed, for a teacher and its students",
        description="For the teacher and each student, and each precision the OpenVINO engine can run for it: "
        "5-class accuracy on the held-out cells every model left out of training (at this sample's class mix and at "
        "--class-mix), engine cells/s at batch 1 and the best batch, the dead/debris AUROC on simulated cells, and "
        "end-to-end max sustained cells/s through `flowsort serve` unless --skip-e2e. Writes frontier.json and "
        "frontier.png (accuracy against cells/s).",
    )
    defaults = frontier.FrontierSettings(teacher=Path(), dataset=Path())
    parser.add_argument("teacher", type=Path, help="the full-width bundle")
    parser.add_argument("dataset", type=Path, help="the labeled dataset every model was trained on")
    parser.add_argument("--students", type=Path, nargs="*", default=[], metavar="BUNDLE", help="student bundles")
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
        teacher=args.teacher, dataset=args.dataset, students=tuple(args.students), class_mix=args.class_mix,
        batch_sizes=args.batch_sizes, seconds=args.seconds, threads=args.threads, skip_e2e=args.skip_e2e,
        e2e_seconds=args.e2e_seconds, out=args.out,
    ))
    return 0
