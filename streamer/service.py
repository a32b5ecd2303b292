"""The streaming service: sockets, threads and lifecycle of `flowsort serve`.

Threads:

* the service loop (:mod:`streamer.loop`), owning every ZeroMQ socket and the engine:
  PULL socket -> validation (:mod:`streamer.ingest`) -> queue -> batches -> engine ->
  policy (:mod:`streamer.dispatcher`) -> decisions on PUSH (sorter) and PUB (monitors)
  (:mod:`streamer.emitter`); the engine computes on threads of its own;
* results, with ``--results`` (:mod:`streamer.results_thread`): sent decisions -> FCS files;
* HTTP (:mod:`streamer.health`): /metrics, /healthz, /readyz;
* ZAP authenticator with CURVE (:mod:`streamer.security`);
* the caller's (main) thread only waits for signals: :meth:`Service.request_stop`
  (SIGINT/SIGTERM) stops ingest, drains every queued cell (decided, or answered
  late), sends everything, finishes the results files and returns;
  :meth:`Service.request_reload` (SIGHUP) re-reads the config and the bundle,
  builds and warms a new engine beside the running one and swaps it in between
  two batches, keeping the queue.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import replace
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zmq

from flowsort.errors import UserError
from streamer import protocol as p
from streamer.batcher import Batcher
from streamer.config import StreamerConfig, load_config
from streamer.emitter import Emitter
from streamer.health import HealthServer
from streamer.dispatcher import Dispatcher
from streamer.ingest import Ingest, InputAdapter
from streamer.loop import ServiceLoop, Waker
from streamer.metrics import Metrics
from streamer.model import EngineFactory, Model, build_model
from streamer.recording import AcquisitionWriter
from streamer.results_thread import ResultsWriter, check_results_path
from streamer.security import (
    Curve,
    allowed_client_keys,
    attach,
    configure_socket,
    exposed_endpoints,
    load_public_key,
)

log = logging.getLogger(__name__)
POLL_S = 0.05
# Sections whose changes need a restart (sockets, keys); the rest reload live.
RESTART_SECTIONS = ("ingest", "push", "pub", "health", "security", "service")


def check_exposure(config: StreamerConfig, insecure: bool) -> None:
    """Refuse non-loopback endpoints without CURVE unless ``insecure``."""
    exposed = exposed_endpoints([config.ingest.endpoint, config.push.endpoint, config.pub.endpoint])
    if exposed and not config.security.curve:
        if not insecure:
            raise UserError(
                f"refusing to serve on {', '.join(exposed)} without encryption: anyone on that network could read "
                "cell images and forge sort decisions. Turn on CURVE ([security] curve = true, keys from "
                "`flowsort keys`) or pass --insecure on a network you trust."
            )
        log.warning("serving on %s WITHOUT encryption or authentication (--insecure)", ", ".join(exposed))


class Service:
    def __init__(self, bundle_path: str | Path, config: StreamerConfig, *, config_path: str | Path | None = None,
                 insecure: bool = False, record: str | Path | None = None, ready_file: str | Path | None = None,
                 results: str | Path | None = None, engine_factory: EngineFactory | None = None) -> None:
        self.bundle_path = Path(bundle_path)
        self.config = config
        self.config_path = Path(config_path) if config_path else None
        self.insecure = insecure
        self.record = Path(record) if record else (config.path(config.service.record) if config.service.record else None)
        # FCS results: a path template ({acquisition} kept as is), relative to the config's folder when from it.
        self.results_path = (str(results) if results else
                             str(config.path(config.service.results)) if config.service.results else None)
        self.ready_file = Path(ready_file) if ready_file else None
        self.engine_factory = engine_factory
        self.worker = config.worker
        self.metrics = Metrics()
        self.endpoints: dict[str, str] = {}
        self.model: Model | None = None
        self.health: HealthServer | None = None
        self.context: zmq.Context | None = None
        self.curve: Curve | None = None
        self.emitter: Emitter | None = None
        self.dispatcher: Dispatcher | None = None
        self.ingest: Ingest | None = None
        self.loop: ServiceLoop | None = None
        self.waker: Waker | None = None
        self.recorder: AcquisitionWriter | None = None
        self.results: ResultsWriter | None = None
        self.started = False
        self.stopping = False
        self.stopped = False
        self._stop_requested = False
        self._reload_requested = False
        self._reload_thread: threading.Thread | None = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ start

    def start(self) -> Service:
        config = self.config
        check_exposure(config, self.insecure)
        try:
            self.health = HealthServer(config.health.host, config.health.port, self.metrics.registry,
                                       self.alive, self.readiness)
        except OSError as exc:
            raise UserError(f"[health] cannot listen on {config.health.host}:{config.health.port}: {exc}") from None
        self.health.start()
        self.endpoints["health"] = self.health.url
        try:
            self._start(config)
        except BaseException:
            self.close()
            raise
        self.started = True
        self.metrics.ready.set_function(lambda: 1.0 if self.readiness()[0] else 0.0)
        self.metrics.queue_depth.set_function(self.dispatcher.queued)
        self.metrics.admission_safety.set_function(lambda: self.dispatcher.batcher.safety)
        self._write_ready_file()
        log.info("worker %s serving %s: ingest %s (%s), push %s, pub %s, health %s", self.worker, self.bundle_path,
                 self.endpoints["ingest"], config.ingest.mode, self.endpoints.get("push", "off"),
                 self.endpoints.get("pub", "off"), self.endpoints["health"])
        log.info("the model takes channels %s at %dx%d (any order, extra channels ignored, other sizes cropped or "
                 "padded); classes %s", list(self.model.channels), self.model.input_size, self.model.input_size,
                 ", ".join(self.model.bundle.class_names))
        return self

    def _start(self, config: StreamerConfig) -> None:
        if self.results_path is not None:
            check_results_path(self.results_path)  # an unwritable folder fails the start, not every cell later
        model = self.model = build_model(self.bundle_path, config, self.engine_factory)
        self.metrics.set_engine(model.description)
        self.metrics.queue_capacity.set(config.batching.queue_cells)
        context = self.context = zmq.Context(io_threads=1)
        if config.security.curve:
            clients = allowed_client_keys(config.security.allowed_clients, config.security.allowed_clients_dir,
                                          config.base_dir)
            self.curve = Curve(context, config.path(config.security.secret_key_file), clients,
                               self.metrics.auth_failures.inc)

        ingest_socket = context.socket(zmq.PULL)
        ingest_socket.setsockopt(zmq.LINGER, 0)
        ingest_socket.setsockopt(zmq.RCVHWM, config.ingest.hwm)
        ingest_socket.setsockopt(zmq.MAXMSGSIZE, config.ingest.max_message_bytes * config.ingest.hard_limit_factor)
        self.endpoints["ingest"] = self._open(ingest_socket, "ingest", config.ingest.endpoint, config.ingest.mode,
                                              config.ingest.server_key)
        monitor = ingest_socket.get_monitor_socket(
            zmq.EVENT_ACCEPTED | zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
            | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)

        outputs: dict[str, zmq.Socket] = {}
        for name, kind in (("push", zmq.PUSH), ("pub", zmq.PUB)):
            section = getattr(config, name)
            if not section.endpoint:
                continue
            socket = context.socket(kind)
            socket.setsockopt(zmq.SNDHWM, section.hwm)
            socket.setsockopt(zmq.LINGER, 0)
            self.endpoints[name] = self._open(socket, name, section.endpoint, section.mode, section.server_key)
            outputs[name] = socket

        if self.record is not None:
            self.recorder = AcquisitionWriter(self.record, {"worker": self.worker, "bundle": model.bundle_hash})
            self.endpoints["record"] = str(self.record)

        if self.results_path is not None:
            self.results = ResultsWriter(self.results_path, on_drop=self.metrics.results_dropped.inc)
            self.results.start()
            self.endpoints["results"] = self.results_path

        self.emitter = Emitter(outputs, self.metrics, self.worker, int(config.deadline.margin_us * 1000),
                               results=self.results)
        batcher = Batcher.from_config(model.planner, config.batching)
        waker = self.waker = Waker()
        self.dispatcher = Dispatcher(model, batcher, self.emitter, self.metrics,
                                     config.engine.max_consecutive_failures, config.logging.reject_interval_s,
                                     waker.wake, results_embedding=self.results.embedding if self.results else None)
        self.dispatcher.on_swap = self._swapped
        limits = config.ingest.limits()
        self.ingest = Ingest(
            ingest_socket, monitor, limits=limits, adapter=InputAdapter(model.channels, model.input_size, self.metrics),
            queue=self.dispatcher.queue, queue_marker=self.dispatcher.queue_marker, emitter=self.emitter,
            metrics=self.metrics, deadline=config.deadline,
            bundle_hash=lambda: self.model.bundle_hash, status=self.status,
            reject_interval=config.logging.reject_interval_s, recorder=self.recorder,
        )
        self.recorder = None  # the service loop owns it now
        self.loop = ServiceLoop(self.ingest, self.dispatcher, self.emitter, waker)
        self.loop.start()

    def _open(self, socket: zmq.Socket, name: str, endpoint: str, mode: str, server_key: str) -> str:
        key = load_public_key(server_key, self.config.base_dir) if server_key and self.curve else None
        try:
            configure_socket(socket, self.curve, mode, key)
            return attach(socket, endpoint, mode)
        except zmq.ZMQError as exc:
            socket.close(linger=0)
            raise UserError(f"[{name}] cannot {mode} {endpoint}: {exc}") from None
        except UserError as exc:
            socket.close(linger=0)
            raise UserError(f"[{name}] {exc}") from None

    def _write_ready_file(self) -> None:
        if self.ready_file is None:
            return
        info = {"pid": os.getpid(), "worker": self.worker, **self.endpoints}
        temporary = self.ready_file.with_name(self.ready_file.name + ".tmp")
        temporary.write_text(json.dumps(info, indent=2) + "\n")
        temporary.replace(self.ready_file)

    # ------------------------------------------------------------------ health

    def _threads(self) -> list[threading.Thread]:
        return [self.loop] if self.loop is not None else []

    def alive(self) -> tuple[bool, dict[str, Any]]:
        if not self.started or self.stopping:
            return True, {"state": "stopping" if self.stopping else "starting"}
        dead = [t.name for t in self._threads() if not t.is_alive()]
        return not dead, {"state": "running", **({"dead_threads": dead} if dead else {})}

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        reasons = []
        if not self.started:
            reasons.append("starting: engine warming up, sockets not bound yet")
        if self.stopping:
            reasons.append("stopping")
        if self.dispatcher is not None and self.dispatcher.failing:
            reasons.append(f"engine failed {self.dispatcher.failures_in_row} batches in a row")
        if self.started and not self.stopping:
            reasons += [f"thread {t.name} is not running" for t in self._threads() if not t.is_alive()]
        return not reasons, {"reasons": reasons, **self.status()}

    def status(self) -> dict[str, Any]:
        model = self.model
        return {
            p.WORKER: self.worker,
            p.READY: self.started and not self.stopping and not (self.dispatcher and self.dispatcher.failing),
            p.QUEUE_DEPTH: self.dispatcher.queued() if self.dispatcher else 0,
            p.ENGINE: f"{model.engine.name} {model.engine.precision}" if model else "",
            p.ENGINE_SPEED: model.speed.as_dict() if model else {},
            p.BUNDLE: model.bundle_hash if model else "",
            p.ENDPOINTS: dict(self.endpoints),
        }

    # ------------------------------------------------------------------ requests (from any thread or a signal handler)

    def request_stop(self) -> None:
        self._stop_requested = True

    def request_reload(self) -> None:
        self._reload_requested = True

    def run_forever(self, wait: Callable[[float], object] = time.sleep) -> int:
        """Serve until :meth:`request_stop`, then drain and close. Returns the exit status.

        ``wait(seconds)`` idles between checks: the CLI passes one that takes signals synchronously.
        """
        status = 0
        while not self._stop_requested:
            if self._reload_requested:
                self._reload_requested = False
                if self._reload_thread is not None and self._reload_thread.is_alive():
                    log.warning("reload already in progress: this SIGHUP is folded into it")
                else:
                    self._reload_thread = threading.Thread(target=self.reload, name="flowsort-reload", daemon=True)
                    self._reload_thread.start()
            dead = [t.name for t in self._threads() if not t.is_alive()]
            if dead:
                log.error("thread(s) %s ended unexpectedly: stopping", ", ".join(dead))
                status = 1
                break
            wait(POLL_S)
        self.stop()
        return status

    # ------------------------------------------------------------------ reload

    def reload(self) -> bool:
        """Re-read the config and the bundle; swap in a warmed engine without dropping a cell."""
        with self._lock:
            if self.stopping or not self.started:
                return False
            started = time.perf_counter()
            try:
                config = load_config(self.config_path) if self.config_path else self.config
                changed = [name for name in RESTART_SECTIONS if getattr(config, name) != getattr(self.config, name)]
                if changed:
                    log.warning("reload: changes to [%s] take effect at the next restart", "], [".join(changed))
                    config = replace(config, **{name: getattr(self.config, name) for name in RESTART_SECTIONS})
                model = build_model(self.bundle_path, config, self.engine_factory)
                current = self.model
                if model.channels != current.channels:
                    model.close()
                    raise UserError(f"the new bundle takes channels {list(model.channels)}, the running one "
                                    f"{list(current.channels)}: restart the service to change channels")
                self.dispatcher.reconfigure(config.batching, config.engine.max_consecutive_failures)
                if not self.dispatcher.swap(model):
                    model.close()
                    log.warning("reload abandoned: the service is stopping")
                    return False
                self.ingest.reconfigure(config.deadline)
                self.emitter.reconfigure(config.deadline)
                self.metrics.queue_capacity.set(config.batching.queue_cells)
                self.config = config
            except Exception as exc:
                self.metrics.reloads.labels("failed").inc()
                log.error("reload failed, still running the previous engine and config: %s", exc,
                          exc_info=not isinstance(exc, UserError))
                return False
            self.metrics.reloads.labels("ok").inc()
            log.info("reloaded config and bundle in %.1f s: %s %s, bundle %s", time.perf_counter() - started,
                     model.engine.name, model.engine.precision, model.bundle_hash[:12])
            return True

    def _swapped(self, model: Model) -> None:
        """Called by the service loop once ``model`` runs."""
        self.model = model
        self.ingest.adapter = InputAdapter(model.channels, model.input_size, self.metrics)
        self.metrics.set_engine(model.description)

    # ------------------------------------------------------------------ stop

    def stop(self) -> None:
        """Stop ingest, decide or answer every queued cell, send everything, close. Idempotent."""
        if self.stopped:
            return
        self.stopping = True
        if self._reload_thread is not None:
            self._reload_thread.join()
        timeout = self.config.service.drain_timeout_s
        if self.loop is not None:
            queued = self.dispatcher.queued()
            self.loop.request_stop()
            self.loop.join(timeout)
            if self.loop.is_alive():
                log.error("drain did not finish in %.0f s (%d cells were queued)", timeout, queued)
            else:
                log.info("drained %d queued cells", queued)
        self._stop_results(timeout)
        self.close()
        received = self.metrics.registry.get_sample_value("flowsort_cells_received_total") or 0
        log.info("stopped: %d cells received", received)

    def _stop_results(self, timeout: float) -> None:
        """Write what the emitter handed over and finish every results file (after the emitter has ended)."""
        results, self.results = self.results, None
        if results is None:
            return
        results.stop()
        results.join(timeout)
        if results.is_alive():
            log.error("results: files not finished in %.0f s; they stay .partial", timeout)
        elif results.written:
            log.info("results: %d FCS file(s), the last %s", len(results.written), results.written[-1])

    def close(self) -> None:
        """Release everything (after stop, or after a failed start)."""
        self.stopped = True
        self._stop_results(self.config.service.drain_timeout_s)
        if self.recorder is not None:
            self.recorder.close()
        if self.curve is not None:
            self.curve.stop()
            self.curve = None
        if self.model is not None:
            self.model.close()
        # After the engine: a completion callback must never write to a closed (or reused) descriptor.
        if self.waker is not None and not (self.loop is not None and self.loop.is_alive()):
            self.waker.close()
            self.waker = None
        if self.health is not None:
            self.health.stop()
            self.health = None
        if self.context is not None:
            # Sockets the threads closed keep their linger (decisions still being flushed); any left open
            # (a failed start) close at once.
            self.context.destroy(linger=0)
            self.context = None
        if self.ready_file is not None:
            try:
                self.ready_file.unlink()
            except FileNotFoundError:
                pass

    def __enter__(self) -> Service:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
