"""The compiled GPU engine without TensorRT: torch on CUDA, made fast.

Per batch the host does one thing: copy the raw uint16 cells into a
page-locked buffer. Everything else runs on the GPU, and all of it except the
uploads is replayed from CUDA graphs:

* **Upload on a copy stream.** Cells go up as their raw 16-bit words (half the
  bytes of float32) into a staging buffer per slot, on a stream of their own,
  so the upload of batch k+1 runs while batch k computes.
* **Buckets.** A CUDA graph is captured at load for each batch size in
  ``buckets`` (default 1, 2, 4, ... and ``max_batch``: the streamer's batch
  sizes); a batch runs on the smallest bucket that holds it, its unused rows
  left as they were (padding is cheap on a GPU; a capture on the hot path
  would stall the stream).
* **Preprocessing in the graph.** The 16-bit words are widened to float32,
  normalized with the bundle's mean and std (the deployed module's own
  ``normalize``), then cast to fp16 or bf16 in channels-last layout for the
  body. The head (classifier, softmax, dead-cell distance) stays f32, as in
  every engine: the dead score is a small difference of large numbers.
* **Folded BatchNorm.** Every conv-BN pair becomes one convolution.
* **Outputs** are copied back asynchronously into page-locked output buffers;
  ``collect`` waits on the slot's event.

``compile`` chooses what the graphs replay: ``none`` (the eager module),
``inductor`` (``torch.compile`` with mode ``max-autotune-no-cudagraphs``; its
kernels are captured here) or ``aoti`` (an AOTInductor package compiled once
with a dynamic batch axis and cached in the engine cache (:mod:`engines.cache`)
keyed by GPU, compute capability, torch version, bundle hash, precision,
compile options and buckets; bundles stay read-only, and an unusable cache
means a private folder for this engine's life). The default is ``none`` or the
``FLOWSORT_CUDA_COMPILE`` environment variable.

On the CPU (``device="cpu"``: tests and the dry run of the GPU proof) the same
class runs the same module (eager or compiled) on the same buckets, without
graphs or streams, so the bookkeeping and the numbers are tested without a GPU.

torch is imported only when the engine is built: ``import engines`` stays
free of it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from bisect import bisect_left
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import numpy as np

from engines.base import DEFAULT_MAX_BATCH, DEPTH, Engine, OutputBuffers, Outputs
from engines.bundle import Bundle
from engines.cache import engine_cache
from engines.torch_engine import reduced_precision_net
from flowsort.errors import UserError

PRECISIONS = ("auto", "fp16", "bf16", "fp32")
COMPILE_MODES = ("none", "inductor", "aoti")
COMPILE_ENV = "FLOWSORT_CUDA_COMPILE"
INDUCTOR_MODE = "max-autotune-no-cudagraphs"
CAPTURE_WARMUP = 3
DRIVER_PATHS = ("/proc/driver/nvidia", "/dev/nvidiactl")

log = logging.getLogger(__name__)


def missing() -> str | None:
    """Why this machine cannot run the engine on a GPU, or None; torch is imported only where a driver is."""
    if find_spec("torch") is None:
        return "engine 'cuda' needs torch: pip install 'flowsort[train]'"
    if not any(Path(path).exists() for path in DRIVER_PATHS) and shutil.which("nvidia-smi") is None:
        return "engine 'cuda' needs an NVIDIA GPU and finds no NVIDIA driver"
    import torch

    if not torch.cuda.is_available():
        return f"engine 'cuda' needs a CUDA GPU and torch {torch.__version__} sees none"
    return None


def precisions(bundle: Bundle) -> tuple[str, ...]:
    import torch

    return ("fp16", "bf16", "fp32") if torch.cuda.is_bf16_supported() else ("fp16", "fp32")


def resolve_precision(requested: str, device: str) -> str:
    """fp16 on a GPU by default, fp32 on the CPU; fp16 needs a GPU."""
    if requested not in PRECISIONS:
        raise UserError(f"engine 'cuda' has no precision {requested!r}: choose {', '.join(PRECISIONS)}")
    if requested == "auto":
        return "fp16" if device == "cuda" else "fp32"
    if requested == "fp16" and device != "cuda":
        raise UserError("engine 'cuda' runs fp16 on a GPU only: use bf16 or fp32 on the CPU")
    return requested


def resolve_compile(requested: str | None) -> str:
    mode = requested or os.environ.get(COMPILE_ENV) or "none"
    if mode not in COMPILE_MODES:
        raise UserError(f"engine 'cuda' has no compile mode {mode!r} (compile option or ${COMPILE_ENV}): "
                        f"choose {', '.join(COMPILE_MODES)}")
    return mode


def default_buckets(max_batch: int) -> tuple[int, ...]:
    """Powers of two below ``max_batch``, and ``max_batch``: the streamer's default batch sizes."""
    sizes = {1 << k for k in range(max_batch.bit_length()) if 1 << k < max_batch}
    return tuple(sorted(sizes | {max_batch}))


def check_buckets(buckets: Sequence[int] | None, max_batch: int) -> tuple[int, ...]:
    """Sorted bucket sizes, the largest ``max_batch``: every batch 1..max_batch has one that holds it."""
    if buckets is None:
        return default_buckets(max_batch)
    sizes = tuple(sorted({int(size) for size in buckets}))
    if not sizes or sizes[0] < 1:
        raise UserError(f"engine 'cuda': bucket sizes must be positive, got {list(buckets)}")
    if sizes[-1] != max_batch:
        raise UserError(f"engine 'cuda': the largest bucket must be max_batch {max_batch}, got {sizes[-1]}")
    return sizes


def bucket_for(buckets: tuple[int, ...], n: int) -> int:
    """The smallest bucket holding ``n`` cells."""
    index = bisect_left(buckets, n)
    if index == len(buckets):
        raise ValueError(f"a batch of {n} cells is larger than the largest bucket {buckets[-1]}")
    return buckets[index]


@dataclass(frozen=True)
class PackageKey:
    """Everything a compiled AOTInductor package depends on."""

    gpu: str
    compute_capability: str
    torch: str
    bundle_hash: str
    precision: str
    compile: str
    buckets: tuple[int, ...]

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]

    def package_name(self) -> str:
        return f"{self.precision}-b{self.buckets[-1]}-{self.digest()}.pt2"


def buffer_bytes(max_batch: int, input_shape: tuple[int, ...], num_classes: int, embedding_dim: int) -> dict[str, int]:
    """Bytes of each buffer family the engine allocates (all ``DEPTH`` slots): what a max batch costs in memory."""
    cell_words = int(np.prod(input_shape))
    per_cell_outputs = 4 * (num_classes + embedding_dim + 1)
    return {
        "pinned_input": DEPTH * max_batch * cell_words * 2,
        "device_staging": DEPTH * max_batch * cell_words * 2,
        "device_static_input": max_batch * cell_words * 2,
        "pinned_output": DEPTH * max_batch * per_cell_outputs,
    }


def fold_batch_norms(net: Any) -> int:
    """Fold every conv-BN pair of DeepFlow (eval mode) into the convolution; returns how many were folded."""
    from torch import nn
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    folded = 0
    for module in net.modules():
        if isinstance(module, nn.Sequential) and len(module) == 3 and isinstance(module[1], nn.BatchNorm2d):
            module[0] = fuse_conv_bn_eval(module[0].eval(), module[1].eval())
            module[1] = nn.Identity()
            folded += 1
    return folded


def device_model(deployed: Any, precision: str) -> Any:
    """Raw 16-bit words [N, C, S, S] (int16 holding uint16 bits) in, the deployed module's three outputs out.

    The widening is exact for every uint16 value (``& 0xFFFF`` undoes the
    sign of int16); the rest is the deployed module itself, BN folded, its
    body at ``precision``.
    """
    import torch
    from torch import nn

    fold_batch_norms(deployed.net)
    if precision != "fp32":
        deployed.net = reduced_precision_net(deployed.net, {"fp16": torch.float16, "bf16": torch.bfloat16}[precision])
    else:
        deployed.net = deployed.net.to(memory_format=torch.channels_last)

    class FromWords(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.deployed = deployed

        def forward(self, words: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            cells = words.to(torch.int32).bitwise_and(0xFFFF).to(torch.float32)
            return tuple(self.deployed(cells))

    return FromWords().eval()


def aoti_package(model: Any, example: Any, key: PackageKey, directory: Path) -> Path:
    """The AOTInductor package for ``key``: read from ``directory``, else exported, compiled and written there."""
    import torch

    path = directory / key.package_name()
    if path.is_file():
        return path
    directory.mkdir(parents=True, exist_ok=True)
    batch = torch.export.Dim("batch", min=1, max=key.buckets[-1])
    with torch.inference_mode(False), torch.no_grad():
        program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    partial = path.with_suffix(".partial.pt2")
    torch._inductor.aoti_compile_and_package(program, package_path=str(partial))
    partial.replace(path)  # whole or absent: a killed build leaves no half package behind
    path.with_suffix(".json").write_text(json.dumps(asdict(key), indent=2) + "\n")
    return path


class CudaEngine(Engine):
    name = "cuda"

    def __init__(
        self,
        bundle: Bundle,
        precision: str = "auto",
        max_batch: int = DEFAULT_MAX_BATCH,
        compile: str | None = None,
        buckets: Sequence[int] | None = None,
        device: str = "cuda",
        cache_dir: str | Path | None = None,
    ) -> None:
        """``cache_dir``: the engine cache root (:func:`engines.cache.cache_root`), for AOTInductor packages."""
        import torch

        from engines.deployed_model import load_deployed

        if device not in ("cuda", "cpu"):
            raise UserError(f"engine 'cuda' runs on device cuda (or cpu for tests), not {device!r}")
        if device == "cuda" and not torch.cuda.is_available():
            raise UserError(missing() or "engine 'cuda' needs a CUDA GPU")
        resolved = resolve_precision(precision, device)
        gpu = device == "cuda"
        super().__init__(bundle, resolved, torch.cuda.get_device_name() if gpu else "CPU", max_batch)
        self.compile = resolve_compile(compile)
        self.buckets = check_buckets(buckets, max_batch)
        self._torch = torch
        self._gpu = gpu
        self._cache_root = cache_dir
        self._private: tempfile.TemporaryDirectory[str] | None = None
        self._device = torch.device(device)
        capability = "{}.{}".format(*torch.cuda.get_device_capability()) if gpu else "cpu"
        self.key = PackageKey(self.device, capability, torch.__version__, bundle.content_hash, resolved,
                              self.compile, self.buckets)
        self.package: Path | None = None
        model = device_model(load_deployed(bundle), resolved).to(self._device)
        words = (max_batch, *self.input_shape)
        # Page-locked on a GPU, so uploads and downloads run asynchronously; numpy views for the host's copies.
        self._host_words = [torch.empty(words, dtype=torch.int16, pin_memory=gpu) for _ in range(DEPTH)]
        self._host_cells = [tensor.numpy().view(np.uint16) for tensor in self._host_words]
        self._host_outputs: list[list[Any]] = []
        self._buffers = []
        for _ in range(DEPTH):
            tensors: list[Any] = []
            self._host_outputs.append(tensors)

            def empty(shape: tuple[int, ...], dtype: Any, tensors: list[Any] = tensors) -> np.ndarray:
                tensors.append(torch.empty(shape, dtype=torch.float32, pin_memory=gpu))
                return tensors[-1].numpy()

            self._buffers.append(OutputBuffers(max_batch, self.num_classes, self.embedding_dim, empty))
        self._static_input = torch.zeros(words, dtype=torch.int16, device=self._device)
        self._runs = self._prepare(model)
        if gpu:
            self._staging = [torch.zeros(words, dtype=torch.int16, device=self._device) for _ in range(DEPTH)]
            self._uploaded = [torch.cuda.Event() for _ in range(DEPTH)]
            self._done = [torch.cuda.Event() for _ in range(DEPTH)]

    @property
    def captured(self) -> tuple[int, ...]:
        """The bucket sizes ready to run (captured as CUDA graphs on a GPU)."""
        return tuple(self._runs)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "compile": self.compile, "buckets": list(self.buckets),
                "compute_capability": self.key.compute_capability, "torch": self.key.torch,
                "buffer_bytes": buffer_bytes(self.max_batch, self.input_shape, self.num_classes, self.embedding_dim),
                **({"package": str(self.package)} if self.package else {})}

    def close(self) -> None:
        """Drop the graphs (their memory pool goes with the last one) so a reloaded model's engine has the room."""
        if self._gpu and self._runs:
            self._torch.cuda.synchronize()
        self._runs.clear()
        if self._gpu:
            self._torch.cuda.empty_cache()
        if self._private is not None:
            self._private.cleanup()
            self._private = None

    def _package_folder(self) -> Path:
        """The engine cache's folder for this key; a private temporary one (gone at close) when unusable."""
        folder = engine_cache(self.name, asdict(self.key), self._cache_root)
        if folder is None:
            self._private = tempfile.TemporaryDirectory(prefix="flowsort-cuda-")
            folder = Path(self._private.name)
        return folder

    def _prepare(self, model: Any) -> dict[int, Callable[[], tuple[Any, ...]]]:
        """Per bucket, a call that runs the model on the first rows of the static input and returns its outputs."""
        torch = self._torch
        if self.compile == "aoti":
            self.package = aoti_package(model, self._static_input[:2], self.key, self._package_folder())
            # Single-threaded: the AOTI runtime's own threads cannot be captured in a CUDA graph.
            model = torch._inductor.aoti_load_package(str(self.package), run_single_threaded=True)
        elif self.compile == "inductor":
            model = torch.compile(model, mode=INDUCTOR_MODE, dynamic=True)
        if not self._gpu:
            def eager(batch: int) -> Callable[[], tuple[Any, ...]]:
                static_input = self._static_input[:batch]

                def run() -> tuple[Any, ...]:
                    with torch.inference_mode():
                        return tuple(model(static_input))

                return run

            return {batch: eager(batch) for batch in self.buckets}
        torch.backends.cudnn.benchmark = True  # the warmups before each capture pick each shape's fastest kernels
        self._copy_stream = torch.cuda.Stream()
        self._compute_stream = torch.cuda.Stream()
        return self._capture(model)

    def _capture(self, model: Any) -> dict[int, Callable[[], tuple[Any, ...]]]:
        """A CUDA graph per bucket, reading the first rows of the static input.

        The graphs share one memory pool. That is safe because they run one at
        a time on the compute stream, and each replay's outputs are copied out
        on that stream before the next replay can reuse the pool.
        """
        torch = self._torch
        pool = torch.cuda.graph_pool_handle()
        runs: dict[int, Callable[[], tuple[Any, ...]]] = {}
        stream = self._compute_stream
        stream.wait_stream(torch.cuda.current_stream())
        with torch.inference_mode():
            for batch in reversed(self.buckets):  # the largest first: the pool is sized once
                static_input = self._static_input[:batch]
                with torch.cuda.stream(stream):
                    for _ in range(CAPTURE_WARMUP):  # kernels chosen and warmed up before the capture
                        model(static_input)
                stream.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, stream=stream):
                    outputs = tuple(model(static_input))
                runs[batch] = replayer(graph, outputs)
        torch.cuda.synchronize()
        return dict(sorted(runs.items()))

    def _start(self, slot: int, cells: np.ndarray, n: int) -> None:
        np.copyto(self._host_cells[slot][:n], cells)
        run = self._runs[bucket_for(self.buckets, n)]
        if not self._gpu:
            self._static_input[:n].copy_(self._host_words[slot][:n])
            for store, value in zip(self._host_outputs[slot], run()):
                store[:n].copy_(value[:n])
            return
        torch = self._torch
        staging = self._staging[slot][:n]
        with torch.cuda.stream(self._copy_stream):
            staging.copy_(self._host_words[slot][:n], non_blocking=True)
            self._uploaded[slot].record(self._copy_stream)
        with torch.cuda.stream(self._compute_stream):
            self._compute_stream.wait_event(self._uploaded[slot])
            self._static_input[:n].copy_(staging, non_blocking=True)
            for store, value in zip(self._host_outputs[slot], run()):
                store[:n].copy_(value[:n], non_blocking=True)
            self._done[slot].record(self._compute_stream)

    def _finish(self, slot: int, n: int) -> Outputs:
        if self._gpu:
            self._done[slot].synchronize()
        return self._buffers[slot].first(n)


def replayer(graph: Any, outputs: tuple[Any, ...]) -> Callable[[], tuple[Any, ...]]:
    def run() -> tuple[Any, ...]:
        graph.replay()
        return outputs

    return run

