"""The sync engine: submits sync requests to the slot, runs the pipeline, soaks, rolls back.

A sync is the ordered steps of :mod:`keystone.sync.pipeline`. Every request (a poll, ``sync
--once``, a bundle import, a rollback) is a submission to the agent's one desired-state slot
(:mod:`keystone.slot`), so syncs never overlap a deployment, a duplicate joins the one in
flight and a newer request replaces a queued older one.

A revision becomes *last known-good* only after every component stayed healthy for the soak
period; a failure during the soak rolls back to the last known-good plan and marks the revision
failed, so it is not retried until a new commit arrives or the operator asks.

The ledger lives in the agent's snapshot (one atomic file with the applied plan), so a crash at
any instant leaves the applied revision and the applied plan consistent. A deployment in flight
is journaled; after a crash the agent converges on the previous plan and the interrupted
revision is retried once more, then marked failed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Hashable
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

from loguru import logger

from keystone.ledger import LastSync, Ledger
from keystone.plan import plan_from_json, plan_to_json
from keystone.runtime.deployer import ArtifactContext
from keystone.runtime.supervisor import State, Supervisor
from keystone.slot import DesiredSlot, Job, Operation
from keystone.sync.host import SyncHost
from keystone.sync.imports import incoming_path
from keystone.sync.model import EXIT_BY_RESULT, Outcome, RequestKind, SyncRequest, SyncResult
from keystone.sync.pipeline import Clocks, SyncContext, SyncSettings, run_pipeline
from keystone.sync.rollout import RolloutTracker

__all__ = ["EXIT_BY_RESULT", "Poller", "SyncEngine"]

JSON = dict[str, Any]


class Poller(Protocol):
    """The poll trigger as the engine sees it (pause while suspended, show the next poll)."""

    def pause(self) -> None: ...

    def resume(self) -> None: ...

    def next_run(self) -> float | None: ...


class SyncEngine:
    """Pulls, verifies and deploys revisions for one agent.

    Args:
        host: the agent, through the narrow :class:`keystone.sync.host.SyncHost` seam.
        settings: source, trust, device and soak settings.
        slot: the agent's serial lane every request goes through.
        clocks: wall and monotonic time (tests pass fixed ones).
    """

    def __init__(
        self,
        host: SyncHost,
        settings: SyncSettings,
        slot: DesiredSlot,
        *,
        clocks: Clocks | None = None,
    ) -> None:
        self.host = host
        self.settings = settings
        self.slot = slot
        self.clocks = clocks or Clocks()
        self.soak = SoakWatch(self)
        self.poller: Poller | None = None
        self.rollout = RolloutTracker(
            self._rollout_due,
            wall=self.clocks.wall,
            device_id=settings.device_id,
            labels=settings.labels,
            maintenance=settings.maintenance,
            runtime=settings.runtime,
        )

    @property
    def ledger(self) -> Ledger:
        return self.host.ledger

    def _rollout_due(self) -> None:
        """A hold ended (a wave or window opened, a deferral ran out): sync, unless suspended."""
        if not self.ledger.suspended:
            self.submit(SyncRequest(trigger="rollout"))

    # --- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        """Converge after a crash and resume a pending soak (triggers start separately)."""
        led = self.ledger
        journal = led.journal
        if journal is not None:
            rev = journal.revision
            if journal.attempts >= 2:
                led.mark_failed(
                    rev,
                    "deployment interrupted twice (agent killed mid-deployment)",
                    "rolled-back",
                    self.clocks.wall(),
                )
                led.journal = None
            logger.warning(
                "a deployment of {} was interrupted; running the previous plan", rev[:12]
            )
            self.host.emit(
                {
                    "kind": "recovery",
                    "result": "rolled-back",
                    "revision": rev,
                    "error": "agent stopped during deployment; converged on the previous plan",
                }
            )
        if led.applied and led.applied != led.last_known_good:
            self.soak.start(set(self.host.applied_plan.components))
        self.host.save_soon()

    async def close(self) -> None:
        self.soak.cancel()
        self.rollout.wake.cancel()

    # --- status -----------------------------------------------------------------------------

    async def revision_info(self) -> JSON:
        led, s = self.ledger, self.settings
        return {
            "applied": led.applied,
            "last_known_good": led.last_known_good,
            "source": led.source or (s.source.url if s.source else None),
            "ref": s.source.ref if s.source else None,
            "signer": led.signer,
            "fingerprint": led.fingerprint,
            "applied_at": led.applied_at,
            "soaking": self.soak.running,
            "last_sync": led.last_sync.to_json() if led.last_sync else None,
            "failed": led.failed_json(),
            "suspended": led.suspended,
            "next_poll": self.poller.next_run() if self.poller else None,
            "device": s.device_id,
            "labels": list(s.labels),
            **({"rollout": r} if (r := self.rollout.status()) is not None else {}),
        }

    # --- submissions ------------------------------------------------------------------------

    def submit(self, request: SyncRequest) -> Operation:
        """Queue ``request`` in the slot (or join its duplicate); its operation at once."""
        key: Hashable
        joins: frozenset[Hashable] = frozenset()
        desired = True
        cleanup: Callable[[], None] | None = None
        if request.kind is RequestKind.SYNC and request.dry_run:
            key, desired = ("sync-dry", request.allow_rollback, request.retry), False
        elif request.kind is RequestKind.SYNC:
            key = ("sync", request.allow_rollback, request.retry)
            if not request.force:
                # A plain sync (poll or manual) joins any sync queued or in flight.
                joins = frozenset(("sync", a, r) for a in (False, True) for r in (False, True))
        elif request.kind is RequestKind.IMPORT:
            key = ("import", str(request.bundle))
            bundle = request.bundle
            if bundle is not None and bundle.parent == incoming_path(self.settings.runtime):

                def cleanup() -> None:
                    # An upload is consumed whatever its result, so uploads do not fill the disk.
                    bundle.unlink(missing_ok=True)
        else:
            key = ("rollback", request.to)

        async def run(op_id: str) -> JSON:
            try:
                return (await self.run(_with_op(request, op_id))).to_json()
            finally:
                if cleanup is not None:
                    cleanup()

        def superseded(op_id: str, by: str) -> JSON:
            if cleanup is not None:
                cleanup()
            return SyncResult(
                Outcome.SUPERSEDED,
                trigger=request.trigger,
                previous=self.ledger.applied,
                error=f"superseded by {by}",
                operation=op_id,
                superseded_by=by,
                time=self.clocks.wall(),
            ).to_json()

        return self.slot.submit(
            Job(
                request.kind.value,
                run,
                key=key,
                joins=joins,
                desired=desired,
                weak=request.trigger == "schedule",
                superseded=superseded,
            )
        )

    async def sync_now(
        self, *, dry_run: bool, allow_rollback: bool, trigger: str, retry: bool = False
    ) -> JSON:
        """Run one sync; a plain one joins the one in flight (coalesce, never reject)."""
        request = SyncRequest(
            trigger=trigger, dry_run=dry_run, allow_rollback=allow_rollback, retry=retry
        )
        return await self.submit(request).wait()

    async def import_bundle(self, path: Path, *, allow_rollback: bool = False) -> JSON:
        """Import a bundle file (USB, HTTP, API upload) and deploy its revision.

        An upload (a file under ``runtime/bundles/incoming``) is consumed: it is deleted once the
        import is over, whatever its result, so repeated uploads do not fill the disk.
        """
        request = SyncRequest(
            RequestKind.IMPORT, trigger="bundle", bundle=path, allow_rollback=allow_rollback
        )
        return await self.submit(request).wait()

    async def rollback(self, *, to: str | None) -> JSON:
        """Deploy the last known-good revision (or ``to``) again, verified as any revision."""
        return await self.submit(
            SyncRequest(RequestKind.ROLLBACK, trigger="rollback", allow_rollback=True, to=to)
        ).wait()

    async def run(self, request: SyncRequest) -> SyncResult:
        """Run the pipeline for ``request`` now (the slot calls this, one at a time)."""
        ctx = SyncContext(
            request, self.host, self.settings, self.soak, self.clocks, rollout=self.rollout
        )
        result = await run_pipeline(ctx)
        self.rollout.after(self.host, result)
        return result

    # --- soak -------------------------------------------------------------------------------

    def on_component_change(self, sup: Supervisor) -> None:
        """Called on every component state change; ends a soak when one stops being healthy."""
        self.soak.on_component_change(sup)

    async def soak_failed(self, rev: str, reason: str) -> JSON:
        """Roll back to the last known-good plan after ``rev`` failed its soak (a slot job)."""
        led, host = self.ledger, self.host
        if led.applied != rev:
            return {"result": "skipped", "revision": rev, "error": "a newer revision was applied"}
        logger.error(
            "revision {} failed its soak ({}); rolling back to last known-good", rev[:12], reason
        )
        led.mark_failed(rev, reason, "rolled-back", self.clocks.wall())
        lkg = led.last_known_good
        plan = plan_from_json(led.lkg_plan or {"components": []}, environ=dict(host.environ()))
        checkout = led.lkg_checkout
        result = await host.apply(
            plan,
            source=f"git:{(lkg or 'none')[:12]}",
            planned=None,
            artifacts=ArtifactContext(Path(checkout) if checkout else None, require_sha256=True),
        )
        led.applied = lkg
        led.applied_at = self.clocks.wall()
        if host.metrics is not None:
            host.metrics.rollback("ok" if result.ok else "failed")
        event = {
            "kind": "rollback",
            "result": "rolled-back" if result.ok else "failed",
            "revision": rev,
            "to": lkg,
            "error": reason,
        }
        host.emit(event)
        self.rollout.soaked(host, rev, ok=False)
        led.last_sync = LastSync(
            time=self.clocks.wall(),
            result="rolled-back",
            revision=rev,
            error=reason,
            trigger="soak",
            duration=0,
        )
        host.save_now()
        return event

    # --- suspend ----------------------------------------------------------------------------

    async def suspend(self) -> JSON:
        self.ledger.suspended = True
        if self.poller is not None:
            self.poller.pause()
        self.host.emit({"kind": "suspend", "result": "ok"})
        self.host.save_now()
        return {"suspended": True}

    async def resume(self) -> JSON:
        self.ledger.suspended = False
        if self.poller is not None:
            self.poller.resume()
        self.host.emit({"kind": "resume", "result": "ok"})
        self.host.save_now()
        hold = self.rollout.hold
        if hold is not None and hold.at is not None and hold.at <= self.clocks.wall():
            self._rollout_due()  # its time came while suspended: deploy now, not at the next poll
        return {"suspended": False}


def _with_op(request: SyncRequest, op_id: str) -> SyncRequest:
    return replace(request, operation=op_id)


class SoakWatch:
    """Watches an applied revision for the soak period (one at a time)."""

    def __init__(self, engine: SyncEngine) -> None:
        self.engine = engine
        self._task: asyncio.Task[None] | None = None
        self._names: set[str] = set()
        self._event = asyncio.Event()
        self._reason: str | None = None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self, names: set[str]) -> None:
        self.cancel()
        self._names = names
        self._reason = None
        self._event = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._soak())

    def cancel(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
        self._task = None

    def on_component_change(self, sup: Supervisor) -> None:
        if not self.running or sup.name not in self._names:
            return
        if sup.state in (State.UNHEALTHY, State.BACKOFF, State.FAILED) or (
            sup.state is State.STOPPED and sup.wanted
        ):
            self._reason = f"component {sup.name} became {sup.state.value} during the soak: {sup.error or ''}".rstrip(
                ": "
            )
            self._event.set()

    async def _soak(self) -> None:
        engine = self.engine
        led, host = engine.ledger, engine.host
        seconds = engine.settings.soak
        rev = led.applied
        try:
            await asyncio.wait_for(self._event.wait(), seconds)
        except TimeoutError:
            led.last_known_good = rev
            led.lkg_plan = plan_to_json(host.applied_plan)
            led.lkg_checkout = led.applied_plan_checkout
            logger.info(
                "revision {} is last known-good after a {:g}s soak", (rev or "")[:12], seconds
            )
            host.emit({"kind": "soak", "result": "ok", "revision": rev})
            engine.rollout.soaked(host, rev or "", ok=True)
            host.save_now()
            return
        reason = self._reason or "unhealthy during soak"
        # Through the slot, so the rollback never overlaps a deployment; it is a command, never
        # superseded, and does nothing when a newer revision was applied meanwhile.
        engine.slot.submit(Job("soak-rollback", lambda _op: engine.soak_failed(rev or "", reason)))
