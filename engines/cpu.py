"""What this CPU offers, and how a CPU engine's threads are laid out on it.

Throughput figures are only comparable with the CPU model and the vector
extensions they ran on, so every benchmark records :func:`describe`. The
threading choice is made here, once, for every CPU engine:

* a small DeepFlow batch keeps one core busy for well under a millisecond, too
  little work to split across cores (two threads on one batch bought 2-10%
  over one thread on a 2-core EPYC, at 30% more CPU, and collapsed whenever
  another thread took a core), so the engine runs independent **streams** of
  one thread each and keeps one batch in flight per stream;
* the service's own threads (ingest, inference, emitter) and, on an instrument
  PC, the acquisition software need CPU too: on machines with more than two
  cores one core is left to them; on one or two cores the engine takes them
  all, because its streams idle whenever cells do not arrive, and a stream
  held back would cap the ceiling at half.

``ONEDNN_MAX_CPU_ISA`` (oneDNN's dispatcher control, honoured by OpenVINO's
CPU plugin) limits the kernels to an older instruction set, e.g. ``AVX2`` to
measure on a Zen 4 what a Zen 3 would do; :func:`isa_limit` reports it and
:func:`native_bf16` respects it.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

# Flags that decide which kernels run: AVX2 (every x86 CPU we support), AVX-512, bf16 and int8 dot products, AMX.
RELEVANT_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx_vnni",
                  "amx_tile", "amx_bf16", "amx_int8")
# ONEDNN_MAX_CPU_ISA values below which there is no native bf16 (AVX512_CORE_BF16 and AMX have it).
ISA_WITHOUT_BF16 = {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI"}
MAX_STREAMS = 4


@lru_cache(maxsize=1)
def _cpuinfo() -> tuple[str, frozenset[str]]:
    model, flags = platform.processor() or platform.machine(), frozenset()
    try:
        with open("/proc/cpuinfo") as lines:
            for line in lines:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name":
                    model = value.strip()
                elif key == "flags":
                    flags = frozenset(value.split())
                if key == "flags":
                    break
    except OSError:
        pass
    return model, flags


def cpu_model() -> str:
    return _cpuinfo()[0]


def cpu_flags() -> list[str]:
    """The flags of :data:`RELEVANT_FLAGS` this CPU has (empty where /proc/cpuinfo is not readable)."""
    flags = _cpuinfo()[1]
    return [flag for flag in RELEVANT_FLAGS if flag in flags]


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask, which containers and taskset narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def isa_limit() -> str | None:
    """The instruction-set cap set through ``ONEDNN_MAX_CPU_ISA``, upper-cased, or None."""
    value = os.environ.get("ONEDNN_MAX_CPU_ISA", "").strip().upper()
    return value or None


def native_bf16(runtime_says: bool) -> bool:
    """bf16 is native when the runtime reports it and no ISA cap below AVX512_CORE_BF16 is set."""
    return runtime_says and isa_limit() not in ISA_WITHOUT_BF16


def describe() -> dict[str, Any]:
    """The facts a benchmark figure needs: CPU model, its vector flags, usable cores, any ISA cap."""
    info: dict[str, Any] = {"cpu_model": cpu_model(), "cpu_flags": cpu_flags(), "cores": usable_cores(),
                            "platform": platform.platform(), "python": platform.python_version()}
    if isa_limit():
        info["isa_limit"] = isa_limit()
    if hasattr(os, "getloadavg"):
        info["load_average_1_5_15min"] = [round(v, 2) for v in os.getloadavg()]
    return info


@dataclass(frozen=True)
class Threading:
    """How a CPU engine runs: ``streams`` batches at once, each on ``threads_per_stream`` threads."""

    streams: int
    threads_per_stream: int
    cores: int
    chosen: str  # "auto", or what the operator set

    @property
    def threads(self) -> int:
        return self.streams * self.threads_per_stream

    def __str__(self) -> str:
        return (f"{self.streams} stream{'s' if self.streams > 1 else ''} x {self.threads_per_stream} "
                f"thread{'s' if self.threads_per_stream > 1 else ''} on {self.cores} core{'s' if self.cores > 1 else ''}"
                f" ({self.chosen})")


def choose_threading(streams: int = 0, threads: int = 0, cores: int | None = None) -> Threading:
    """The engine's layout for ``cores`` (default: this process's); 0 means choose.

    ``threads`` is the engine's total thread count, as OpenVINO's INFERENCE_NUM_THREADS.
    """
    if streams < 0 or threads < 0:
        raise ValueError(f"streams and threads must be >= 0 (0 = choose), got {streams} and {threads}")
    cores = cores or usable_cores()
    engine_cores = cores if cores <= 2 else cores - 1  # leave the service (and the instrument) a core
    if streams and threads:
        chosen = "set"
    elif streams:
        threads = streams * max(1, engine_cores // streams)
        chosen = "streams set"
    elif threads:
        streams = min(threads, MAX_STREAMS)
        chosen = "threads set"
    else:
        streams, threads = min(engine_cores, MAX_STREAMS), engine_cores
        chosen = "auto"
    return Threading(streams, max(1, threads // streams), cores, chosen)
