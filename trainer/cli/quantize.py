"""`flowsort quantize BUNDLE DATASET`: calibration cells and a guarded INT8 model for the bundle."""

from __future__ import annotations

import argparse
from pathlib import Path

from engines.int8 import CALIBRATION_CELLS, MAX_ACCURACY_DROP, MIN_AGREEMENT


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "quantize",
        help="add a guarded INT8 model to a bundle (OpenVINO now, TensorRT on its first start)",
        description=(
            "Draw calibration cells from the training dataset (leaving out the bundle's validation cells), store "
            "them in the bundle (the one command that writes into a bundle, which must be writable), quantize the "
            "OpenVINO model with NNCF and keep it only if it passes the accuracy "
            f"guard on the validation cells (class agreement with f32 >= {MIN_AGREEMENT:.0%}, accuracy drop <= "
            f"{100 * MAX_ACCURACY_DROP:.1f} points). TensorRT builds its INT8 plan from the same cells on the GPU machine."
        ),
    )
    parser.add_argument("bundle", type=Path, help="model bundle from `flowsort train`")
    parser.add_argument("dataset", type=Path, help="the dataset the model was trained on")
    parser.add_argument("--cells", type=int, default=CALIBRATION_CELLS,
                        help=f"calibration cells (default {CALIBRATION_CELLS})")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for OpenVINO (default: all cores)")
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from engines import int8
    from engines.bundle import load_bundle
    from engines.openvino_engine import is_x86
    from engines.openvino_int8 import ALL_FLOAT, quantize_openvino
    from flowsort.errors import UserError
    from trainer.dataset import read_dataset

    if args.cells < 1:
        raise UserError("--cells must be at least 1")
    bundle = load_bundle(args.bundle)
    int8.require_writable(bundle)
    int8.require_unseen_validation(bundle)
    dataset = read_dataset(args.dataset)
    if "held_out" in bundle.manifest:  # cells kept out of training stay out of calibration too
        from trainer.holdout import held_out_removed

        dataset = held_out_removed(dataset, bundle.manifest)
    cells = int8.calibration_cells(dataset.images, dataset.object_ids, bundle, args.cells, args.seed)
    print(f"writing into the bundle {bundle.path}: calibration cells and the INT8 model under {int8.BUNDLE_DIR}/")
    path = int8.store_calibration(bundle, cells)
    print(f"{len(cells)} calibration cells stored in {path}")
    if not is_x86():
        print("not an x86 CPU: no OpenVINO INT8 model made; TensorRT will calibrate on the stored cells")
        return 0
    report = quantize_openvino(bundle, cells, args.threads)
    print(report.summary())
    if report.passed and int8.approved_model(bundle) is None:
        print(f"no INT8 model kept: {ALL_FLOAT}")
    return 0 if int8.approved_model(bundle) else 1
