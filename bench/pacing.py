"""Precise pacing for the simulated instrument and replay: an absolute schedule, kept with little CPU.

A schedule is a sorted array of send times in seconds from the start
(:func:`poisson_times`, :func:`fixed_times`, or a recording's own gaps).
:class:`Pacer` waits for each one against ``time.perf_counter``: it sleeps
until a short margin before the target, then spins the rest. Because every
target is absolute, a late wake-up (a busy machine, a preempted thread) never
shifts the messages after it: the achieved rate over a run is the scheduled
one, and a sender that falls behind catches up by sending at once. On Linux
the pacing thread lowers its timer slack so that a sleep overshoots by tens
of microseconds instead of ~70, which keeps the spin (the CPU a pacer burns)
short.
"""

from __future__ import annotations

import ctypes
import sys
import time
from dataclasses import dataclass

import numpy as np

DEFAULT_SPIN_S = 50e-6  # sleep until this long before a target, then spin
_PR_SET_TIMERSLACK = 29


def poisson_times(rate: float, seconds: float, rng: np.random.Generator, granule: int = 1) -> np.ndarray:
    """Arrival times (s) of a Poisson process of ``rate`` events/s over ``seconds``.

    The count is trimmed to a multiple of ``granule`` (cells per message) so that
    every message is whole.
    """
    if rate <= 0 or seconds <= 0:
        raise ValueError(f"rate and seconds must be positive, got {rate} and {seconds}")
    expected = rate * seconds
    # Draw a little more than needed, then keep the arrivals inside the window.
    gaps = rng.exponential(1.0 / rate, int(expected + 6 * np.sqrt(expected) + 16))
    times = np.cumsum(gaps)
    while times[-1] < seconds:  # vanishingly rare: extend
        more = np.cumsum(rng.exponential(1.0 / rate, len(times))) + times[-1]
        times = np.concatenate([times, more])
    times = times[times < seconds]
    return times[: len(times) - len(times) % granule]


def fixed_times(rate: float, seconds: float, granule: int = 1) -> np.ndarray:
    """Evenly spaced times (s) at ``rate`` events/s over ``seconds``, starting at 0."""
    if rate <= 0 or seconds <= 0:
        raise ValueError(f"rate and seconds must be positive, got {rate} and {seconds}")
    count = int(round(rate * seconds))
    count -= count % granule
    return np.arange(count, dtype=np.float64) / rate


def lower_timer_slack(nanoseconds: int = 1000) -> bool:
    """Make this thread's sleeps wake closer to their deadline (Linux; a no-op elsewhere)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_TIMERSLACK, nanoseconds, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


class Pacer:
    """Waits for absolute targets on the ``perf_counter`` clock: sleep, then a short spin.

    The spin calls ``time.sleep(0)`` so that other Python threads (the decision
    receiver) can take the interpreter while the pacer waits.
    """

    def __init__(self, spin_s: float = DEFAULT_SPIN_S) -> None:
        self.spin_s = max(0.0, spin_s)
        self.slack_lowered = lower_timer_slack()

    def wait_until(self, target: float) -> None:
        clock, sleep = time.perf_counter, time.sleep
        left = target - clock()
        if left > self.spin_s:
            sleep(left - self.spin_s)
        while clock() < target:
            sleep(0)


@dataclass(frozen=True)
class PacingStats:
    """How well a run kept its schedule."""

    messages: int
    scheduled_rate: float  # messages/s the schedule asked for (over the same span)
    achieved_rate: float  # messages/s actually sent
    rate_error: float  # achieved / scheduled - 1
    lag_p50_us: float  # send time minus target
    lag_p99_us: float
    lag_max_us: float
    behind_1ms: int  # messages sent more than 1 ms after their target

    def as_dict(self) -> dict[str, float | int]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


def pacing_stats(targets: np.ndarray, sent: np.ndarray) -> PacingStats:
    """Compare send times with their targets (both s, same clock and origin).

    The rate is taken over messages 0..n-1 as (n - 1) / span, both for the
    schedule and for what was sent, so a run's start-up does not count.
    """
    n = len(sent)
    if n == 0:
        return PacingStats(0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0)
    targets = targets[:n]
    lag = (sent - targets) * 1e6
    if n > 1 and targets[-1] > targets[0] and sent[-1] > sent[0]:
        scheduled = (n - 1) / (targets[-1] - targets[0])
        achieved = (n - 1) / (sent[-1] - sent[0])
    else:
        scheduled = achieved = 0.0
    return PacingStats(
        messages=n, scheduled_rate=float(scheduled), achieved_rate=float(achieved),
        rate_error=float(achieved / scheduled - 1) if scheduled else 0.0,
        lag_p50_us=float(np.percentile(lag, 50)), lag_p99_us=float(np.percentile(lag, 99)),
        lag_max_us=float(lag.max()), behind_1ms=int((lag > 1000).sum()),
    )
