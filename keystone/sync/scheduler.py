"""When to sync: an interval timer on the agent's loop, with a fixed per-device offset and backoff.

A thousand devices must not hit the fleet server in the same second: each device's first poll
is delayed by a fixed offset derived from a hash of its id (the Go Keystone's scheme), so the
fleet spreads evenly over the jitter window and each device keeps its slot. While the source is
unreachable the next poll backs off exponentially, up to 16 intervals or 30 minutes.

The schedule is one timer of a monotonic :class:`~keystone.runtime.timing.Clock`, not the wall
clock: a device without a real-time clock that boots in 1970 and is set right by NTP a minute
later neither fires a burst of missed polls nor waits decades for the next one. One poll runs
at a time; a poll falling due while the last one still runs is skipped, and the schedule goes
on from the missed slot (no burst of catch-up polls).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any

from loguru import logger

from keystone.runtime.timing import Clock, MonotonicClock, Timer


def device_offset(device_id: str, window: float) -> float:
    """A fixed offset in ``[0, window)`` seconds for this device (FNV-1a of its id)."""
    if window <= 0:
        return 0.0
    h = 0xCBF29CE484222325
    for b in device_id.encode():
        h ^= b
        h = (h * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return (h % 1_000_000) / 1_000_000 * window


def backoff_delay(interval: float, failures: int, *, cap: float = 1800.0) -> float:
    """Delay before the next poll after ``failures`` consecutive unreachable polls."""
    if failures <= 0:
        return interval
    return float(min(max(cap, interval), interval * 2 ** min(failures, 4)))


class SyncScheduler:
    """Runs ``tick`` every ``interval`` seconds after a per-device offset; pausable.

    Slots are ``first + k * interval`` (``first`` is start plus the device's offset). A backoff
    (:meth:`record`) moves the next poll, and the slots after it follow on from there; resuming
    after a pause waits for the next slot of the schedule as it stood.
    """

    def __init__(
        self,
        tick: Callable[[], Awaitable[Any]],
        *,
        interval: float,
        jitter: float,
        device_id: str,
        clock: Clock | None = None,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.tick = tick
        # A zero interval polls every second (as apscheduler's interval trigger did).
        self.interval = interval if interval > 0 else 1.0
        self.offset = device_offset(device_id, jitter)
        self.failures = 0
        self.clock: Clock = clock if clock is not None else MonotonicClock()
        self.wall = wall
        self._anchor: float | None = None  # a slot of the schedule, on the monotonic clock
        self._due: float | None = None  # the next poll, None while paused or stopped
        self._timer: Timer | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopped = False

    def start(self, *, paused: bool = False) -> None:
        """Begin the schedule (on the running loop): the first poll after the offset."""
        self._stopped = False
        self._anchor = self.clock.now() + self.offset
        if not paused:
            self._arm(self._anchor)

    def _arm(self, due: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._due = due
        self._timer = self.clock.call_later(due - self.clock.now(), self._fire)

    def _fire(self) -> None:
        self._timer = None
        if self._due is None or self._stopped:
            return
        ran = self._due
        now = self.clock.now()
        # The next slot after the one that fell due; missed ones are coalesced into this poll.
        missed = max(0, math.floor((now - ran) / self.interval))
        self._anchor = ran + missed * self.interval
        self._arm(self._anchor + self.interval)
        if self._task is not None and not self._task.done():
            logger.debug("poll due while the last one still runs: skipped")
            return
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        try:
            await self.tick()
        except asyncio.CancelledError:
            raise
        except Exception:  # one failed poll never ends the schedule
            logger.exception("scheduled poll failed")

    def record(self, *, reachable: bool) -> None:
        """After a poll: reset or grow the backoff and move the next run accordingly."""
        if reachable:
            if self.failures:
                self.failures = 0
                self._reschedule(self.interval)
            return
        self.failures += 1
        self._reschedule(backoff_delay(self.interval, self.failures))

    def _reschedule(self, delay: float) -> None:
        if self._due is None or self._stopped:
            return
        self._anchor = self.clock.now() + delay
        self._arm(self._anchor)

    def next_run(self) -> float | None:
        """Epoch seconds of the next poll, or None when paused."""
        if self._due is None:
            return None
        return self.wall() + (self._due - self.clock.now())

    def pause(self) -> None:
        """No poll until :meth:`resume` (one running goes on)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._due = None

    def resume(self) -> None:
        """Poll again from the next slot of the schedule."""
        if self._stopped or self._anchor is None or self._due is not None:
            return
        now = self.clock.now()
        slots = max(0, math.ceil((now - self._anchor) / self.interval))
        self._arm(self._anchor + slots * self.interval)

    def shutdown(self) -> None:
        """Stop the schedule and cancel a poll in progress."""
        self._stopped = True
        self.pause()
        if self._task is not None and not self._task.done():
            self._task.cancel()
