"""`flowsort record`: capture a live stream of ingest messages to an acquisition file.

It listens where an instrument sends (a PULL socket that binds, like the
streamer's) and appends every message exactly as it arrived, timed at receipt,
in the streamer's format (:mod:`streamer.recording`). With ``forward`` it is a
tap: every message also goes on, unchanged, to a streamer. Ground truth that a
stream carries in ``x_truth`` header keys (``flowsort simulate
--truth-in-messages``) is written as truth records, so replaying the file can
score purity and yield.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import zmq

from streamer import protocol as p
from streamer.recording import AcquisitionWriter
from streamer.recording_truth import TRUTH_KEY_BYTES, Truth, header_truth, truth_record

log = logging.getLogger(__name__)
DEFAULT_LISTEN = "tcp://127.0.0.1:5555"
TRUTH_FLUSH_CELLS = 4096
TRUTH_FLUSH_S = 1.0


class Recorder:
    """Binds ``listen`` at once (``endpoint`` is where it listens); :meth:`run` records until a limit or :meth:`stop`."""

    def __init__(self, path: str | Path, listen: str, forward: str | None = None, context: zmq.Context | None = None,
                 hwm: int = 100_000) -> None:
        self.context = context or zmq.Context.instance()
        self.socket = self.context.socket(zmq.PULL)
        self.socket.setsockopt(zmq.RCVHWM, hwm)
        self.socket.setsockopt(zmq.LINGER, 0)
        try:
            self.socket.bind(listen)
        except zmq.ZMQError as exc:
            self.socket.close(0)
            from flowsort.errors import UserError

            raise UserError(f"cannot listen on {listen}: {exc}") from None
        self.endpoint = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self.forward = None
        if forward:
            self.forward = self.context.socket(zmq.PUSH)
            self.forward.setsockopt(zmq.SNDHWM, hwm)
            self.forward.setsockopt(zmq.LINGER, 2000)
            self.forward.connect(forward)
        self.writer = AcquisitionWriter(path, {"recorder": "flowsort record", "listen": self.endpoint,
                                               **({"forward": forward} if forward else {})})
        self.path = Path(path)
        self.messages = 0
        self.cells = 0
        self.bytes = 0
        self.ends = 0
        self.truth_cells = 0
        self._truth: dict[str, list[tuple[np.ndarray, Truth]]] = {}
        self._truth_pending = 0
        self._truth_flushed = time.monotonic()
        self._halt = threading.Event()

    def stop(self) -> None:
        self._halt.set()

    def run(self, seconds: float | None = None, messages: int | None = None, until_end: bool = False,
            idle_s: float | None = None) -> dict[str, Any]:
        """Record until ``seconds`` pass, ``messages`` arrive, an ``end`` arrives (``until_end``), nothing
        arrives for ``idle_s`` after the first message, or :meth:`stop`."""
        started = time.monotonic()
        last = None
        socket = self.socket
        try:
            while not self._halt.is_set():
                now = time.monotonic()
                if seconds is not None and now - started >= seconds:
                    break
                if idle_s is not None and last is not None and now - last >= idle_s:
                    break
                if not socket.poll(50):
                    self._maybe_flush_truth()
                    continue
                while True:
                    try:
                        frames = socket.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    received = time.time_ns()
                    last = time.monotonic()
                    self.writer.write(frames, received)
                    if self.forward is not None:
                        self.forward.send_multipart(frames, copy=True)
                    self.messages += 1
                    self.bytes += sum(len(f) for f in frames)
                    kind = self._inspect(frames)
                    if kind == p.END:
                        self.ends += 1
                    if (messages is not None and self.messages >= messages) or (until_end and kind == p.END):
                        self._halt.set()
                        break
                self._maybe_flush_truth()
        finally:
            self.close()
        return {"path": str(self.path), "endpoint": self.endpoint, "messages": self.messages, "cells": self.cells,
                "bytes": self.bytes, "ends": self.ends, "truth_cells": self.truth_cells,
                "seconds": time.monotonic() - started}

    def _inspect(self, frames: list[bytes]) -> str | None:
        """The message's type; counts cells and collects ``x_truth``. Never raises on bad input."""
        head = frames[0]
        try:
            header = msgpack.unpackb(head, raw=False)
        except Exception:
            return None
        if not isinstance(header, dict):
            return None
        kind = header.get(p.TYPE)
        if kind == p.CELLS:
            shape = header.get(p.SHAPE)
            count = shape[0] if isinstance(shape, list) and shape and isinstance(shape[0], int) else 0
            self.cells += count
            truth = header_truth(header, count) if TRUTH_KEY_BYTES in head else None
            ids = header.get(p.EVENT_IDS)
            if truth is not None and isinstance(ids, (bytes, list)):
                event_ids = np.frombuffer(ids, "<u8") if isinstance(ids, bytes) else np.array(ids, np.uint64)
                if len(event_ids) == count and isinstance(header.get(p.ACQUISITION), str):
                    self._truth.setdefault(header[p.ACQUISITION], []).append((event_ids.copy(), truth))
                    self._truth_pending += count
        return kind if isinstance(kind, str) else None

    def _maybe_flush_truth(self, force: bool = False) -> None:
        if not self._truth_pending:
            return
        if not force and self._truth_pending < TRUTH_FLUSH_CELLS and time.monotonic() - self._truth_flushed < TRUTH_FLUSH_S:
            return
        for acquisition, parts in self._truth.items():
            ids = np.concatenate([i for i, _ in parts])
            truth = Truth.concatenate([t for _, t in parts])
            self.writer.write_truth(truth_record(acquisition, ids, truth))
            self.truth_cells += len(ids)
        self._truth.clear()
        self._truth_pending = 0
        self._truth_flushed = time.monotonic()

    def close(self) -> None:
        if self.writer is None:
            return
        try:
            self._maybe_flush_truth(force=True)
        finally:
            self.writer.close()
            self.writer = None
            self.socket.close(0)
            if self.forward is not None:
                self.forward.close()


def record(path: Path, listen: str = DEFAULT_LISTEN, forward: str | None = None, seconds: float | None = None,
           messages: int | None = None, until_end: bool = False, idle: float | None = None) -> dict[str, Any]:
    """`flowsort record`: capture what arrives at ``listen`` to ``path`` until Ctrl-C/SIGTERM or a stop condition,
    printing what was recorded; returns the recorder's summary."""
    import signal

    from flowsort.errors import UserError
    from streamer.security import exposed_endpoints

    if exposed_endpoints([listen]):
        raise UserError(f"refusing to listen on {listen}: the recorder has no encryption; use a loopback or "
                        "ipc:// endpoint")
    recorder = Recorder(path, listen, forward)
    previous = {sig: signal.signal(sig, lambda *_: recorder.stop()) for sig in (signal.SIGINT, signal.SIGTERM)}
    print(f"recording {recorder.endpoint} to {path}" + (f", forwarding to {forward}" if forward else "")
          + " (Ctrl-C stops)", flush=True)
    try:
        summary = recorder.run(seconds, messages, until_end, idle)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print(f"recorded {summary['messages']:,} messages ({summary['cells']:,} cells, {summary['bytes'] / 1e6:.1f} MB) "
          f"in {summary['seconds']:.1f} s to {summary['path']}"
          + (f"; ground truth for {summary['truth_cells']:,} cells" if summary["truth_cells"] else ""))
    return summary
