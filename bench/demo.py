"""`flowsort demo`: the main job end to end on simulated cells, on any machine.

It runs the same subcommands a user would: simulate an acquisition, draw its
contact sheet, train a small DeepFlow (or reuse the one trained last time),
and evaluate it on a fresh acquisition with the Jurkat class prior.
Needs nothing but the package itself (no real data, no network).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from flowsort.errors import UserError

TRAIN_CELLS = 4000
TEST_CELLS = 3000
INTERPHASE_MERGE = "G1,S_phase,G2=Interphase"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="simulate cells, train a small model and evaluate it (the `make demo` job)",
        description="Simulate an enriched training acquisition and a Jurkat-like test acquisition, "
        "draw the contact sheet, train a small DeepFlow (reused when present) and write an evaluation report.",
    )
    parser.add_argument("--out", type=Path, default=Path("demo-output"), help="working folder (default demo-output)")
    parser.add_argument("--retrain", action="store_true", help="train a new model even if one is there")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--width", type=float, default=0.5, help="DeepFlow width multiplier for the demo model")
    parser.set_defaults(run=run)


def step(title: str, argv: list[str]) -> None:
    from flowsort.cli import main

    print(f"\n==> {title}\n    flowsort {' '.join(argv)}", flush=True)
    started = time.perf_counter()
    if main(argv) != 0:
        raise UserError(f"demo step failed: flowsort {' '.join(argv)}")
    print(f"    ({time.perf_counter() - started:.1f} s)")


def run(args: argparse.Namespace) -> int:
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    train_set, test_set, bundle = out / "train-cells", out / "test-cells", out / "model"
    if not (train_set / "dataset.json").is_file():
        step("Simulating a mitosis-enriched training acquisition",
             ["import", "synthetic", "--cells", str(TRAIN_CELLS), "--prior", "uniform", "--seed", "1", "-o", str(train_set)])
    if not (test_set / "dataset.json").is_file():
        step("Simulating a test acquisition with the Jurkat prior (97.8% interphase)",
             ["import", "synthetic", "--cells", str(TEST_CELLS), "--prior", "jurkat", "--seed", "2", "-o", str(test_set)])
    step("Drawing the contact sheet of the simulated cells",
         ["gallery", str(train_set), "-o", str(out / "synthetic-gallery.png"), "--title", "simulated IFC cells"])
    if args.retrain or not (bundle / "bundle.json").is_file():
        step("Training a small DeepFlow on the 5-class task (interphase merged, as in the paper)",
             ["train", str(train_set), "-o", str(bundle), "--merge", INTERPHASE_MERGE,
              "--width", str(args.width), "--epochs", str(args.epochs)])
    else:
        print(f"\n==> Reusing the model in {bundle} (--retrain trains a new one)")
    step("Evaluating on the test acquisition",
         ["evaluate", str(bundle), str(test_set), "-o", str(out / "report")])
    print(f"\nDone. Contact sheet: {out / 'synthetic-gallery.png'}\n      Report:        {out / 'report' / 'report.html'}")
    return 0
