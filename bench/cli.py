"""Commands contributed by the bench package.

``flowsort bench`` groups the benchmarks; each module in ``BENCH_MODULES``
adds one sub-command through its ``add_parser`` (``bench engines`` here; add
``bench e2e``). ``TOP_LEVEL_MODULES`` add commands of their own: ``flowsort
simulate``, ``record``, ``replay`` and ``demo``. Parsers only: every module imports its
heavy dependencies inside its ``run``.
"""

from __future__ import annotations

import argparse
import importlib

BENCH_MODULES = ("bench.engine_bench", "bench.e2e", "bench.frontier")
TOP_LEVEL_MODULES = ("bench.simulate_cmd", "bench.record_cmd", "bench.replay_cmd", "bench.demo")


def register(subparsers: argparse._SubParsersAction) -> None:
    bench = subparsers.add_parser(
        "bench",
        help="benchmarks: engines (throughput and latency per engine and precision), e2e (the live path under load)",
        description="Benchmarks of flowsort's moving parts on this machine.",
    )
    benchmarks = bench.add_subparsers(dest="benchmark", metavar="BENCHMARK", required=True)
    for name in BENCH_MODULES:
        importlib.import_module(name).add_parser(benchmarks)
    for name in TOP_LEVEL_MODULES:
        importlib.import_module(name).add_parser(subparsers)
