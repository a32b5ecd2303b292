"""The torch reference engine: the very module the bundle's ONNX was exported from.

On the CPU it runs in f32 (the reference the other engines are judged
against). On CUDA it runs fp16 with channels-last weights and replays CUDA
graphs captured at load for batches of 1, 2, 4, ... and ``max_batch``, a batch
running on the smallest graph that holds it (padding is cheap on a GPU, and a
capture on the hot path would stall the stream). The dead-cell head stays in
f32 because its distance is a small difference of large numbers.

torch is imported only when the engine is built, so ``import engines`` stays
free of it.
"""

from __future__ import annotations

from bisect import bisect_left
from importlib.util import find_spec
from typing import Any

import numpy as np

from engines.base import DEFAULT_MAX_BATCH, DEPTH, Engine, OutputBuffers, Outputs
from engines.bundle import Bundle
from flowsort.errors import UserError

PRECISIONS = ("auto", "fp32", "fp16")
CAPTURE_WARMUP = 3


def missing() -> str | None:
    if find_spec("torch") is None:
        return "engine 'torch' needs torch: pip install 'flowsort[train]'"
    return None


def precisions(bundle: Bundle) -> tuple[str, ...]:
    import torch

    return ("fp32", "fp16") if torch.cuda.is_available() else ("fp32",)


def resolve_precision(requested: str, cuda: bool) -> str:
    if requested not in PRECISIONS:
        raise UserError(f"engine 'torch' has no precision {requested!r}: choose {', '.join(PRECISIONS)}")
    if requested == "auto":
        return "fp16" if cuda else "fp32"
    if requested == "fp16" and not cuda:
        raise UserError("engine 'torch' runs fp16 on a CUDA GPU only and torch sees none here: use fp32")
    return requested


def reduced_precision_net(net: Any, dtype: Any) -> Any:
    """DeepFlow's body in ``dtype`` (fp16 or bf16), channels-last, handing f32 logits and embedding to the head."""
    import torch
    from torch import nn

    class ReducedNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net.to(dtype=dtype, memory_format=torch.channels_last)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            logits, embedding = self.net(x.to(dtype, memory_format=torch.channels_last))
            return logits.float(), embedding.float()

    return ReducedNet()


class TorchEngine(Engine):
    name = "torch"

    def __init__(
        self,
        bundle: Bundle,
        precision: str = "auto",
        max_batch: int = DEFAULT_MAX_BATCH,
        threads: int | None = None,
    ) -> None:
        import torch

        from engines.deployed_model import load_deployed

        cuda = torch.cuda.is_available()
        resolved = resolve_precision(precision, cuda)
        super().__init__(bundle, resolved, torch.cuda.get_device_name() if cuda else "CPU", max_batch)
        if threads:
            torch.set_num_threads(int(threads))
        self._torch = torch
        self._cuda = cuda
        module = load_deployed(bundle).to(memory_format=torch.channels_last)
        if resolved == "fp16":
            module.net = reduced_precision_net(module.net, torch.float16)
        self._module = module.to("cuda" if cuda else "cpu")
        empty = pinned_empty if cuda else np.empty
        # float32 input: exact for uint16, and every device casts it (the module's own cast becomes a no-op).
        self._inputs = [empty((max_batch, *self.input_shape), np.float32) for _ in range(DEPTH)]
        self._buffers = [OutputBuffers(max_batch, self.num_classes, self.embedding_dim, empty) for _ in range(DEPTH)]
        self._input_tensors = [torch.from_numpy(array) for array in self._inputs]
        self._output_tensors = [[torch.from_numpy(array) for array in buffers.arrays] for buffers in self._buffers]
        if cuda:
            self._stream = torch.cuda.Stream()
            self._done = [torch.cuda.Event() for _ in range(DEPTH)]
            self._device_input = torch.zeros((max_batch, *self.input_shape), device="cuda")
            self._graph_batches = graph_batches(max_batch)
            self._graphs = self._capture(self._graph_batches)

    def _start(self, slot: int, cells: np.ndarray, n: int) -> None:
        np.copyto(self._inputs[slot][:n], cells)
        torch = self._torch
        if not self._cuda:
            with torch.inference_mode():
                results = self._module(self._input_tensors[slot][:n])
            for store, value in zip(self._output_tensors[slot], results):
                store[:n].copy_(value)
            return
        with torch.cuda.stream(self._stream):
            self._device_input[:n].copy_(self._input_tensors[slot][:n], non_blocking=True)
            graph, results = self._graphs[bisect_left(self._graph_batches, n)]
            graph.replay()
            for store, value in zip(self._output_tensors[slot], results):
                store[:n].copy_(value[:n], non_blocking=True)
            self._done[slot].record(self._stream)

    def _finish(self, slot: int, n: int) -> Outputs:
        if self._cuda:
            self._done[slot].synchronize()
        return self._buffers[slot].first(n)

    def _capture(self, batches: list[int]) -> list[tuple[Any, tuple[Any, ...]]]:
        """A CUDA graph per batch size, reading the first rows of the device input.

        The graphs share one memory pool. That is safe here because they only
        ever run one at a time on one stream, and each replay's outputs are
        copied out before the next replay can reuse the pool.
        """
        torch = self._torch
        pool = torch.cuda.graph_pool_handle()
        graphs = []
        with torch.inference_mode(), torch.cuda.stream(self._stream):
            for batch in batches:
                static_input = self._device_input[:batch]
                for _ in range(CAPTURE_WARMUP):  # capture needs the kernels warmed up on a side stream
                    self._module(static_input)
                self._stream.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    results = tuple(self._module(static_input))
                graphs.append((graph, results))
        return graphs


def graph_batches(max_batch: int) -> list[int]:
    """Batch sizes with a CUDA graph: powers of two and ``max_batch``; a batch runs on the next one up."""
    sizes = {1 << k for k in range(max_batch.bit_length()) if 1 << k < max_batch}
    return sorted(sizes | {max_batch})


def pinned_empty(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """A page-locked numpy array, so host-device copies run asynchronously."""
    import torch

    torch_dtype = torch.from_numpy(np.empty(0, dtype)).dtype
    return torch.empty(shape, dtype=torch_dtype, pin_memory=True).numpy()
