"""INT8 by post-training quantization, kept only where it is as good as f32.

``flowsort quantize BUNDLE DATASET`` draws calibration cells from the training
data (never the bundle's validation cells, which judge the result) and stores
them in the bundle, quantizes the OpenVINO model with NNCF, and runs the
accuracy guard on the validation cells: the INT8 model must agree with the f32
model on the predicted class for >= 99% of the cells and lose <= 0.5 points of
accuracy. A model that fails is deleted; its report stays, so the engine can
say why INT8 is unavailable. The TensorRT engine calibrates on the same stored
cells and applies the same guard to its INT8 plans.

Everything lives under ``BUNDLE/engines/``, keyed by the bundle's content hash.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from engines.base import CACHE_DIR, predict_all
from engines.bundle import VALIDATION_FILE, Bundle
from flowsort.errors import UserError

if TYPE_CHECKING:
    from engines.base import Engine

MIN_AGREEMENT = 0.99
MAX_ACCURACY_DROP = 0.005
CALIBRATION_CELLS = 1000
# Accuracy-aware quantization reverts layers to float until INT8 agrees with f32 on the
# calibration (training) cells to within this; the margin below the guard's 1% leaves room for
# the guard's own cells, which the quantizer never sees.
TARGET_DISAGREEMENT = 0.005
MODEL_FILE = "model.xml"
REPORT_FILE = "guard.json"
ALL_FLOAT = "no layer could be quantized without changing the model's classes on the calibration cells"


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


def run_guard(bundle: Bundle, reference: Engine, candidate: Engine) -> GuardReport:
    images, labels = bundle.validation_cells()
    return guard(predict_all(reference, images).probabilities, predict_all(candidate, images).probabilities, labels)


def int8_dir(bundle: Bundle, engine: str) -> Path:
    return bundle.path / CACHE_DIR / "int8" / engine / bundle.content_hash[:16]


def calibration_file(bundle: Bundle) -> Path:
    return bundle.path / CACHE_DIR / "int8" / f"calibration-{bundle.content_hash[:16]}.npy"


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


def consumers(node: Any) -> list[Any]:
    return [target.get_node() for output in node.outputs() for target in output.get_target_inputs()]


def stem_convolutions(model: Any) -> list[str]:
    """The convolutions fed by the input normalization.

    They stay in float: 8 bits cannot carry the 12-bit camera's pixels, with
    two input channels they gain nothing from INT8, and quantizing them makes
    the CPU plugin fold the uint16 input conversion into an INT8 convolution
    it then refuses ("does not support u16 for use with oneDNN").
    """
    node = model.get_parameters()[0]
    while len(consumers(node)) == 1 and consumers(node)[0].get_type_name() != "Convolution":
        node = consumers(node)[0]
    return [c.get_friendly_name() for c in consumers(node) if c.get_type_name() == "Convolution"]


def last_module_convolutions(model: Any) -> list[str]:
    """The branches of the last module: the convolutions that read the same input as the last one.

    Its maps become the embedding directly (pooling only), so its rounding
    errors reach the classifier and the dead-cell score unaveraged.
    """
    convolutions = [op for op in model.get_ordered_ops() if op.get_type_name() == "Convolution"]
    source = convolutions[-1].input(0).get_source_output().get_node()
    return [c.get_friendly_name() for c in consumers(source) if c.get_type_name() == "Convolution"]


def float_scope(model: Any) -> Any:
    """What stays in float: the stem, the last module and the head's matrix products (classifier,
    dead-cell whitening): a few percent of the compute, most of INT8's error."""
    import nncf

    return nncf.IgnoredScope(names=stem_convolutions(model) + last_module_convolutions(model), types=["MatMul"])


def agreement_metric(f32: Any, calibration: np.ndarray) -> tuple[Any, Any]:
    """NNCF validation data (cells with the f32 class) and the agreement function it maximizes."""
    import nncf

    reference = f32(calibration)[0].argmax(1)
    items = [(calibration[i : i + 1], int(reference[i])) for i in range(len(calibration))]

    def agreement(compiled: Any, data: Any) -> tuple[float, list[float]]:
        same = [float(compiled(cells)[0].argmax(1)[0] == expected) for cells, expected in data]
        return float(np.mean(same)), same

    return nncf.Dataset(items, lambda item: item[0]), agreement


def quantize_openvino(bundle: Bundle, calibration: np.ndarray, threads: int | None = None) -> GuardReport:
    """Quantize the bundle's model with NNCF, judge it, keep it only if it passes.

    Accuracy-aware post-training quantization: the sensitive layers stay in
    float from the start (:func:`float_scope`), then NNCF ranks the remaining
    quantized layers by how much they change the f32 model's classes on the
    calibration cells and reverts the worst to float until the agreement is
    within ``TARGET_DISAGREEMENT``. The guard then judges the result on the
    bundle's validation cells, which quantization never saw.
    """
    try:
        import nncf
    except ImportError as exc:
        raise UserError("INT8 quantization needs the nncf package: pip install nncf") from exc
    from engines.openvino_engine import OpenVINOEngine, import_openvino

    ov = import_openvino()
    core = ov.Core()
    model = core.read_model(str(bundle.onnx_path))
    validation, agreement = agreement_metric(core.compile_model(model, "CPU"), calibration)
    quantized = nncf.quantize_with_accuracy_control(
        model,
        validation,
        validation,
        agreement,
        max_drop=TARGET_DISAGREEMENT,
        subset_size=len(calibration),
        fast_bias_correction=False,
        ignored_scope=float_scope(model),
    )
    directory = int8_dir(bundle, "openvino")
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    ov.save_model(quantized, str(directory / MODEL_FILE), compress_to_fp16=False)
    report = run_guard(
        bundle,
        OpenVINOEngine(bundle, "fp32", threads=threads),
        OpenVINOEngine(bundle, "int8", threads=threads, model_path=directory / MODEL_FILE),
    )
    layers = count_int8_layers(quantized)
    # Accuracy control that had to give every layer back to float leaves a float model: not INT8, not kept.
    kept = report.passed and layers["int8"] > 0
    if not kept:
        for file in directory.glob("model.*"):
            file.unlink()
    write_report(
        directory, report, calibration_cells=len(calibration), nncf=nncf.__version__, openvino=ov.get_version(),
        int8_layers=layers, **({} if kept or not report.passed else {"passed": False, "reason": ALL_FLOAT}),
    )
    return report


def count_int8_layers(model: Any) -> dict[str, int]:
    """Convolutions and matrix products with INT8 weights (a FakeQuantize or an i8 constant behind them) vs float."""
    counts = {"int8": 0, "float": 0}
    for op in model.get_ordered_ops():
        if op.get_type_name() in ("Convolution", "MatMul"):
            counts["int8" if any(map(is_int8_weight, upstream(op.input(1).get_source_output().get_node(), 3)))
                   else "float"] += 1
    return counts


def is_int8_weight(node: Any) -> bool:
    return node.get_type_name() == "FakeQuantize" or (
        node.get_type_name() == "Constant" and node.get_output_element_type(0).get_type_name() in ("i8", "u8"))


def upstream(node: Any, depth: int) -> list[Any]:
    """``node`` and what feeds it, ``depth`` steps back."""
    found, frontier = [node], [node]
    for _ in range(depth):
        frontier = [i.get_source_output().get_node() for n in frontier for i in n.inputs()]
        found.extend(frontier)
    return found
