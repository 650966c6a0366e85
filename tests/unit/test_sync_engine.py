"""The sync engine's submissions to the slot: who joins whom, who replaces whom."""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path
from typing import Any

import pytest

from keystone.ledger import Ledger
from keystone.slot import DesiredSlot, Job
from keystone.sync.engine import SyncEngine
from keystone.sync.model import (
    FetchedTip,
    Gate,
    RequestKind,
    SyncRequest,
    WorkerAnswer,
    WorkerRequest,
)
from keystone.sync.pipeline import Clocks

from .test_sync_pipeline import REV, SETTINGS, FakeHost


class HeldHost(FakeHost):
    """A host whose worker answers only when the test releases it."""

    def __init__(self) -> None:
        super().__init__(answer=WorkerAnswer(ok=True, tip=FetchedTip(REV), gate=Gate.UP_TO_DATE))
        self.release = asyncio.Event()

    async def run_worker(self, request: WorkerRequest, *, timeout: float) -> WorkerAnswer:
        self.requests.append(request)
        await self.release.wait()
        return self.answer


def engine(host: FakeHost) -> SyncEngine:
    counter = itertools.count(1)
    slot = DesiredSlot(ids=lambda: f"op-{next(counter)}", clock=lambda: 5.0)
    return SyncEngine(host, SETTINGS, slot, clocks=Clocks(wall=lambda: 5.0, monotonic=lambda: 1.0))


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


class TestSubmissions:
    @pytest.mark.parametrize(
        ("first", "second", "joined"),
        [
            (SyncRequest(trigger="schedule"), SyncRequest(trigger="manual"), True),
            (SyncRequest(allow_rollback=True), SyncRequest(trigger="manual"), True),
            (SyncRequest(), SyncRequest(allow_rollback=True), False),
            (SyncRequest(), SyncRequest(dry_run=True), False),
            (SyncRequest(dry_run=True), SyncRequest(dry_run=True), True),
        ],
    )
    def test_who_joins_the_sync_in_flight(
        self, first: SyncRequest, second: SyncRequest, joined: bool
    ) -> None:
        """A plain sync joins any sync in flight; flagged and dry ones run on their own."""

        async def go() -> None:
            host = HeldHost()
            eng = engine(host)
            a = eng.submit(first)
            await settle()
            b = eng.submit(second)
            assert (a is b) is joined
            host.release.set()
            ra, rb = await a.wait(), await b.wait()
            assert ra["operation"] == a.id and rb["operation"] == b.id
            assert len(host.requests) == (1 if joined else 2)

        asyncio.run(go())

    def test_a_newer_import_replaces_a_queued_sync_and_consumes_a_superseded_upload(
        self, tmp_path: Path
    ) -> None:
        """Latest wins: the queued request ends as superseded, naming the newer operation."""

        async def go() -> None:
            host = HeldHost()
            settings = SETTINGS.__class__(runtime=tmp_path, source=SETTINGS.source)
            eng = engine(host)
            eng.settings = settings
            running = eng.submit(SyncRequest())
            await settle()
            upload = tmp_path / "bundles" / "incoming" / "u.bundle"
            upload.parent.mkdir(parents=True)
            upload.write_bytes(b"x")
            queued = eng.submit(SyncRequest(RequestKind.IMPORT, trigger="bundle", bundle=upload))
            newer = eng.submit(SyncRequest(RequestKind.ROLLBACK, trigger="rollback", to=REV))
            old = await queued.wait()
            assert old["result"] == "superseded" and old["superseded_by"] == newer.id
            assert old["error"] == f"superseded by {newer.id}" and old["exit_code"] == 0
            assert not upload.exists()
            host.release.set()
            await running.wait()
            await newer.wait()

        asyncio.run(go())

    def test_a_poll_joins_a_queued_operator_request(self) -> None:
        """A scheduled poll never replaces an operator's queued rollback."""

        async def go() -> None:
            host = HeldHost()
            eng = engine(host)
            eng.submit(SyncRequest(RequestKind.IMPORT, trigger="bundle", bundle=Path("/b.ksb")))
            await settle()
            rollback = eng.submit(SyncRequest(RequestKind.ROLLBACK, trigger="rollback", to=REV))
            poll = eng.submit(SyncRequest(trigger="schedule"))
            assert poll is rollback
            host.release.set()
            await poll.wait()

        asyncio.run(go())


class TestSoak:
    @pytest.mark.parametrize(("failed", "rolls_back"), [(REV, True), ("other", False)])
    def test_soak_failure_rolls_back_through_the_slot(self, failed: str, rolls_back: bool) -> None:
        """The soak rollback is a slot job; it does nothing once a newer revision was applied."""

        async def go() -> None:
            host = FakeHost(
                ledger=Ledger(applied=REV, last_known_good="lkg", lkg_plan={"components": []})
            )
            eng = engine(host)
            job = Job("soak-rollback", lambda _op: eng.soak_failed(failed, "db crashed"))
            result: dict[str, Any] = await eng.slot.run(job)
            if not rolls_back:
                assert result["result"] == "skipped" and host.applied == []
                assert host.ledger.applied == REV
                return
            assert result == {
                "kind": "rollback",
                "result": "rolled-back",
                "revision": REV,
                "to": "lkg",
                "error": "db crashed",
            }
            assert host.ledger.applied == "lkg" and host.ledger.failed[REV].kind == "rolled-back"
            assert host.ledger.last_sync is not None and host.ledger.last_sync.trigger == "soak"
            assert host.events == [result] and len(host.applied) == 1

        asyncio.run(go())
