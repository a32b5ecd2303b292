"""The bench's instrument side: pre-built messages sent on a schedule, decisions collected and joined.

Everything a run sends is built before its clock starts. A message is a
:class:`Template`: its header as a ``bytearray`` whose per-cell columns
(``event_ids``, ``capture_ns``, ``deadline_ns``, the ``x_truth`` columns) are
msgpack ``bin`` values at known offsets, plus its pixel frame. Sending message
m copies the run's precomputed values for m's cells into those columns through
numpy views and hands the frames to ZeroMQ (which copies them at once, so the
next message can reuse the header). Nothing is encoded per message.

:class:`PacedSender` walks a :class:`Plan` (templates, send times, per-cell
columns) in its own thread with a :class:`~bench.pacing.Pacer`.
:class:`Collector` receives decisions in another thread, stamps each message
with its arrival time and keeps the columns as numpy arrays (strings become
small integer codes). :func:`join` matches them to the plan's cells.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zmq

from bench.cell_sources import CellSet
from bench.pacing import DEFAULT_SPIN_S, Pacer, PacingStats, pacing_stats
from streamer import codec
from streamer import protocol as p
from streamer.recording_truth import TRUTH_KEY, Recording, Truth

START_DELAY_S = 0.1
TRUTH_DTYPES = {"label": np.dtype("<i2"), "dead": np.dtype("u1"), "debris": np.dtype("u1")}


def truth_map(truth: Truth, count: int) -> codec.HeaderBuilder:
    """The ``x_truth`` map of a `cells` header: class names and writable ``truth_*`` columns for ``count`` cells."""
    inner = codec.HeaderBuilder()
    inner.add("class_names", list(truth.class_names))
    inner.add_column("label", TRUTH_DTYPES["label"], count, "truth_label")
    for flag in ("dead", "debris"):
        if getattr(truth, flag) is not None:
            inner.add_column(flag, TRUTH_DTYPES[flag], count, f"truth_{flag}")
    return inner


@dataclass
class Template:
    """One message ready to send: frames, and the views its per-cell columns are written through."""

    frames: list[Any]
    patches: list[tuple[str, np.ndarray]]


@dataclass
class Plan:
    """A run: which template each message uses, when it leaves, and each cell's column values.

    Cells are numbered in sending order; message m holds cells ``start[m]:start[m + 1]``.
    Times are relative to the run's start: seconds for messages, nanoseconds for cells.
    """

    templates: list[Template]
    template: np.ndarray  # int32 [M]
    start: np.ndarray  # int64 [M + 1]
    send_at: np.ndarray  # float64 [M], s
    event_ids: np.ndarray  # uint64 [T]
    acquisition: np.ndarray  # int16 [T], index into acquisitions
    acquisitions: list[str]
    capture_offset_ns: np.ndarray | None  # int64 [T]; None: the messages' own stamps are sent (verbatim)
    deadline_offset_ns: np.ndarray | None  # int64 [T]
    truth: Truth | None  # per cell [T]
    description: dict[str, Any] = field(default_factory=dict)

    @property
    def messages(self) -> int:
        return len(self.template)

    @property
    def cells(self) -> int:
        return len(self.event_ids)

    @property
    def duration_s(self) -> float:
        return float(self.send_at[-1]) if len(self.send_at) else 0.0

    def columns(self, t0_wall_ns: int) -> dict[str, np.ndarray]:
        """Each patchable column's values for every cell, given the wall-clock time of the start."""
        out: dict[str, np.ndarray] = {p.EVENT_IDS: self.event_ids}
        if self.capture_offset_ns is not None:
            out[p.CAPTURE_NS] = self.capture_offset_ns + t0_wall_ns
        if self.deadline_offset_ns is not None:
            out[p.DEADLINE_NS] = self.deadline_offset_ns + t0_wall_ns
        if self.truth is not None:
            out["truth_label"] = self.truth.label
            if self.truth.dead is not None:
                out["truth_dead"] = self.truth.dead.view(np.uint8)
            if self.truth.debris is not None:
                out["truth_debris"] = self.truth.debris.view(np.uint8)
        return out

    def capture_ns(self, t0_wall_ns: int) -> np.ndarray | None:
        return None if self.capture_offset_ns is None else self.capture_offset_ns + t0_wall_ns


# ---------------------------------------------------------------------------- plans

class CellMessages:
    """A cell set cut into pre-built N-cell messages, in a shuffled order, for any number of plans.

    The images are copied once into the shuffled order so that every message's
    pixel frame is a contiguous slice; all messages share one header.
    """

    def __init__(self, cells: CellSet, cells_per_message: int = 1, seed: int = 0, deadline: bool = True,
                 truth_in_messages: bool = False) -> None:
        n = cells_per_message
        if n < 1:
            raise ValueError("cells per message must be at least 1")
        usable = len(cells) - len(cells) % n
        if usable < n:
            raise ValueError(f"{len(cells)} cells cannot fill one message of {n}")
        self.cells = cells
        self.cells_per_message = n
        self.order = np.random.default_rng(seed).permutation(len(cells))[:usable]
        self.images = np.ascontiguousarray(cells.images[self.order])
        self.deadline = deadline
        self.truth_in_messages = truth_in_messages and cells.truth is not None
        self.frames = [self.images[i:i + n] for i in range(0, usable, n)]

    def plan(self, arrivals: np.ndarray, acquisition: str, first_event_id: int, transit_ns: int | None,
             description: dict[str, Any] | None = None) -> Plan:
        """Cells arriving at ``arrivals`` (s from the start, a multiple of N of them), each message leaving
        with its last cell; ``transit_ns`` after capture is each cell's deadline (None: none sent)."""
        n = self.cells_per_message
        total = len(arrivals) - len(arrivals) % n
        arrivals = arrivals[:total]
        messages = total // n
        truth = self.cells.truth
        header, views = codec.cells_header(
            acquisition, self.cells.channels, (n, *self.images.shape[1:]),
            deadline=self.deadline and transit_ns is not None,
            maps={TRUTH_KEY: truth_map(truth, n)} if truth is not None and self.truth_in_messages else None)
        patches = list(views.items())
        templates = [Template([header, frame], patches) for frame in self.frames]
        slot = np.arange(total) % len(self.order)
        source = self.order[slot]
        capture = np.round(arrivals * 1e9).astype(np.int64)
        return Plan(
            templates=templates,
            template=(np.arange(messages) % len(templates)).astype(np.int32),
            start=np.arange(messages + 1, dtype=np.int64) * n,
            send_at=arrivals[n - 1::n].astype(np.float64) if messages else np.zeros(0),
            event_ids=np.arange(first_event_id, first_event_id + total, dtype=np.uint64),
            acquisition=np.zeros(total, np.int16), acquisitions=[acquisition],
            capture_offset_ns=capture,
            deadline_offset_ns=None if transit_ns is None else capture + int(transit_ns),
            truth=None if truth is None else truth.take(source),
            description={"cells_per_message": n, **(description or {})},
        )


def replay_times(messages: Sequence[Any], timing: str, rate: float | None, speed: float, poisson: bool, loops: int,
                 seed: int) -> np.ndarray:
    """Send times (s from the start) of every message of every pass, for :func:`recording_plan`'s ``timing``."""
    count = len(messages)
    if timing == "recorded":
        stamps = np.array([m.time_ns for m in messages], np.int64)
        one = (stamps - stamps[0]) / 1e9 / speed
        gap = float(np.median(np.diff(one))) if count > 1 else 0.0
        return np.concatenate([one + k * (one[-1] + gap) for k in range(loops)])
    if timing == "rate":
        if not rate or rate <= 0:
            raise ValueError("timing 'rate' needs a positive rate")
        total = count * loops
        if poisson:
            send_at = np.cumsum(np.random.default_rng(seed).exponential(1.0 / rate, total))
            return send_at - send_at[0]
        return np.arange(total, dtype=np.float64) / rate
    if timing == "max":
        return np.zeros(count * loops)
    raise ValueError(f"unknown timing {timing!r}")


def restamped_template(message: Any, cells: Any, with_deadline: bool) -> Template:
    """A recorded `cells` message whose per-cell id, capture and deadline columns are rewritten per send."""
    builder = codec.HeaderBuilder()
    for key, value in (message.header or {}).items():
        if key not in (p.EVENT_IDS, p.CAPTURE_NS, p.DEADLINE_NS):
            builder.add(key, value)
    n = cells.count
    builder.add_column(p.EVENT_IDS, p.UINT64, n)
    builder.add_column(p.CAPTURE_NS, p.INT64, n)
    if with_deadline:
        builder.add_column(p.DEADLINE_NS, p.INT64, n)
    frame, views = builder.build()
    return Template([frame, *message.frames[1:]], list(views.items()))


@dataclass
class RecordedPass:
    """One pass over a recording's messages: what to send, and each cell's recorded ids and stamps."""

    acquisitions: list[str] = field(default_factory=list)
    templates: list[Template] = field(default_factory=list)
    cells: list[int] = field(default_factory=list)  # per message
    event_ids: list[np.ndarray] = field(default_factory=list)  # per cells message
    acquisition: list[int] = field(default_factory=list)  # per cells message, into acquisitions
    capture_rel: list[np.ndarray] = field(default_factory=list)  # capture - receipt time as recorded, per cell
    deadline_rel: list[np.ndarray | None] = field(default_factory=list)

    @classmethod
    def of(cls, messages: Sequence[Any], verbatim: bool, transit_ns: int | None) -> RecordedPass:
        one = cls()
        for message in messages:
            cells = message.decoded
            if cells is None:
                one.templates.append(Template(list(message.frames), []))
                one.cells.append(0)
                continue
            if cells.acquisition not in one.acquisitions:
                one.acquisitions.append(cells.acquisition)
            one.acquisition.append(one.acquisitions.index(cells.acquisition))
            n = cells.count
            one.cells.append(n)
            one.event_ids.append(np.asarray(cells.event_ids, np.uint64))
            one.capture_rel.append(np.asarray(cells.capture_ns, np.int64) - message.time_ns)
            if cells.deadline_ns is None:
                one.deadline_rel.append(None)
            else:
                deadline = np.broadcast_to(np.asarray(cells.deadline_ns, np.int64), (n,))
                one.deadline_rel.append(deadline - message.time_ns)
            with_deadline = transit_ns is not None or cells.deadline_ns is not None
            one.templates.append(Template(list(message.frames), []) if verbatim
                                 else restamped_template(message, cells, with_deadline))
        return one


def recording_plan(recording: Recording, timing: str = "recorded", rate: float | None = None, speed: float = 1.0,
                   poisson: bool = False, loops: int = 1, verbatim: bool = False, transit_ns: int | None = None,
                   seed: int = 0) -> Plan:
    """Replay an acquisition file: ``timing`` is ``recorded`` (its own gaps, divided by ``speed``),
    ``rate`` (``rate`` messages/s, evenly spaced or Poisson) or ``max`` (as fast as possible).

    ``verbatim`` sends every message byte for byte as recorded. Otherwise cells messages
    get fresh ``capture_ns`` (shifted by the same amount as their send time, so a cell's
    age at sending is as recorded) and ``deadline_ns`` (shifted likewise, or
    ``transit_ns`` after capture), and loops after the first get new event ids.
    """
    messages = recording.messages
    if not messages:
        raise ValueError(f"{recording.path} holds no messages")
    if loops < 1:
        raise ValueError("loops must be at least 1")
    count = len(messages)
    send_at = replay_times(messages, timing, rate, speed, poisson, loops, seed)

    one = RecordedPass.of(messages, verbatim, transit_ns)
    acquisitions, templates, capture_rel, deadline_rel = one.acquisitions, one.templates, one.capture_rel, one.deadline_rel
    ids_one, acq_one, cells_per_template = one.event_ids, one.acquisition, one.cells

    per_message = np.array(cells_per_template, np.int64)
    template = np.tile(np.arange(count, dtype=np.int32), loops)
    start = np.zeros(len(template) + 1, np.int64)
    start[1:] = np.cumsum(per_message[template])
    cells_one = int(per_message.sum())
    ids_pass = np.concatenate(ids_one) if ids_one else np.zeros(0, np.uint64)
    acq_pass = np.repeat(np.array(acq_one, np.int16), per_message[per_message > 0]) if acq_one else np.zeros(0, np.int16)
    if loops > 1 and not verbatim and cells_one:
        stride = int(ids_pass.max()) + 1
        if stride * loops >= 2**63:
            raise ValueError("event ids too large to renumber for looping: use --verbatim")
        event_ids = np.concatenate([ids_pass + np.uint64(k * stride) for k in range(loops)])
    else:
        event_ids = np.tile(ids_pass, loops)
    # Each cell's send time (its message's), in ns, to shift its recorded stamps onto the new clock.
    cell_send_ns = np.repeat(np.round(send_at * 1e9).astype(np.int64), per_message[template])
    capture_offset = deadline_offset = None
    if not verbatim and cells_one:
        capture_offset = cell_send_ns + np.tile(np.concatenate(capture_rel), loops)
        if transit_ns is not None:
            deadline_offset = capture_offset + int(transit_ns)
        elif any(d is not None for d in deadline_rel):
            rel = np.concatenate([d if d is not None else np.full(len(c), 10**16, np.int64)
                                  for d, c in zip(deadline_rel, capture_rel)])
            deadline_offset = cell_send_ns + np.tile(rel, loops)
    truth = None
    if recording.truth and cells_one:
        truth_one = recording.truth.lookup([acquisitions[i] for i in acq_pass], ids_pass)
        if truth_one is not None:
            truth = truth_one.take(np.tile(np.arange(cells_one), loops))
    return Plan(
        templates=templates, template=template, start=start, send_at=send_at.astype(np.float64),
        event_ids=event_ids, acquisition=np.tile(acq_pass, loops), acquisitions=acquisitions,
        capture_offset_ns=capture_offset, deadline_offset_ns=deadline_offset, truth=truth,
        description={"source": str(recording.path), "timing": timing, "rate": rate, "speed": speed,
                     "poisson": poisson, "loops": loops, "verbatim": verbatim,
                     "recorded_messages": count, "tail": recording.tail},
    )


# ---------------------------------------------------------------------------- sending

def push_socket(context: zmq.Context, endpoint: str, hwm: int = 1_000_000) -> zmq.Socket:
    socket = context.socket(zmq.PUSH)
    socket.setsockopt(zmq.SNDHWM, hwm)
    socket.setsockopt(zmq.LINGER, 2000)
    socket.connect(endpoint)
    return socket


class PacedSender(threading.Thread):
    """Sends a plan on its schedule from its own thread; ``sent_at`` (s after the start) per message."""

    def __init__(self, socket: zmq.Socket, plan: Plan, spin_s: float = DEFAULT_SPIN_S,
                 start_delay_s: float = START_DELAY_S) -> None:
        super().__init__(name="bench-sender", daemon=True)
        self.socket = socket
        self.plan = plan
        self.spin_s = spin_s
        self.start_delay_s = start_delay_s
        self.sent_at = np.zeros(plan.messages)
        self.count = 0  # messages sent so far
        self.cells_sent = 0
        self.t0 = 0.0  # perf_counter of the start
        self.t0_wall_ns = 0
        self.cpu_s = 0.0
        self.started_event = threading.Event()
        self.error: BaseException | None = None
        self._halt = False

    def stop(self) -> None:
        self._halt = True

    def run(self) -> None:
        cpu = time.thread_time()
        try:
            self._run()
        except BaseException as exc:  # reported by the caller
            self.error = exc
        finally:
            self.cpu_s = time.thread_time() - cpu
            self.started_event.set()

    def _run(self) -> None:
        plan = self.plan
        pacer = Pacer(self.spin_s)
        t0 = time.perf_counter() + self.start_delay_s
        t0_wall = time.time_ns() + int((t0 - time.perf_counter()) * 1e9)
        columns = plan.columns(t0_wall)
        self.t0, self.t0_wall_ns = t0, t0_wall
        self.started_event.set()
        templates, which, start, send_at, sent_at = plan.templates, plan.template, plan.start, plan.send_at, self.sent_at
        send = self.socket.send_multipart
        clock = time.perf_counter
        wait = pacer.wait_until
        for m in range(plan.messages):
            if self._halt:
                break
            target = t0 + send_at[m]
            if clock() < target:
                wait(target)
            template = templates[which[m]]
            if template.patches:
                a, b = start[m], start[m + 1]
                for name, view in template.patches:
                    view[:] = columns[name][a:b]
            send(template.frames, copy=True)
            sent_at[m] = clock() - t0
            self.count = m + 1
            self.cells_sent = int(start[m + 1])


# ---------------------------------------------------------------------------- receiving

class Codes:
    """Strings to small integer codes, growing as new strings appear."""

    def __init__(self, initial: Sequence[str] = ("",)) -> None:
        self.names: list[str] = []
        self.index: dict[str, int] = {}
        for name in initial:
            self.code(name)

    def code(self, name: str) -> int:
        code = self.index.get(name)
        if code is None:
            code = self.index[name] = len(self.names)
            self.names.append(name)
        return code

    def codes(self, values: Sequence[str]) -> np.ndarray:
        index = self.index
        return np.array([index[v] if v in index else self.code(v) for v in values], np.int16)


@dataclass
class Chunk:
    """One decisions message, as numpy columns, stamped when it arrived (CLOCK_REALTIME ns)."""

    acquisition: str
    received_ns: int
    event_ids: np.ndarray
    label: np.ndarray  # int16 codes (Collector.labels)
    probability: np.ndarray
    dead: np.ndarray
    gate: np.ndarray  # int16 codes (Collector.gates)
    late: np.ndarray
    latency_us: np.ndarray
    error: np.ndarray  # int16 codes (Collector.errors)
    seq: int
    worker: str


class Collector(threading.Thread):
    """Receives every message of a decision socket; decisions become :class:`Chunk` s in arrival order.

    Appending is the only change to ``chunks``, so other threads read ``chunks[i:j]`` without locks.
    """

    def __init__(self, endpoint: str, context: zmq.Context, kind: int = zmq.PULL) -> None:
        super().__init__(name="bench-collector", daemon=True)
        self.socket = context.socket(kind)
        self.socket.setsockopt(zmq.RCVHWM, 1_000_000)
        self.socket.setsockopt(zmq.LINGER, 0)
        if kind == zmq.SUB:
            self.socket.setsockopt(zmq.SUBSCRIBE, b"")
        self.socket.connect(endpoint)
        self.chunks: list[Chunk] = []
        self.others: list[dict[str, Any]] = []
        self.labels, self.gates, self.errors = Codes(), Codes(), Codes()
        self.cpu_s = 0.0
        self.malformed = 0
        self._halt = threading.Event()
        self.start()

    def run(self) -> None:
        socket = self.socket
        cpu0 = time.thread_time()
        try:
            while not self._halt.is_set():
                if socket.poll(50):
                    while True:
                        try:
                            frame = socket.recv(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        received = time.time_ns()
                        while socket.getsockopt(zmq.RCVMORE):  # decisions are one frame; tolerate more
                            socket.recv()
                        self._handle(frame, received)
                self.cpu_s = time.thread_time() - cpu0
        finally:
            socket.close(linger=0)

    def _handle(self, frame: bytes, received: int) -> None:
        try:
            message = codec.decode_output([frame])
        except Exception:  # garbage, another version, a decisions message missing a column
            self.malformed += 1
            return
        if not isinstance(message, p.Decisions):
            message["received_ns"] = received
            self.others.append(message)
            return
        self.chunks.append(Chunk(
            acquisition=message.acquisition, received_ns=received, event_ids=message.event_ids,
            label=self.labels.codes(message.label), probability=message.probability, dead=message.dead,
            gate=self.gates.codes(message.gate), late=message.late, latency_us=message.latency_us,
            error=self.errors.codes(message.error), seq=message.seq, worker=message.worker,
        ))

    def cells(self) -> int:
        return sum(len(c.event_ids) for c in self.chunks)

    def wait_other(self, message_type: str, timeout: float, since: int = 0, **fields: Any) -> dict[str, Any] | None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for message in self.others[since:]:
                if message.get(p.TYPE) == message_type and all(message.get(k) == v for k, v in fields.items()):
                    return message
            time.sleep(0.01)
        return None

    def close(self) -> None:
        self._halt.set()
        self.join(2)


def handshake(socket: zmq.Socket, collector: Collector, timeout: float = 30.0) -> dict[str, Any]:
    """Ping until a pong comes back on the decision socket (the whole path is connected)."""
    end = time.monotonic() + timeout
    nonce = int(time.time_ns() % 1_000_000_000)
    while time.monotonic() < end:
        nonce += 1
        socket.send_multipart(codec.encode_ping(nonce))
        pong = collector.wait_other(p.PONG, 0.1, nonce=nonce)
        if pong is not None:
            return pong
    raise TimeoutError(f"no pong from the streamer within {timeout:.0f} s: is it running, and are the endpoints right?")


# ---------------------------------------------------------------------------- joining

@dataclass
class Outcome:
    """Each planned cell's decision (where one came), in the plan's cell order."""

    decided: np.ndarray  # bool [T]
    received_ns: np.ndarray  # int64 [T], 0 where not decided
    label: np.ndarray  # int16 codes into label_names, -1 where not decided
    probability: np.ndarray
    dead: np.ndarray
    gate: np.ndarray  # int16 codes into gate_names, -1 where not decided
    late: np.ndarray
    latency_us: np.ndarray  # the service's receipt-to-send latency
    error: np.ndarray  # int16 codes into error_names, -1 where not decided
    label_names: list[str]
    gate_names: list[str]
    error_names: list[str]
    duplicates: int = 0
    strays: int = 0  # decisions for this plan's acquisitions whose event id was not planned
    chunks: int = 0


def join(plan: Plan, chunks: Sequence[Chunk], collector: Collector) -> Outcome:
    """Match decisions to planned cells by (acquisition, event id); later duplicates are counted, not used."""
    t = plan.cells
    out = Outcome(
        decided=np.zeros(t, bool), received_ns=np.zeros(t, np.int64), label=np.full(t, -1, np.int16),
        probability=np.full(t, np.nan, np.float32), dead=np.zeros(t, bool), gate=np.full(t, -1, np.int16),
        late=np.zeros(t, bool), latency_us=np.zeros(t, np.int64), error=np.full(t, -1, np.int16),
        label_names=list(collector.labels.names), gate_names=list(collector.gates.names),
        error_names=list(collector.errors.names),
    )
    for code, name in enumerate(plan.acquisitions):
        mine = [c for c in chunks if c.acquisition == name]
        if not mine:
            continue
        out.chunks += len(mine)
        cells = np.flatnonzero(plan.acquisition == code)
        ids = plan.event_ids[cells]
        order = np.argsort(ids, kind="stable")
        sorted_ids = ids[order]
        got = np.concatenate([c.event_ids for c in mine])
        position = np.minimum(np.searchsorted(sorted_ids, got), len(sorted_ids) - 1)
        found = sorted_ids[position] == got
        out.strays += int((~found).sum())
        target = cells[order[position[found]]]
        # First decision per cell wins: keep the first occurrence of each target.
        unique_targets, first = np.unique(target, return_index=True)
        out.duplicates += len(target) - len(unique_targets) + int(out.decided[unique_targets].sum())
        source = np.flatnonzero(found)[first]
        received = np.concatenate([np.full(len(c.event_ids), c.received_ns, np.int64) for c in mine])
        columns = {column: np.concatenate([getattr(c, column) for c in mine])
                   for column in ("label", "probability", "dead", "gate", "late", "latency_us", "error")}
        fresh = ~out.decided[unique_targets]
        dest, src = unique_targets[fresh], source[fresh]
        out.decided[dest] = True
        out.received_ns[dest] = received[src]
        for column, values in columns.items():
            getattr(out, column)[dest] = values[src]
    return out


@dataclass
class RunRecord:
    """A finished run: the plan, when things were sent, and the decisions matched to cells."""

    plan: Plan
    t0_wall_ns: int
    sent_at: np.ndarray  # s after the start, per message sent
    messages_sent: int
    cells_sent: int
    pacing: PacingStats
    outcome: Outcome
    sender_cpu_s: float
    receiver_cpu_s: float
    wall_s: float  # start to the end of the drain
    drain_s: float
    # This whole process (sender, receiver, their ZeroMQ I/O threads, a dashboard): what the instrument costs
    # the machine, which its two threads alone understate.
    instrument_cpu_s: float = 0.0
    machine_idle_share: float | None = None  # of every core over the run (Linux); near 0: the cores were full

    @property
    def capture_ns(self) -> np.ndarray:
        capture = self.plan.capture_ns(self.t0_wall_ns)
        return np.zeros(self.plan.cells, np.int64) if capture is None else capture


def run_plan(socket: zmq.Socket, collector: Collector, plan: Plan, *, drain_timeout_s: float = 5.0,
             spin_s: float = DEFAULT_SPIN_S, tick: Callable[[PacedSender, int], None] | None = None,
             tick_s: float = 0.25, stop: Callable[[], bool] | None = None) -> RunRecord:
    """Send ``plan``, then wait (up to ``drain_timeout_s``) for a decision on every cell sent.

    ``tick(sender, first_chunk)`` is called about every ``tick_s`` while it runs (dashboard, progress).
    """
    first_chunk = len(collector.chunks)
    receiver_cpu = collector.cpu_s
    process_cpu, machine = time.process_time(), machine_cpu_ticks()
    sender = PacedSender(socket, plan, spin_s)
    sender.start()
    sender.started_event.wait()
    try:
        while sender.is_alive():
            sender.join(tick_s)
            if tick is not None:
                tick(sender, first_chunk)
            if stop is not None and stop():
                sender.stop()
    except KeyboardInterrupt:  # Ctrl-C: stop sending, still collect and report what was sent
        sender.stop()
        sender.join()
        drain_timeout_s = min(drain_timeout_s, 2.0)
    if sender.error is not None:
        raise sender.error
    sent_cells = sender.cells_sent
    counter = DecidedCounter(collector, plan.acquisitions, first_chunk)
    drain_start = time.perf_counter()
    while time.perf_counter() - drain_start < drain_timeout_s:
        if counter.update() >= sent_cells:
            break
        time.sleep(0.02)
        if tick is not None and time.perf_counter() - drain_start > tick_s:
            tick(sender, first_chunk)
    drain = time.perf_counter() - drain_start
    time.sleep(0.05)  # duplicates and stragglers
    wall = time.perf_counter() - sender.t0
    chunks = collector.chunks[first_chunk:]
    outcome = join(plan, chunks, collector)
    count = sender.count
    return RunRecord(
        plan=plan, t0_wall_ns=sender.t0_wall_ns, sent_at=sender.sent_at[:count], messages_sent=count,
        cells_sent=sent_cells, pacing=pacing_stats(plan.send_at[:count], sender.sent_at[:count]), outcome=outcome,
        sender_cpu_s=sender.cpu_s, receiver_cpu_s=collector.cpu_s - receiver_cpu, wall_s=wall, drain_s=drain,
        instrument_cpu_s=time.process_time() - process_cpu, machine_idle_share=idle_share(machine, machine_cpu_ticks()),
    )


def machine_cpu_ticks() -> tuple[int, int] | None:
    """Busy and idle (idle + iowait) ticks of all cores so far, from /proc/stat; None where there is none."""
    try:
        with open("/proc/stat") as stat:
            fields = [int(v) for v in stat.readline().split()[1:8]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + fields[4]
    return sum(fields) - idle, idle


def idle_share(before: tuple[int, int] | None, after: tuple[int, int] | None) -> float | None:
    """The share of the machine's CPU time that was idle between two :func:`machine_cpu_ticks` readings."""
    if before is None or after is None:
        return None
    busy, idle = after[0] - before[0], after[1] - before[1]
    return idle / (busy + idle) if busy + idle > 0 else None


class DecidedCounter:
    """Decisions received so far for a set of acquisitions, counted incrementally."""

    def __init__(self, collector: Collector, acquisitions: Sequence[str], first_chunk: int = 0) -> None:
        self.collector = collector
        self.names = set(acquisitions)
        self.next = first_chunk
        self.count = 0

    def update(self) -> int:
        chunks = self.collector.chunks
        end = len(chunks)
        self.count += sum(len(c.event_ids) for c in chunks[self.next:end] if c.acquisition in self.names)
        self.next = end
        return self.count
