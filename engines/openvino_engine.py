"""OpenVINO on the CPU: the default engine of an instrument PC without an NVIDIA GPU.

Batches of 1 to 8 cells run on static-shape models compiled for their size,
larger ones on a single model with a dynamic batch up to ``max_batch``: when
batch sizes vary, as they do in a stream, a dynamic model re-prepares on each
change, which costs about as much as computing a few cells. Each buffer set
has a request per model whose input and output tensors wrap this engine's
preallocated numpy arrays (shared memory), so OpenVINO reads the cells and
writes the results in place; a request is re-bound only when its batch size
changes. ``start_async``/``wait`` release the GIL while the CPU computes.

The model's uint16 input is retyped float32 at load (exact: its only consumer
is the cast to float32) and the engine converts each batch while copying it
into its buffer. In bf16 the CPU plugin would otherwise convert the raw 12-bit
pixels straight to bf16, whose 8-bit mantissa rounds bright pixels by up to
16 counts before normalization; on the test model that raised the class
disagreement with f32 from 0.4% to 1.5%.

Precision: ``bf16`` where the CPU has native bf16 (AVX512-BF16 or AMX), else
``fp32``; ``int8`` runs the guarded NNCF model stored in the bundle
(:mod:`engines.int8`). Compiled models are cached in this machine's engine
cache (:mod:`engines.cache`), never in the bundle, so the second start skips
compilation; a cache OpenVINO fails on is dropped and the models compiled anew.
"""

from __future__ import annotations

import logging
import platform
from collections.abc import Callable
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import numpy as np

from engines import int8
from engines.base import DEFAULT_MAX_BATCH, Engine, OutputBuffers, Outputs
from engines.bundle import INPUT_NAME, OUTPUT_NAMES, Bundle
from engines.cache import cpu_identity, engine_cache
from engines.cpu import Threading, choose_threading, native_bf16
from flowsort.errors import UserError

PRECISIONS = ("auto", "fp32", "bf16", "int8")
# Batches up to this size run on static-shape models of their own: a dynamic-shape model pays ~0.3 ms
# (measured on a Zen 4) whenever the batch size changes, most of a small batch's compute.
STATIC_BATCHES = 8
X86 = {"x86_64", "amd64", "i386", "i686", "x86"}

log = logging.getLogger(__name__)


def missing() -> str | None:
    if find_spec("openvino") is None:
        return "engine 'openvino' needs the openvino package: pip install 'flowsort[cpu]'"
    return None


def precisions(bundle: Bundle) -> tuple[str, ...]:
    native_bf16 = has_native_bf16(import_openvino().Core())
    return ("fp32", *(("bf16",) if native_bf16 else ()), *(("int8",) if int8.approved_model(bundle) else ()))


def import_openvino() -> Any:
    try:
        import openvino
    except ImportError as exc:
        raise UserError("engine 'openvino' needs the openvino package: pip install 'flowsort[cpu]'") from exc
    return openvino


def is_x86() -> bool:
    return platform.machine().lower() in X86


def has_native_bf16(core: Any) -> bool:
    """OpenVINO lists BF16 among the CPU's capabilities only where it is native (AVX512-BF16, AMX); an
    ``ONEDNN_MAX_CPU_ISA`` cap below that turns it off (the plugin still lists it)."""
    return native_bf16("BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"))


def resolve_precision(requested: str, core: Any, bundle: Bundle) -> str:
    """``auto``: a guard-approved INT8 model when the bundle holds one, else bf16 where native, else fp32."""
    if requested not in PRECISIONS:
        raise UserError(f"engine 'openvino' has no precision {requested!r}: choose {', '.join(PRECISIONS)}")
    native_bf16 = has_native_bf16(core)
    if requested == "auto":
        if int8.approved_model(bundle) is not None:
            return "int8"
        return "bf16" if native_bf16 else "fp32"
    if requested == "bf16" and not native_bf16:
        raise UserError(
            "precision bf16 needs a CPU with native bf16 (AVX512-BF16 or AMX); "
            f"this one offers {', '.join(core.get_property('CPU', 'OPTIMIZATION_CAPABILITIES'))}: use fp32"
        )
    if requested == "int8" and int8.approved_model(bundle) is None:
        raise UserError(int8.unavailable_reason(bundle))
    return requested


def float_input(model: Any, ov: Any) -> None:
    """Retype the uint16 input float32, refusing a graph that reads the raw integers other than by a float cast."""
    parameter = model.input(INPUT_NAME).get_node()
    consumers = [target.get_node() for target in parameter.output(0).get_target_inputs()]
    if not all(node.get_type_name() == "Convert" and node.get_output_element_type(0) == ov.Type.f32 for node in consumers):
        raise UserError(f"the model's input {INPUT_NAME!r} is not only cast to float32, so it cannot be fed as float32")
    parameter.set_element_type(ov.Type.f32)
    model.validate_nodes_and_infer_types()


def batch_shapes(max_batch: int, cell: tuple[int, ...], ov: Any) -> list[Any]:
    """A static shape for each batch size up to ``STATIC_BATCHES``, then one dynamic shape up to ``max_batch``."""
    static = min(STATIC_BATCHES, max_batch)
    shapes = [ov.PartialShape([n, *cell]) for n in range(1, static + 1)]
    if max_batch > static:
        shapes.append(ov.PartialShape([ov.Dimension(static + 1, max_batch), *cell]))
    return shapes


def compile_config(precision: str, threading: Threading) -> dict[str, Any]:
    """The CPU plugin's settings: precision, and one thread per stream without pinning.

    Pinning would tie a stream to a core that the service's own threads (or the
    instrument's) may be using while another core idles.
    """
    return {
        # Layers INT8 leaves in float run in f32: they are few, and the dead score is sensitive.
        "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
        "PERFORMANCE_HINT": "LATENCY" if threading.streams == 1 else "THROUGHPUT",
        "NUM_STREAMS": threading.streams,
        "INFERENCE_NUM_THREADS": threading.threads,
        "ENABLE_CPU_PINNING": False,
    }


def compile_all(core: Any, model: Any, shapes: list[Any], config: dict[str, Any], cache: Path | None) -> list[Any]:
    """``model`` compiled for each of ``shapes``, caching the compiled blobs in ``cache`` (None: no cache)."""
    core.set_property({"CACHE_DIR": str(cache) if cache else ""})
    compiled = []
    for shape in shapes:
        model.reshape({INPUT_NAME: shape})
        compiled.append(core.compile_model(model, "CPU", config))
    return compiled


class OpenVINOEngine(Engine):
    name = "openvino"

    def __init__(
        self,
        bundle: Bundle,
        precision: str = "auto",
        max_batch: int = DEFAULT_MAX_BATCH,
        threads: int | None = None,
        streams: int | None = None,
        model_path: Path | None = None,
        cache_dir: str | Path | None = None,
    ) -> None:
        """``threads``/``streams``: see :func:`engines.cpu.choose_threading` (None: chosen for this machine).
        ``model_path`` overrides the model to run (the INT8 guard evaluates a candidate with it);
        ``cache_dir`` is the engine cache root (:func:`engines.cache.cache_root`)."""
        ov = import_openvino()
        core = ov.Core()
        resolved = precision if model_path is not None else resolve_precision(precision, core, bundle)
        self.threading = choose_threading(streams or 0, threads or 0)
        super().__init__(bundle, resolved, "CPU", max_batch, parallel=self.threading.streams)
        # A folder per precision: OpenVINO names a cached blob after the model alone, so they would evict each other.
        key = {"bundle_hash": bundle.content_hash, "precision": resolved, "openvino": ov.get_version(), **cpu_identity()}
        cache = engine_cache(self.name, key, cache_dir)
        if model_path is None:
            model_path = int8.approved_model(bundle) if resolved == "int8" else bundle.onnx_path
        model = core.read_model(str(model_path))
        float_input(model, ov)
        config = compile_config(resolved, self.threading)
        try:
            self._compiled = compile_all(core, model, batch_shapes(max_batch, self.input_shape, ov), config, cache)
        except RuntimeError as exc:
            if cache is None:
                raise
            log.warning("OpenVINO failed on the engine cache %s (%s): compiling without a cache", cache, exc)
            self._compiled = compile_all(core, model, batch_shapes(max_batch, self.input_shape, ov), config, None)
        self._tensor = ov.Tensor
        depth = self.depth
        self._inputs = [np.empty((max_batch, *self.input_shape), np.float32) for _ in range(depth)]
        self._buffers = [OutputBuffers(max_batch, self.num_classes, self.embedding_dim) for _ in range(depth)]
        # Per buffer set: a request on each compiled model, and the batch size it is bound to.
        self._requests = [[compiled.create_infer_request() for compiled in self._compiled] for _ in range(depth)]
        self._bound = [[0] * len(self._compiled) for _ in range(depth)]
        self._running: list[Any] = [None] * depth
        # Set by the completion callback (see notify): the request of that slot has computed its batch.
        self._ended = [False] * depth
        self._wake: Callable[[], None] | None = None

    def compiled_for(self, n: int) -> Any:
        """The compiled model that runs batches of ``n`` cells."""
        return self._compiled[min(n, len(self._compiled)) - 1]

    def describe(self) -> dict[str, Any]:
        ov = import_openvino()
        compiled = self._compiled[0]
        return {**super().describe(), "streams": compiled.get_property("NUM_STREAMS"),
                "threads": compiled.get_property("INFERENCE_NUM_THREADS"), "threading": str(self.threading),
                "openvino": ov.get_version()}

    def _start(self, slot: int, cells: np.ndarray, n: int) -> None:
        np.copyto(self._inputs[slot][:n], cells)  # uint16 -> float32, exact
        model = min(n, len(self._compiled)) - 1
        request = self._requests[slot][model]
        if self._bound[slot][model] != n:
            self._bind(request, slot, n)
            self._bound[slot][model] = n
        self._ended[slot] = False
        request.start_async()
        self._running[slot] = request

    def notify(self, wake: Callable[[], None]) -> bool:
        """A completion callback on every request. OpenVINO calls it on its stream thread (taking the GIL for a
        moment) just before it marks the request finished, so the callback records the slot itself: ``done``
        is then true at once and ``collect`` returns within microseconds."""
        self._wake = wake
        for slot, requests in enumerate(self._requests):
            for request in requests:
                request.set_callback(self._completed, slot)
        return True

    def _completed(self, slot: int) -> None:
        self._ended[slot] = True
        if self._wake is not None:
            self._wake()

    def done(self) -> bool:
        if not self._pending:
            return True
        slot = self._pending[0][0]
        return self._ended[slot] or self._running[slot].wait_for(0)

    def _finish(self, slot: int, n: int) -> Outputs:
        request = self._running[slot]
        request.wait()
        self.last_run_ns = int(request.latency * 1e6)  # OpenVINO's own clock: start_async to completion, in ms
        return self._buffers[slot].first(n)

    def _bind(self, request: Any, slot: int, n: int) -> None:
        """Point ``request`` at the first ``n`` rows of buffer set ``slot``."""
        request.set_input_tensor(self._tensor(self._inputs[slot][:n], shared_memory=True))
        for name, array in zip(OUTPUT_NAMES, self._buffers[slot].first(n)):
            request.set_tensor(name, self._tensor(array, shared_memory=True))
