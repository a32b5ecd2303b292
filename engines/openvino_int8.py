"""Post-training INT8 quantization of the OpenVINO model with NNCF, judged by the guard of :mod:`engines.int8`."""

from __future__ import annotations

import shutil
from typing import Any

import numpy as np

from engines.bundle import Bundle
from engines.int8 import MODEL_FILE, GuardReport, int8_dir, run_guard, write_report
from engines.openvino_engine import OpenVINOEngine, import_openvino
from flowsort.errors import UserError


def stem_convolutions(model: Any) -> list[str]:
    """The convolutions fed by the input normalization.

    They stay in float: 8 bits cannot carry the 12-bit camera's pixels, with
    two input channels they gain nothing from INT8, and quantizing them makes
    the CPU plugin fold the uint16 input conversion into an INT8 convolution
    it then refuses ("does not support u16 for use with oneDNN").
    """

    def consumers(node: Any) -> list[Any]:
        return [target.get_node() for output in node.outputs() for target in output.get_target_inputs()]

    node = model.get_parameters()[0]
    while len(consumers(node)) == 1 and consumers(node)[0].get_type_name() != "Convolution":
        node = consumers(node)[0]
    return [c.get_friendly_name() for c in consumers(node) if c.get_type_name() == "Convolution"]


def quantize_openvino(bundle: Bundle, calibration: np.ndarray, threads: int | None = None) -> GuardReport:
    """Quantize the bundle's model with NNCF, judge it, keep it (in the bundle) only if it passes."""
    try:
        import nncf
    except ImportError as exc:
        raise UserError("INT8 quantization needs the nncf package: pip install nncf") from exc

    ov = import_openvino()
    model = ov.Core().read_model(str(bundle.onnx_path))
    quantized = nncf.quantize(
        model,
        nncf.Dataset([calibration[i : i + 1] for i in range(len(calibration))]),
        subset_size=len(calibration),
        ignored_scope=nncf.IgnoredScope(names=stem_convolutions(model)),
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
    if not report.passed:
        for file in directory.glob("model.*"):
            file.unlink()
    write_report(
        directory, report, calibration_cells=len(calibration), nncf=nncf.__version__, openvino=ov.get_version()
    )
    return report
