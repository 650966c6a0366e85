"""A no-change poll without the sync worker, against real servers.

The agent's own look (:mod:`keystone.sync.peek`) must answer exactly what the real worker
(``python -m keystone.sync.worker``, run here on the same request) answers, for one request on the
wire; and step aside (the worker runs) for a new tip, a forced sync, or a bundle to import.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from keystone.ledger import FailedRevision, Ledger
from keystone.plan import DesiredPlan
from keystone.sources.bundle import create_bundle
from keystone.sync import pipeline as p
from keystone.sync.model import (
    Gate,
    Outcome,
    SourceSpec,
    SyncRequest,
    WorkerAnswer,
    WorkerOp,
    WorkerRequest,
)
from keystone.sync.peek import peek
from tests.integration.sources.gitserver import FleetRepo, serve_git
from tests.integration.sources.test_sources_http import BundleServer

pytestmark = pytest.mark.integration


class CountingHost:
    """A SyncHost whose worker is the real one, and counted."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self.applied_plan = DesiredPlan.empty()
        self.metrics = None
        self.workers: list[WorkerRequest] = []
        self.events: list[dict[str, Any]] = []

    def environ(self) -> Mapping[str, str]:
        return {}

    async def run_worker(self, request: WorkerRequest, *, timeout: float) -> WorkerAnswer:
        self.workers.append(request)
        return WorkerAnswer.from_json(worker_answer(request))

    def emit(self, event: dict[str, Any]) -> None:
        self.events.append(event)

    def save_now(self) -> None:
        pass

    def save_soon(self) -> None:
        pass


def worker_answer(req: WorkerRequest) -> dict[str, Any]:
    """The real sync worker's answer to ``req`` (its own process, as the agent runs it)."""
    proc = subprocess.run(
        [sys.executable, "-m", "keystone.sync.worker"],
        input=json.dumps(req.to_json()).encode(),
        capture_output=True,
        timeout=120,
        check=True,
    )
    answer: dict[str, Any] = json.loads(proc.stdout)
    return answer


def request(runtime: Path, source: SourceSpec, **kw: Any) -> WorkerRequest:
    op = WorkerOp.HTTP_FETCH if source.type == "http" else WorkerOp.FETCH
    return WorkerRequest(op, runtime=str(runtime), source=source, **kw)


@pytest.fixture
def git_fleet(tmp_path: Path) -> Iterator[tuple[FleetRepo, str, list[str]]]:
    fleet = FleetRepo(tmp_path)
    log: list[str] = []
    with serve_git(fleet.root, log=log) as base:
        yield fleet, f"{base}/fleet.git", log


class TestGitPoll:
    def test_unchanged_tip_is_answered_as_the_worker_would_for_one_get(
        self, git_fleet: tuple[FleetRepo, str, list[str]], tmp_path: Path
    ) -> None:
        fleet, url, log = git_fleet
        rev = fleet.commit({"plans/default.toml": "[[components]]\n"})
        rt = tmp_path / "rt"
        src = SourceSpec("git", url, "main", 10)
        req = request(rt, src, applied=rev)
        worker_answer(req)  # the first fetch: the mirror has the tip
        log.clear()
        answer = asyncio.run(peek(req))
        assert answer is not None and answer.gate is Gate.UP_TO_DATE
        assert log == ["GET /fleet.git/info/refs?service=git-upload-pack"]
        assert answer.to_json() == worker_answer(req)
        # A wiped mirror is the worker's to fill again, even for the applied tip.
        shutil.rmtree(rt / "repo")
        assert asyncio.run(peek(req)) is None

    def test_known_bad_tip_is_answered_without_the_worker_unless_retried(
        self, git_fleet: tuple[FleetRepo, str, list[str]], tmp_path: Path
    ) -> None:
        fleet, url, _ = git_fleet
        old = fleet.commit({"a": "1"})
        bad = fleet.commit({"a": "2"})
        src = SourceSpec("git", url, "refs/heads/main", 10)
        req = request(tmp_path / "rt", src, applied=old, known_bad=frozenset({bad}))
        worker_answer(req)
        answer = asyncio.run(peek(req))
        assert answer is not None and answer.gate is Gate.KNOWN_BAD
        assert answer.to_json() == worker_answer(req)
        forced = request(tmp_path / "rt", src, applied=old, known_bad=frozenset(), force=True)
        assert asyncio.run(peek(forced)) is None

    def test_a_new_tip_needs_the_worker(
        self, git_fleet: tuple[FleetRepo, str, list[str]], tmp_path: Path
    ) -> None:
        fleet, url, _ = git_fleet
        old = fleet.commit({"a": "1"})
        fleet.commit({"a": "2"})
        req = request(tmp_path / "rt", SourceSpec("git", url, "main", 10), applied=old)
        assert asyncio.run(peek(req)) is None

    def test_the_pipeline_runs_no_worker_for_an_unchanged_poll(
        self, git_fleet: tuple[FleetRepo, str, list[str]], tmp_path: Path
    ) -> None:
        """Through the fetch, verify and gate steps: up to date, and the worker ran only when
        the tip moved (and for --retry)."""
        fleet, url, log = git_fleet
        rev = fleet.commit({"a": "1"})
        rt = tmp_path / "rt"
        settings = p.SyncSettings(rt, SourceSpec("git", url, "main", 10), peek=True)
        host = CountingHost(Ledger(applied=rev))
        worker_answer(request(rt, settings.source, applied=rev))  # type: ignore[arg-type]

        def run(req: SyncRequest) -> Any:
            ctx = p.SyncContext(req, host, settings, soak=_NoSoak())  # type: ignore[arg-type]
            steps = (p.target, p.fetch, p.verify, p.gate)
            return asyncio.run(p.run_pipeline(ctx, steps))

        log.clear()
        result = run(SyncRequest(trigger="schedule"))
        assert result.outcome is Outcome.UP_TO_DATE and result.revision == rev
        assert host.workers == [] and len(log) == 1
        assert host.ledger.last_sync is not None and host.ledger.last_sync.result == "up-to-date"
        result = run(SyncRequest(retry=True))
        assert len(host.workers) == 1  # forced: the worker verifies it
        host.ledger.failed[rev] = FailedRevision("x", "refused", 1.0)
        host.ledger.applied = None
        result = run(SyncRequest())
        assert result.outcome is Outcome.KNOWN_BAD and len(host.workers) == 1


class _NoSoak:
    def start(self, names: set[str]) -> None:
        pass

    def cancel(self) -> None:
        pass


class TestBundlePoll:
    @pytest.fixture
    def server(self) -> Iterator[BundleServer]:
        s = BundleServer()
        try:
            yield s
        finally:
            s.close()

    def test_304_is_answered_as_the_worker_would(
        self, server: BundleServer, tmp_path: Path
    ) -> None:
        fleet = FleetRepo(tmp_path)
        rev = fleet.commit({"plans/default.toml": "[[components]]\n"})
        out = tmp_path / "fleet.ksb"
        create_bundle(out, fleet.work, "main", None, [])
        server.put(out.read_bytes())
        rt = tmp_path / "rt"
        src = SourceSpec("http", server.url, timeout=10)
        first = request(rt, src)
        assert asyncio.run(peek(first)) is None  # nothing to be conditional on yet
        worker_answer(first)  # downloads, imports, keeps the bundle
        req = request(rt, src, applied=rev)
        before = len(server.seen)
        answer = asyncio.run(peek(req))
        assert answer is not None and answer.gate is Gate.UP_TO_DATE
        assert [s.status for s in server.seen[before:]] == [304]
        assert answer.to_json() == worker_answer(req)
        # Not settled (nothing applied): the kept bundle is the worker's to import.
        assert asyncio.run(peek(request(rt, src))) is None
        # A new bundle (200): the body is not read here; the worker downloads it.
        fleet.commit({"a": "2"})
        create_bundle(out, fleet.work, "main", None, [])
        server.put(out.read_bytes())
        before = len(server.seen)
        assert asyncio.run(peek(req)) is None
        assert [s.status for s in server.seen[before:]] == [200]

    def test_304_with_nothing_kept_is_up_to_date(
        self, server: BundleServer, tmp_path: Path
    ) -> None:
        fleet = FleetRepo(tmp_path)
        rev = fleet.commit({"plans/default.toml": "[[components]]\n"})
        out = tmp_path / "fleet.ksb"
        create_bundle(out, fleet.work, "main", None, [])
        server.put(out.read_bytes())
        rt = tmp_path / "rt"
        src = SourceSpec("http", server.url, timeout=10)
        worker_answer(request(rt, src))
        (rt / "bundles" / "http" / "current.bundle").unlink()
        req = request(rt, src, applied=rev)
        answer = asyncio.run(peek(req))
        assert answer is not None and answer.gate is Gate.UP_TO_DATE
        assert answer.to_json() == worker_answer(req)
