"""How fast the synthetic cytometer makes cells on one core.

The live simulated instrument must be fed at >= 5,000 cells/s from a single
core, so this pins the process to one CPU and one BLAS/OpenMP thread before
numpy loads, then times rendering new cells (``generate``) and drawing from a
pre-rendered pool with fresh noise (``CellPool.sample``). A benchmark, not a
test: timings depend on the machine.

    python -m bench.synthetic_speed [--out bench-results/synthetic_speed.json]
"""

from __future__ import annotations

import os

for _variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_variable] = "1"  # before numpy is imported, or its BLAS starts a thread pool

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from trainer.synthetic import CellPool, generate  # noqa: E402

TARGET = 5000  # cells/s the live instrument needs
POOL_BATCH = 256  # cells per draw, a live instrument's burst


def best_rate(cells: int, run: Callable[[], object], repeats: int) -> float:
    """Cells per second of the fastest of ``repeats`` runs (the least disturbed by other load)."""
    run()  # warm up: quantile table, caches
    fastest = min(_seconds(run) for _ in range(repeats))
    return cells / fastest


def _seconds(run: Callable[[], object]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def measure(cells: int, sizes: list[int], repeats: int) -> dict:
    generation = {
        str(size): round(best_rate(cells, lambda size=size: generate(cells, seed=1, size=size), repeats))
        for size in sizes
    }
    pool = CellPool(4096, seed=2)
    rng = np.random.default_rng(3)
    batches = max(1, cells // POOL_BATCH)
    sampling = round(best_rate(batches * POOL_BATCH, lambda: [pool.sample(POOL_BATCH, rng) for _ in range(batches)], repeats))
    return {
        "cells_per_s": {"generate": generation, "pool_sample": sampling},
        "target_cells_per_s": TARGET,
        "meets_target": {"generate_40": generation.get("40", 0) >= TARGET, "pool_sample": sampling >= TARGET},
        "cells_per_run": cells,
        "repeats": repeats,
        "pool": {"cells": len(pool), "batch": POOL_BATCH},
        "threads": 1,
        "machine": {"cpu": platform.processor() or platform.machine(), "python": platform.python_version(),
                    "numpy": np.__version__},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench-results/synthetic_speed.json"))
    parser.add_argument("--cells", type=int, default=8192, help="cells per timed run (default 8192)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[40, 64], help="image sizes to time (default 40 64)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement, the best is kept")
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})

    result = measure(args.cells, args.sizes, args.repeats)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for size, rate in result["cells_per_s"]["generate"].items():
        print(f"generate {size}x{size}: {rate:,} cells/s")
    print(f"pool sample 40x40: {result['cells_per_s']['pool_sample']:,} cells/s (target {TARGET:,})")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
