"""The engines against the torch f32 reference, and the engine interface itself.

The parity suite runs for every engine and precision this machine has (the
others skip with the reason): 2,000 fresh synthetic cells in batches of 1, odd
sizes and the max, every output buffer poisoned with NaN before each batch.

Tolerances, per precision (probabilities are calibrated, dead scores are
Mahalanobis distances of a few units to a few tens):

=========  ==========  ===============  =====================================
precision  agreement   max |dp|         dead score relative error p50 / p99
=========  ==========  ===============  =====================================
fp32       >= 99.9%    1e-4             1e-4 / 1e-3
fp16       >= 99.5%    0.02             0.01 / 0.05
bf16       >= 99.5%    0.05             0.03 / 0.10
int8       >= 99%      0.15             0.10 / 0.35
=========  ==========  ===============  =====================================

Agreement (same class as f32) is judged on the cells f32 decides by at least
the precision's max |dp|: closer ones are ties the precision may break either
way. (The tests' small model leaves 17% of fresh cells within 0.05 of a tie;
on a Zen 5, bf16 flipped 14 of 2,000 cells, every one within 0.01.)

bf16 keeps 8 mantissa bits: its dead scores move by a few percent, mostly
through the embedding (the whitening amplifies small embedding errors), so
the head in f32 would not help much. INT8 moves them more; the INT8 guard
judges classes, which is what sorting decides on.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest

import engines
from engines import int8
from engines.base import Outputs
from engines.bundle import Bundle, load_bundle
from engines.openvino_engine import is_x86
from flowsort.errors import UserError

MAX_BATCH = 64
BATCHES = (1, 7, MAX_BATCH, 33, 2, 63, 13)  # cycled: single cells, odd sizes, the max
PARITY_CELLS = 2000


class Tolerance(NamedTuple):
    agreement: float
    probability: float
    dead_p50: float
    dead_p99: float


TOLERANCES = {
    "fp32": Tolerance(0.999, 1e-4, 1e-4, 1e-3),
    "fp16": Tolerance(0.995, 0.02, 0.01, 0.05),
    "bf16": Tolerance(0.995, 0.05, 0.03, 0.10),
    "int8": Tolerance(0.99, 0.15, 0.10, 0.35),
}
COMBINATIONS = [
    ("openvino", "fp32"), ("openvino", "bf16"), ("openvino", "int8"),
    ("torch", "fp32"), ("torch", "fp16"),
    ("tensorrt", "fp32"), ("tensorrt", "fp16"), ("tensorrt", "int8"),
    ("cuda", "fp32"), ("cuda", "fp16"), ("cuda", "bf16"),
    ("cuda-on-cpu", "fp32"), ("cuda-on-cpu", "bf16"),  # the cuda engine's eager path, where no GPU is
]


@pytest.fixture(scope="module")
def bundle_dir(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private copy of the tiny bundle, so the INT8 model quantized into it stays out of others' tests."""
    return Path(shutil.copytree(tiny_bundle, tmp_path_factory.mktemp("engines") / "bundle"))


@pytest.fixture(scope="module")
def quantized(bundle_dir: Path, synthetic_dataset: Path) -> dict:
    """`flowsort quantize` on the bundle, calibrated on its training dataset; the guard's report."""
    from flowsort.cli import main

    main(["quantize", str(bundle_dir), str(synthetic_dataset), "--cells", "200"])
    report = int8.read_report(int8.int8_dir(load_bundle(bundle_dir), "openvino"))
    assert report is not None, "quantize wrote no guard report"
    return report


@pytest.fixture(scope="module")
def bundle(bundle_dir: Path, quantized: dict) -> Bundle:
    return load_bundle(bundle_dir)


@pytest.fixture(scope="module")
def fresh_cells() -> np.ndarray:
    from trainer.synthetic import generate

    return generate(PARITY_CELLS, seed=2024, size=40, prior="uniform", dead_fraction=0.08, debris_fraction=0.04).images


@pytest.fixture(scope="module")
def reference(bundle: Bundle, fresh_cells: np.ndarray) -> Outputs:
    """The torch f32 module the ONNX was exported from, run plainly."""
    from engines.deployed_model import load_deployed
    from trainer.predictions import predict

    predicted = predict(load_deployed(bundle), fresh_cells)
    return Outputs(predicted.probabilities, predicted.embedding, predicted.dead_score)


def loaded(bundle: Bundle, name: str, precision: str) -> engines.Engine:
    """The engine, or a skip saying why this machine cannot run it at ``precision``."""
    if name == "cuda-on-cpu":
        from engines.cuda_engine import CudaEngine

        return CudaEngine(bundle, precision, max_batch=MAX_BATCH, device="cpu")
    reason = engines.available()[name]
    if reason:
        pytest.skip(reason)
    try:
        return engines.load(bundle, name, precision, max_batch=MAX_BATCH)
    except UserError as exc:
        if precision in engines.precisions(name, bundle):
            raise
        pytest.skip(str(exc))


@pytest.mark.parametrize(("name", "precision"), COMBINATIONS, ids=[f"{n}-{p}" for n, p in COMBINATIONS])
def test_parity_with_torch_f32(
    bundle: Bundle, fresh_cells: np.ndarray, reference: Outputs, name: str, precision: str
) -> None:
    with loaded(bundle, name, precision) as engine:
        assert (engine.name, engine.precision) == (name.removesuffix("-on-cpu"), precision)
        whole = [engine.infer(fresh_cells[:MAX_BATCH]) for _ in range(engine.depth)]  # every buffer set, entire
        got = Outputs(*(np.full_like(array, np.nan) for array in reference))
        start, turn = 0, 0
        while start < len(fresh_cells):
            n = min(BATCHES[turn % len(BATCHES)], len(fresh_cells) - start)
            for views in whole:
                for array in views:
                    array.fill(np.nan)
            out = engine.infer(fresh_cells[start : start + n])
            assert all(len(array) == n and np.isfinite(array).all() for array in out), f"unwritten output at batch {n}"
            in_place = any(np.shares_memory(out.probabilities, views.probabilities) for views in whole)
            assert in_place, "the outputs are not views of the engine's buffers"
            for store, array in zip(got, out):
                store[start : start + n] = array
            start, turn = start + n, turn + 1

    tolerance = TOLERANCES[precision]
    # A cell whose two likeliest classes are closer in f32 than the precision may move a probability is a tie
    # that precision may break either way: agreement is judged on the cells f32 decides by more.
    top2 = np.sort(reference.probabilities, 1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] >= tolerance.probability
    same = got.probabilities.argmax(1) == reference.probabilities.argmax(1)
    agreement = same[clear].mean()
    probability = np.abs(got.probabilities - reference.probabilities).max()
    dead = np.abs(got.dead_score - reference.dead_score) / np.maximum(reference.dead_score, 1e-3)
    dead_p50, dead_p99 = np.percentile(dead, [50, 99])
    measured = (f"agreement {agreement:.4f} on the {clear.sum()} cells f32 decides by >= {tolerance.probability:g} "
                f"({same.mean():.4f} on all), max |dp| {probability:.2e}, dead rel p50 {dead_p50:.2e} p99 {dead_p99:.2e}")
    assert clear.mean() > 0.5, measured  # the test model decides most cells clearly, or the check means little
    assert agreement >= tolerance.agreement, measured
    assert probability <= tolerance.probability, measured
    assert dead_p50 <= tolerance.dead_p50 and dead_p99 <= tolerance.dead_p99, measured
    assert np.allclose(got.probabilities.sum(1), 1, atol=1e-3), measured


def test_importing_engines_needs_no_torch() -> None:
    code = (
        "import sys, engines, engines.base, engines.int8, engines.openvino_int8, engines.openvino_engine, "
        "engines.tensorrt_engine, engines.torch_engine, engines.cuda_engine; engines.available(); "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_auto_picks_the_engine_of_this_machine(bundle: Bundle) -> None:
    reasons = engines.available()
    if reasons["tensorrt"] is None:
        expected = "tensorrt"
    elif reasons["cuda"] is None:
        expected = "cuda"
    elif reasons["openvino"] is None and is_x86():
        expected = "openvino"
    else:
        expected = "torch"
    with engines.load(bundle, max_batch=8) as engine:
        described = engine.describe()
    assert described["engine"] == expected
    assert described["bundle_hash"] == bundle.content_hash
    assert {"precision", "device", "max_batch"} <= set(described)


def test_missing_engine_says_what_is_missing(bundle: Bundle) -> None:
    reason = engines.available()["tensorrt"]
    if reason is None:
        pytest.skip("TensorRT runs on this machine")
    with pytest.raises(UserError, match="tensorrt and pycuda packages and an NVIDIA GPU"):
        engines.load(bundle, "tensorrt")
    with pytest.raises(UserError, match="unknown engine"):
        engines.load(bundle, "onnxruntime")


def test_unavailable_precision_is_refused_with_the_reason(bundle: Bundle) -> None:
    with pytest.raises(UserError, match="choose auto, fp32, bf16, int8"):
        engines.load(bundle, "openvino", "fp16")
    with pytest.raises(UserError, match="takes no device_id"):
        engines.load(bundle, "openvino", device_id=0)
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="CUDA"):
            engines.load(bundle, "torch", "fp16")


def test_int8_needs_a_quantized_bundle(tiny_bundle: Path, tmp_path: Path) -> None:
    fresh = load_bundle(shutil.copytree(tiny_bundle, tmp_path / "bundle"))
    with pytest.raises(UserError, match="flowsort quantize"):
        engines.load(fresh, "openvino", "int8")


def test_quantize_keeps_int8_only_when_it_passes_the_guard(bundle: Bundle, quantized: dict) -> None:
    model = int8.int8_dir(bundle, "openvino") / int8.MODEL_FILE
    assert quantized["passed"] == model.is_file() == (int8.approved_model(bundle) is not None)
    assert quantized["cells"] == len(bundle.validation_cells()[1])
    assert int8.load_calibration(bundle).shape == (200, 2, 40, 40)
    if not quantized["passed"]:
        with pytest.raises(UserError, match="rejected by the accuracy guard|no INT8 model was kept"):
            engines.load(bundle, "openvino", "int8")


def test_guard_thresholds() -> None:
    labels = np.repeat(np.arange(4), 50)
    f32 = np.eye(4)[labels]
    assert int8.guard(f32, f32, labels).passed
    one_percent = f32.copy()
    one_percent[:2] = np.eye(4)[1]  # 2 of 200 cells change class: agreement 99%, accuracy -1 point
    report = int8.guard(f32, one_percent, labels)
    assert report.agreement == pytest.approx(0.99) and report.accuracy_drop == pytest.approx(0.01)
    assert not report.passed and "failed" in report.summary()
    with pytest.raises(UserError, match="no labels"):
        int8.guard(f32, f32, np.full(200, -1))


def test_input_is_checked(bundle: Bundle) -> None:
    with engines.load(bundle, "openvino", "fp32", max_batch=4) as engine:
        cells = np.zeros((4, *engine.input_shape), np.uint16)
        with pytest.raises(TypeError, match="uint16"):
            engine.infer(cells.astype(np.float32))
        with pytest.raises(ValueError, match="1 to 4"):
            engine.infer(np.zeros((5, *engine.input_shape), np.uint16))
        with pytest.raises(ValueError, match="shaped"):
            engine.infer(cells[:, :1])


@pytest.mark.parametrize("name", ["openvino", "torch"])
def test_submit_and_collect_pipeline_two_batches(bundle: Bundle, fresh_cells: np.ndarray, name: str) -> None:
    with loaded(bundle, name, "fp32") as engine:
        first, second = fresh_cells[:5], fresh_cells[5:16]
        expected = [engine.infer(first).probabilities.copy(), engine.infer(second).probabilities.copy()]
        engine.submit(first)
        with pytest.raises(RuntimeError, match="collect"):
            engine.infer(second)
        for turn in range(1, engine.depth):  # every buffer set in flight at once, alternating the two batches
            engine.submit((first, second)[turn % 2])
        with pytest.raises(RuntimeError, match="in flight"):
            engine.submit(first)
        for turn in range(engine.depth):  # oldest first; a set is reused only after its batch was collected
            out = engine.collect()
            assert len(out.dead_score) == (5, 11)[turn % 2]
            np.testing.assert_allclose(out.probabilities, expected[turn % 2], atol=1e-6)
        with pytest.raises(RuntimeError, match="without a submitted batch"):
            engine.collect()


def test_openvino_reports_each_completion_and_is_done_when_it_does(bundle: Bundle, fresh_cells: np.ndarray) -> None:
    """The service loop sleeps until the engine wakes it: every batch's end calls wake, on OpenVINO's thread, and
    done() is already true then (the callback runs before OpenVINO marks the request finished)."""
    import threading

    with loaded(bundle, "openvino", "fp32") as engine:
        expected = engine.infer(fresh_cells[:3]).probabilities.copy()
        woken = threading.Semaphore(0)
        seen_done = []

        def wake() -> None:
            seen_done.append(engine.done())
            woken.release()

        assert engine.notify(wake) and not loaded_torch_notifies(bundle)
        for _ in range(3):
            engine.submit(fresh_cells[:3])
            assert woken.acquire(timeout=10)
            assert engine.done()
            np.testing.assert_allclose(engine.collect().probabilities, expected, atol=1e-6)
        assert seen_done == [True, True, True]


def loaded_torch_notifies(bundle: Bundle) -> bool:
    """The torch engine computes in submit(): there is nothing to report, and it says so."""
    with loaded(bundle, "torch", "fp32") as engine:
        return engine.notify(lambda: None)


def test_openvino_caches_compiled_models_in_the_cache_not_the_bundle(tiny_bundle: Path, tmp_path: Path) -> None:
    from engines.cache import KEY_FILE

    bundle = load_bundle(shutil.copytree(tiny_bundle, tmp_path / "bundle"))
    before = sorted((path.relative_to(bundle.path), path.stat().st_mtime_ns) for path in bundle.path.rglob("*"))
    with engines.load(bundle, "openvino", "fp32", max_batch=8, cache_dir=tmp_path / "cache") as engine:
        described = engine.describe()
    (folder,) = (tmp_path / "cache" / "openvino").iterdir()
    assert any(folder.glob("*.blob")), "no compiled model was cached"
    cached = json.loads((folder / KEY_FILE).read_text())
    assert (cached["bundle_hash"], cached["precision"], cached["openvino"]) == (
        described["bundle_hash"], "fp32", described["openvino"])
    assert sorted((path.relative_to(bundle.path), path.stat().st_mtime_ns) for path in bundle.path.rglob("*")) == before


def test_bench_engines_writes_json_and_png(bundle: Bundle, tmp_path: Path) -> None:
    from flowsort.cli import main

    out = tmp_path / "bench"
    assert main(["bench", "engines", str(bundle.path), "--engines", "openvino", "--batch-sizes", "1,3",
                 "--seconds", "0.05", "--threads", "1", "-o", str(out)]) == 0
    report = json.loads((out / "engines.json").read_text())
    assert (out / "engines.png").stat().st_size > 0
    rows = report["results"]
    assert {row["engine"] for row in rows} == {"torch-eager", "openvino"}
    openvino_rows = [row for row in rows if row["engine"] == "openvino"]
    assert {row["batch"] for row in openvino_rows} == {1, 3}
    assert all("wrapper_overhead" in row and row["throughput_cells_per_s"] > 0 for row in openvino_rows)
