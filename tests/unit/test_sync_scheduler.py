"""SyncScheduler: the poll timer on a fake monotonic clock (slots, backoff, pause, overlap)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from keystone.runtime.timing import FakeClock
from keystone.sync.scheduler import SyncScheduler, backoff_delay, device_offset

T0 = 5000.0
WALL0 = 1_700_000_000.0


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(test())  # type: ignore[arg-type]


class Polls:
    """A tick that records the fake time of each poll; ``hold`` keeps a poll running."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.times: list[float] = []
        self.hold: asyncio.Event | None = None
        self.fail = False

    async def __call__(self) -> None:
        self.times.append(self.clock.now())
        if self.hold is not None:
            await self.hold.wait()
        if self.fail:
            raise RuntimeError("the poll broke")


def scheduler(clock: FakeClock, polls: Polls, interval: float = 60.0) -> SyncScheduler:
    return SyncScheduler(
        polls,
        interval=interval,
        jitter=10.0,
        device_id="dev-1",
        clock=clock,
        wall=lambda: WALL0 + clock.now() - T0,
    )


def plain(interval: float = 10.0) -> tuple[FakeClock, Polls, SyncScheduler]:
    """A fake clock, its polls and a scheduler of ``interval`` with no jitter (not started)."""
    clock = FakeClock(T0)
    polls = Polls(clock)
    return (
        clock,
        polls,
        SyncScheduler(polls, interval=interval, jitter=0, device_id="d", clock=clock),
    )


class TestSlots:
    def test_first_poll_after_the_offset_then_every_interval(self) -> None:
        """The first poll waits the device's offset, the next ones one interval each."""

        async def t() -> None:
            clock = FakeClock(T0)
            polls = Polls(clock)
            sched = scheduler(clock, polls)
            offset = device_offset("dev-1", 10.0)
            sched.start()
            assert sched.next_run() == WALL0 + offset
            await clock.advance(offset + 181)
            assert polls.times == pytest.approx([T0 + offset + k * 60 for k in range(4)])
            assert sched.next_run() == pytest.approx(WALL0 + offset + 240)

        run(t)

    def test_a_zero_interval_polls_every_second(self) -> None:
        """interval = "0s" is one poll a second, as before (apscheduler's minimum)."""

        async def t() -> None:
            clock, polls, sched = plain(0)
            sched.start()
            await clock.advance(3)
            assert polls.times == [T0, T0 + 1, T0 + 2, T0 + 3]

        run(t)

    def test_a_poll_still_running_skips_the_slots_it_overlaps(self) -> None:
        """One poll at a time: the slots that fall due while it runs are skipped, not queued."""

        async def t() -> None:
            clock, polls, sched = plain()
            polls.hold = asyncio.Event()
            sched.start()
            await clock.advance(35)
            assert polls.times == [T0]
            polls.hold.set()
            polls.hold = None
            await clock.advance(5)
            assert polls.times == [T0, T0 + 40]

        run(t)

    def test_a_failing_poll_does_not_end_the_schedule(self) -> None:
        """An exception out of a poll is logged; the next slot polls again."""

        async def t() -> None:
            clock, polls, sched = plain()
            polls.fail = True
            sched.start()
            await clock.advance(20)
            assert polls.times == [T0, T0 + 10, T0 + 20]

        run(t)


class TestBackoff:
    def test_unreachable_polls_back_off_and_a_reachable_one_resets(self) -> None:
        """Each unreachable poll moves the next one by the backoff; success restores the interval."""

        async def t() -> None:
            clock, polls, sched = plain()
            sched.start()
            await clock.advance(0)
            sched.record(reachable=False)
            assert clock.deadlines == [T0 + backoff_delay(10, 1)]  # 20 s, the old slot is gone
            await clock.advance(20)
            assert polls.times == [T0, T0 + 20]
            sched.record(reachable=False)
            await clock.advance(40)
            assert polls.times[-1] == T0 + 60
            sched.record(reachable=True)
            assert sched.failures == 0
            await clock.advance(10)
            assert polls.times[-1] == T0 + 70
            sched.record(reachable=True)  # no backoff to undo: the schedule is unchanged
            assert clock.deadlines == [T0 + 80]

        run(t)


class TestPause:
    def test_paused_has_no_next_poll_and_resume_keeps_the_slots(self) -> None:
        """While paused nothing polls; resuming waits for the next slot of the schedule."""

        async def t() -> None:
            clock, polls, sched = plain()
            sched.start(paused=True)
            assert sched.next_run() is None and clock.deadlines == []
            await clock.advance(25)
            assert polls.times == []
            sched.resume()
            assert clock.deadlines == [T0 + 30]
            sched.resume()  # resuming twice arms one timer
            assert clock.deadlines == [T0 + 30]
            await clock.advance(5)
            sched.pause()
            await clock.advance(20)
            assert polls.times == [T0 + 30]

        run(t)

    def test_shutdown_cancels_the_running_poll_and_the_timer(self) -> None:
        """After shutdown no timer is left and a poll in progress is cancelled."""

        async def t() -> None:
            clock, polls, sched = plain()
            polls.hold = asyncio.Event()
            sched.start()
            await clock.advance(0)
            task = sched._task
            assert task is not None and not task.done()
            sched.shutdown()
            await clock.settle()
            assert task.cancelled() and clock.deadlines == []
            sched.resume()
            sched.record(reachable=False)
            assert clock.deadlines == [] and sched.next_run() is None

        run(t)


class TestRealLoop:
    def test_the_default_clock_polls_on_the_running_loop(self) -> None:
        """With the real clock the timer is the loop's: a short interval polls repeatedly."""

        async def t() -> None:
            done = asyncio.Event()
            count = 0

            async def tick() -> None:
                nonlocal count
                count += 1
                if count == 3:
                    done.set()

            sched = SyncScheduler(tick, interval=0.01, jitter=0, device_id="d")
            sched.start()
            await asyncio.wait_for(done.wait(), 10)
            sched.shutdown()

        run(t)
