"""When health probes run: one timer for every probe of the agent, due probes run together.

Each supervisor's health loop asks :meth:`ProbeScheduler.probe` for its next verdict after a
delay (its interval, or the start-up backoff). The scheduler keeps the due times in one heap and
one timer on its :class:`~keystone.runtime.timing.Clock` for the earliest; when it fires, every
probe due within :data:`COALESCE` seconds runs in the same turn of the loop, so ten components
probed every second wake the agent about once a second, not ten times.

An IP-literal ``tcp://`` or ``http://`` check is a :class:`~keystone.runtime.health.SocketProbe`
started from the timer callback: the health loop awaits one future per check, no task is made
and nothing is formatted unless the answer is news. Other checks (host names, HTTPS, ``cmd:``)
wait on the same timer and then run :func:`~keystone.runtime.health.probe` in the health loop's
own task, as before. What a probe does and answers does not depend on the scheduler.
"""

from __future__ import annotations

import asyncio
import heapq
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from keystone.runtime.health import ProbeResult, SocketProbe, parse_check, probe
from keystone.runtime.runner import CommandRunner
from keystone.runtime.timing import Clock, Timer

#: Probes due this many seconds after the earliest run with it (a few ms early at most).
COALESCE = 0.005


def _wake(fut: asyncio.Future[None]) -> None:
    fut.set_result(None)


class ProbeScheduler:
    """The due times of every health probe on one loop, behind one timer of ``clock``.

    Args:
        clock: the timers and the time (a :class:`~keystone.runtime.timing.FakeClock` in tests).
    """

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self._heap: list[tuple[float, int, asyncio.Future[Any], Callable[[], None] | None]] = []
        self._seq = 0
        self._timer: Timer | None = None
        self._timer_at = math.inf
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def pending(self) -> int:
        """Scheduled probes and waits not yet run (cancelled ones excluded)."""
        return sum(1 for _, _, fut, _ in self._heap if not fut.done())

    async def probe(
        self,
        delay: float,
        check: str,
        *,
        timeout: float,
        runner: CommandRunner,
        cwd: Path,
        env: Mapping[str, str],
    ) -> ProbeResult:
        """The verdict of ``check`` run ``delay`` seconds from now (``<= 0``: at once).

        The arguments after ``check`` are :func:`~keystone.runtime.health.probe`'s. Cancelling
        the caller drops the scheduled probe (or closes its socket).
        """
        parsed = parse_check(check)
        if isinstance(parsed, str) or not parsed.direct:
            if delay > 0:
                await self.sleep(delay)
            return await probe(check, timeout=timeout, runner=runner, cwd=cwd, env=env)
        loop = asyncio.get_running_loop()
        sp = SocketProbe(parsed, timeout, loop.create_future(), self.clock.call_later)
        if delay > 0:
            self._push(delay, sp.fut, sp.start)
        else:
            sp.start()
        return await sp.result()

    def sleep(self, delay: float) -> asyncio.Future[None]:
        """A future done ``delay`` seconds from now, on the shared timer."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._push(delay, fut, None)
        return fut

    def _push(
        self, delay: float, fut: asyncio.Future[Any], start: Callable[[], None] | None
    ) -> None:
        loop = fut.get_loop()
        if loop is not self._loop:
            # A new loop (a test's next asyncio.run): the old one's timer and entries are dead.
            self._loop = loop
            self._heap.clear()
            self._timer = None
            self._timer_at = math.inf
        when = self.clock.now() + max(0.0, delay)
        heapq.heappush(self._heap, (when, self._seq, fut, start))
        self._seq += 1
        if when < self._timer_at:
            self._arm()

    def _arm(self) -> None:
        """Point the one timer at the earliest live entry (none: no timer)."""
        heap = self._heap
        while heap and heap[0][2].done():
            heapq.heappop(heap)  # a cancelled wait or probe
        when = heap[0][0] if heap else math.inf
        if when == self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = when
        if heap:
            self._timer = self.clock.call_later(when - self.clock.now(), self._fire)

    def _fire(self) -> None:
        self._timer = None
        self._timer_at = math.inf
        heap = self._heap
        limit = self.clock.now() + COALESCE
        while heap and heap[0][0] <= limit:
            _, _, fut, start = heapq.heappop(heap)
            if fut.done():
                continue
            if start is None:
                _wake(fut)
            else:
                start()
        self._arm()
