"""The fake clock: sleepers wake in deadline order, and only when time is advanced."""

from __future__ import annotations

import asyncio

import pytest

from keystone.runtime.timing import FakeClock, MonotonicClock


class TestFakeClock:
    def test_wakes_in_deadline_order(self) -> None:
        """Sleepers wake by deadline, ties in the order they slept, each at its own time."""

        async def t() -> None:
            clock = FakeClock(10.0)
            woke: list[tuple[str, float]] = []

            async def sleeper(name: str, seconds: float) -> None:
                await clock.sleep(seconds)
                woke.append((name, clock.now()))

            tasks = [
                asyncio.ensure_future(sleeper(n, s))
                for n, s in (("c", 3.0), ("a", 1.0), ("b", 3.0), ("d", 9.0))
            ]
            await clock.settle()
            assert clock.deadlines == [11.0, 13.0, 13.0, 19.0]
            await clock.advance(5.0)
            assert woke == [("a", 11.0), ("c", 13.0), ("b", 13.0)]
            assert clock.now() == 15.0
            assert await clock.advance_to_next() == 19.0
            assert woke[-1] == ("d", 19.0)
            await asyncio.gather(*tasks)

        asyncio.run(t())

    def test_wait_for(self) -> None:
        """``wait_for`` returns the result in time and raises TimeoutError in fake time."""

        async def t() -> None:
            clock = FakeClock()
            event = asyncio.Event()
            late = asyncio.ensure_future(clock.wait_for(event.wait(), 2.0))
            await clock.advance(2.0)
            with pytest.raises(TimeoutError):
                await late
            soon = asyncio.ensure_future(clock.wait_for(event.wait(), 2.0))
            await clock.settle()
            event.set()
            await clock.settle()
            assert await soon is True
            assert await clock.wait_for(asyncio.sleep(0, "x"), None) == "x"
            assert clock.deadlines == []

        asyncio.run(t())

    def test_cancelled_sleeper_is_forgotten(self) -> None:
        """A cancelled sleep leaves no deadline behind."""

        async def t() -> None:
            clock = FakeClock()
            task = asyncio.ensure_future(clock.sleep(5.0))
            await clock.settle()
            task.cancel()
            await clock.settle()
            assert clock.deadlines == []
            await clock.advance(10.0)

        asyncio.run(t())


class TestMonotonicClock:
    def test_real_clock_moves_forward(self) -> None:
        """The real clock is monotonic and its wait_for times out."""

        async def t() -> None:
            clock = MonotonicClock()
            before = clock.now()
            await clock.sleep(0)
            assert clock.now() >= before
            with pytest.raises(TimeoutError):
                await clock.wait_for(asyncio.Event().wait(), 0.01)

        asyncio.run(t())


class TestFakeTimers:
    def test_timers_run_in_deadline_order_with_sleepers(self) -> None:
        """call_later timers and sleepers wake in one deadline order; a cancelled timer never runs."""

        async def t() -> None:
            clock = FakeClock(100.0)
            seen: list[tuple[str, float]] = []

            async def sleeper() -> None:
                await clock.sleep(2.0)
                seen.append(("sleep", clock.now()))

            task = asyncio.ensure_future(sleeper())
            await clock.settle()
            clock.call_later(3.0, lambda: seen.append(("three", clock.now())))
            clock.call_later(1.0, lambda: seen.append(("one", clock.now())))
            gone = clock.call_later(1.5, lambda: seen.append(("cancelled", clock.now())))
            gone.cancel()
            assert clock.deadlines == [101.0, 102.0, 103.0]
            await clock.advance(5.0)
            assert seen == [("one", 101.0), ("sleep", 102.0), ("three", 103.0)]
            assert clock.deadlines == []
            await task

        asyncio.run(t())

    def test_a_timer_due_now_runs_on_the_next_turn(self) -> None:
        """A delay of zero (or less) runs the callback soon, without moving time."""

        async def t() -> None:
            clock = FakeClock(5.0)
            seen: list[float] = []
            clock.call_later(0.0, lambda: seen.append(clock.now()))
            assert seen == []
            await clock.settle()
            assert seen == [5.0]

        asyncio.run(t())

    def test_real_timer_is_the_loops(self) -> None:
        """MonotonicClock.call_later is the running loop's timer (cancellable)."""

        async def t() -> None:
            clock = MonotonicClock()
            done = asyncio.get_running_loop().create_future()
            clock.call_later(0.0, lambda: done.set_result(True))
            never = clock.call_later(60.0, lambda: done.set_result(False))
            assert await done is True
            never.cancel()

        asyncio.run(t())
