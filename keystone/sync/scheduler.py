"""When to sync: an apscheduler interval job with a fixed per-device offset and backoff.

A thousand devices must not hit the fleet server in the same second: each device's first poll
is delayed by a fixed offset derived from a hash of its id (the Go Keystone's scheme), so the
fleet spreads evenly over the jitter window and each device keeps its slot. While the source is
unreachable the next poll backs off exponentially, up to 16 intervals or 30 minutes.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any


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
    """Runs ``tick`` every ``interval`` seconds after a per-device offset; pausable."""

    def __init__(
        self, tick: Callable[[], Awaitable[Any]], *, interval: float, jitter: float, device_id: str
    ) -> None:
        self.tick = tick
        self.interval = interval
        self.offset = device_offset(device_id, jitter)
        self.failures = 0
        self._scheduler: Any = None
        self._job: Any = None

    def start(self, *, paused: bool = False) -> None:
        # apscheduler is heavy: only an agent with a source to poll loads it.
        from apscheduler.schedulers.asyncio import AsyncIOScheduler

        self._scheduler = AsyncIOScheduler(timezone=UTC)
        first = datetime.now(UTC) + timedelta(seconds=self.offset)
        self._job = self._scheduler.add_job(
            self._run,
            "interval",
            seconds=self.interval,
            next_run_time=first,
            id="sync",
            max_instances=1,
            coalesce=True,
            misfire_grace_time=None,
        )
        self._scheduler.start(paused=False)
        if paused:
            self._job.pause()

    async def _run(self) -> None:
        await self.tick()

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
        if self._job is None or self._job.next_run_time is None:
            return
        self._job.modify(next_run_time=datetime.now(UTC) + timedelta(seconds=delay))

    def next_run(self) -> float | None:
        """Epoch seconds of the next poll, or None when paused."""
        if self._job is None or self._job.next_run_time is None:
            return None
        return float(self._job.next_run_time.timestamp())

    def pause(self) -> None:
        if self._job is not None:
            self._job.pause()

    def resume(self) -> None:
        if self._job is not None:
            self._job.resume()

    def shutdown(self) -> None:
        if self._scheduler is not None and self._scheduler.running:
            self._scheduler.shutdown(wait=False)
