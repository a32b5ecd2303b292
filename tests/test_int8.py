"""The INT8 accuracy guard on both sides: a quantization that passes is kept, one that fails leaves nothing.

The guard's thresholds are module constants read when a report is judged; the
tests move them to force each outcome on the same real quantization of the
quick bundle, so what is tested is the keeping and the refusing, not luck.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

import engines
from engines import int8, openvino_int8
from engines.bundle import Bundle, load_bundle
from engines.openvino_engine import is_x86
from flowsort.errors import UserError
from trainer.dataset import read_dataset

pytestmark = pytest.mark.skipif(not is_x86(), reason="OpenVINO INT8 is made on x86 CPUs only")


def quantized_copy(quick_bundle: Path, tmp_path: Path) -> tuple[Bundle, int8.GuardReport]:
    bundle = load_bundle(shutil.copytree(quick_bundle, tmp_path / "bundle"))
    dataset = read_dataset(quick_bundle.parent / "dataset")
    cells = int8.calibration_cells(dataset.images, dataset.object_ids, bundle, 60)
    int8.store_calibration(bundle, cells)
    return bundle, openvino_int8.quantize_openvino(bundle, cells)


def test_passing_quantization_is_kept_and_served(quick_bundle: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(int8, "MIN_AGREEMENT", 0.0)
    monkeypatch.setattr(int8, "MAX_ACCURACY_DROP", 1.0)
    monkeypatch.setattr(openvino_int8, "TARGET_DISAGREEMENTS", (1.0,))  # no layer given back to float
    bundle, report = quantized_copy(quick_bundle, tmp_path)
    assert report.passed
    kept = int8.approved_model(bundle)
    assert kept is not None and kept.is_file()
    recorded = int8.read_report(int8.int8_dir(bundle, "openvino"))
    assert recorded["passed"] and recorded["int8_layers"]["int8"] > 0 and recorded["int8_layers"]["float"] > 0
    images, _ = bundle.validation_cells()
    with engines.load(bundle, "openvino", "int8", max_batch=8) as engine:
        probabilities = engine.infer(images[:8]).probabilities
    assert probabilities.shape == (8, len(bundle.class_names)) and np.allclose(probabilities.sum(1), 1, atol=1e-3)


def test_failing_quantization_is_refused_and_nothing_is_kept(quick_bundle: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(int8, "MIN_AGREEMENT", 1.01)  # no model can agree with f32 on more than every cell
    bundle, report = quantized_copy(quick_bundle, tmp_path)
    assert not report.passed
    directory = int8.int8_dir(bundle, "openvino")
    assert not list(directory.glob("model.*")) and int8.approved_model(bundle) is None
    assert int8.read_report(directory)["passed"] is False
    with pytest.raises(UserError, match="rejected by the accuracy guard"):
        engines.load(bundle, "openvino", "int8")


def test_quantization_that_keeps_every_layer_in_float_is_not_kept(quick_bundle: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import nncf

    # As if accuracy control had given every layer back to float: a float model that trivially passes the guard.
    monkeypatch.setattr(openvino_int8, "float_scope", lambda model: nncf.IgnoredScope(types=["Convolution", "MatMul"]))
    monkeypatch.setattr(openvino_int8, "TARGET_DISAGREEMENTS", (1.0,))
    bundle, report = quantized_copy(quick_bundle, tmp_path)
    recorded = int8.read_report(int8.int8_dir(bundle, "openvino"))
    assert recorded["int8_layers"]["int8"] == 0 and recorded["passed"] is False
    assert int8.approved_model(bundle) is None
    with pytest.raises(UserError, match="no layer could be quantized"):
        engines.load(bundle, "openvino", "int8")


def test_a_model_the_guard_rejects_is_made_again_at_a_stricter_target(quick_bundle: Path, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from engines.int8 import GuardReport

    targets = []
    real_quantize = __import__("nncf").quantize_with_accuracy_control

    def quantize(*args, max_drop, **kwargs):
        targets.append(max_drop)
        return real_quantize(*args, max_drop=max_drop, **kwargs)

    verdicts = iter([GuardReport(cells=10, agreement=0.9, accuracy_f32=0.8, accuracy_int8=0.7),  # rejected
                     GuardReport(cells=10, agreement=1.0, accuracy_f32=0.8, accuracy_int8=0.8)])
    monkeypatch.setattr("nncf.quantize_with_accuracy_control", quantize)
    monkeypatch.setattr(openvino_int8, "run_guard", lambda *args: next(verdicts))
    monkeypatch.setattr(openvino_int8, "TARGET_DISAGREEMENTS", (1.0, 0.5))  # both keep INT8 layers on this model
    bundle, report = quantized_copy(quick_bundle, tmp_path)
    assert targets == [1.0, 0.5] and report.passed
    recorded = int8.read_report(int8.int8_dir(bundle, "openvino"))
    assert recorded["target_disagreement"] == 0.5 and recorded["passed"]
    assert int8.approved_model(bundle) is not None


def test_sensitive_layers_stay_in_float(quick_bundle: Path) -> None:
    from engines.openvino_engine import import_openvino

    model = import_openvino().Core().read_model(str(load_bundle(quick_bundle).onnx_path))
    stem, last = openvino_int8.stem_convolutions(model), openvino_int8.last_module_convolutions(model)
    convolutions = [op.get_friendly_name() for op in model.get_ordered_ops() if op.get_type_name() == "Convolution"]
    assert stem == convolutions[:1]
    assert len(last) == 2 and set(last) == set(convolutions[-2:])  # the last module's two branches
