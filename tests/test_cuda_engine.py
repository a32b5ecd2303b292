"""The cuda engine's bookkeeping, run on the CPU: buckets and padding, cache keys, buffer sizes, choosing ``auto``.

Its parity with the torch f32 reference (on the CPU device here, on CUDA where
a GPU is) is in tests/test_engines.py with every other engine's.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

import engines
from engines.bundle import Bundle, load_bundle
from engines.cuda_engine import (
    CudaEngine,
    PackageKey,
    bucket_for,
    buffer_bytes,
    check_buckets,
    default_buckets,
    fold_batch_norms,
)
from flowsort.errors import UserError


@pytest.fixture(scope="module")
def bundle(quick_bundle: Path) -> Bundle:
    return load_bundle(quick_bundle)


def test_default_buckets_are_powers_of_two_and_the_max() -> None:
    assert default_buckets(1) == (1,)
    assert default_buckets(64) == (1, 2, 4, 8, 16, 32, 64)
    assert default_buckets(100) == (1, 2, 4, 8, 16, 32, 64, 100)
    assert default_buckets(4096)[-3:] == (1024, 2048, 4096)


def test_a_batch_runs_on_the_smallest_bucket_that_holds_it() -> None:
    buckets = (1, 2, 4, 8, 64)
    assert [bucket_for(buckets, n) for n in (1, 2, 3, 4, 5, 8, 9, 63, 64)] == [1, 2, 4, 4, 8, 8, 64, 64, 64]
    with pytest.raises(ValueError, match="larger than the largest bucket 64"):
        bucket_for(buckets, 65)


def test_buckets_must_reach_max_batch() -> None:
    assert check_buckets([8, 1, 8, 32], 32) == (1, 8, 32)
    assert check_buckets(None, 16) == default_buckets(16)
    with pytest.raises(UserError, match="largest bucket must be max_batch 64"):
        check_buckets([1, 2, 32], 64)
    with pytest.raises(UserError, match="must be positive"):
        check_buckets([0, 64], 64)


def test_package_key_changes_with_everything_a_package_depends_on() -> None:
    key = PackageKey("NVIDIA H200", "9.0", "2.11.0+cu130", "ab" * 32, "fp16", "aoti", (1, 2, 4, 4096))
    digests = {key.digest()}
    for change in ({"gpu": "NVIDIA H100 80GB HBM3"}, {"compute_capability": "10.0"}, {"torch": "2.12.0"},
                   {"bundle_hash": "cd" * 32}, {"precision": "bf16"}, {"buckets": (1, 2, 4, 2048)}):
        digests.add(replace(key, **change).digest())
    assert len(digests) == 7
    assert key.digest() == PackageKey(*key.__dict__.values()).digest()  # stable across processes: no salted hash
    assert key.package_name().startswith("fp16-b4096-") and key.package_name().endswith(".pt2")


def test_packages_are_cached_outside_the_bundle(bundle: Bundle, tmp_path: Path) -> None:
    """Compiled packages go to the engine cache, keyed; an unusable cache gives a private folder, gone at close."""
    with CudaEngine(bundle, "fp32", max_batch=4, device="cpu", cache_dir=tmp_path / "cache") as engine:
        folder = engine._package_folder()
        assert folder.parent == tmp_path / "cache" / "cuda" and not folder.is_relative_to(bundle.path)
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the cache root should be")
    with CudaEngine(bundle, "fp32", max_batch=4, device="cpu", cache_dir=blocked) as engine:
        private = engine._package_folder()
        assert private.is_dir() and not private.is_relative_to(blocked)
    assert not private.exists()


def test_buffer_sizes_at_the_largest_batch() -> None:
    sizes = buffer_bytes(4096, (2, 40, 40), num_classes=7, embedding_dim=336)
    words = 4096 * 2 * 40 * 40 * 2  # raw 16-bit words: half of float32
    assert sizes == {"pinned_input": 2 * words, "device_staging": 2 * words, "device_static_input": words,
                     "pinned_output": 2 * 4096 * 4 * (7 + 336 + 1)}


def test_every_bucket_is_ready_and_padding_leaves_results_unchanged(bundle: Bundle) -> None:
    from engines.deployed_model import load_deployed
    from trainer.predictions import predict

    cells, _ = bundle.validation_cells()
    cells = np.ascontiguousarray(np.resize(cells, (16, *cells.shape[1:])))
    reference = predict(load_deployed(bundle), cells)
    with CudaEngine(bundle, "fp32", max_batch=16, buckets=(1, 4, 16), device="cpu") as engine:
        assert engine.captured == (1, 4, 16)
        engine.infer(np.full_like(cells, 4095))  # the rows a padded batch does not fill hold other cells
        for n in (3, 1, 16, 5):
            got = engine.infer(cells[:n])
            assert got.probabilities.shape == (n, engine.num_classes)
            np.testing.assert_allclose(got.probabilities, reference.probabilities[:n], atol=1e-5)
            np.testing.assert_allclose(got.dead_score, reference.dead_score[:n], rtol=1e-4)
        described = engine.describe()
        assert described["buckets"] == [1, 4, 16]
        sizes = described["buffer_bytes"]  # the formula, against what the engine allocated
        assert sizes["pinned_input"] == sum(tensor.nbytes for tensor in engine._host_words)
        assert sizes["device_static_input"] == engine._static_input.nbytes
        assert sizes["pinned_output"] == sum(t.nbytes for tensors in engine._host_outputs for t in tensors)
    assert engine.captured == ()  # closed: nothing left to replay


def test_uint16_words_are_widened_exactly(bundle: Bundle) -> None:
    """Values above 32767 are negative as int16: the engine must still see them as uint16."""
    from engines.deployed_model import load_deployed
    from trainer.predictions import predict

    size = bundle.input_size
    cells = np.stack([np.full((len(bundle.channels), size, size), value, np.uint16) for value in (0, 4095, 40000, 65535)])
    reference = predict(load_deployed(bundle), cells)
    with CudaEngine(bundle, "fp32", max_batch=4, device="cpu") as engine:
        got = engine.infer(cells)
        np.testing.assert_allclose(got.probabilities, reference.probabilities, atol=1e-4)


def test_folded_batch_norms_compute_the_same(bundle: Bundle) -> None:
    import torch

    from engines.deployed_model import load_deployed

    module = load_deployed(bundle)
    x = torch.rand(4, len(bundle.channels), bundle.input_size, bundle.input_size) * 2000
    with torch.no_grad():
        before = module(x)
        folded = fold_batch_norms(module.net)
        after = module(x)
    assert folded == 1 + 2 * 10 + 3  # the stem, two per normal module, one per reduction module
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in module.modules())
    torch.testing.assert_close(after[0], before[0], atol=1e-5, rtol=1e-4)


def test_the_cpu_device_refuses_what_needs_a_gpu(bundle: Bundle) -> None:
    with pytest.raises(UserError, match="fp16 on a GPU only"):
        CudaEngine(bundle, "fp16", max_batch=4, device="cpu")
    with pytest.raises(UserError, match="no compile mode 'tensorrt'"):
        CudaEngine(bundle, "fp32", max_batch=4, compile="tensorrt", device="cpu")


def test_load_without_a_gpu_says_why(bundle: Bundle) -> None:
    reason = engines.available()["cuda"]
    if reason is None:
        pytest.skip("a CUDA GPU is here")
    with pytest.raises(UserError, match="engine 'cuda' needs"):
        engines.load(bundle, "cuda")


@pytest.mark.parametrize(("runnable", "expected"), [
    ({"tensorrt", "cuda", "openvino", "torch"}, "tensorrt"),
    ({"cuda", "openvino", "torch"}, "cuda"),
    ({"openvino", "torch"}, "openvino"),
    ({"torch"}, "torch"),
])
def test_auto_prefers_tensorrt_then_cuda_then_the_cpu_engines(
    monkeypatch: pytest.MonkeyPatch, runnable: set[str], expected: str
) -> None:
    reasons = {name: None if name in runnable else f"{name} cannot run" for name in engines.ENGINES}
    monkeypatch.setattr(engines, "available", lambda: reasons)
    monkeypatch.setattr(engines._module("openvino"), "is_x86", lambda: True)
    assert engines.pick("auto") == expected
