"""The service loop: one thread reads cells, runs batches and sends decisions.

Why one thread: every hand-over between Python threads costs a wake-up and a
GIL hand-over (about 25 µs of CPU per wake-up on a 2-vCPU VM, measured with a
thread ping-pong), and with the three threads of earlier versions (ingest,
inference, emitter) a cell paid several of them; the inference thread also
looked every 0.2 ms whether a batch had ended. Here the only other threads
that run per cell are the engine's own (OpenVINO streams) and ZeroMQ's I/O
thread. The loop sleeps in ``select`` on the ingest socket's descriptors and
on a :class:`Waker` pipe, which the engine's completion callback, a reload
and a stop request write to; it wakes at the exact time the batcher wants
(``select`` takes microseconds, ZeroMQ's own poll only milliseconds).

Per turn: read up to ``BURST`` messages (their cells admitted together; a
completion reported meanwhile cuts the burst short after ``CHUNK``), let the
dispatcher collect the batches that ended and start those that are due
(decisions are sent as they are made), then sleep until the next of: a
message, an engine completion, the batcher's next due time. Under a flood of
one-cell messages the engine's streams are thus handed new work within a few
messages of finishing, instead of idling behind a whole burst.
"""

from __future__ import annotations

import logging
import os
import select
import threading
import time

from streamer.dispatcher import Dispatcher
from streamer.emitter import Emitter
from streamer.ingest import Ingest
from streamer.threadnames import LOOP, name_os_thread

log = logging.getLogger(__name__)
# Messages read before the dispatcher looks at the engine again: 64 one-cell messages take about 2 ms, so a
# finished batch or an idle stream waits no longer than that behind a flood.
BURST = 64
CHUNK = 8  # messages between two looks at whether the engine has reported a completion
IDLE_S = 0.5  # the longest sleep with nothing due (a wake-up always ends it sooner)


def sleep_until(due: int | None) -> float:
    """Seconds to sleep until ``due`` (the dispatcher's next time, ns on the perf counter; None: nothing due)."""
    return IDLE_S if due is None else min(IDLE_S, max(0.0, (due - time.perf_counter_ns()) / 1e9))


class Waker:
    """A pipe that wakes the loop: any thread (or the engine's completion callback) writes a byte."""

    def __init__(self) -> None:
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)
        os.set_blocking(self._write, False)
        self.signaled = False  # woken since the last clear(): the loop's cheap look between two chunks

    def wake(self) -> None:
        self.signaled = True
        try:
            os.write(self._write, b"\0")
        except (BlockingIOError, OSError):
            pass  # full (the loop will wake anyway) or closed (the loop has ended)

    def fileno(self) -> int:
        return self._read

    def clear(self) -> None:
        self.signaled = False
        try:
            while os.read(self._read, 4096):
                pass
        except BlockingIOError:
            pass

    def close(self) -> None:
        for fd in (self._read, self._write):
            try:
                os.close(fd)
            except OSError:
                pass


class ServiceLoop(threading.Thread):
    def __init__(self, ingest: Ingest, dispatcher: Dispatcher, emitter: Emitter, waker: Waker,
                 drain_s: float = 0.5) -> None:
        super().__init__(name="flowsort-loop", daemon=True)
        self.ingest = ingest
        self.dispatcher = dispatcher
        self.emitter = emitter
        self.waker = waker
        self.drain_s = drain_s
        self._stop_requested = False

    def request_stop(self) -> None:
        """Stop reading (after what has already arrived), decide or answer every queued cell, then end."""
        self._stop_requested = True
        self.waker.wake()

    def run(self) -> None:
        name_os_thread(LOOP)
        try:
            self._serve()
            self._drain()
        except Exception:
            log.exception("service loop failed")
            raise
        finally:
            self.dispatcher.release()
            self.ingest.close()
            self.emitter.close()

    def _serve(self) -> None:
        ingest, dispatcher = self.ingest, self.dispatcher
        descriptors = [*ingest.file_descriptors(), self.waker.fileno()]
        while not self._stop_requested:
            dispatcher.take_handover()
            read = self._read_burst()
            due = dispatcher.step()
            if read == BURST or ingest.has_input():
                continue  # more is waiting: no sleep
            timeout = sleep_until(due)
            if timeout > 0:
                select.select(descriptors, [], [], timeout)
                self.waker.clear()

    def _read_burst(self) -> int:
        """Read up to ``BURST`` messages, stopping early once the engine reports a completion."""
        read = self.ingest.read(BURST, CHUNK, self._signaled)
        self.waker.clear()
        return read

    def _signaled(self) -> bool:
        return self.waker.signaled

    def _drain(self) -> None:
        """Take in what has already arrived (for up to ``drain_s``), then run the queue empty."""
        ingest, dispatcher = self.ingest, self.dispatcher
        end = time.monotonic() + self.drain_s
        while time.monotonic() < end and ingest.read(BURST):
            dispatcher.step()
        dispatcher.drain()
        while not dispatcher.drained:
            due = dispatcher.step()
            if dispatcher.drained:
                break
            timeout = sleep_until(due)
            if timeout > 0:
                select.select([self.waker.fileno()], [], [], timeout)
                self.waker.clear()
