"""The bench's connection to a streamer: one it starts (`flowsort serve` as a subprocess) or one running.

Shared by ``flowsort simulate``, ``flowsort replay``, ``bench e2e`` and the demo:
the streamer's endpoints, its sort gates (to score purity and yield) and what
the model is (classes, training merges, channels, input size).
"""

from __future__ import annotations

import contextlib
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq

from bench.defaults import DEFAULT_GATE_THRESHOLD
from bench.scoring import GateSpec
from flowsort.errors import UserError

MITOTIC = ("Prophase", "Metaphase", "Anaphase", "Telophase")
EPHEMERAL = "tcp://127.0.0.1:*"


@dataclass(frozen=True)
class LinkOptions:
    """Which streamer to use: ``serve`` starts one on that bundle for the run, else the running one of ``config``
    (or ``ingest``/``decisions``) is used, scored against ``bundle``'s classes."""

    serve: Path | None = None
    bundle: Path | None = None
    config: Path | None = None
    ingest: str | None = None
    decisions: str | None = None
    engine: str | None = None
    gate_threshold: float | None = None
    record: Path | None = None
    max_batch: int | None = None


@dataclass(frozen=True)
class ModelInfo:
    """What the bench needs to know about a bundle."""

    path: Path | None
    class_names: tuple[str, ...]
    merges: tuple[str, ...]
    channels: tuple[int, ...]
    input_size: int

    @classmethod
    def load(cls, path: str | Path) -> ModelInfo:
        from engines.bundle import load_bundle

        bundle = load_bundle(path, verify=False)
        merges = bundle.manifest.get("provenance", {}).get("dataset_merges", []) or []
        return cls(Path(path), bundle.class_names, tuple(merges), bundle.channels, bundle.input_size)


def default_gates(class_names: tuple[str, ...], threshold: float = DEFAULT_GATE_THRESHOLD) -> list[dict[str, Any]]:
    """A "mitotic" gate over the model's mitotic classes (none if it has none)."""
    classes = [name for name in class_names if name in MITOTIC]
    if not classes:
        return []
    return [{"name": "mitotic", "classes": classes, "min_probability": threshold, "exclude_dead": True, "stream": 1}]


def gate_specs(gates: list[dict[str, Any]]) -> list[GateSpec]:
    return [GateSpec(g["name"], tuple(g["classes"])) for g in gates]


def read_toml(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        return tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise UserError(f"cannot read config {path}: {exc}") from None


def service_config(model: ModelInfo, base: dict[str, Any] | None = None, engine: str | None = None,
                   max_batch: int | None = None, gate_threshold: float | None = None,
                   record: Path | None = None) -> dict[str, Any]:
    """A streamer config for a bench-started service: ``base`` (a parsed streamer.toml) on loopback
    ephemeral ports, no PUB socket, the given engine and batch sizes, and the mitotic gate when
    ``base`` has no gates."""
    from streamer.testing import merge

    config = merge(base or {}, {
        "ingest": {"endpoint": EPHEMERAL, "mode": "bind"},
        "push": {"endpoint": EPHEMERAL, "mode": "bind"},
        "pub": {"endpoint": ""},
        "health": {"host": "127.0.0.1", "port": 0},
        "logging": {"reject_interval_s": 1.0},
    })
    if engine:
        config = merge(config, {"engine": {"engine": engine}})
    if max_batch:
        sizes = [1]
        while sizes[-1] * 2 <= max_batch:
            sizes.append(sizes[-1] * 2)
        if sizes[-1] != max_batch:
            sizes.append(max_batch)
        config = merge(config, {"batching": {"batch_sizes": sizes}})
    if not config.get("gates"):
        config["gates"] = default_gates(model.class_names,
                                        DEFAULT_GATE_THRESHOLD if gate_threshold is None else gate_threshold)
    elif gate_threshold is not None:
        config["gates"] = [{**g, "min_probability": gate_threshold} for g in config["gates"]]
    if record is not None:
        config = merge(config, {"service": {"record": str(record.resolve())}})
    return config


@dataclass
class Link:
    """Where to send cells and read decisions, and what the streamer sorts."""

    ingest: str
    decisions: str
    gates: list[GateSpec]
    model: ModelInfo | None
    context: zmq.Context
    served: Any = None  # streamer.testing.Served when the bench started the streamer
    config: dict[str, Any] = field(default_factory=dict)
    engine: str = ""  # from the streamer's pong, e.g. "openvino bf16"

    def streamer_cpu_s(self) -> dict[str, float] | None:
        """CPU seconds the streamer process has used, per thread group (None when unknown or not ours)."""
        if self.served is None:
            return None
        return thread_cpu_s(self.served.process.pid)

    def streamer_rss_mb(self) -> dict[str, float] | None:
        """The streamer process's resident memory now and at its peak, MiB (None when unknown or not ours)."""
        if self.served is None:
            return None
        try:
            status = Path(f"/proc/{self.served.process.pid}/status").read_text()
        except OSError:
            return None
        fields = {line.split(":")[0]: line.split()[1] for line in status.splitlines() if line.startswith(("VmRSS", "VmHWM"))}
        return {"rss": int(fields["VmRSS"]) / 1024, "peak": int(fields["VmHWM"]) / 1024} if len(fields) == 2 else None


ENGINE_AND_OTHER = "engine and other"


def thread_cpu_s(pid: int) -> dict[str, float] | None:
    """CPU seconds per service thread (named by :mod:`streamer.threadnames`), the rest (the engine's worker
    threads, ZeroMQ's I/O thread, HTTP) together, and the ``total`` (Linux /proc)."""
    import os

    from streamer.threadnames import SERVICE_THREADS

    tick = os.sysconf("SC_CLK_TCK")
    used = dict.fromkeys(SERVICE_THREADS, 0.0) | {ENGINE_AND_OTHER: 0.0}
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total = (int(fields[11]) + int(fields[12])) / tick  # every thread's, ended ones included
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                name = (task / "comm").read_text().strip()
                fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue  # the thread ended
            used[name if name in used else ENGINE_AND_OTHER] += (int(fields[11]) + int(fields[12])) / tick
    except (OSError, IndexError, ValueError):
        return None
    used[ENGINE_AND_OTHER] += max(0.0, total - sum(used.values()))  # threads that ended since
    used["total"] = total
    return used


def thread_switches(pid: int) -> dict[str, int] | None:
    """Context switches so far per service thread and the rest together (Linux /proc): a thread that wakes
    per message, or gives up its core to another, shows here."""
    from streamer.threadnames import SERVICE_THREADS

    counts = dict.fromkeys(SERVICE_THREADS, 0) | {ENGINE_AND_OTHER: 0}
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                name = (task / "comm").read_text().strip()
                status = (task / "status").read_text()
            except OSError:
                continue
            switches = sum(int(line.split()[1]) for line in status.splitlines() if "ctxt_switches:" in line)
            counts[name if name in counts else ENGINE_AND_OTHER] += switches
    except OSError:
        return None
    return counts


def switch_rates(before: dict[str, int] | None, after: dict[str, int] | None, wall_s: float) -> dict[str, float] | None:
    """Context switches per second per thread group between two :func:`thread_switches` readings."""
    if before is None or after is None or wall_s <= 0:
        return None
    return {name: (after[name] - before.get(name, 0)) / wall_s for name in after}


def service_and_engine_cores(summary: dict[str, Any]) -> tuple[float | None, float | None]:
    """Cores the streamer's own threads (ingest, inference, emitter, results) used, and the rest (the engine)."""
    threads = summary.get("streamer_threads_cores")
    if not threads:
        return None, None
    return sum(v for k, v in threads.items() if k != ENGINE_AND_OTHER), threads[ENGINE_AND_OTHER]


def cpu_use(before: dict[str, float] | None, after: dict[str, float] | None, wall_s: float) -> dict[str, Any]:
    """Summary fields for the streamer's CPU between two :func:`thread_cpu_s` readings (cores = CPU s / wall s)."""
    if before is None or after is None or wall_s <= 0:
        return {"streamer_cpu_s": None, "streamer_cpu_core_fraction": None, "streamer_threads_cores": None}
    return {"streamer_cpu_s": after["total"] - before["total"],
            "streamer_cpu_core_fraction": (after["total"] - before["total"]) / wall_s,
            "streamer_threads_cores": {name: (after[name] - before.get(name, 0.0)) / wall_s
                                       for name in after if name != "total"}}


def connect_endpoint(endpoint: str) -> str:
    """A bind endpoint as a peer connects to it (a wildcard host becomes loopback)."""
    for wildcard in ("tcp://*:", "tcp://0.0.0.0:"):
        if endpoint.startswith(wildcard):
            return "tcp://127.0.0.1:" + endpoint[len(wildcard):]
    return endpoint


@contextlib.contextmanager
def open_link(options: LinkOptions, workdir: Path, name: str = "serve") -> Iterator[Link]:
    """The streamer ``options`` name: started here (``serve``), else the running one."""
    from streamer.config import load_config

    context = zmq.Context(io_threads=1)
    try:
        if options.serve is not None:
            from streamer.testing import Served, write_toml

            model = ModelInfo.load(options.serve)
            config = service_config(model, read_toml(options.config), options.engine, options.max_batch,
                                    options.gate_threshold, options.record)
            workdir.mkdir(parents=True, exist_ok=True)
            path = write_toml(workdir / f"{name}.toml", config)
            try:
                served = Served(options.serve, path, workdir, name=name, timeout=180)
            except (RuntimeError, TimeoutError) as exc:
                raise UserError(f"the streamer did not start: {exc}") from None
            try:
                yield Link(served["ingest"], served["push"], gate_specs(config.get("gates", [])), model, context,
                           served, config)
            finally:
                served.stop()
        else:
            if options.record is not None:
                raise UserError("--record needs --serve (to record a running stream, use `flowsort record`)")
            config = load_config(options.config)
            bundle = options.bundle
            model = ModelInfo.load(bundle) if bundle else None
            gates = [GateSpec(g.name, g.classes) for g in config.gates]
            ingest = options.ingest or connect_endpoint(config.ingest.endpoint)
            decisions = options.decisions or connect_endpoint(config.push.endpoint)
            yield Link(ingest, decisions, gates, model, context)
    finally:
        context.destroy(linger=0)
