"""Prometheus metrics of the streamer, all prefixed ``flowsort_``.

Each service owns a :class:`Metrics` with its own registry (several services
can live in one test process). Histograms that see every cell are
:class:`VectorHistogram` s: a batch's values are binned with numpy in one
call instead of one ``observe`` per cell.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Iterator, Sequence

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Info
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric

# Capture to decision, seconds: 50 us to 100 ms.
LATENCY_BUCKETS = (50e-6, 100e-6, 200e-6, 300e-6, 500e-6, 750e-6, 1e-3, 1.5e-3, 2e-3, 3e-3, 5e-3, 7.5e-3,
                   10e-3, 15e-3, 20e-3, 30e-3, 50e-3, 75e-3, 100e-3)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
ENGINE_BUCKETS = (50e-6, 100e-6, 200e-6, 500e-6, 1e-3, 2e-3, 5e-3, 10e-3, 20e-3, 50e-3, 100e-3, 200e-3, 500e-3, 1.0)


class VectorHistogram:
    """A Prometheus histogram fed whole arrays at a time."""

    def __init__(self, name: str, documentation: str, buckets: Sequence[float], registry: CollectorRegistry) -> None:
        self.name = name
        self.documentation = documentation
        self.bounds = np.asarray(buckets, np.float64)
        self._bounds = [float(b) for b in buckets]
        self._counts = np.zeros(len(self.bounds) + 1, np.int64)
        self._sum = 0.0
        self._lock = threading.Lock()
        registry.register(self)

    def observe(self, values: np.ndarray | list[float] | float) -> None:
        """Fold in values: an array of several with numpy, a number or a list (the emitter's few per block) with
        ``bisect``, which costs less than numpy's dispatch for a handful."""
        if isinstance(values, np.ndarray) and values.size > 1:
            self._observe_array(values)
            return
        few = np.ravel(values).tolist() if isinstance(values, np.ndarray) else values if isinstance(values, list) \
            else [float(values)]
        bounds, counts = self._bounds, self._counts
        with self._lock:
            for value in few:
                counts[bisect.bisect_left(bounds, value)] += 1
            self._sum += sum(few)

    def _observe_array(self, values: np.ndarray) -> None:
        values = np.asarray(values, np.float64).ravel()
        # Bucket i counts values <= bounds[i] (Prometheus "le"); the last is +Inf.
        counts = np.bincount(np.searchsorted(self.bounds, values, side="left"), minlength=len(self._counts))
        total = float(values.sum())
        with self._lock:
            self._counts += counts
            self._sum += total

    def snapshot(self) -> tuple[np.ndarray, float]:
        with self._lock:
            return self._counts.copy(), self._sum

    def describe(self) -> Iterator[Metric]:
        yield HistogramMetricFamily(self.name, self.documentation)

    def collect(self) -> Iterator[Metric]:
        counts, total = self.snapshot()
        cumulative = np.cumsum(counts)
        buckets = [(repr(float(b)), int(c)) for b, c in zip(self.bounds, cumulative[:-1])]
        buckets.append(("+Inf", int(cumulative[-1])))
        yield HistogramMetricFamily(self.name, self.documentation, buckets=buckets, sum_value=total)


# The service path, stage by stage (all on the service loop): which part runs it, and what one call covers.
STAGES = {
    "receive": "ingest: reading a message's frames off the socket",
    "decode": "ingest: decoding and validating a message",
    "admit": "ingest: channel order, dtype and size; deadlines; admission to the queue",
    "queue_wait": "dispatch: receipt to the start of the cell's batch (per cell)",
    "batch": "dispatch: forming a batch and gathering its cells",
    "engine": "dispatch: collecting the engine's result (the engine computes on its own threads meanwhile)",
    "policy": "dispatch: calibration re-weighting, labels, gates and decision blocks",
    "emit": "emitter: lateness, encoding and sending a decision message",
}


class StageClock:
    """Time spent in each stage of the service path, as ``flowsort_stage_seconds_total{stage}`` and
    ``flowsort_stage_calls_total{stage}``: where a cell's time goes, and what one message costs.

    Each stage is timed by the service loop only, with two integer additions per call, so it can stay on
    in production; a scrape reads the running sums.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.ns = dict.fromkeys(STAGES, 0)
        self.calls = dict.fromkeys(STAGES, 0)
        registry.register(self)

    def add(self, stage: str, nanoseconds: int, calls: int = 1) -> None:
        self.ns[stage] += nanoseconds
        self.calls[stage] += calls

    def describe(self) -> Iterator[Metric]:
        yield CounterMetricFamily("flowsort_stage_seconds", "Time spent per stage of the service path", labels=["stage"])
        yield CounterMetricFamily("flowsort_stage_calls", "Calls (queue_wait: cells) per stage", labels=["stage"])

    def collect(self) -> Iterator[Metric]:
        seconds = CounterMetricFamily("flowsort_stage_seconds", "Time spent per stage of the service path",
                                      labels=["stage"])
        calls = CounterMetricFamily("flowsort_stage_calls", "Calls (queue_wait: cells) per stage", labels=["stage"])
        for stage in STAGES:
            seconds.add_metric([stage], self.ns[stage] / 1e9)
            calls.add_metric([stage], self.calls[stage])
        yield seconds
        yield calls


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry()
        self.messages_received = Counter("flowsort_messages_received", "Ingest messages received, by type",
                                         ["type"], registry=r)
        self.cells_received = Counter("flowsort_cells_received", "Cells received in valid cells messages", registry=r)
        self.messages_rejected = Counter("flowsort_messages_rejected", "Ingest messages rejected whole, by reason",
                                         ["reason"], registry=r)
        self.cells_rejected = Counter("flowsort_cells_rejected",
                                      "Cells answered with an error instead of a classification, by reason (bad "
                                      "input, overload, expired, engine_error)", ["reason"], registry=r)
        self.cells_resized = Counter("flowsort_cells_resized",
                                     "Cells cropped or padded to the model input by the preprocessing contract",
                                     registry=r)
        self.cells_converted = Counter("flowsort_cells_converted", "Cells converted to uint16, by source dtype",
                                       ["dtype"], registry=r)
        self.cells_decided = Counter("flowsort_cells_decided", "Cells classified, by label", ["label"], registry=r)
        self.cells_sorted = Counter("flowsort_cells_sorted", "Cells sent to a sort gate, by gate", ["gate"], registry=r)
        self.cells_dead = Counter("flowsort_cells_dead", "Cells flagged dead", registry=r)
        self.cells_late = Counter("flowsort_cells_late", "Decisions that left after the cell's deadline (not sorted)",
                                  registry=r)
        self.decisions_sent = Counter("flowsort_decision_messages_sent", "Decision messages sent, by socket",
                                      ["socket"], registry=r)
        self.decisions_dropped = Counter("flowsort_decisions_dropped",
                                         "Cell decisions not sent because the consumer was slow or absent, by socket",
                                         ["socket"], registry=r)
        self.engine_failures = Counter("flowsort_engine_failures", "Batches the engine failed on", registry=r)
        self.reloads = Counter("flowsort_reloads", "Configuration and bundle reloads (SIGHUP), by result",
                               ["result"], registry=r)
        self.auth_failures = Counter("flowsort_auth_failures", "CURVE clients refused by the authenticator",
                                     registry=r)
        self.connection_events = Counter("flowsort_ingest_connection_events",
                                         "Ingest socket connection events (a disconnect also follows a frame above "
                                         "ZMQ_MAXMSGSIZE)", ["event"], registry=r)
        self.records_written = Counter("flowsort_records_written", "Messages appended to the acquisition file",
                                       registry=r)
        self.results_dropped = Counter("flowsort_results_dropped",
                                       "Decided cells not written to the FCS results (writer queue full or write "
                                       "failed)", registry=r)
        self.queue_depth = Gauge("flowsort_queue_depth", "Cells waiting for the engine", registry=r)
        self.queue_capacity = Gauge("flowsort_queue_capacity", "Capacity of the ingest queue, cells", registry=r)
        self.admission_safety = Gauge("flowsort_admission_safety",
                                      "Factor admission applies to planned engine times (95th percentile overrun)",
                                      registry=r)
        self.ready = Gauge("flowsort_ready", "1 when the engine is warm and sockets bound", registry=r)
        self.engine_info = Info("flowsort_engine", "The engine in use", registry=r)
        self.latency = VectorHistogram("flowsort_decision_latency_seconds",
                                       "Capture (capture_ns) to decision sent, per cell; from receipt where the "
                                       "capture stamp is later than receipt", LATENCY_BUCKETS, r)
        self.ingest_wait = VectorHistogram("flowsort_ingest_wait_seconds",
                                           "Capture (capture_ns) to receipt by the service, per cell: time in the "
                                           "sender, the network and ZeroMQ's queue (0 where the stamp is later)",
                                           LATENCY_BUCKETS, r)
        self.batch_size = VectorHistogram("flowsort_batch_size_cells", "Cells per engine batch", BATCH_BUCKETS, r)
        self.engine_time = VectorHistogram("flowsort_engine_seconds", "Engine time per batch", ENGINE_BUCKETS, r)
        self.stages = StageClock(r)

    def set_engine(self, description: dict[str, object]) -> None:
        self.engine_info.info({key: str(value) for key, value in description.items()})


def parse_text(text: str) -> dict[str, float]:
    """Samples of a Prometheus text exposition as {'name{label="v"}': value} (for tests and the bench)."""
    from prometheus_client.parser import text_string_to_metric_families

    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples
