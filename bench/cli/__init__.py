"""Commands contributed by the bench package: one module per command, each with ``add_parser`` and ``run``.

``flowsort bench`` groups the benchmarks (``bench engines``, ``bench e2e``, ``bench overhead``, ``bench gpu``,
``bench frontier``);
``simulate``, ``record``, ``replay`` and ``demo`` are commands of their own.
Parsers only: every command imports its heavy dependencies inside its ``run``.
"""

from __future__ import annotations

import argparse

from bench.cli import (
    bench_e2e, bench_engines, bench_frontier, bench_gpu, bench_overhead, demo, record, replay, simulate,
)


def register(subparsers: argparse._SubParsersAction) -> None:
    bench = subparsers.add_parser(
        "bench",
        help="benchmarks: engines (throughput and latency per engine and precision), e2e (the live path under load), frontier (accuracy against speed)",
        description="Benchmarks of flowsort's moving parts on this machine.",
    )
    benchmarks = bench.add_subparsers(dest="benchmark", metavar="BENCHMARK", required=True)
    bench_engines.add_parser(benchmarks)
    bench_e2e.add_parser(benchmarks)
    bench_overhead.add_parser(benchmarks)
    bench_gpu.add_parser(benchmarks)
    bench_frontier.add_parser(benchmarks)
    simulate.add_parser(subparsers)
    record.add_parser(subparsers)
    replay.add_parser(subparsers)
    demo.add_parser(subparsers)
