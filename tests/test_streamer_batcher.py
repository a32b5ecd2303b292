"""The deadline-aware micro-batcher, on a fake clock (integer ns)."""

from __future__ import annotations

import numpy as np
import pytest

from streamer.batcher import ADMISSION_SAFETY, LEAD_NS, NEVER, SAFETY_MAX, Batcher, Marker, Planner, Segment

US = 1_000
MS = 1_000_000
SIZES = (1, 2, 4, 8)


def linear_costs(sizes=SIZES, fixed=200 * US, per_cell=50 * US) -> dict[int, float]:
    return {s: fixed + per_cell * s for s in sizes}


def segment(first_id: int, n: int, arrival: int, deadline: int | list[int] = NEVER, acq: str = "a") -> Segment:
    ids = np.arange(first_id, first_id + n, dtype=np.uint64)
    pixels = np.full((n, 2, 4, 4), first_id, np.uint16)
    deadlines = np.broadcast_to(np.asarray(deadline, np.int64), (n,)).copy()
    return Segment(acq, ids, pixels, arrival, deadlines, np.full(n, arrival, np.int64))


def batcher(max_delay=1 * MS, capacity=64, overload="drop_oldest", costs=None) -> Batcher:
    return Batcher(Planner(SIZES, costs or linear_costs()), max_delay, capacity, overload)


def ids_of(batch) -> list[int]:
    return [int(i) for piece in batch.pieces for i in piece.segment.event_ids[piece.index]]


def test_waits_max_delay_for_company_then_merges_small_messages() -> None:
    b = batcher()
    assert b.due(0) is None
    b.add(segment(0, 1, arrival=0))
    assert b.due(10 * US) == 1 * MS  # the oldest cell's wait runs out at max_delay
    b.add(segment(1, 1, arrival=300 * US))
    b.add(segment(2, 1, arrival=600 * US))
    assert b.due(700 * US) == 1 * MS
    batch = b.take(1 * MS)
    # three cells: two batches (2 + 1) cost 850 us, a padded 4 costs 400 us: pad
    assert ids_of(batch) == [0, 1, 2] and batch.cells == 3 and batch.size == 4
    assert len(b) == 0 and b.due(2 * MS) is None


def test_full_batch_is_due_at_once_and_large_messages_split() -> None:
    b = batcher()
    b.add(segment(0, 19, arrival=0))
    assert b.due(0) == 0
    sizes = []
    while len(b):
        batch = b.take(0)
        sizes.append(batch.cells)
        assert batch.size in SIZES and batch.size >= batch.cells
    assert sizes[:2] == [8, 8] and sum(sizes) == 19


def test_planner_follows_measured_costs() -> None:
    # An engine for which 8 is slow per cell: the planner prefers 4 + 4.
    planner = Planner(SIZES, {1: 100, 2: 150, 4: 200, 8: 1000})
    assert planner.size_for(8) == 4 and planner.size_for(3) == 4 and planner.size_for(100) == 4
    cheap_big = Planner(SIZES, {1: 100, 2: 190, 4: 380, 8: 500})
    assert cheap_big.size_for(8) == 8
    assert cheap_big.size_for(2) == 2 and cheap_big.size_for(1) == 1
    assert planner.pad_size(3) == 4 and planner.pad_size(5) == 8


def test_no_waiting_where_batching_does_not_pay() -> None:
    flat = Planner(SIZES, {1: 100, 2: 200, 4: 400, 8: 800})  # every cell costs the same at any batch size
    assert not flat.batching_pays
    b = Batcher(flat, 5 * MS, 64)
    b.add(segment(0, 1, arrival=0))
    assert b.due(10) == 0  # due at its arrival: waiting for company would only add latency
    b.adaptive_delay = False
    assert b.due(10) == 5 * MS
    assert Planner(SIZES, linear_costs()).batching_pays


def test_an_idle_parallel_engine_does_not_wait_for_company() -> None:
    b = Batcher(Planner(SIZES, linear_costs(), parallel=2), 1 * MS, 64)
    b.add(segment(0, 1, arrival=0))
    assert b.due(10) <= 10  # a stream is free: run now
    assert b.due(10, backlog_ns=2 * MS) == 2 * MS + 10 - b.lead_ns  # both busy: grow until one frees up
    b.adaptive_delay = False
    assert b.due(10) == 1 * MS


def test_planner_updates_from_observations() -> None:
    planner = Planner(SIZES, {1: 100, 2: 150, 4: 200, 8: 300})
    assert planner.size_for(8) == 8
    for _ in range(256):
        planner.observe(8, 10_000)
    assert planner.size_for(8) == 4


def test_deadline_brings_the_batch_forward() -> None:
    b = batcher(max_delay=5 * MS)
    b.add(segment(0, 1, arrival=0, deadline=2 * MS))
    # a batch of 1 costs 250 us: it must start by 1.75 ms, before max_delay
    assert b.due(0) == 2 * MS - 250 * US
    # cells busy in the engine push it earlier still
    assert b.due(0, backlog_ns=1 * MS) == 2 * MS - 1250 * US


def test_batch_size_fits_the_earliest_deadline() -> None:
    # Big batches slightly cheaper per cell: with no deadline a backlog of 8 goes as one batch of 8 (2.6 ms) ...
    costs = {1: 400 * US, 2: 760 * US, 4: 1400 * US, 8: 2600 * US}
    b = batcher(costs=costs)
    b.add(segment(0, 8, arrival=0))
    assert b.take(0).cells == 8
    # ... but cells due in 1.5 ms go in the largest batch that finishes by then (4 cells: 1.4 ms), the rest next.
    b.add(segment(10, 16, arrival=0, deadline=1500 * US))
    assert b.take(0).cells == 4
    # an engine busy for another 0.5 ms leaves 1 ms: 2 cells; busy for 1 ms leaves 0.5 ms: 1
    assert b.take(0, backlog_ns=500 * US).cells == 2
    assert b.take(0, backlog_ns=1 * MS).cells == 1
    # nothing fits at all: the head cells are late whatever runs, so the batch is not shrunk (9 queued: 8)
    assert b.take(0, backlog_ns=5 * MS).cells == 8
    assert Planner(SIZES, costs).fit(8, 1e12) == 8 and Planner(SIZES, costs).fit(4, 1e12) == 4


def test_a_busy_engine_lets_the_batch_grow() -> None:
    b = batcher(max_delay=1 * MS)
    b.add(segment(0, 1, arrival=0))
    # engine busy for 3 more ms: not due at max_delay, shortly before the engine frees up
    assert b.due(0, backlog_ns=3 * MS) == 3 * MS - b.lead_ns
    assert b.due(0) == 1 * MS


def test_expired_cells_are_not_run() -> None:
    b = batcher()
    b.add(segment(0, 4, arrival=0, deadline=[5 * MS, 1 * MS, 5 * MS, 1 * MS]))
    batch = b.take(2 * MS)
    assert ids_of(batch) == [0, 2] and batch.cells == 2 and batch.size == 2
    expired = [int(i) for piece in batch.expired for i in piece.segment.event_ids[piece.index]]
    assert expired == [1, 3]


def test_marker_flushes_and_follows_earlier_cells() -> None:
    b = batcher(max_delay=50 * MS)
    b.add(segment(0, 3, arrival=0, acq="a"))
    end = Marker("end of a")
    b.add_marker(end)
    b.add(segment(3, 1, arrival=0, acq="b"))
    assert b.due(0) == 0  # an end of acquisition does not wait for company
    batch = b.take(0)
    assert ids_of(batch) == [0, 1, 2] and batch.markers == [end]
    batch = b.take(0)
    assert ids_of(batch) == [3] and batch.markers == []


def test_marker_alone_passes() -> None:
    b = batcher()
    marker = Marker("x")
    b.add_marker(marker)
    assert b.due(0) == 0
    batch = b.take(0)
    assert batch.cells == 0 and batch.markers == [marker] and b.due(0) is None


def test_draining_runs_everything_now() -> None:
    b = batcher(max_delay=50 * MS)
    b.add(segment(0, 1, arrival=0))
    assert b.due(0) == 50 * MS
    b.draining = True
    assert b.due(0) == 0


def test_overload_drop_oldest_keeps_the_bound() -> None:
    b = batcher(capacity=10)
    first = b.add(segment(0, 6, arrival=0))
    assert first.queued and not first.dropped
    admission = b.add(segment(6, 6, arrival=1))
    dropped = admission.dropped
    assert admission.queued and not admission.refused and len(b) == 10
    assert [int(i) for piece in dropped for i in piece.segment.event_ids[piece.index]] == [0, 1]
    taken = []
    while len(b):
        taken += ids_of(b.take(10 * MS))
    assert taken == list(range(2, 12))


def test_overload_refuse_turns_the_new_message_away() -> None:
    b = batcher(capacity=10, overload="refuse")
    b.add(segment(0, 6, arrival=0))
    admission = b.add(segment(6, 6, arrival=1))
    assert not admission.queued and admission.refused and len(b) == 6
    assert [int(i) for piece in admission.dropped for i in piece.segment.event_ids[piece.index]] == list(range(6, 12))


def test_queue_never_exceeds_capacity_under_any_arrivals() -> None:
    rng = np.random.default_rng(0)
    b = batcher(capacity=50)
    now, next_id, answered = 0, 0, 0
    for _ in range(2000):
        n = int(rng.integers(1, 12))
        admission = b.admit(segment(next_id, n, arrival=now, deadline=now + 3 * MS), now)
        next_id += n
        answered += sum(piece.count for pieces in (admission.dropped, admission.expired, admission.shed)
                        for piece in pieces)
        assert len(b) <= 50
        now += int(rng.integers(0, 200 * US))
        due = b.due(now)
        if due is not None and due <= now and rng.random() < 0.5:
            batch = b.take(now)
            answered += batch.cells + sum(piece.count for piece in batch.expired)
    b.draining = True
    while b.due(now) is not None:
        batch = b.take(now)
        answered += batch.cells + sum(piece.count for piece in batch.expired)
    assert answered == next_id  # every cell run, expired or dropped: none lost


def test_bad_overload_name() -> None:
    with pytest.raises(ValueError):
        Batcher(Planner(SIZES), 0, 10, "panic")


def ids_in(pieces) -> list[int]:
    return [int(i) for piece in pieces for i in piece.segment.event_ids[piece.index]]


def test_admission_answers_at_once_the_cells_that_cannot_make_their_deadline() -> None:
    costs = {1: 400 * US, 2: 760 * US, 4: 1400 * US, 8: 2600 * US}
    b = batcher(costs=costs, capacity=1000)
    # Arrived with its deadline already past: expired at the door, never queued.
    gone = b.admit(segment(0, 1, arrival=0, deadline=-1), 0)
    assert not gone.queued and ids_in(gone.expired) == [0] and len(b) == 0
    # 16 cells due in 1.5 ms on an idle engine: with the admission's margin (15% and 0.1 ms) the first 3 can be
    # decided by then (batches of 2 and 1: 1.16 ms of work), not 4 (1.4 ms), nor the rest.
    part = b.admit(segment(10, 16, arrival=0, deadline=1500 * US), 0)
    assert part.queued and ids_in(part.shed) == list(range(13, 26)) and len(b) == 3
    # Behind those 3 and an engine busy for 1 more ms, a cell due in 2 ms cannot make it ...
    b.engine_free_ns = 1 * MS
    assert ids_in(b.admit(segment(30, 1, arrival=0, deadline=2 * MS), 0).shed) == [30]
    # ... one due in 5 ms can, and cells without a deadline are never shed.
    assert b.admit(segment(31, 1, arrival=0, deadline=5 * MS), 0).queued
    assert b.admit(segment(32, 50, arrival=0), 0).queued and len(b) == 54


def test_admission_allows_for_how_far_batches_overran_the_plan() -> None:
    """Batches that ran longer than planned (a machine whose cores the engine shares) make admission plan with the
    95th percentile of the overrun: a cell the plan alone would admit is refused, and the margin never falls below
    ADMISSION_SAFETY nor rises above SAFETY_MAX."""
    costs = {1: 400 * US, 2: 760 * US, 4: 1400 * US, 8: 2600 * US}
    b = batcher(costs=costs, capacity=1000)
    for _ in range(500):
        b.observe_overrun(0.8)
    assert b.safety == ADMISSION_SAFETY
    assert b.admit(segment(0, 1, arrival=0, deadline=600 * US), 0).queued  # 1.15 x 400 us + 0.1 ms fits
    b = batcher(costs=costs, capacity=1000)
    rng = np.random.default_rng(0)
    for ratio in rng.uniform(1.0, 2.0, 5000):  # batches took 1-2x their plan: the 95th percentile is 1.95
        b.observe_overrun(float(ratio))
    assert b.safety == pytest.approx(1.95, abs=0.08)
    assert b.finish_estimates(1, 0)[0] == pytest.approx(b.safety * 400 * US + LEAD_NS)
    assert ids_in(b.admit(segment(0, 1, arrival=0, deadline=600 * US), 0).shed) == [0]
    for _ in range(500):
        b.observe_overrun(50.0)
    assert b.safety == SAFETY_MAX


def test_parallel_engine_drains_the_queue_faster_but_each_batch_takes_its_time() -> None:
    costs = {1: 400 * US, 2: 760 * US, 4: 1400 * US, 8: 2600 * US}
    serial, parallel = Planner(SIZES, costs), Planner(SIZES, costs, parallel=2)
    assert parallel.ceiling() == pytest.approx(2 * serial.ceiling())
    assert parallel.drain_ns(np.array([16]))[0] == pytest.approx(serial.drain_ns(np.array([16]))[0] / 2)
    b = Batcher(parallel, 0, 100)
    # One cell on an idle two-stream engine: decided after one batch of 1 (with the margin), not half of one.
    assert b.finish_estimates(1, 0)[0] == pytest.approx(ADMISSION_SAFETY * 400 * US + LEAD_NS)


def test_learned_costs_stay_near_the_measured_ones() -> None:
    """A run of very slow batches (a busy machine) must not teach a cost that refuses every cell for good."""
    planner = Planner(SIZES, {1: 100, 2: 150, 4: 200, 8: 300})
    for _ in range(1000):
        planner.observe(1, 10**9)
    assert planner.cost(1) == pytest.approx(300)  # 3x what was measured, not a second
    for _ in range(1000):
        planner.observe(1, 1)
    assert planner.cost(1) == pytest.approx(50)
