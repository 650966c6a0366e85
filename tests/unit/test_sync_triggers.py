"""Triggers submit to the engine; the engine's start converges a journal left by a crash."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from keystone.ledger import Journal, Ledger
from keystone.sync.model import SyncRequest
from keystone.sync.triggers import BundleWatch, PollTrigger, StagedBundles

from .test_sync_engine import engine
from .test_sync_pipeline import REV, FakeHost


class FakeEngine:
    """What a trigger needs of the engine: submissions, the ledger, the host, a clock."""

    def __init__(self, result: str = "up-to-date") -> None:
        self.host = FakeHost()
        self.ledger = self.host.ledger
        self.result = result
        self.submitted: list[SyncRequest] = []
        self.imported: list[Path] = []
        self.poller: Any = None
        self.clocks = type("C", (), {"wall": staticmethod(lambda: 7.0)})()

    def submit(self, request: SyncRequest) -> Any:
        self.submitted.append(request)
        outer = self

        class Op:
            async def wait(self) -> dict[str, Any]:
                return {"result": outer.result}

        return Op()

    async def import_bundle(self, path: Path) -> dict[str, Any]:
        self.imported.append(path)
        return {"result": "applied"}


class TestPoll:
    @pytest.mark.parametrize(
        ("suspended", "result", "submitted", "failures"),
        [(True, "applied", 0, 0), (False, "applied", 1, 0), (False, "unreachable", 1, 1)],
    )
    def test_tick(self, suspended: bool, result: str, submitted: int, failures: int) -> None:
        """A poll submits a scheduled sync (not while suspended) and counts unreachable ones."""
        eng = FakeEngine(result)
        eng.ledger.suspended = suspended
        poll = PollTrigger(eng, interval=60, jitter=0, device_id="d")  # type: ignore[arg-type]
        asyncio.run(poll.tick())
        assert [r.trigger for r in eng.submitted] == ["schedule"] * submitted
        assert poll.scheduler.failures == failures


class TestBundles:
    def test_staged_bundles_are_imported_and_removed(self, tmp_path: Path) -> None:
        """Each staged bundle is imported once at start, then deleted."""
        staged = tmp_path / "bundles" / "staged"
        staged.mkdir(parents=True)
        (staged / "a.bundle").write_bytes(b"a")
        eng = FakeEngine()
        asyncio.run(StagedBundles(eng, tmp_path).run())  # type: ignore[arg-type]
        assert [p.name for p in eng.imported] == ["a.bundle"] and not list(staged.iterdir())

    def test_a_watched_bundle_is_imported_once(self, tmp_path: Path) -> None:
        """The same file (by its sha256) is imported once, whatever the number of scans."""
        stick = tmp_path / "media" / "usb" / "keystone"
        stick.mkdir(parents=True)
        (stick / "fleet.ksb").write_bytes(b"bundle")
        eng = FakeEngine()
        watch = BundleWatch(eng, (str(tmp_path / "media" / "*" / "keystone"),))  # type: ignore[arg-type]

        async def go() -> None:
            await watch.scan()
            await watch.scan()
            (stick / "copy.ksb").write_bytes(b"bundle")
            await watch.scan()

        asyncio.run(go())
        assert [p.name for p in eng.imported] == ["fleet.ksb"]
        (entry,) = eng.ledger.imported_bundles.values()
        assert entry.result == "applied" and entry.path.endswith("fleet.ksb")


class TestRecovery:
    @pytest.mark.parametrize(
        ("attempts", "failed", "journal"), [(1, False, True), (2, True, False)]
    )
    def test_a_journal_left_by_a_crash(self, attempts: int, failed: bool, journal: bool) -> None:
        """An interrupted deployment is retried once more, then its revision marked failed."""

        async def go() -> None:
            host = FakeHost(ledger=Ledger(journal=Journal(REV, attempts, 1.0)))
            eng = engine(host)
            eng.start()
            assert (REV in host.ledger.failed) is failed
            assert (host.ledger.journal is not None) is journal
            assert host.events[0]["kind"] == "recovery" and host.events[0]["revision"] == REV
            assert not eng.soak.running

        asyncio.run(go())

    def test_an_unsoaked_revision_soaks_again(self) -> None:
        """After a restart, a revision applied but not yet last known-good soaks again."""

        async def go() -> None:
            host = FakeHost(ledger=Ledger(applied=REV, last_known_good="old"))
            eng = engine(host)
            eng.start()
            assert eng.soak.running
            await eng.close()

        asyncio.run(go())
