"""One sync as an ordered list of steps of one signature.

Each step is ``async def step(ctx: SyncContext) -> SyncResult | None``: it reads what earlier
steps put in the context, adds its own product, and either returns None (go on) or the result
that ends the sync. :data:`STEPS` is the order (DESIGN section 1)::

    target -> fetch -> verify -> gate -> resolve -> diff -> dry_run -> rollout -> prepare
           -> deploy -> record -> soak

fetch + verify + resolve run in the sync worker process (one request, one answer); the steps on
this side read its answer. :func:`run_pipeline` runs the steps and :func:`finish` writes what
every sync writes, whatever its outcome (last sync, metrics, log, history).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from loguru import logger

from keystone.config import DEFAULT_SYNC_DEADLINE, AgentConfig
from keystone.errors import KeystoneError
from keystone.ledger import Journal, LastSync
from keystone.plan import DesiredPlan, plan_from_json, plan_to_json
from keystone.runtime.deployer import ArtifactContext, DeployResult, plan_changes
from keystone.sync.host import SyncHost
from keystone.sync.model import (
    DesiredState,
    Gate,
    Outcome,
    RequestKind,
    SourceSpec,
    SyncRequest,
    SyncResult,
    TrustSpec,
    WorkerAnswer,
    WorkerOp,
    WorkerRequest,
    sync_deadline_message,
)
from keystone.sync.peek import peek
from keystone.sync.rollout import RolloutTracker
from keystone.windows import Maintenance
from keystone.workerproc import ErrorInfo

TRUST_FAILURES = {
    "SignatureError": "signature",
    "RollbackRefused": "rollback",
    "StaleRevision": "stale",
    "VerificationError": "verification",
}
"""The ``keystone_signature_failures_total{kind}`` label of a refusal, by error type."""


@dataclass(frozen=True)
class SyncSettings:
    """The agent configuration the sync engine reads."""

    runtime: Path
    source: SourceSpec | None = None
    trust: TrustSpec = field(default_factory=TrustSpec)
    device_id: str = ""
    labels: tuple[str, ...] = ()
    soak: float = 30.0
    maintenance: Maintenance | None = None  # the agent's own windows ([maintenance])
    peek: bool = False  # look at the source's tip here first (keystone.sync.peek)

    @property
    def polls(self) -> bool:
        """A source to poll is configured."""
        return self.source is not None and bool(self.source.url)

    @property
    def worker_timeout(self) -> float:
        """The sync deadline (``[source] deadline``, ``KEYSTONE_SYNC_DEADLINE``): the sync
        worker is killed past it, however slowly its source keeps sending."""
        return self.source.deadline if self.source else DEFAULT_SYNC_DEADLINE

    @classmethod
    def from_config(cls, cfg: AgentConfig, runtime: Path) -> SyncSettings:
        src = cfg.source
        t = cfg.trust
        return cls(
            runtime=runtime,
            source=SourceSpec(src.type, src.url, src.ref, src.timeout, src.deadline)
            if src
            else None,
            trust=TrustSpec(
                allowed_signers=str(t.allowed_signers) if t.allowed_signers else None,
                gpg_home=str(t.gpg_home) if t.gpg_home else None,
                revoked_keys=str(t.revoked_keys) if t.revoked_keys else None,
                verify=t.verify,
                max_age=t.max_age,
            ),
            device_id=cfg.device_id,
            labels=tuple(cfg.labels),
            soak=src.soak if src else 30.0,
            maintenance=cfg.maintenance,
            peek=True,
        )


class Soak(Protocol):
    """The engine's soak of an applied revision."""

    def start(self, names: set[str]) -> None:
        """Watch ``names`` for the soak period; last known-good when they stay healthy."""
        ...

    def cancel(self) -> None:
        """Stop watching (a new deployment starts)."""
        ...


@dataclass(frozen=True)
class Clocks:
    """Wall time for records, monotonic time for durations (tests pass fixed ones)."""

    wall: Callable[[], float] = time.time
    monotonic: Callable[[], float] = time.monotonic


@dataclass
class SyncContext:
    """What one sync carries from step to step."""

    request: SyncRequest
    host: SyncHost
    settings: SyncSettings
    soak: Soak
    clocks: Clocks = field(default_factory=Clocks)
    t0: float = 0.0
    previous: str | None = None
    target: str | None = None
    answer: WorkerAnswer | None = None
    plan: DesiredPlan | None = None
    desired: DesiredState | None = None
    deployed: DeployResult | None = None
    datasets: tuple[dict[str, Any], ...] | None = None
    rollout: RolloutTracker | None = None  # the engine's holds (waves, windows, deferrals)

    def __post_init__(self) -> None:
        self.t0 = self.clocks.monotonic()
        self.previous = self.host.ledger.applied

    def result(self, outcome: Outcome, **fields: Any) -> SyncResult:
        """The record of this sync so far, ending with ``outcome``."""
        tip = self.answer.tip if self.answer is not None else None
        verified = self.answer.verified if self.answer is not None else None
        base: dict[str, Any] = {
            "revision": tip.revision if tip else None,
            "previous": self.previous,
            "source": tip.source if tip else None,
            "bytes": tip.bytes if tip else 0,
        }
        if self.desired is not None and verified is not None:
            planned = self.desired.planned
            base.update(
                signer=verified.signer,
                fingerprint=verified.fingerprint,
                changes=planned.changes.to_json(),
                actions=tuple(a.to_json() for a in planned.actions),
                warnings=verified.warnings,
            )
        if self.datasets is not None:
            base["datasets"] = self.datasets
        base.update(fields)
        return SyncResult(
            outcome, trigger=self.request.trigger, operation=self.request.operation or None, **base
        )

    def mark_failed(self, reason: str, kind: str) -> None:
        """Remember that the tip of this sync failed (not retried until a new commit)."""
        tip = self.answer.tip.revision if self.answer is not None else None
        self.host.ledger.mark_failed(tip, reason, kind, self.clocks.wall())


Step = Callable[[SyncContext], Awaitable[SyncResult | None]]


def worker_request(ctx: SyncContext) -> WorkerRequest:
    """The sync worker's request for this sync (what to fetch, how to verify it)."""
    s, req, led = ctx.settings, ctx.request, ctx.host.ledger
    common: dict[str, Any] = {
        "runtime": str(s.runtime),
        "source": s.source,
        "trust": s.trust,
        "applied": led.applied,
        "device_id": s.device_id,
        "labels": s.labels,
        "environ": dict(ctx.host.environ()),
    }
    if req.kind is RequestKind.IMPORT:
        return WorkerRequest(
            WorkerOp.IMPORT_BUNDLE,
            bundle=str(req.bundle),
            allow_rollback=req.allow_rollback,
            **common,
        )
    if req.kind is RequestKind.ROLLBACK:
        return WorkerRequest(WorkerOp.VERIFY_REV, rev=ctx.target, allow_rollback=True, **common)
    op = WorkerOp.HTTP_FETCH if s.source is not None and s.source.type == "http" else WorkerOp.FETCH
    return WorkerRequest(
        op,
        allow_rollback=req.allow_rollback,
        known_bad=frozenset() if req.retry else frozenset(led.failed),
        force=req.force,
        **common,
    )


# --- the steps ------------------------------------------------------------------------------


async def target(ctx: SyncContext) -> SyncResult | None:
    """A rollback goes to the revision named, else to the last known-good one."""
    if ctx.request.kind is not RequestKind.ROLLBACK:
        return None
    ctx.target = ctx.request.to or ctx.host.ledger.last_known_good
    if not ctx.target:
        return ctx.result(Outcome.REFUSED, error="no last known-good revision to roll back to")
    return None


async def fetch(ctx: SyncContext) -> SyncResult | None:
    """Fetch, verify and resolve in the worker process; keep its answer.

    An unchanged source is seen without the worker (:mod:`keystone.sync.peek`): one request
    from the agent, and the answer the worker's gate would have given.
    """
    request = worker_request(ctx)
    # One deadline for the whole fetch, the agent's own look included: a drip-feeding server
    # holds the sync at most that long.
    deadline = ctx.settings.worker_timeout
    started = time.monotonic()
    answer = None
    if ctx.settings.peek:
        with contextlib.suppress(TimeoutError):
            answer = await asyncio.wait_for(peek(request), deadline)
    if answer is None:
        left = deadline - (time.monotonic() - started)
        if left > 0:
            answer = await ctx.host.run_worker(request, timeout=left)
        if left <= 0 or (
            answer is not None and answer.error and answer.error.type == "SyncDeadline"
        ):
            answer = WorkerAnswer.failed(
                ErrorInfo("SyncDeadline", "retryable", sync_deadline_message(deadline))
            )
    ctx.answer = answer
    return None


async def verify(ctx: SyncContext) -> SyncResult | None:
    """A refusal or failure in the worker ends the sync (a refused tip is marked failed)."""
    answer = ctx.answer
    assert answer is not None
    if answer.ok:
        return None
    err = answer.error
    kind = err.kind if err else None
    outcome = (
        Outcome.UNREACHABLE
        if kind == "retryable"
        else Outcome.REFUSED
        if kind == "refused"
        else Outcome.ERROR
    )
    if outcome is Outcome.REFUSED:
        ctx.mark_failed(err.message if err else "", "refused")
    label = TRUST_FAILURES.get(err.type if err else "")
    metrics = ctx.host.metrics
    if label and metrics is not None:
        metrics.signature_failure(label)
    return ctx.result(
        outcome, error=err.message if err else None, error_type=err.type if err else None
    )


async def gate(ctx: SyncContext) -> SyncResult | None:
    """A tip that is applied already, or failed before, ends the sync quietly."""
    answer = ctx.answer
    assert answer is not None
    led = ctx.host.ledger
    if answer.gate is Gate.UP_TO_DATE:
        return ctx.result(Outcome.UP_TO_DATE, signer=led.signer)
    if answer.gate is Gate.KNOWN_BAD:
        rev = answer.tip.revision
        failed = led.failed.get(rev or "")
        reason = failed.reason if failed else ""
        return ctx.result(
            Outcome.KNOWN_BAD,
            error=f"revision {str(rev)[:12]} failed before ({reason}); not retried until a new "
            "commit arrives (or sync --retry)",
        )
    return None


async def resolve(ctx: SyncContext) -> SyncResult | None:
    """Validate the resolved plan here too; a plan that does not validate refuses the tip."""
    answer = ctx.answer
    assert answer is not None
    try:
        ctx.plan = plan_from_json(dict(answer.plan or {}), environ=dict(ctx.host.environ()))
    except KeystoneError as exc:
        ctx.mark_failed(str(exc), "refused")
        return ctx.result(Outcome.REFUSED, error=str(exc))
    return None


async def diff(ctx: SyncContext) -> SyncResult | None:
    """The change set from the applied plan, computed once and handed to the deployer."""
    answer = ctx.answer
    assert answer is not None and answer.verified is not None and ctx.plan is not None
    ctx.desired = DesiredState(
        ctx.plan, answer.verified, plan_changes(ctx.host.applied_plan, ctx.plan)
    )
    return None


async def dry_run(ctx: SyncContext) -> SyncResult | None:
    """A dry run ends here, with the change set."""
    return ctx.result(Outcome.DRY_RUN) if ctx.request.dry_run else None


async def rollout(ctx: SyncContext) -> SyncResult | None:
    """A rollout wave, a halt, a maintenance window or a component's deferral may hold the
    revision back (``keystone.sync.rollout``); only a sync of the source's tip is held."""
    tracker = ctx.rollout
    if tracker is None or ctx.request.kind is not RequestKind.SYNC:
        return None
    assert ctx.desired is not None
    d = ctx.desired
    hold = await tracker.check(
        ctx.host, d.verified, d.planned, ctx.host.applied_plan, plan_windows=d.plan.maintenance
    )
    if hold is None:
        return None
    return ctx.result(hold.outcome, error=hold.message, rollout=hold.to_json())


async def prepare(ctx: SyncContext) -> SyncResult | None:
    """Journal the deployment (a crash mid-way is recovered), end the soak of the previous one."""
    assert ctx.desired is not None
    led, host = ctx.host.ledger, ctx.host
    rev = ctx.desired.verified.revision
    if not led.lkg_plan:
        led.lkg_plan = plan_to_json(host.applied_plan)
    journal = led.journal
    attempts = journal.attempts + 1 if journal is not None and journal.revision == rev else 1
    led.journal = Journal(rev, attempts, ctx.clocks.wall())
    host.save_now()
    ctx.soak.cancel()
    return None


async def deploy(ctx: SyncContext) -> SyncResult | None:
    """Deploy with the change set and the revision's verified checkout for its artifacts."""
    assert ctx.desired is not None
    desired, host, led = ctx.desired, ctx.host, ctx.host.ledger
    rev = desired.verified.revision
    checkout = desired.verified.checkout
    try:
        result = await host.apply(
            desired.plan,
            source=f"git:{rev[:12]}",
            planned=desired.planned,
            artifacts=ArtifactContext(Path(checkout) if checkout else None, require_sha256=True),
        )
    except KeystoneError as exc:
        led.journal = None
        ctx.mark_failed(str(exc), "refused")
        host.save_now()
        return ctx.result(Outcome.REFUSED, error=str(exc))
    led.journal = None
    ctx.deployed = result
    if not result.ok:
        reason = f"component {result.failed}: {result.reason}"
        ctx.mark_failed(reason, "rolled-back")
        host.save_now()
        return ctx.result(Outcome.ROLLED_BACK, error=reason, failed_component=result.failed)
    return None


async def record(ctx: SyncContext) -> SyncResult | None:
    """The revision is applied: ledger, anti-rollback anchor, metric."""
    assert ctx.desired is not None
    host, led, v = ctx.host, ctx.host.ledger, ctx.desired.verified
    led.applied = v.revision
    led.applied_at = ctx.clocks.wall()
    led.signer = v.signer
    led.fingerprint = v.fingerprint
    led.source = v.source
    led.applied_plan_checkout = v.checkout
    led.failed.pop(v.revision, None)
    host.save_now()
    host.background(_mark_anchor(ctx, v.revision))
    if host.metrics is not None:
        host.metrics.set_revision(v.revision, v.source or "")
    return None


async def datasets(ctx: SyncContext) -> SyncResult | None:
    """A bundle's datasets go to the dataset manager before the revision deploys.

    Each is verified there as a refresh is, for the components of the plan about to run, so a
    ``required`` dataset that only the bundle carries (an air-gapped site) is in place when the
    start gate asks. A refused one is reported in the result, never fatal to the revision.
    """
    wire = ctx.answer.tip.wire if ctx.answer is not None else {}
    root, error = wire.get("bundle_datasets"), wire.get("bundle_datasets_error")
    if root or error:
        plan = ctx.desired.plan if ctx.desired is not None else None
        records = await ctx.host.import_bundle_datasets(Path(root or "."), error, plan=plan)
        ctx.datasets = tuple(records)
    return None


async def soak(ctx: SyncContext) -> SyncResult | None:
    """Watch the new revision for the soak period; the sync itself is applied."""
    assert ctx.desired is not None
    ctx.soak.start(set(ctx.desired.plan.components))
    return ctx.result(Outcome.APPLIED)


async def _mark_anchor(ctx: SyncContext, rev: str) -> None:
    s = ctx.settings
    await ctx.host.run_worker(
        WorkerRequest(
            WorkerOp.MARK_APPLIED,
            runtime=str(s.runtime),
            source=s.source,
            trust=s.trust,
            rev=rev,
        ),
        timeout=s.worker_timeout,
    )


STEPS: tuple[Step, ...] = (
    target,
    fetch,
    verify,
    gate,
    resolve,
    diff,
    dry_run,
    rollout,
    prepare,
    datasets,
    deploy,
    record,
    soak,
)


async def run_pipeline(ctx: SyncContext, steps: Sequence[Step] = STEPS) -> SyncResult:
    """Run ``steps`` in order until one returns a result; then :func:`finish` it."""
    for step in steps:
        result = await step(ctx)
        if result is not None:
            return finish(ctx, result)
    raise AssertionError("the last step of a sync returns its result")


def finish(ctx: SyncContext, result: SyncResult) -> SyncResult:
    """What every sync writes: time and duration, last sync, metrics, the log, the history."""
    result = replace(
        result,
        time=ctx.clocks.wall(),
        duration=round(ctx.clocks.monotonic() - ctx.t0, 3),
    )
    host, trigger = ctx.host, result.trigger
    host.ledger.last_sync = LastSync(
        time=result.time,
        result=result.outcome.value,
        revision=result.revision,
        error=result.error,
        trigger=trigger,
        duration=result.duration,
    )
    if host.metrics is not None:
        # A USB/API bundle import is a bundle sync even on an agent that also polls a source.
        source = ctx.settings.source
        kind = "bundle" if trigger == "bundle" or source is None else source.type
        host.metrics.sync(result.outcome.value, kind, result.duration)
    log = logger.info if result.outcome.good else logger.warning
    log(
        "sync ({}): {} {}{}",
        trigger,
        result.outcome.value,
        (result.revision or "")[:12],
        f": {result.error}" if result.error else "",
    )
    if not result.outcome.quiet or trigger != "schedule":
        host.emit(result.event())
    host.save_soon()
    return result
