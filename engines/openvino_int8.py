"""Post-training INT8 quantization of the OpenVINO model with NNCF, judged by the guard of :mod:`engines.int8`."""

from __future__ import annotations

import shutil
from typing import Any

import numpy as np

from engines.bundle import Bundle
from engines.int8 import MODEL_FILE, GuardReport, int8_dir, run_guard, write_report
from engines.openvino_engine import OpenVINOEngine, import_openvino
from flowsort.errors import UserError

# Accuracy-aware quantization reverts layers to float until INT8 agrees with f32 on the
# calibration (training) cells to within a target. The first aims at the guard's own 1% (the most
# layers in INT8); where the guard, on cells the quantizer never sees, rejects that model, the
# next leaves it half the margin. (At 0.5% alone, a width-0.35 student gave every layer back.)
TARGET_DISAGREEMENTS = (0.01, 0.005)
ALL_FLOAT = "no layer could be quantized without changing the model's classes on the calibration cells"


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
    within a target (``TARGET_DISAGREEMENTS``, loosest first). The guard then
    judges the result on the bundle's validation cells, which quantization never
    saw; a rejected model is made again at the next, stricter target.
    """
    try:
        import nncf
    except ImportError as exc:
        raise UserError("INT8 quantization needs the nncf package: pip install nncf") from exc

    ov = import_openvino()
    core = ov.Core()
    model = core.read_model(str(bundle.onnx_path))
    validation, agreement = agreement_metric(core.compile_model(model, "CPU"), calibration)
    directory = int8_dir(bundle, "openvino")
    for target in TARGET_DISAGREEMENTS:
        quantized = nncf.quantize_with_accuracy_control(
            model,
            validation,
            validation,
            agreement,
            max_drop=target,
            subset_size=len(calibration),
            fast_bias_correction=False,
            ignored_scope=float_scope(model),
        )
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True)
        ov.save_model(quantized, str(directory / MODEL_FILE), compress_to_fp16=False)
        report = run_guard(
            bundle,
            OpenVINOEngine(bundle, "fp32", threads=threads),
            OpenVINOEngine(bundle, "int8", threads=threads, model_path=directory / MODEL_FILE),
        )
        layers = count_int8_layers(quantized)
        # Accuracy control that had to give every layer back to float leaves a float model: not INT8, not kept
        # (and a stricter target cannot do better).
        kept = report.passed and layers["int8"] > 0
        if kept or layers["int8"] == 0:
            break
    if not kept:
        for file in directory.glob("model.*"):
            file.unlink()
    write_report(
        directory, report, calibration_cells=len(calibration), nncf=nncf.__version__, openvino=ov.get_version(),
        int8_layers=layers, target_disagreement=target,
        **({"passed": False, "reason": ALL_FLOAT} if layers["int8"] == 0 else {}),
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
