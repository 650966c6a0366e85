"""The desired-state slot: one lane, latest wins, duplicates join, commands never dropped."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable, Hashable
from typing import Any

import pytest

from keystone.slot import DesiredSlot, Job, OperationFailed, OpState

JSON = dict[str, Any]


class Lane:
    """A slot with counted ids, a fixed clock, and jobs that finish when the test says so."""

    def __init__(self) -> None:
        counter = itertools.count(1)
        self.slot = DesiredSlot(ids=lambda: f"op-{next(counter)}", clock=lambda: 100.0)
        self.log: list[str] = []
        self.release: dict[str, asyncio.Event] = {}

    def job(
        self,
        name: str,
        *,
        kind: str = "sync",
        key: Hashable | None = None,
        joins: frozenset[Hashable] = frozenset(),
        desired: bool = True,
        weak: bool = False,
        hold: bool = False,
        fail: BaseException | None = None,
    ) -> Job:
        """A job that logs its start, waits for its release when ``hold``, then answers."""
        event = self.release.setdefault(name, asyncio.Event())
        if not hold:
            event.set()

        async def run(op_id: str) -> JSON:
            self.log.append(f"start {name}")
            await event.wait()
            self.log.append(f"end {name}")
            if fail is not None:
                raise fail
            return {"result": name, "operation": op_id}

        return Job(kind, run, key=key, joins=joins, desired=desired, weak=weak)


async def settle() -> None:
    """Let every ready task run until none is ready (no wall-clock time involved)."""
    for _ in range(20):
        await asyncio.sleep(0)


def run(test: Callable[[Lane], Awaitable[None]]) -> None:
    async def main() -> None:
        await test(Lane())

    asyncio.run(main())


class TestLatestWins:
    def test_newer_desired_request_replaces_the_queued_one(self) -> None:
        """A queued apply is replaced by a newer one; it completes as superseded by the newer."""

        async def go(lane: Lane) -> None:
            s = lane.slot
            running = s.submit(lane.job("a", hold=True))
            await settle()
            old = s.submit(lane.job("b", kind="apply"))
            new = s.submit(lane.job("c", kind="apply"))
            assert old.state is OpState.DONE and old.superseded_by == new.id
            assert (await old.wait())["result"] == "superseded"
            assert (await old.wait())["error"] == f"superseded by {new.id}"
            lane.release["a"].set()
            assert (await new.wait())["result"] == "c"
            assert (await running.wait())["result"] == "a"
            assert lane.log == ["start a", "end a", "start c", "end c"]

        run(go)

    def test_superseded_result_comes_from_the_job(self) -> None:
        """A job may build its own superseded record (a sync record, say)."""

        async def go(lane: Lane) -> None:
            s = lane.slot
            s.submit(lane.job("a", hold=True))
            await settle()
            base = lane.job("b")
            old = s.submit(
                Job(
                    "import",
                    base.run,
                    desired=True,
                    superseded=lambda op, by: {"result": "superseded", "mine": (op, by)},
                )
            )
            new = s.submit(lane.job("c"))
            assert (await old.wait())["mine"] == (old.id, new.id)
            lane.release["a"].set()
            await new.wait()

        run(go)

    def test_a_poll_never_replaces_a_queued_request(self) -> None:
        """A weak (scheduled) request joins a queued operator request instead of replacing it."""

        async def go(lane: Lane) -> None:
            s = lane.slot
            s.submit(lane.job("a", hold=True))
            await settle()
            rollback = s.submit(lane.job("rollback", kind="rollback", key=("rollback", None)))
            poll = s.submit(lane.job("poll", key=("sync",), weak=True))
            assert poll is rollback
            lane.release["a"].set()
            assert (await poll.wait())["result"] == "rollback"
            assert "start poll" not in lane.log

        run(go)

    def test_a_running_operation_is_never_replaced(self) -> None:
        """Latest wins among queued requests only: the one running completes."""

        async def go(lane: Lane) -> None:
            s = lane.slot
            first = s.submit(lane.job("a", hold=True))
            await settle()
            second = s.submit(lane.job("b"))
            assert first.state is OpState.RUNNING and second.state is OpState.QUEUED
            lane.release["a"].set()
            assert (await first.wait())["result"] == "a"
            assert (await second.wait())["result"] == "b"

        run(go)


class TestJoin:
    @pytest.mark.parametrize(
        ("first", "second", "joins", "same"),
        [
            (("sync", False, False), ("sync", False, False), frozenset(), True),
            (("sync", True, False), ("sync", False, False), frozenset(), False),
            (
                ("sync", True, False),
                ("sync", False, False),
                frozenset({("sync", True, False)}),
                True,
            ),
            (None, None, frozenset(), False),
            (("import", "a"), ("import", "b"), frozenset(), False),
        ],
    )
    def test_duplicates_join_the_one_in_flight(
        self, first: Any, second: Any, joins: frozenset[Hashable], same: bool
    ) -> None:
        """Equal keys (or a key the newcomer accepts) share one operation and its result."""

        async def go(lane: Lane) -> None:
            s = lane.slot
            a = s.submit(lane.job("a", key=first, hold=True))
            await settle()
            b = s.submit(lane.job("b", key=second, joins=joins))
            assert (a is b) is same
            lane.release["a"].set()
            assert (await b.wait())["result"] == ("a" if same else "b")

        run(go)

    def test_a_duplicate_joins_a_queued_operation_too(self) -> None:
        """A second identical request while the first waits in the queue gets the same id."""

        async def go(lane: Lane) -> None:
            s = lane.slot
            s.submit(lane.job("a", hold=True))
            await settle()
            q1 = s.submit(lane.job("b", key=("sync",)))
            q2 = s.submit(lane.job("c", key=("sync",)))
            assert q1 is q2
            lane.release["a"].set()
            await q1.wait()
            assert "start c" not in lane.log

        run(go)


class TestCommands:
    def test_stop_and_restart_wait_for_the_deployment_and_keep_their_order(self) -> None:
        """Commands queue behind what runs, first in first out, and are never superseded."""

        async def go(lane: Lane) -> None:
            s = lane.slot
            deploy = s.submit(lane.job("deploy", kind="apply", hold=True))
            await settle()
            stop = s.submit(lane.job("stop db", kind="stop", key=("stop", "db"), desired=False))
            restart = s.submit(
                lane.job("restart api", kind="restart", key=("restart", "api"), desired=False)
            )
            newer = s.submit(lane.job("apply 2", kind="apply"))
            assert lane.log == ["start deploy"]
            lane.release["deploy"].set()
            for op in (deploy, stop, restart, newer):
                await op.wait()
            assert [e for e in lane.log if e.startswith("start")] == [
                "start deploy",
                "start stop db",
                "start restart api",
                "start apply 2",
            ]

        run(go)

    def test_a_failing_job_raises_to_its_waiter_and_the_lane_goes_on(self) -> None:
        """The job's exception reaches whoever waits; the next operation still runs."""

        async def go(lane: Lane) -> None:
            s = lane.slot
            bad = s.submit(lane.job("bad", desired=False, fail=KeyError("x")))
            good = s.submit(lane.job("good", desired=False))
            with pytest.raises(KeyError):
                await bad.wait()
            assert (await good.wait())["result"] == "good"
            assert bad.to_json()["error"] == "KeyError: 'x'"

        run(go)


class TestLookup:
    def test_operation_states_and_wait(self) -> None:
        """An operation is queued, running, then done with its result; wait returns when done."""

        async def go(lane: Lane) -> None:
            s = lane.slot
            a = s.submit(lane.job("a", hold=True))
            b = s.submit(lane.job("b", kind="apply", desired=False))
            assert s.get(a.id) is a and s.get("op-404") is None
            await settle()
            assert s.get(a.id).to_json()["state"] == "running"  # type: ignore[union-attr]
            assert b.to_json()["state"] == "queued"
            now = await s.wait(b.id, 0)
            assert now is not None and now.state is OpState.QUEUED
            waiter = asyncio.ensure_future(s.wait(b.id, None))
            await settle()
            assert not waiter.done()
            lane.release["a"].set()
            done = await waiter
            assert done is not None
            doc = done.to_json()
            assert doc["state"] == "done" and doc["result"] == {"result": "b", "operation": b.id}
            assert doc["kind"] == "apply" and doc["submitted"] == 100.0
            assert await s.wait("op-404", 1) is None

        run(go)

    def test_old_operations_are_forgotten_beyond_the_bound(self) -> None:
        """The slot keeps the newest finished operations only."""

        async def go(lane: Lane) -> None:
            counter = itertools.count(1)
            s = DesiredSlot(ids=lambda: f"op-{next(counter)}", keep=2)
            ops = [s.submit(lane.job(f"j{i}", desired=False)) for i in range(4)]
            for op in ops:
                await op.wait()
            s.submit(lane.job("last", desired=False))
            assert s.get(ops[0].id) is None and s.get(ops[3].id) is not None

        run(go)

    def test_close_cancels_what_is_queued(self) -> None:
        """At shutdown queued operations end without a result and new ones are refused."""

        async def go(lane: Lane) -> None:
            s = lane.slot
            s.submit(lane.job("a", hold=True))
            await settle()
            queued = s.submit(lane.job("b"))
            await s.close()
            with pytest.raises(OperationFailed):
                await queued.wait()
            with pytest.raises(RuntimeError):
                s.submit(lane.job("c"))

        run(go)
