"""ProbeScheduler: one timer for every probe, due probes run together, on a fake clock."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

from keystone.runtime.health import ProbeResult
from keystone.runtime.probes import COALESCE, ProbeScheduler
from keystone.runtime.timing import FakeClock

from .fake_runner import FakeRunner

T0 = 1000.0


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(test())  # type: ignore[arg-type]


class TestTimer:
    def test_probes_due_together_share_one_timer(self) -> None:
        """Waits due within the coalescing window wake in one timer; a later one keeps its own."""

        async def t() -> None:
            clock = FakeClock(T0)
            sched = ProbeScheduler(clock)
            step = COALESCE / 5
            near = [sched.sleep(1.0 + i * step) for i in range(5)]
            later = sched.sleep(1.2)
            assert clock.deadlines == [T0 + 1.0]  # one timer, not six
            await clock.advance(1.0)
            assert all(f.done() for f in near) and not later.done()
            assert clock.deadlines == [T0 + 1.2]
            await clock.advance(0.2)
            assert later.done() and clock.deadlines == []

        run(t)

    def test_nothing_runs_early_beyond_the_window(self) -> None:
        """A wait due just past the window is not woken with the earlier ones."""

        async def t() -> None:
            clock = FakeClock(T0)
            sched = ProbeScheduler(clock)
            first, second = sched.sleep(1.0), sched.sleep(1.0 + 2 * COALESCE)
            await clock.advance(1.0)
            assert first.done() and not second.done()
            await clock.advance(2 * COALESCE)
            assert second.done()

        run(t)

    def test_an_earlier_probe_moves_the_timer(self) -> None:
        """A wait due before the armed timer re-arms it; the old one is cancelled."""

        async def t() -> None:
            clock = FakeClock(T0)
            sched = ProbeScheduler(clock)
            late = sched.sleep(5.0)
            early = sched.sleep(1.0)
            assert clock.deadlines == [T0 + 1.0]
            await clock.advance(1.0)
            assert early.done() and not late.done()
            assert clock.deadlines == [T0 + 5.0]

        run(t)

    def test_waits_wake_in_due_order(self) -> None:
        """Whatever order they were asked in, waits wake in the order they are due."""

        async def t() -> None:
            clock = FakeClock(T0)
            sched = ProbeScheduler(clock)
            woke: list[float] = []

            async def waiter(delay: float) -> None:
                await sched.sleep(delay)
                woke.append(delay)

            tasks = [asyncio.ensure_future(waiter(d)) for d in (3.0, 1.0, 2.0)]
            await clock.settle()
            for _ in range(3):
                await clock.advance_to_next()
            assert woke == [1.0, 2.0, 3.0]
            await asyncio.gather(*tasks)

        run(t)

    def test_cancelled_waits_leave_no_timer(self) -> None:
        """A cancelled wait is dropped; once only cancelled ones are left, no timer stays armed."""

        async def t() -> None:
            clock = FakeClock(T0)
            sched = ProbeScheduler(clock)
            a, b = sched.sleep(1.0), sched.sleep(2.0)
            b.cancel()
            assert sched.pending == 1
            await clock.advance(1.0)
            assert a.done() and sched.pending == 0
            assert clock.deadlines == []  # b's due time needs no wake-up

        run(t)

    def test_a_new_event_loop_starts_afresh(self) -> None:
        """A scheduler used on a second loop does not wait for the first loop's dead timer."""
        clock = FakeClock(T0)
        sched = ProbeScheduler(clock)

        async def first() -> None:
            sched.sleep(10.0)
            await clock.settle()

        async def second() -> None:
            fut = sched.sleep(1.0)
            assert clock.deadlines[-1] == T0 + 1.0
            await clock.advance(1.0)
            assert fut.done()

        run(first)
        clock._sleepers.clear()  # the first loop's timer died with it
        run(second)


class TestProbe:
    def test_a_check_runs_after_its_delay(self, tmp_path: Path) -> None:
        """probe(delay, cmd:...) runs the check once the delay has passed on the clock."""

        async def t() -> None:
            clock = FakeClock(T0)
            sched = ProbeScheduler(clock)
            runner = FakeRunner()
            runner.probe_status = 1
            kw = {"timeout": 3.0, "runner": runner, "cwd": tmp_path, "env": {"A": "1"}}
            task = asyncio.ensure_future(sched.probe(2.0, f"cmd:{runner.probe}", **kw))  # type: ignore[arg-type]
            await clock.advance(1.9)
            assert runner.commands == [] and not task.done()
            await clock.advance(0.1)
            assert await task == ProbeResult(False, "exit 1")
            assert runner.commands == [(runner.probe, {"A": "1"}, 3.0)]
            assert await sched.probe(0.0, f"cmd:{runner.probe}", **kw) == ProbeResult(  # type: ignore[arg-type]
                False, "exit 1"
            )

        run(t)

    def test_a_cancelled_probe_never_runs(self, tmp_path: Path) -> None:
        """Cancelling the waiting health loop drops its probe: the check is never run."""

        async def t() -> None:
            clock = FakeClock(T0)
            sched = ProbeScheduler(clock)
            runner = FakeRunner()
            task = asyncio.ensure_future(
                sched.probe(
                    2.0, f"cmd:{runner.probe}", timeout=3.0, runner=runner, cwd=tmp_path, env={}
                )
            )
            await clock.settle()
            task.cancel()
            await clock.advance(5.0)
            assert runner.commands == [] and task.cancelled()

        run(t)

    def test_an_invalid_check_answers_after_its_delay(self, tmp_path: Path) -> None:
        """An unusable check is an unhealthy verdict with the reason, like any other probe."""

        async def t() -> None:
            clock = FakeClock(T0)
            sched = ProbeScheduler(clock)
            task = asyncio.ensure_future(
                sched.probe(
                    1.0, "ftp://127.0.0.1/", timeout=1.0, runner=FakeRunner(), cwd=tmp_path, env={}
                )
            )
            await clock.advance(1.0)
            result = await task
            assert not result.ok and "expected http://" in result.detail

        run(t)
