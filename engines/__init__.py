"""DeepFlow and the engines that run it.

Importing this package must stay free of torch: the streamer runs on the
lightweight runtime dependencies alone. The torch model lives in
``engines.deepflow`` and is imported only by the trainer and the torch engine.

``load(bundle)`` returns an :class:`~engines.base.Engine`; ``engine="auto"``
picks TensorRT on an NVIDIA GPU, else the cuda engine (torch on CUDA, compiled,
graphs captured) on a CUDA GPU, else OpenVINO on x86, else torch.
"""

from __future__ import annotations

import importlib
import logging
import shutil
from pathlib import Path
from types import ModuleType
from typing import Any

from engines.base import DEFAULT_MAX_BATCH, Engine, Outputs
from engines.bundle import Bundle, load_bundle
from flowsort.errors import UserError

__all__ = ["DEFAULT_MAX_BATCH", "ENGINES", "Engine", "Outputs", "available", "load", "precisions"]

ENGINES = ("tensorrt", "cuda", "openvino", "torch")
_MODULES = {"tensorrt": "engines.tensorrt_engine", "cuda": "engines.cuda_engine", "openvino": "engines.openvino_engine",
            "torch": "engines.torch_engine"}
_CLASSES = {"tensorrt": "TensorRTEngine", "cuda": "CudaEngine", "openvino": "OpenVINOEngine", "torch": "TorchEngine"}
_OPTIONS = {"tensorrt": {"device_id"}, "cuda": {"compile", "buckets"}, "openvino": {"threads", "streams"},
            "torch": {"threads"}}
_CACHING = {"tensorrt", "cuda", "openvino"}  # engines keeping compiled models in the engine cache (engines.cache)

log = logging.getLogger(__name__)


def _module(engine: str) -> ModuleType:
    return importlib.import_module(_MODULES[engine])


def available() -> dict[str, str | None]:
    """Each engine and why it cannot run here (None where it can)."""
    return {engine: _module(engine).missing() for engine in ENGINES}


def precisions(engine: str, bundle: Bundle) -> tuple[str, ...]:
    """The precisions ``engine`` can run ``bundle`` at on this machine (imports the engine's runtime)."""
    return _module(engine).precisions(bundle)


def pick(requested: str) -> str:
    """The engine to use: ``requested``, or for ``auto`` the fastest this machine has."""
    if requested != "auto" and requested not in ENGINES:
        raise UserError(f"unknown engine {requested!r}: choose auto, {', '.join(ENGINES)}")
    reasons = available()
    if requested != "auto":
        if reasons[requested]:
            raise UserError(reasons[requested])
        return requested
    if reasons["tensorrt"] is None:
        return "tensorrt"
    if reasons["cuda"] is None:
        log.info("TensorRT cannot run (%s): using the cuda engine", reasons["tensorrt"])
        return "cuda"
    if shutil.which("nvidia-smi"):
        log.warning("an NVIDIA GPU is present but neither TensorRT nor the cuda engine can run: %s; %s",
                    reasons["tensorrt"], reasons["cuda"])
    if reasons["openvino"] is None and _module("openvino").is_x86():
        return "openvino"
    if reasons["torch"] is None:
        return "torch"
    raise UserError("no engine can run on this machine: " + "; ".join(r for r in reasons.values() if r))


def load(
    bundle: str | Path | Bundle,
    engine: str = "auto",
    precision: str = "auto",
    max_batch: int = DEFAULT_MAX_BATCH,
    cache_dir: str | Path | None = None,
    **options: Any,
) -> Engine:
    """An engine running ``bundle`` for batches of 1..``max_batch`` cells.

    ``precision="auto"`` is the engine's fastest validated precision: OpenVINO
    runs the bundle's guard-approved INT8 model if it has one, else bf16 where
    the CPU has it natively, else fp32; TensorRT and cuda fp16; torch fp16 on CUDA and
    fp32 on the CPU. ``cache_dir`` is the root of the engine cache, where compiled models are kept (default
    ``$FLOWSORT_CACHE_DIR``, else the user's cache folder: :mod:`engines.cache`); the bundle is only read.
    ``options`` go to the engine: ``threads`` (openvino, torch), ``streams`` (openvino: batches computed at
    once, see :mod:`engines.cpu`), ``device_id`` (tensorrt), ``compile`` and ``buckets`` (cuda);
    those set to None are left to the engine's default.
    """
    if not isinstance(bundle, Bundle):
        bundle = load_bundle(bundle)
    name = pick(engine)
    options = {key: value for key, value in options.items() if value is not None}
    unknown = set(options) - _OPTIONS[name]
    if unknown:
        accepted = ", ".join(sorted(_OPTIONS[name]))
        raise UserError(f"engine {name!r} takes no {', '.join(sorted(unknown))} (it takes {accepted})")
    if name in _CACHING:
        options["cache_dir"] = cache_dir
    engine_class = getattr(_module(name), _CLASSES[name])
    return engine_class(bundle, precision=precision, max_batch=max_batch, **options)
