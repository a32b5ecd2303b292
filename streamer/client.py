"""Reference peers of the service: an instrument-side :class:`Sender` and a :class:`Receiver` of decisions.

The tests, the bench's simulated instrument and replay use them; they also
show an integrator the whole protocol in a few lines.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import zmq

from streamer import codec
from streamer import protocol as p
from streamer.security import attach


def _curve_client(socket: zmq.Socket, keys: tuple[bytes, bytes, bytes] | None) -> None:
    """keys = (public, secret, server public) for a CURVE client."""
    if keys is not None:
        socket.curve_publickey, socket.curve_secretkey, socket.curve_serverkey = keys


class Sender:
    """Sends ingest messages on a PUSH socket (connects by default; bind for several workers to connect)."""

    def __init__(self, endpoint: str, mode: str = "connect", context: zmq.Context | None = None,
                 curve: tuple[bytes, bytes, bytes] | None = None, hwm: int = 100_000) -> None:
        self.context = context or zmq.Context.instance()
        self.socket = self.context.socket(zmq.PUSH)
        self.socket.setsockopt(zmq.SNDHWM, hwm)
        self.socket.setsockopt(zmq.LINGER, 5000)
        _curve_client(self.socket, curve)
        self.endpoint = attach(self.socket, endpoint, mode)
        self._encoders: dict[tuple[Any, ...], codec.CellsEncoder] = {}

    def send(self, frames: Sequence[Any], block: bool = True) -> None:
        self.socket.send_multipart(frames, flags=0 if block else zmq.NOBLOCK)

    def cells(self, acquisition: str, event_ids: Any, pixels: np.ndarray, channels: Sequence[int],
              capture_ns: Any = None, deadline_ns: Any = None) -> None:
        if pixels.ndim == 3:
            pixels = pixels[None]
        dtype = next(name for name, dt in p.DTYPES.items() if dt == pixels.dtype.newbyteorder("<"))
        key = (acquisition, tuple(channels), pixels.shape[2:], dtype)
        encoder = self._encoders.get(key)
        if encoder is None:
            encoder = self._encoders[key] = codec.CellsEncoder(acquisition, channels, pixels.shape[2:], dtype)
        self.send(encoder.encode(event_ids, pixels, capture_ns, deadline_ns))

    def end(self, acquisition: str) -> None:
        self.send(codec.encode_end(acquisition))

    def ping(self, nonce: Any = None) -> None:
        self.send(codec.encode_ping(nonce))

    def close(self, linger: int | None = None) -> None:
        self.socket.close(linger=linger)


class Receiver(threading.Thread):
    """Collects every message of a decision socket (``kind`` "pull" or "sub") in a background thread.

    ``rows`` maps event id -> that cell's decision (a dict with the worker); ``duplicates``
    counts ids seen twice; other messages (end reports, pongs) land in ``others``.
    """

    def __init__(self, endpoint: str, kind: str = "pull", mode: str = "connect", context: zmq.Context | None = None,
                 curve: tuple[bytes, bytes, bytes] | None = None, hwm: int = 100_000) -> None:
        super().__init__(name=f"receiver-{kind}", daemon=True)
        self.context = context or zmq.Context.instance()
        self.socket = self.context.socket(zmq.PULL if kind == "pull" else zmq.SUB)
        self.socket.setsockopt(zmq.RCVHWM, hwm)
        self.socket.setsockopt(zmq.LINGER, 0)
        if kind == "sub":
            self.socket.setsockopt(zmq.SUBSCRIBE, b"")
        _curve_client(self.socket, curve)
        self.endpoint = attach(self.socket, endpoint, mode)
        self.rows: dict[int, dict[str, Any]] = {}
        self.duplicates = 0
        self.batches: list[p.Decisions] = []
        self.others: list[dict[str, Any]] = []
        self._cond = threading.Condition()
        self._halt = threading.Event()
        self.start()

    def run(self) -> None:
        try:
            while not self._halt.is_set():
                if not self.socket.poll(50):
                    continue
                while True:
                    try:
                        frames = self.socket.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self._store(codec.decode_output(frames))
        finally:
            self.socket.close(linger=0)

    def _store(self, message: p.Decisions | dict[str, Any]) -> None:
        with self._cond:
            if isinstance(message, p.Decisions):
                self.batches.append(message)
                for i, event_id in enumerate(message.event_ids.tolist()):
                    if event_id in self.rows:
                        self.duplicates += 1
                    self.rows[event_id] = {
                        "worker": message.worker, "acquisition": message.acquisition,
                        "label": message.label[i], "probability": float(message.probability[i]),
                        "dead": bool(message.dead[i]), "dead_score": float(message.dead_score[i]),
                        "gate": message.gate[i], "stream": int(message.stream[i]), "late": bool(message.late[i]),
                        "latency_us": int(message.latency_us[i]), "error": message.error[i],
                    }
            else:
                self.others.append(message)
            self._cond.notify_all()

    def wait(self, predicate: Callable[[Receiver], bool], timeout: float) -> bool:
        end = time.monotonic() + timeout
        with self._cond:
            while not predicate(self):
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.1))
        return True

    def wait_for(self, event_ids: Iterable[int], timeout: float) -> bool:
        """True once every one of ``event_ids`` has a decision."""
        wanted = {int(i) for i in event_ids}
        return self.wait(lambda r: wanted.issubset(r.rows), timeout)

    def wait_other(self, message_type: str, timeout: float, **fields: Any) -> dict[str, Any] | None:
        found: list[dict[str, Any]] = []

        def match(r: Receiver) -> bool:
            for message in r.others:
                if message.get(p.TYPE) == message_type and all(message.get(k) == v for k, v in fields.items()):
                    found.append(message)
                    return True
            return False

        return found[0] if self.wait(match, timeout) else None

    def close(self) -> None:
        self._halt.set()
        self.join(2)
