"""The TensorRT engine: what can be checked anywhere, and what needs an NVIDIA GPU.

The uint16 -> float32 input edit and the plan cache key are checked on any
machine (the edited graph runs in OpenVINO). Building and running plans needs
TensorRT, pycuda and a GPU; those tests skip with the reason elsewhere. Parity
of the TensorRT precisions runs in tests/test_engines.py with every engine.
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from engines import tensorrt_engine
from engines.bundle import Bundle, load_bundle
from engines.tensorrt_engine import PlanKey, float_input_onnx

KEY = PlanKey("NVIDIA RTX A4000", "8.6", "10.3.0", "ab" * 32, "fp16", 256)


@pytest.fixture(scope="module")
def bundle(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    return load_bundle(shutil.copytree(tiny_bundle, tmp_path_factory.mktemp("tensorrt") / "bundle"))


@pytest.fixture
def gpu() -> None:
    reason = tensorrt_engine.missing()
    if reason:
        pytest.skip(reason)


def test_float_input_graph_computes_the_same(bundle: Bundle, tmp_path: Path) -> None:
    onnx = pytest.importorskip("onnx")
    ov = pytest.importorskip("openvino")
    edited = tmp_path / "float-input.onnx"
    float_input_onnx(bundle.onnx_path, edited)
    assert onnx.load(str(edited)).graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    cells = np.random.default_rng(0).integers(0, 4096, (5, 2, 40, 40), dtype=np.uint16)
    cells[0, 0, 0, 0] = 4095  # above 2048, where float16 would round
    core = ov.Core()
    run = lambda path, x: core.compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})(x)  # noqa: E731
    original, converted = run(bundle.onnx_path, cells), run(edited, cells.astype(np.float32))
    for index in range(3):
        np.testing.assert_array_equal(original[index], converted[index])


def test_input_edit_refuses_a_graph_that_uses_the_raw_input(tmp_path: Path) -> None:
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["cells"], ["out"])],
        "raw",
        [helper.make_tensor_value_info("cells", TensorProto.UINT16, ["batch", 2, 4, 4])],
        [helper.make_tensor_value_info("out", TensorProto.UINT16, ["batch", 2, 4, 4])],
    )
    onnx.save(helper.make_model(graph), str(tmp_path / "raw.onnx"))
    from flowsort.errors import UserError

    with pytest.raises(UserError, match="not only cast to float32"):
        float_input_onnx(tmp_path / "raw.onnx", tmp_path / "out.onnx")


def test_plan_key_changes_with_everything_the_plan_depends_on() -> None:
    changed = [
        replace(KEY, gpu="NVIDIA L4"), replace(KEY, compute_capability="8.9"), replace(KEY, tensorrt="10.4.0"),
        replace(KEY, bundle_hash="cd" * 32), replace(KEY, precision="int8"), replace(KEY, max_batch=128),
    ]
    names = {key.plan_name() for key in [KEY, *changed]}
    assert len(names) == len(changed) + 1
    assert KEY.plan_name() == replace(KEY).plan_name()  # stable for the same inputs
    assert replace(KEY, precision="int8").timing_cache_name() == KEY.timing_cache_name()  # shared per GPU and version
    assert replace(KEY, tensorrt="10.4.0").timing_cache_name() != KEY.timing_cache_name()


def test_missing_says_what_to_install() -> None:
    reason = tensorrt_engine.missing()
    if reason is None:
        pytest.skip("TensorRT runs on this machine")
    assert "flowsort[gpu]" in reason or "GPU" in reason


def test_plan_is_cached_and_reused(bundle: Bundle, gpu: None) -> None:
    with tensorrt_engine.TensorRTEngine(bundle, "fp16", max_batch=32) as engine:
        plan = engine._directory / engine.key.plan_name()
        assert not (bundle.path / "engines").exists()  # the bundle is only read
        assert plan.is_file() and plan.with_suffix(".json").is_file()
        built = plan.stat().st_mtime_ns
    with tensorrt_engine.TensorRTEngine(bundle, "fp16", max_batch=32):
        assert plan.stat().st_mtime_ns == built
    assert any(plan.parent.glob("timing-*.cache"))


def test_fp16_matches_fp32_and_pipelines(bundle: Bundle, gpu: None) -> None:
    images, _ = bundle.validation_cells()
    cells = np.ascontiguousarray(np.resize(images, (48, *images.shape[1:])))
    with tensorrt_engine.TensorRTEngine(bundle, "fp32", max_batch=32) as fp32:
        expected = fp32.infer(cells[:32]).probabilities.copy()
    with tensorrt_engine.TensorRTEngine(bundle, "fp16", max_batch=32) as fp16:
        fp16.submit(cells[:32])
        fp16.submit(cells[32:])
        first, second = fp16.collect(), fp16.collect()
        assert len(second.dead_score) == 16
        np.testing.assert_allclose(first.probabilities, expected, atol=0.02)


def test_int8_without_calibration_cells_says_how_to_get_them(bundle: Bundle, gpu: None) -> None:
    from flowsort.errors import UserError

    with pytest.raises(UserError, match="flowsort quantize"):
        tensorrt_engine.TensorRTEngine(bundle, "int8", max_batch=32)
