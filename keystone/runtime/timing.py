"""The monotonic clock the supervisor waits on, and a fake one that tests drive.

Not to be confused with :mod:`keystone.runtime.clock`, the never-backwards *wall* clock that
judges certificate expiry. This one measures durations: backoff delays, health intervals, start
timeouts, uptimes. Every wait of a :class:`~keystone.runtime.supervisor.Supervisor` goes through
a :class:`Clock`, so a test with a :class:`FakeClock` runs a crash loop of an hour in no time and
in the same order every run.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import time
from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

T = TypeVar("T")


class Timer(Protocol):
    """A callback scheduled with :meth:`Clock.call_later`."""

    def cancel(self) -> None:
        """Do not call it (no effect once it ran)."""
        ...


class Clock(Protocol):
    """Monotonic time in seconds, sleeping, waiting with a timeout, and timers."""

    def now(self) -> float:
        """Seconds on a monotonic clock (only differences mean anything)."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Return after ``seconds`` (at once for ``seconds <= 0``, after one turn of the loop)."""
        ...

    async def wait_for(self, aw: Awaitable[T], timeout: float | None) -> T:
        """Await ``aw``, cancelling it after ``timeout`` seconds (None: no limit).

        Raises:
            TimeoutError: ``timeout`` passed first.
        """
        ...

    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer:
        """Call ``callback`` on the running loop after ``delay`` seconds (no task, no future)."""
        ...


class MonotonicClock:
    """The real clock: ``time.monotonic`` and the event loop's timers."""

    def now(self) -> float:
        """``time.monotonic()`` (the clock of asyncio's default loop)."""
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        """``asyncio.sleep``."""
        await asyncio.sleep(max(0.0, seconds))

    async def wait_for(self, aw: Awaitable[T], timeout: float | None) -> T:
        """``asyncio.wait_for``."""
        return await asyncio.wait_for(aw, timeout)

    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer:
        """``loop.call_later`` on the running loop."""
        return asyncio.get_running_loop().call_later(max(0.0, delay), callback)


class _FakeTimer:
    __slots__ = ("callback", "cancelled")

    def __init__(self, callback: Callable[[], None]) -> None:
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True

    def done(self) -> bool:
        return self.cancelled


class FakeClock:
    """A clock that stands still until a test advances it.

    Sleepers wake and timers (:meth:`call_later`) run in deadline order (ties in the order they
    were scheduled), and after each wake-up the loop is given :data:`SETTLE_ROUNDS` turns, so whatever the woken task does next (a
    transition, the next sleep) has happened when :meth:`advance` returns.
    """

    #: Loop turns given to woken tasks before time moves on.
    SETTLE_ROUNDS = 50

    def __init__(self, start: float = 0.0) -> None:
        self._now = start
        self._seq = 0
        self._sleepers: list[tuple[float, int, asyncio.Future[None] | _FakeTimer]] = []

    def now(self) -> float:
        """The fake time."""
        return self._now

    async def sleep(self, seconds: float) -> None:
        """Block until :meth:`advance` moves time past ``now() + seconds``."""
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self._now + seconds, self._seq, fut))
        self._seq += 1
        await fut

    async def wait_for(self, aw: Awaitable[T], timeout: float | None) -> T:
        """Await ``aw`` with a timeout in fake time."""
        if timeout is None:
            return await aw
        task = asyncio.ensure_future(aw)
        timer = asyncio.ensure_future(self.sleep(timeout))
        try:
            done, _ = await asyncio.wait({task, timer}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            timer.cancel()
            task.cancel()
            raise
        timer.cancel()
        if task in done:
            return task.result()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        raise TimeoutError

    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer:
        """Call ``callback`` once :meth:`advance` reaches ``now() + delay`` (``<= 0``: soon)."""
        timer = _FakeTimer(callback)
        if delay <= 0:
            asyncio.get_running_loop().call_soon(lambda: None if timer.cancelled else callback())
            return timer
        heapq.heappush(self._sleepers, (self._now + delay, self._seq, timer))
        self._seq += 1
        return timer

    @property
    def deadlines(self) -> list[float]:
        """When the pending sleepers wake and timers run, earliest first."""
        return sorted(when for when, _, fut in self._sleepers if not fut.done())

    async def settle(self) -> None:
        """Give the loop :data:`SETTLE_ROUNDS` turns without moving time."""
        for _ in range(self.SETTLE_ROUNDS):
            await asyncio.sleep(0)

    async def advance(self, seconds: float) -> None:
        """Move time forward by ``seconds``, waking each sleeper whose deadline is reached."""
        target = self._now + max(0.0, seconds)
        await self.settle()
        while self._sleepers and self._sleepers[0][0] <= target:
            when, _, fut = heapq.heappop(self._sleepers)
            if fut.done():
                continue
            self._now = max(self._now, when)
            if isinstance(fut, _FakeTimer):
                fut.cancelled = True  # ran: a cancel() now has nothing to stop
                fut.callback()
            else:
                fut.set_result(None)
            await self.settle()
        self._now = target
        await self.settle()

    async def advance_to_next(self) -> float:
        """Advance to the earliest pending deadline (none pending: settle only); the new time."""
        pending = self.deadlines
        await self.advance(pending[0] - self._now if pending else 0.0)
        return self._now
