"""INT8 by post-training quantization, kept only where it is as good as f32.

``flowsort quantize BUNDLE DATASET`` draws calibration cells from the training
data (never the bundle's validation cells, which judge the result) and stores
them in the bundle, quantizes the OpenVINO model with NNCF
(:mod:`engines.openvino_int8`), and runs the accuracy guard on the validation cells: the INT8 model must agree with the f32
model on the predicted class for >= 99% of the cells and lose <= 0.5 points of
accuracy. A model that fails is deleted; its report stays, so the engine can
say why INT8 is unavailable. The TensorRT engine calibrates on the same stored
cells and applies the same guard to its INT8 plans.

The calibration cells, the INT8 model and its report are part of the bundle:
``flowsort quantize`` writes them under ``BUNDLE/engines/int8/`` (outside the
checksummed files, keyed by the bundle's content hash) and is the one command
that writes into a bundle. Engines only read them; what they compile goes to
the engine cache (:mod:`engines.cache`).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from engines.base import predict_all
from engines.bundle import VALIDATION_FILE, Bundle
from flowsort.errors import UserError

if TYPE_CHECKING:
    from engines.base import Engine

MIN_AGREEMENT = 0.99
MAX_ACCURACY_DROP = 0.005
CALIBRATION_CELLS = 1000
MODEL_FILE = "model.xml"
REPORT_FILE = "guard.json"
BUNDLE_DIR = Path("engines") / "int8"  # in the bundle, beside its checksummed files


@dataclass(frozen=True)
class GuardReport:
    """How an INT8 model compares with f32 on the bundle's validation cells."""

    cells: int
    agreement: float  # share of cells where both predict the same class
    accuracy_f32: float
    accuracy_int8: float

    @property
    def accuracy_drop(self) -> float:
        return self.accuracy_f32 - self.accuracy_int8

    @property
    def passed(self) -> bool:
        return self.agreement >= MIN_AGREEMENT and self.accuracy_drop <= MAX_ACCURACY_DROP

    def summary(self) -> str:
        verdict = "passed" if self.passed else "failed"
        return (
            f"INT8 accuracy guard {verdict} on {self.cells} validation cells: class agreement with f32 "
            f"{self.agreement:.2%} (needs >= {MIN_AGREEMENT:.0%}), accuracy {self.accuracy_int8:.2%} vs "
            f"{self.accuracy_f32:.2%} f32 (drop {100 * self.accuracy_drop:.2f} points, "
            f"allowed {100 * MAX_ACCURACY_DROP:.1f})"
        )

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "accuracy_drop": self.accuracy_drop, "passed": self.passed}


def guard(f32_probabilities: np.ndarray, int8_probabilities: np.ndarray, labels: np.ndarray) -> GuardReport:
    """Compare INT8 with f32 predictions; accuracy counts labeled cells (label >= 0) only."""
    f32_class, int8_class = f32_probabilities.argmax(1), int8_probabilities.argmax(1)
    labeled = labels >= 0
    if not labeled.any():
        raise UserError("the bundle's validation cells carry no labels: the INT8 accuracy guard cannot judge the model")
    return GuardReport(
        cells=len(labels),
        agreement=float((f32_class == int8_class).mean()),
        accuracy_f32=float((f32_class[labeled] == labels[labeled]).mean()),
        accuracy_int8=float((int8_class[labeled] == labels[labeled]).mean()),
    )


def require_unseen_validation(bundle: Bundle) -> None:
    """Refuse, before any work, a bundle whose validation cells the model was trained on: the guard would judge
    INT8 on cells both precisions already know."""
    if bundle.validation_seen_in_training:
        raise UserError(
            f"{bundle.path} was trained on every labeled cell (`flowsort train --final-on-all-cells`), so it has no "
            "unseen cells for the INT8 accuracy guard: quantize a model trained with a validation split instead"
        )


def run_guard(bundle: Bundle, reference: Engine, candidate: Engine) -> GuardReport:
    images, labels = bundle.validation_cells()
    return guard(predict_all(reference, images).probabilities, predict_all(candidate, images).probabilities, labels)


def int8_dir(bundle: Bundle, engine: str) -> Path:
    return bundle.path / BUNDLE_DIR / engine / bundle.content_hash[:16]


def calibration_file(bundle: Bundle) -> Path:
    return bundle.path / BUNDLE_DIR / f"calibration-{bundle.content_hash[:16]}.npy"


def require_writable(bundle: Bundle) -> None:
    """Refuse, before any work, to quantize a bundle this user cannot write into."""
    folder = bundle.path / BUNDLE_DIR
    existing = next(parent for parent in (folder, *folder.parents) if parent.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(
            f"flowsort quantize stores the calibration cells and the INT8 model in the bundle, and {existing} is "
            "not writable (a read-only bundle): quantize a writable copy, then mount or copy that one"
        )


def read_report(directory: Path) -> dict[str, Any] | None:
    try:
        return json.loads((directory / REPORT_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def write_report(directory: Path, report: GuardReport, **details: Any) -> None:
    (directory / REPORT_FILE).write_text(json.dumps({**report.to_json(), **details}, indent=2) + "\n")


def approved_model(bundle: Bundle) -> Path | None:
    """The OpenVINO INT8 model that passed the guard for this bundle, if there is one."""
    directory = int8_dir(bundle, "openvino")
    report = read_report(directory)
    model = directory / MODEL_FILE
    return model if report and report.get("passed") and model.is_file() else None


def unavailable_reason(bundle: Bundle) -> str:
    report = read_report(int8_dir(bundle, "openvino"))
    if report is None:
        return (
            f"precision int8: the bundle {bundle.path} holds no INT8 model yet; create one from the training data "
            f"with `flowsort quantize {bundle.path} DATASET`"
        )
    if "reason" in report:
        return f"precision int8: no INT8 model was kept for {bundle.path}: {report['reason']}; use bf16 or fp32"
    return (
        f"precision int8: the INT8 model of {bundle.path} was rejected by the accuracy guard "
        f"(class agreement {report['agreement']:.2%}, accuracy drop {100 * report['accuracy_drop']:.2f} points): "
        "use bf16 or fp32"
    )


def calibration_cells(images: np.ndarray, object_ids: np.ndarray, bundle: Bundle, n: int, seed: int = 0) -> np.ndarray:
    """``n`` training cells drawn at random, leaving out the bundle's validation cells (matched by object id)."""
    if images.shape[1:] != (len(bundle.channels), bundle.input_size, bundle.input_size) or images.dtype != np.uint16:
        raise UserError(
            f"the calibration cells are {images.dtype} {list(images.shape[1:])} but the model takes uint16 "
            f"[{len(bundle.channels)}, {bundle.input_size}, {bundle.input_size}]: use the dataset the model was trained on"
        )
    with np.load(bundle.file(VALIDATION_FILE)) as validation:
        held_out = validation["object_ids"]
    candidates = np.flatnonzero(~np.isin(object_ids, held_out))
    if len(candidates) == 0:
        raise UserError("the dataset holds no cells besides the bundle's validation cells: nothing to calibrate on")
    chosen = np.sort(np.random.default_rng(seed).choice(candidates, min(n, len(candidates)), replace=False))
    return np.ascontiguousarray(images[chosen])


def store_calibration(bundle: Bundle, cells: np.ndarray) -> Path:
    path = calibration_file(bundle)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, cells)
    return path


def load_calibration(bundle: Bundle) -> np.ndarray:
    path = calibration_file(bundle)
    if not path.is_file():
        raise UserError(
            f"INT8 needs calibration cells from the training data and {bundle.path} has none: "
            f"run `flowsort quantize {bundle.path} DATASET` first"
        )
    return np.load(path)
