"""When each dataset is refreshed: its own interval, a fixed per-device offset, a driven clock.

A refresh interval is monotonic (a device whose clock jumps by decades when NTP first syncs does
not refresh a thousand times or never). The first refresh after a start is due at once when the
last one (persisted, by wall time) is older than the interval, which is the whole missed-run
policy: an intermittently powered device catches up when it wakes. Otherwise it is due when the
interval since then has passed, plus a fixed offset derived from the device id and the dataset
name (so a fleet spreads over the window and each device keeps its slot). A failed refresh is
retried sooner than a full interval: 1, 2, 4... minutes up to the interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

from keystone.datasets.manager import FAILED, DatasetManager, RefreshResult
from keystone.sync.scheduler import device_offset

JITTER_FRACTION = 0.1
MAX_JITTER = 900.0
RETRY_BASE = 60.0


class Clock(Protocol):
    """Monotonic time, wall time and sleeping: the seam tests drive."""

    def monotonic(self) -> float: ...

    def time(self) -> float: ...

    async def sleep(self, seconds: float) -> None: ...


class SystemClock:
    """The real clocks."""

    def monotonic(self) -> float:
        return time.monotonic()

    def time(self) -> float:
        return time.time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


def jitter(device_id: str, name: str, refresh: float) -> float:
    """The fixed offset of one dataset on one device: up to 10% of its interval, at most 15m."""
    return device_offset(f"{device_id}/{name}", min(refresh * JITTER_FRACTION, MAX_JITTER))


def retry_delay(refresh: float, failures: int) -> float:
    """Seconds before retrying after ``failures`` consecutive failed refreshes."""
    return float(min(refresh, RETRY_BASE * 2 ** max(0, failures - 1)))


class DatasetScheduler:
    """Runs each bound dataset's refresh when it is due.

    Args:
        manager: the datasets.
        clock: monotonic time, wall time and sleep (:class:`SystemClock` by default).
        device_id: seeds the per-device offsets.
        on_result: told every refresh's outcome (metrics, history).
    """

    def __init__(
        self,
        manager: DatasetManager,
        clock: Clock | None = None,
        *,
        device_id: str = "",
        on_result: Callable[[RefreshResult], Awaitable[None] | None] | None = None,
    ) -> None:
        self.manager = manager
        self.clock = clock or SystemClock()
        self.device_id = device_id
        self.on_result = on_result
        self.next_due: dict[str, float] = {}
        self.failures: dict[str, int] = {}
        self._wake = asyncio.Event()
        self._stopped = False

    def _first_due(self, name: str) -> float:
        spec = self.manager.bindings[name].spec
        now = self.clock.monotonic()
        last = self.manager.store.load_state(name).last_refresh
        if last is None or not self.manager.store.active(name):
            return now
        elapsed = self.clock.time() - last
        if elapsed >= spec.refresh or elapsed < 0:
            return now
        return now + (spec.refresh - elapsed) + jitter(self.device_id, name, spec.refresh)

    def sync_bindings(self) -> None:
        """Pick up datasets bound or unbound since the last call (call after bind/unbind)."""
        for name in list(self.next_due):
            if name not in self.manager.bindings:
                del self.next_due[name]
                self.failures.pop(name, None)
        for name in self.manager.bindings:
            if name not in self.next_due:
                self.next_due[name] = self._first_due(name)
        self._wake.set()

    def due(self) -> list[str]:
        """The datasets due now, in name order."""
        now = self.clock.monotonic()
        return sorted(n for n, at in self.next_due.items() if at <= now)

    def next_wake(self) -> float | None:
        """The monotonic time of the next due refresh, or None with nothing bound."""
        return min(self.next_due.values(), default=None)

    def refresh_now(self) -> None:
        """Make every dataset due at once (``POST /v1/datasets:refresh``)."""
        now = self.clock.monotonic()
        for name in self.next_due:
            self.next_due[name] = now
        self._wake.set()

    async def run_due(self) -> list[RefreshResult]:
        """Refresh what is due now and schedule each one's next refresh."""
        results = []
        for name in self.due():
            if name not in self.manager.bindings:
                continue
            spec = self.manager.bindings[name].spec
            result = await self.manager.refresh(name)
            results.append(result)
            if result.result == FAILED and not result.rolled_back:
                self.failures[name] = self.failures.get(name, 0) + 1
                delay = retry_delay(spec.refresh, self.failures[name])
            else:
                self.failures.pop(name, None)
                delay = spec.refresh
            self.next_due[name] = self.clock.monotonic() + delay
            if self.on_result is not None:
                maybe = self.on_result(result)
                if maybe is not None:
                    await maybe
        return results

    async def run(self) -> None:
        """Loop until :meth:`stop`: sleep until the next due refresh (or a wake-up), run it."""
        self.sync_bindings()
        while not self._stopped:
            self._wake.clear()
            await self.run_due()
            wake = self.next_wake()
            delay = None if wake is None else max(0.0, wake - self.clock.monotonic())
            sleeper = asyncio.ensure_future(
                self.clock.sleep(delay) if delay is not None else asyncio.Event().wait()
            )
            waker = asyncio.ensure_future(self._wake.wait())
            try:
                await asyncio.wait({sleeper, waker}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in (sleeper, waker):
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task

    def stop(self) -> None:
        """End :meth:`run` at its next wake-up."""
        self._stopped = True
        self._wake.set()
