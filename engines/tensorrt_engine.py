"""TensorRT on an NVIDIA GPU: TensorRT 10's tensor API with pycuda buffers and streams.

TensorRT has no uint16 tensor type, so the engine is built from a copy of the
bundle's ONNX whose input is float32 (the graph's first node already casts the
input to float32, which becomes a no-op) and the engine converts each batch
uint16 -> float32 into its page-locked input buffer with one numpy call. The
conversion is exact for every uint16 value; float16 would halve the upload but
rounds values above 2048, and the 12-bit camera reaches 4095.

Plans are built once with a dynamic-batch optimization profile (1..max_batch,
tuned for max_batch: batches fill up when cells arrive fast) and cached in the
engine cache (:mod:`engines.cache`, never the bundle) in a folder per GPU model,
compute capability and TensorRT version, named by bundle hash, precision and
max batch, so a change in any of them builds a new plan; a timing cache per GPU
and TensorRT version makes rebuilds quick. Where the cache is unusable, plans
are built in a private folder removed at close, and a cached plan TensorRT
cannot load is built anew. fp16 and int8 keep the head (everything computed
from the embedding: classifier, softmax, dead-cell distance) in f32. INT8
calibrates on the cells ``flowsort quantize`` stored in the bundle, caches the
calibration, and must pass the same accuracy guard as OpenVINO's INT8
(:mod:`engines.int8`). It uses
the entropy calibrator (implicit quantization), which later TensorRT 10
releases deprecate in favour of Q/DQ models: it still builds, with a warning.

Two buffer sets, a copy stream and a compute stream: the upload of the next
batch runs while the current one computes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import numpy as np

from engines import int8
from engines.base import DEFAULT_MAX_BATCH, DEPTH, Engine, OutputBuffers, Outputs
from engines.cache import engine_cache
from engines.bundle import INPUT_NAME, OUTPUT_NAMES, Bundle
from flowsort.errors import UserError

PRECISIONS = ("auto", "fp32", "fp16", "int8")
INSTALL = "engine 'tensorrt' needs the tensorrt and pycuda packages and an NVIDIA GPU: pip install 'flowsort[gpu]'"
INPUT_DTYPE = np.float32
CALIBRATION_BATCH = 32
WORKSPACE_BYTES = 1 << 30

log = logging.getLogger(__name__)


def missing() -> str | None:
    """Why this machine cannot run TensorRT, or None."""
    absent = [package for package in ("tensorrt", "pycuda") if find_spec(package) is None]
    if absent:
        return f"{INSTALL} ({' and '.join(absent)} missing)"
    try:
        import pycuda.driver as cuda

        cuda.init()
        count = cuda.Device.count()
    except Exception as exc:  # the driver raises its own error types when there is no GPU or driver
        return f"engine 'tensorrt' found no usable NVIDIA GPU: {exc}"
    return None if count else "engine 'tensorrt' needs an NVIDIA GPU and the CUDA driver sees none"


def precisions(bundle: Bundle) -> tuple[str, ...]:
    calibrated = int8.calibration_file(bundle).is_file()
    return ("fp32", "fp16", "int8") if calibrated else ("fp32", "fp16")


@dataclass(frozen=True)
class PlanKey:
    """Everything a serialized plan depends on."""

    gpu: str
    compute_capability: str
    tensorrt: str
    bundle_hash: str
    precision: str
    max_batch: int

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]

    def plan_name(self) -> str:
        return f"{self.precision}-b{self.max_batch}-{self.digest()}.plan"

    def timing_cache_name(self) -> str:
        device = hashlib.sha256(f"{self.gpu}|{self.compute_capability}|{self.tensorrt}".encode()).hexdigest()[:16]
        return f"timing-{device}.cache"

    def calibration_cache_name(self) -> str:
        calibration = hashlib.sha256(f"{self.tensorrt}|{self.bundle_hash}".encode()).hexdigest()[:16]
        return f"calibration-{calibration}.cache"


def float_input_onnx(source: Path, target: Path) -> None:
    """Write ``source`` with its uint16 input retyped float32: TensorRT has no uint16.

    Exact only because every consumer of the input is a Cast to float, so the
    values reach the network unchanged; anything else is refused.
    """
    try:
        import onnx
    except ImportError as exc:
        raise UserError("engine 'tensorrt' needs the onnx package to adapt the bundle's model: pip install onnx") from exc
    model = onnx.load(str(source))
    graph_input = next(value for value in model.graph.input if value.name == INPUT_NAME)
    consumers = [node for node in model.graph.node if INPUT_NAME in node.input]
    float_casts = [
        node
        for node in consumers
        if node.op_type == "Cast" and any(a.name == "to" and a.i == onnx.TensorProto.FLOAT for a in node.attribute)
    ]
    if not consumers or float_casts != consumers:
        raise UserError(
            f"{source}: the input {INPUT_NAME!r} is not only cast to float32, so it cannot be retyped for TensorRT"
        )
    graph_input.type.tensor_type.elem_type = onnx.TensorProto.FLOAT
    target.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(target))


def keep_head_in_fp32(network: Any, trt: Any) -> None:
    """Pin every layer computed from the embedding to f32 (classifier, softmax, dead-cell distance)."""
    head = {"embedding"}
    for index in range(network.num_layers):
        layer = network.get_layer(index)
        inputs = (layer.get_input(i) for i in range(layer.num_inputs))
        if not any(tensor is not None and tensor.name in head for tensor in inputs):
            continue
        layer.precision = trt.float32
        for i in range(layer.num_outputs):
            output = layer.get_output(i)
            head.add(output.name)
            if output.dtype in (trt.float32, trt.float16):
                layer.set_output_type(i, trt.float32)


def import_tensorrt() -> tuple[Any, Any]:
    reason = missing()
    if reason:
        raise UserError(reason)
    import pycuda.driver as cuda
    import tensorrt as trt

    if int(trt.__version__.split(".")[0]) < 10:
        raise UserError(
            f"engine 'tensorrt' needs TensorRT 10 or newer, found {trt.__version__}: pip install 'flowsort[gpu]'"
        )
    return trt, cuda


def make_calibrator(trt: Any, cuda: Any, cells: np.ndarray, cache: Path) -> Any:
    """An entropy calibrator feeding ``cells`` in float32, reading and writing ``cache``."""
    batch = min(CALIBRATION_BATCH, len(cells))
    usable = len(cells) // batch * batch  # every calibration batch must have the declared size

    class Calibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self) -> None:
            super().__init__()
            self.starts = iter(range(0, usable, batch))
            self.device = cuda.mem_alloc(batch * cells[0].size * np.dtype(INPUT_DTYPE).itemsize)

        def get_batch_size(self) -> int:
            return batch

        def get_batch(self, names: list[str]) -> list[int] | None:
            start = next(self.starts, None)
            if start is None:
                return None
            cuda.memcpy_htod(self.device, np.ascontiguousarray(cells[start : start + batch], dtype=INPUT_DTYPE))
            return [int(self.device)]

        def read_calibration_cache(self) -> bytes | None:
            return cache.read_bytes() if cache.is_file() else None

        def write_calibration_cache(self, data: Any) -> None:
            cache.write_bytes(bytes(data))

    return Calibrator()


def build_plan(bundle: Bundle, key: PlanKey, directory: Path, trt: Any, cuda: Any) -> bytes:
    """Build and serialize an engine for ``key`` from the bundle's ONNX."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10 networks are always explicit-batch
    parser = trt.OnnxParser(network, logger)
    onnx_path = directory / f"model-float-input-{key.bundle_hash[:16]}.onnx"
    if not onnx_path.is_file():
        float_input_onnx(bundle.onnx_path, onnx_path)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise UserError(f"TensorRT cannot parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    cell = (len(bundle.channels), bundle.input_size, bundle.input_size)
    profile = builder.create_optimization_profile()
    profile.set_shape(INPUT_NAME, (1, *cell), (key.max_batch, *cell), (key.max_batch, *cell))
    config.add_optimization_profile(profile)
    timing_path = directory / key.timing_cache_name()
    timing = config.create_timing_cache(timing_path.read_bytes() if timing_path.is_file() else b"")
    config.set_timing_cache(timing, ignore_mismatch=False)
    if key.precision in ("fp16", "int8"):
        config.set_flag(trt.BuilderFlag.FP16)
        config.set_flag(trt.BuilderFlag.PREFER_PRECISION_CONSTRAINTS)
        keep_head_in_fp32(network, trt)
    if key.precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)
        config.int8_calibrator = make_calibrator(
            trt, cuda, int8.load_calibration(bundle), directory / key.calibration_cache_name()
        )
        config.set_calibration_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise UserError(
            f"TensorRT could not build a {key.precision} engine for {bundle.path} on {key.gpu} (see its log above)"
        )
    timing_path.write_bytes(bytes(config.get_timing_cache().serialize()))
    return bytes(plan)


class TensorRTEngine(Engine):
    name = "tensorrt"

    def __init__(
        self,
        bundle: Bundle,
        precision: str = "auto",
        max_batch: int = DEFAULT_MAX_BATCH,
        device_id: int = 0,
        cache_dir: str | Path | None = None,
    ) -> None:
        """``cache_dir`` is the engine cache root (:func:`engines.cache.cache_root`)."""
        trt, cuda = import_tensorrt()
        if precision not in PRECISIONS:
            raise UserError(f"engine 'tensorrt' has no precision {precision!r}: choose {', '.join(PRECISIONS)}")
        resolved = "fp16" if precision == "auto" else precision
        gpu = cuda.Device(device_id)
        super().__init__(bundle, resolved, gpu.name(), max_batch)
        self._cuda = cuda
        self._closed = False
        # The primary context is the one the TensorRT runtime uses, so pycuda and TensorRT share memory and streams.
        self._context = gpu.retain_primary_context()
        major, minor = gpu.compute_capability()
        self.key = PlanKey(gpu.name(), f"{major}.{minor}", trt.__version__, bundle.content_hash, resolved, max_batch)
        self._cache_root = cache_dir
        device = {"gpu": self.key.gpu, "compute_capability": self.key.compute_capability, "tensorrt": trt.__version__}
        directory = engine_cache(self.name, device, cache_dir)
        self._private = directory is None
        self._directory = directory or Path(tempfile.mkdtemp(prefix="flowsort-tensorrt-"))
        guard_path = self._directory / self.key.plan_name().replace(".plan", ".guard.json")
        with self._current():
            if resolved == "int8":
                refuse_rejected(guard_path)
            self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
            self._engine = self._runtime.deserialize_cuda_engine(self._plan(trt, cuda))
            if self._engine is None:  # a corrupt cached plan: build it anew
                log.warning("TensorRT could not load the cached plan %s: building it anew", self.key.plan_name())
                (self._directory / self.key.plan_name()).unlink(missing_ok=True)
                self._engine = self._runtime.deserialize_cuda_engine(self._plan(trt, cuda))
            self._execution = self._engine.create_execution_context()
            for name in OUTPUT_NAMES:
                dtype = self._engine.get_tensor_dtype(name)
                if dtype != trt.float32:
                    raise UserError(f"the TensorRT plan's output {name!r} is {dtype}, not float32")
            self._host_inputs = [cuda.pagelocked_empty((max_batch, *self.input_shape), INPUT_DTYPE) for _ in range(DEPTH)]
            self._device_inputs = [cuda.mem_alloc(array.nbytes) for array in self._host_inputs]
            self._buffers = [
                OutputBuffers(max_batch, self.num_classes, self.embedding_dim, cuda.pagelocked_empty) for _ in range(DEPTH)
            ]
            self._device_outputs = [[cuda.mem_alloc(a.nbytes) for a in buffers.arrays] for buffers in self._buffers]
            self._copy_stream, self._compute_stream = cuda.Stream(), cuda.Stream()
            self._uploaded = [cuda.Event() for _ in range(DEPTH)]
            self._done = [cuda.Event() for _ in range(DEPTH)]
        if resolved == "int8" and not guard_path.is_file():
            self._guard(guard_path)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "compute_capability": self.key.compute_capability, "tensorrt": self.key.tensorrt}

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with self._current():
            for allocation in [*self._device_inputs, *(a for outputs in self._device_outputs for a in outputs)]:
                allocation.free()
            del self._execution, self._engine
        self._context.detach()
        if self._private:
            shutil.rmtree(self._directory, ignore_errors=True)

    @contextmanager
    def _current(self) -> Iterator[None]:
        """Make the GPU's context current on the calling thread (the streamer may call from another one)."""
        self._context.push()
        try:
            yield
        finally:
            self._cuda.Context.pop()

    def _plan(self, trt: Any, cuda: Any) -> bytes:
        path = self._directory / self.key.plan_name()
        if path.is_file():
            return path.read_bytes()
        plan = build_plan(self.bundle, self.key, self._directory, trt, cuda)
        path.write_bytes(plan)
        path.with_suffix(".json").write_text(json.dumps(asdict(self.key), indent=2) + "\n")
        return plan

    def _guard(self, guard_path: Path) -> None:
        """Judge a new INT8 plan against f32 on the validation cells; delete it if it fails."""
        reference = TensorRTEngine(self.bundle, "fp32", self.max_batch, cache_dir=self._cache_root)
        try:
            report = int8.run_guard(self.bundle, reference, self)
        finally:
            reference.close()
        guard_path.write_text(json.dumps(report.to_json(), indent=2) + "\n")
        if not report.passed:
            (self._directory / self.key.plan_name()).unlink(missing_ok=True)
            self.close()
            raise UserError(f"{report.summary()}: use fp16")

    def _start(self, slot: int, cells: np.ndarray, n: int) -> None:
        cuda = self._cuda
        host = self._host_inputs[slot][:n]
        np.copyto(host, cells)  # uint16 -> float32: exact, one vectorized pass into page-locked memory
        with self._current():
            cuda.memcpy_htod_async(self._device_inputs[slot], host, self._copy_stream)
            self._uploaded[slot].record(self._copy_stream)
            self._compute_stream.wait_for_event(self._uploaded[slot])
            execution = self._execution
            execution.set_input_shape(INPUT_NAME, (n, *self.input_shape))
            execution.set_tensor_address(INPUT_NAME, int(self._device_inputs[slot]))
            for name, device in zip(OUTPUT_NAMES, self._device_outputs[slot]):
                execution.set_tensor_address(name, int(device))
            if not execution.execute_async_v3(self._compute_stream.handle):
                raise RuntimeError(f"TensorRT failed to enqueue a batch of {n} cells")
            for host_output, device in zip(self._buffers[slot].first(n), self._device_outputs[slot]):
                cuda.memcpy_dtoh_async(host_output, device, self._compute_stream)
            self._done[slot].record(self._compute_stream)

    def _finish(self, slot: int, n: int) -> Outputs:
        with self._current():
            self._done[slot].synchronize()
        return self._buffers[slot].first(n)


def refuse_rejected(guard_path: Path) -> None:
    """Do not rebuild an INT8 plan the guard already rejected on this GPU."""
    if not guard_path.is_file():
        return
    report = json.loads(guard_path.read_text())
    if not report["passed"]:
        raise UserError(
            f"the INT8 TensorRT plan for this GPU was rejected by the accuracy guard (class agreement "
            f"{report['agreement']:.2%}, accuracy drop {100 * report['accuracy_drop']:.2f} points): use fp16"
        )
