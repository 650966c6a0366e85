"""The sync pipeline, one step at a time, over a fake host (no processes, no time)."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from keystone.diff import ChangeSet
from keystone.errors import ArtifactIntegrityError, KeystoneError
from keystone.ledger import FailedRevision, Journal, Ledger
from keystone.plan import DesiredPlan, plan_from_json
from keystone.runtime.deployer import ArtifactContext, DeployResult, PlannedChanges
from keystone.sync import pipeline as p
from keystone.sync.model import (
    FetchedTip,
    Gate,
    Outcome,
    RequestKind,
    SourceSpec,
    SyncRequest,
    VerifiedRevision,
    WorkerAnswer,
    WorkerOp,
    WorkerRequest,
    gate,
)
from keystone.workerproc import ErrorInfo

REV = "a" * 40
OLD = "b" * 40
RECIPE = (
    '[metadata]\nname = "{n}"\nversion = "{v}"\n\n[lifecycle.run.exec]\ncommand = "/bin/true"\n'
)


def plan_json(*names: str, version: str = "1.0.0") -> dict[str, Any]:
    return {
        "sources": ["plans/default.toml"],
        "components": [
            {
                "name": n,
                "recipe_ref": f"recipes/{n}.recipe.toml",
                "origin": "plans/default.toml",
                "recipe_source": f"recipes/{n}.recipe.toml",
                "recipe_text": RECIPE.format(n=n, v=version),
            }
            for n in names
        ],
    }


class FakeMetrics:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def sync(self, result: str, source: str, duration: float) -> None:
        self.calls.append(("sync", result, source))

    def signature_failure(self, kind: str) -> None:
        self.calls.append(("signature_failure", kind))

    def set_revision(self, revision: str, source: str) -> None:
        self.calls.append(("set_revision", revision, source))

    def rollback(self, result: str) -> None:
        self.calls.append(("rollback", result))


@dataclass
class FakeHost:
    """A SyncHost that records what the steps asked of it."""

    ledger: Ledger = field(default_factory=Ledger)
    applied_plan: DesiredPlan = field(default_factory=DesiredPlan.empty)
    metrics: FakeMetrics | None = field(default_factory=FakeMetrics)
    answer: WorkerAnswer = field(default_factory=lambda: WorkerAnswer(ok=True))
    deploy: DeployResult | KeystoneError | None = None
    events: list[dict[str, Any]] = field(default_factory=list)
    requests: list[WorkerRequest] = field(default_factory=list)
    applied: list[tuple[DesiredPlan, str, PlannedChanges | None, ArtifactContext]] = field(
        default_factory=list
    )
    saves: list[str] = field(default_factory=list)
    tasks: list[Coroutine[Any, Any, Any]] = field(default_factory=list)

    def environ(self) -> Mapping[str, str]:
        return {}

    async def apply(
        self,
        plan: DesiredPlan,
        *,
        source: str,
        planned: PlannedChanges | None,
        artifacts: ArtifactContext,
    ) -> DeployResult:
        self.applied.append((plan, source, planned, artifacts))
        if isinstance(self.deploy, KeystoneError):
            raise self.deploy
        if planned is None:
            return self.deploy or DeployResult(True, ChangeSet((), (), (), (), ()), [])
        return self.deploy or DeployResult(True, planned.changes, list(planned.actions))

    def emit(self, event: dict[str, Any]) -> None:
        self.events.append(event)

    def save_now(self) -> None:
        self.saves.append("now")

    def save_soon(self) -> None:
        self.saves.append("soon")

    async def run_worker(self, request: WorkerRequest, *, timeout: float) -> WorkerAnswer:
        self.requests.append(request)
        return self.answer

    def background(self, coro: Coroutine[Any, Any, Any]) -> None:
        self.tasks.append(coro)

    async def repair(self) -> list[str]:
        return []


class FakeSoak:
    def __init__(self) -> None:
        self.calls: list[Any] = []

    def start(self, names: set[str]) -> None:
        self.calls.append(("start", sorted(names)))

    def cancel(self) -> None:
        self.calls.append("cancel")


SETTINGS = p.SyncSettings(
    runtime=Path("/rt"), source=SourceSpec("git", "https://git.example/fleet.git"), soak=5.0
)


def context(
    request: SyncRequest | None = None,
    host: FakeHost | None = None,
    settings: p.SyncSettings = SETTINGS,
) -> p.SyncContext:
    ticks = iter([10.0, 12.5, 13.0, 14.0])
    return p.SyncContext(
        request or SyncRequest(operation="op-1"),
        host or FakeHost(),
        settings,
        FakeSoak(),
        p.Clocks(wall=lambda: 1000.0, monotonic=lambda: next(ticks)),
    )


def verified_answer(*names: str, checkout: str | None = "/rt/checkouts/x") -> WorkerAnswer:
    return WorkerAnswer(
        ok=True,
        tip=FetchedTip(REV, "https://git.example/fleet.git", 123, True),
        verified=VerifiedRevision(
            REV,
            signer="ops@example.com",
            fingerprint="SHA256:x",
            source="https://git.example/fleet.git",
            checkout=checkout,
            warnings=("w",),
        ),
        plan=plan_json(*names),
    )


def step(fn: p.Step, ctx: p.SyncContext) -> Any:
    return asyncio.run(fn(ctx))


def with_desired(ctx: p.SyncContext, *names: str) -> p.SyncContext:
    """A context whose answer, plan and diff steps have run."""
    host = ctx.host
    assert isinstance(host, FakeHost)
    host.answer = ctx.answer = verified_answer(*names)
    assert step(p.resolve, ctx) is None and step(p.diff, ctx) is None
    return ctx


class TestTarget:
    @pytest.mark.parametrize(
        ("request_", "lkg", "target", "outcome"),
        [
            (SyncRequest(), OLD, None, None),
            (SyncRequest(RequestKind.ROLLBACK, trigger="rollback", to=REV), OLD, REV, None),
            (SyncRequest(RequestKind.ROLLBACK, trigger="rollback"), OLD, OLD, None),
            (SyncRequest(RequestKind.ROLLBACK, trigger="rollback"), None, None, Outcome.REFUSED),
        ],
    )
    def test_rollback_target(
        self, request_: SyncRequest, lkg: str | None, target: str | None, outcome: Any
    ) -> None:
        """A rollback goes where it is told, else to last known-good; without one it is refused."""
        ctx = context(request_, FakeHost(ledger=Ledger(last_known_good=lkg)))
        result = step(p.target, ctx)
        assert ctx.target == target
        assert (result.outcome if result else None) is outcome
        if result:
            assert result.error == "no last known-good revision to roll back to"


class TestFetch:
    @pytest.mark.parametrize(
        ("request_", "source", "op", "known_bad", "force"),
        [
            (SyncRequest(), "git", WorkerOp.FETCH, {OLD}, False),
            (SyncRequest(), "http", WorkerOp.HTTP_FETCH, {OLD}, False),
            (SyncRequest(retry=True), "git", WorkerOp.FETCH, set(), True),
            (SyncRequest(allow_rollback=True), "git", WorkerOp.FETCH, {OLD}, True),
            (
                SyncRequest(RequestKind.IMPORT, trigger="bundle", bundle=Path("/b.ksb")),
                "git",
                WorkerOp.IMPORT_BUNDLE,
                set(),
                False,
            ),
        ],
    )
    def test_worker_request(
        self, request_: SyncRequest, source: str, op: WorkerOp, known_bad: set[str], force: bool
    ) -> None:
        """The worker is asked for the right operation, with the failed revisions to skip."""
        host = FakeHost(ledger=Ledger(applied=REV, failed={OLD: FailedRevision("x", "y", 1)}))
        settings = p.SyncSettings(Path("/rt"), SourceSpec(source, "https://x"), device_id="d")
        ctx = context(request_, host, settings)
        assert step(p.fetch, ctx) is None and ctx.answer is host.answer
        (req,) = host.requests
        assert (req.op, set(req.known_bad), req.force) == (op, known_bad, force)
        assert req.applied == REV and req.device_id == "d"
        assert WorkerRequest.from_json(req.to_json()) == req

    def test_rollback_verifies_the_target(self) -> None:
        """A rollback asks the worker to verify the target revision, rollback allowed."""
        ctx = context(SyncRequest(RequestKind.ROLLBACK, trigger="rollback", to=OLD))
        step(p.target, ctx)
        req = p.worker_request(ctx)
        assert (req.op, req.rev, req.allow_rollback) == (WorkerOp.VERIFY_REV, OLD, True)


class TestVerify:
    @pytest.mark.parametrize(
        ("error", "outcome", "marked", "metric"),
        [
            (ErrorInfo("SignatureError", "refused", "bad sig"), Outcome.REFUSED, True, "signature"),
            (ErrorInfo("RollbackRefused", "refused", "older"), Outcome.REFUSED, True, "rollback"),
            (ErrorInfo("ValidationError", "refused", "plan"), Outcome.REFUSED, True, None),
            (ErrorInfo("SourceUnreachable", "retryable", "down"), Outcome.UNREACHABLE, False, None),
            (ErrorInfo("WorkerCrash", "bug", "boom"), Outcome.ERROR, False, None),
        ],
    )
    def test_failures(
        self, error: ErrorInfo, outcome: Outcome, marked: bool, metric: str | None
    ) -> None:
        """Refusals mark the tip failed and count trust failures; others only report."""
        host = FakeHost()
        ctx = context(host=host)
        ctx.answer = WorkerAnswer.failed(error, FetchedTip(revision=REV))
        result = step(p.verify, ctx)
        assert result.outcome is outcome and result.error == error.message
        assert result.error_type == error.type
        assert (REV in host.ledger.failed) is marked
        assert host.metrics is not None
        assert host.metrics.calls == ([("signature_failure", metric)] if metric else [])

    def test_ok_goes_on(self) -> None:
        """A verified answer is not a result."""
        ctx = context()
        ctx.answer = verified_answer("db")
        assert step(p.verify, ctx) is None


class TestGate:
    @pytest.mark.parametrize(
        ("gate_", "outcome"),
        [(Gate.UP_TO_DATE, Outcome.UP_TO_DATE), (Gate.KNOWN_BAD, Outcome.KNOWN_BAD), (None, None)],
    )
    def test_gate(self, gate_: Gate | None, outcome: Outcome | None) -> None:
        """Applied or known-bad tips end the sync; the known-bad one says why it failed."""
        host = FakeHost(
            ledger=Ledger(signer="ops", failed={REV: FailedRevision("tool unhealthy", "x", 1)})
        )
        ctx = context(host=host)
        ctx.answer = WorkerAnswer(ok=True, tip=FetchedTip(REV), gate=gate_)
        result = step(p.gate, ctx)
        assert (result.outcome if result else None) is outcome
        if outcome is Outcome.UP_TO_DATE:
            assert result.signer == "ops"
        if outcome is Outcome.KNOWN_BAD:
            assert "tool unhealthy" in result.error and REV[:12] in result.error

    @pytest.mark.parametrize(
        ("tip", "applied", "known_bad", "force", "expected"),
        [
            (REV, REV, (), False, Gate.UP_TO_DATE),
            (REV, REV, (), True, None),
            (REV, OLD, (REV,), False, Gate.KNOWN_BAD),
            (REV, OLD, (REV,), True, None),
            (REV, OLD, (), False, None),
            (None, None, (), False, None),
        ],
    )
    def test_the_one_worker_gate(
        self,
        tip: str | None,
        applied: str | None,
        known_bad: tuple[str, ...],
        force: bool,
        expected: Gate | None,
    ) -> None:
        """The worker's single up-to-date / known-bad check; force verifies anyway."""
        req = WorkerRequest(
            WorkerOp.FETCH, "/rt", applied=applied, known_bad=frozenset(known_bad), force=force
        )
        assert gate(req, tip) is expected


class TestResolveAndDiff:
    def test_valid_plan_is_resolved_and_diffed_once(self) -> None:
        """The plan is rebuilt, and its change set against the applied plan computed."""
        ctx = with_desired(context(), "db", "api")
        assert ctx.desired is not None
        planned = ctx.desired.planned
        assert planned.base is ctx.host.applied_plan and planned.desired is ctx.plan
        assert planned.changes.added == ("api", "db")
        assert ctx.desired.verified.signer == "ops@example.com"

    def test_plan_that_does_not_validate_is_refused(self) -> None:
        """A resolved plan that fails validation here refuses and marks the revision."""
        host = FakeHost()
        ctx = context(host=host)
        bad = plan_json("db")
        bad["components"][0]["recipe_text"] = '[metadata]\nname = "db"\n'
        ctx.answer = WorkerAnswer(ok=True, tip=FetchedTip(REV), plan=bad)
        result = step(p.resolve, ctx)
        assert result.outcome is Outcome.REFUSED and REV in host.ledger.failed

    @pytest.mark.parametrize(("dry", "outcome"), [(True, Outcome.DRY_RUN), (False, None)])
    def test_dry_run_stops_after_the_diff(self, dry: bool, outcome: Outcome | None) -> None:
        """A dry run's record carries the change set and the actions."""
        ctx = with_desired(context(SyncRequest(dry_run=dry)), "db")
        result = step(p.dry_run, ctx)
        assert (result.outcome if result else None) is outcome
        if result:
            doc = result.to_json()
            assert doc["changes"]["added"] == ["db"] and doc["actions"][0]["action"] == "start"
            assert doc["signer"] == "ops@example.com" and doc["warnings"] == ["w"]


class TestPrepare:
    @pytest.mark.parametrize(
        ("journal", "attempts"),
        [(None, 1), (Journal(REV, 1, 0.0), 2), (Journal(OLD, 1, 0.0), 1)],
    )
    def test_journal_and_soak(self, journal: Journal | None, attempts: int) -> None:
        """The deployment is journaled (attempts counted per revision) and saved before it runs."""
        host = FakeHost(ledger=Ledger(journal=journal))
        ctx = with_desired(context(host=host), "db")
        assert step(p.prepare, ctx) is None
        assert host.ledger.journal == Journal(REV, attempts, 1000.0)
        assert host.ledger.lkg_plan == {"sources": [], "components": []}
        assert host.saves == ["now"] and ctx.soak.calls == ["cancel"]  # type: ignore[attr-defined]


class TestDeploy:
    def test_the_diff_and_the_checkout_go_to_the_deployer(self) -> None:
        """The deployer gets the change set computed by diff and the revision's checkout."""
        host = FakeHost()
        ctx = with_desired(context(host=host), "db")
        assert step(p.deploy, ctx) is None
        ((plan, source, planned, artifacts),) = host.applied
        assert ctx.desired is not None
        assert planned is ctx.desired.planned and plan is ctx.plan
        assert source == f"git:{REV[:12]}"
        assert artifacts == ArtifactContext(Path("/rt/checkouts/x"), require_sha256=True)

    @pytest.mark.parametrize(
        ("deploy", "outcome", "kind"),
        [
            (ArtifactIntegrityError("web: hash mismatch"), Outcome.REFUSED, "refused"),
            (
                DeployResult(False, ChangeSet((), (), (), (), ()), [], "db", "not healthy"),
                Outcome.ROLLED_BACK,
                "rolled-back",
            ),
        ],
    )
    def test_failures(self, deploy: Any, outcome: Outcome, kind: str) -> None:
        """A refused or rolled-back deployment marks the revision and ends the journal."""
        host = FakeHost(ledger=Ledger(journal=Journal(REV, 1, 0)), deploy=deploy)
        ctx = with_desired(context(host=host), "db")
        result = step(p.deploy, ctx)
        assert result.outcome is outcome and host.ledger.journal is None
        assert host.ledger.failed[REV].kind == kind
        if outcome is Outcome.ROLLED_BACK:
            assert result.failed_component == "db"
            assert result.error == "component db: not healthy"


class TestRecordAndSoak:
    def test_record_then_soak(self) -> None:
        """The ledger names the new revision; the anchor is marked; the soak starts."""
        host = FakeHost(ledger=Ledger(applied=OLD, failed={REV: FailedRevision("x", "y", 1)}))
        ctx = with_desired(context(host=host), "db")
        assert step(p.record, ctx) is None
        led = host.ledger
        assert (led.applied, led.signer, led.applied_plan_checkout) == (
            REV,
            "ops@example.com",
            "/rt/checkouts/x",
        )
        assert REV not in led.failed and led.applied_at == 1000.0
        assert host.metrics is not None
        assert host.metrics.calls == [("set_revision", REV, "https://git.example/fleet.git")]
        (anchor,) = host.tasks
        asyncio.run(anchor)
        assert host.requests[-1].op is WorkerOp.MARK_APPLIED and host.requests[-1].rev == REV
        result = step(p.soak, ctx)
        assert result.outcome is Outcome.APPLIED
        assert ctx.soak.calls == [("start", ["db"])]  # type: ignore[attr-defined]


class TestRun:
    @pytest.mark.parametrize(
        ("trigger", "answer", "outcome", "event"),
        [
            (
                "manual",
                WorkerAnswer(ok=True, tip=FetchedTip(REV), gate=Gate.UP_TO_DATE),
                "up-to-date",
                True,
            ),
            (
                "schedule",
                WorkerAnswer(ok=True, tip=FetchedTip(REV), gate=Gate.UP_TO_DATE),
                "up-to-date",
                False,
            ),
            ("schedule", verified_answer("db"), "applied", True),
            ("bundle", verified_answer("db"), "applied", True),
        ],
    )
    def test_whole_pipeline(
        self, trigger: str, answer: WorkerAnswer, outcome: str, event: bool
    ) -> None:
        """Every sync ends in one record: last sync, metric by source kind, history unless quiet."""
        host = FakeHost(answer=answer)
        ctx = context(SyncRequest(trigger=trigger, operation="op-9"), host)
        result = asyncio.run(p.run_pipeline(ctx))
        doc = result.to_json()
        assert doc["result"] == outcome and doc["operation"] == "op-9"
        assert doc["time"] == 1000.0 and doc["duration"] == 2.5 and doc["exit_code"] == 0
        assert host.ledger.last_sync is not None
        assert host.ledger.last_sync.result == outcome
        assert host.metrics is not None
        kind = "bundle" if trigger == "bundle" else "git"
        assert ("sync", outcome, kind) in host.metrics.calls
        assert [e["kind"] for e in host.events] == (["sync"] if event else [])
        if event:
            assert "exit_code" not in host.events[0]
        for c in host.tasks:
            c.close()

    def test_the_record_keeps_its_keys(self) -> None:
        """A refused record has the keys the CLI and history always showed."""
        host = FakeHost(answer=WorkerAnswer.failed(ErrorInfo("SignatureError", "refused", "x")))
        doc = asyncio.run(p.run_pipeline(context(host=host))).to_json()
        assert {"revision", "previous", "trigger", "source", "bytes", "result", "error"} <= set(doc)
        assert {"time", "duration", "exit_code", "error_type"} <= set(doc)
        assert doc["exit_code"] == 3


class TestWorkerAnswer:
    @pytest.mark.parametrize(
        "answer",
        [
            verified_answer("db"),
            WorkerAnswer(
                ok=True,
                tip=FetchedTip(REV, "u", 5, False, {"http": {"status": 304}}),
                gate=Gate.KNOWN_BAD,
            ),
            WorkerAnswer.failed(ErrorInfo("BundleError", "refused", "damaged"), FetchedTip(REV)),
        ],
    )
    def test_round_trip(self, answer: WorkerAnswer) -> None:
        """The answer crosses the process boundary as JSON and reads back equal."""
        back = WorkerAnswer.from_json(answer.to_json())
        assert back.ok == answer.ok and back.gate is answer.gate and back.error == answer.error
        assert back.tip.revision == answer.tip.revision and back.plan == answer.plan
        assert dict(back.tip.wire) == dict(answer.tip.wire)
        if answer.verified:
            assert back.verified == answer.verified
            assert plan_from_json(dict(back.plan or {}), environ={}).components
