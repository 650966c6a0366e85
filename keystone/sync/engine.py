"""One sync cycle end to end, the ledger of revisions, soak and rollback to last known-good.

Steps (DESIGN section 1), each a method with one shape: fetch + verify + resolve (in the worker
process), diff, prepare + deploy (the deployer, which prepares artifacts before touching
anything), record. A revision becomes *last known-good* only after every component stayed
healthy for the soak period; a failure during the soak rolls back to the last known-good plan and
marks the revision failed, so it is not retried until a new commit arrives or the operator asks.

The ledger lives in the agent's snapshot (one atomic file with the applied plan), so a crash at
any instant leaves the applied revision and the applied plan consistent. A deployment in flight
is journaled; after a crash the agent converges on the previous plan and the interrupted
revision is retried once more, then marked failed.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loguru import logger

from keystone.errors import KeystoneError
from keystone.plan import DesiredPlan, plan_from_json, plan_to_json
from keystone.runtime.deployer import plan_actions
from keystone.runtime.supervisor import State, Supervisor
from keystone.sync.scheduler import SyncScheduler

if TYPE_CHECKING:
    from keystone.agent import Agent

TRUST_FAILURES = {
    "SignatureError": "signature",
    "RollbackRefused": "rollback",
    "StaleRevision": "stale",
    "VerificationError": "verification",
}
EXIT_BY_RESULT = {
    "applied": 0,
    "up-to-date": 0,
    "dry-run": 0,
    "rolled-back": 4,
    "refused": 3,
    "unreachable": 1,
    "error": 1,
    "known-bad": 3,
    "suspended": 0,
}


class SyncEngine:
    """Pulls, verifies and deploys revisions for one agent."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        cfg = agent.config
        self.source = cfg.source
        self.ledger: dict[str, Any] = agent.ledger
        self.ledger.setdefault("failed", {})
        self._lock = asyncio.Lock()
        self._inflight: asyncio.Task[dict[str, Any]] | None = None
        self._soak_task: asyncio.Task[None] | None = None
        self._soak_plan: set[str] = set()
        self._soak_event = asyncio.Event()
        self._soak_reason: str | None = None
        self.scheduler: SyncScheduler | None = None

    # --- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        """Converge after a crash, resume a pending soak, and start polling."""
        journal = self.ledger.get("journal")
        if journal:
            attempts = int(journal.get("attempts", 1))
            rev = journal.get("revision", "")
            if attempts >= 2:
                self._mark_failed(
                    rev, "deployment interrupted twice (agent killed mid-deployment)", "rolled-back"
                )
                self.ledger.pop("journal", None)
            logger.warning(
                "a deployment of {} was interrupted; running the previous plan", rev[:12]
            )
            self.agent.events.append(
                {
                    "kind": "recovery",
                    "result": "rolled-back",
                    "revision": rev,
                    "error": "agent stopped during deployment; converged on the previous plan",
                }
            )
        if self.ledger.get("applied") and self.ledger.get("applied") != self.ledger.get(
            "last_known_good"
        ):
            self._start_soak(set(self.agent.deployer.applied.components))
        if self.source is not None and self.source.url:
            self.scheduler = SyncScheduler(
                self.tick,
                interval=self.source.interval,
                jitter=self.source.jitter,
                device_id=self.agent.config.device_id,
            )
            self.scheduler.start(paused=bool(self.ledger.get("suspended")))
        self.agent.background(self._import_staged())
        if self.agent.config.bundle_watch:
            self.agent.background(self._watch_bundles(self.agent.config.bundle_watch))
        self.agent.save_soon()

    async def _import_staged(self) -> None:
        """Apply bundles staged by ``keystone bundle import`` while no agent ran."""
        from keystone.sync.imports import staged_bundles

        for path in staged_bundles(self.agent.runtime):
            result = await self.import_bundle(path)
            logger.info("staged bundle {}: {}", path.name, result["result"])
            path.unlink(missing_ok=True)

    async def _watch_bundles(self, patterns: tuple[str, ...], every: float = 5.0) -> None:
        """Import each bundle that appears under a watched mount pattern, once."""
        from keystone.sync.imports import file_digest, watched_bundles

        seen: set[tuple[str, int, int]] = set()
        imported = self.ledger.setdefault("imported_bundles", {})
        while True:
            for path in await asyncio.to_thread(watched_bundles, list(patterns)):
                try:
                    st = path.stat()
                except OSError:
                    continue
                key = (str(path), st.st_size, st.st_mtime_ns)
                if key in seen:
                    continue
                seen.add(key)
                try:
                    digest = await asyncio.to_thread(file_digest, path)
                except OSError as exc:  # the stick was pulled mid-scan: try again when it is back
                    seen.discard(key)
                    logger.warning("watched bundle {}: cannot read it: {}", path, exc)
                    continue
                if digest in imported:
                    continue
                imported[digest] = {"path": str(path), "time": time.time()}
                try:
                    result = await self.import_bundle(path)
                except Exception:
                    # One bad file must not end the watch: later sticks still update the device.
                    logger.exception("watched bundle {}: import failed", path)
                    result = {"result": "error"}
                imported[digest]["result"] = result["result"]
                self.agent.save_soon()
            await asyncio.sleep(every)

    async def close(self) -> None:
        if self.scheduler is not None:
            self.scheduler.shutdown()
        for t in (self._soak_task, self._inflight):
            if t is not None and not t.done():
                t.cancel()

    # --- status -----------------------------------------------------------------------------

    async def revision_info(self) -> dict[str, Any]:
        led = self.ledger
        return {
            "applied": led.get("applied"),
            "last_known_good": led.get("last_known_good"),
            "source": led.get("source") or (self.source.url if self.source else None),
            "ref": self.source.ref if self.source else None,
            "signer": led.get("signer"),
            "fingerprint": led.get("fingerprint"),
            "applied_at": led.get("applied_at"),
            "soaking": self._soak_task is not None and not self._soak_task.done(),
            "last_sync": led.get("last_sync"),
            "failed": led.get("failed", {}),
            "suspended": bool(led.get("suspended")),
            "next_poll": self.scheduler.next_run() if self.scheduler else None,
            "device": self.agent.config.device_id,
            "labels": list(self.agent.config.labels),
        }

    # --- triggers ---------------------------------------------------------------------------

    async def tick(self) -> None:
        """The scheduled poll: sync, then repair what should run and does not."""
        if self.ledger.get("suspended"):
            return
        result = await self.sync_now(dry_run=False, allow_rollback=False, trigger="schedule")
        if self.scheduler is not None:
            self.scheduler.record(reachable=result["result"] != "unreachable")
        await self.agent.repair()

    async def sync_now(
        self, *, dry_run: bool, allow_rollback: bool, trigger: str, retry: bool = False
    ) -> dict[str, Any]:
        """Run one sync; a plain manual trigger joins the one in flight (coalesce, never reject)."""
        if (
            self._inflight is not None
            and not self._inflight.done()
            and not dry_run
            and not allow_rollback
            and not retry
        ):
            return await asyncio.shield(self._inflight)
        task = asyncio.get_running_loop().create_task(
            self._locked(
                lambda: self._sync(
                    dry_run=dry_run, allow_rollback=allow_rollback, trigger=trigger, retry=retry
                )
            )
        )
        if not dry_run:
            self._inflight = task
        return await asyncio.shield(task)

    async def _locked(self, make: Any) -> dict[str, Any]:
        async with self._lock:
            result: dict[str, Any] = await make()
            return result

    # --- the cycle --------------------------------------------------------------------------

    def _request(self, op: str, **extra: Any) -> dict[str, Any]:
        cfg = self.agent.config
        from keystone.env import substitution_env

        return {
            "op": op,
            "runtime": str(self.agent.runtime),
            "source": {
                "type": self.source.type,
                "url": self.source.url,
                "ref": self.source.ref,
                "timeout": self.source.timeout,
            }
            if self.source
            else None,
            "trust": {
                "allowed_signers": str(cfg.trust.allowed_signers)
                if cfg.trust.allowed_signers
                else None,
                "gpg_home": str(cfg.trust.gpg_home) if cfg.trust.gpg_home else None,
                "revoked_keys": str(cfg.trust.revoked_keys) if cfg.trust.revoked_keys else None,
                "verify": cfg.trust.verify,
                "max_age": cfg.trust.max_age,
            },
            "applied": self.ledger.get("applied"),
            "device": {"id": cfg.device_id, "labels": list(cfg.labels)},
            "environ": substitution_env(),
            **extra,
        }

    async def _worker(self, request: dict[str, Any]) -> dict[str, Any]:
        timeout = (self.source.timeout if self.source else 120.0) + 120.0
        result = await self.agent.runner.run(
            [sys.executable, "-m", "keystone.sync.worker"],
            cwd=self.agent.runtime,
            env=dict(os.environ),
            timeout=timeout,
            input=json.dumps(request).encode(),
            max_output=64 << 20,
        )
        if result.timed_out:
            return {
                "ok": False,
                "error": {
                    "type": "Timeout",
                    "kind": "retryable",
                    "message": f"sync worker timed out after {timeout:g}s",
                },
            }
        try:
            answer: dict[str, Any] = json.loads(result.stdout.decode() or "null") or {}
        except json.JSONDecodeError:
            answer = {}
        if not answer:
            return {
                "ok": False,
                "error": {
                    "type": "WorkerCrash",
                    "kind": "bug",
                    "message": f"sync worker exited {result.returncode} without an answer",
                },
            }
        return answer

    async def _sync(
        self, *, dry_run: bool, allow_rollback: bool, trigger: str, retry: bool
    ) -> dict[str, Any]:
        t0 = time.monotonic()
        known_bad = {} if retry else self.ledger.get("failed", {})
        op = "http-fetch" if self.source is not None and self.source.type == "http" else "fetch"
        answer = await self._worker(
            self._request(
                op,
                allow_rollback=allow_rollback,
                known_bad=known_bad,
                force=allow_rollback or retry,
            )
        )
        return await self._after_verify(
            answer, dry_run=dry_run, trigger=trigger, t0=t0, allow_rollback=allow_rollback
        )

    async def import_bundle(self, path: Path, *, allow_rollback: bool = False) -> dict[str, Any]:
        """Import a bundle file (USB, HTTP, API upload) and deploy its revision.

        An upload (a file under ``runtime/bundles/incoming``) is consumed: it is deleted once the
        import is over, whatever its result, so repeated uploads do not fill the disk.
        """
        from keystone.sync.imports import incoming_dir

        async def go() -> dict[str, Any]:
            t0 = time.monotonic()
            answer = await self._worker(
                self._request("import-bundle", bundle=str(path), allow_rollback=allow_rollback)
            )
            return await self._after_verify(
                answer, dry_run=False, trigger="bundle", t0=t0, allow_rollback=allow_rollback
            )

        try:
            return await self._locked(go)
        finally:
            if path.parent == incoming_dir(self.agent.runtime):
                path.unlink(missing_ok=True)

    async def rollback(self, *, to: str | None) -> dict[str, Any]:
        """Deploy the last known-good revision (or ``to``) again, verified as any revision."""

        async def go() -> dict[str, Any]:
            t0 = time.monotonic()
            target = to or self.ledger.get("last_known_good")
            if not target:
                return self._finish(
                    {"result": "refused", "error": "no last known-good revision to roll back to"},
                    t0,
                    "rollback",
                )
            answer = await self._worker(
                self._request("verify-rev", rev=target, allow_rollback=True)
            )
            return await self._after_verify(
                answer, dry_run=False, trigger="rollback", t0=t0, allow_rollback=True
            )

        return await self._locked(go)

    async def _after_verify(
        self,
        answer: dict[str, Any],
        *,
        dry_run: bool,
        trigger: str,
        t0: float,
        allow_rollback: bool,
    ) -> dict[str, Any]:
        rev = answer.get("revision")
        base: dict[str, Any] = {
            "revision": rev,
            "previous": self.ledger.get("applied"),
            "trigger": trigger,
            "source": answer.get("source"),
            "bytes": answer.get("bytes", 0),
        }
        if not answer.get("ok"):
            err = answer.get("error") or {}
            kind = err.get("kind")
            result = (
                "unreachable"
                if kind == "retryable"
                else "refused"
                if kind == "refused"
                else "error"
            )
            if result == "refused" and rev:
                self._mark_failed(rev, err.get("message", ""), "refused")
            kind_label = TRUST_FAILURES.get(err.get("type", ""))
            if kind_label and self.agent.metrics is not None:
                self.agent.metrics.signature_failure(kind_label)
            return self._finish(
                {
                    **base,
                    "result": result,
                    "error": err.get("message"),
                    "error_type": err.get("type"),
                },
                t0,
                trigger,
            )
        if answer.get("up_to_date"):
            return self._finish(
                {**base, "result": "up-to-date", "signer": self.ledger.get("signer")},
                t0,
                trigger,
                quiet=True,
            )
        if answer.get("known_bad"):
            reason = (self.ledger.get("failed", {}).get(rev) or {}).get("reason", "")
            return self._finish(
                {
                    **base,
                    "result": "known-bad",
                    "error": f"revision {str(rev)[:12]} failed before ({reason}); not retried until a new commit arrives (or sync --retry)",
                },
                t0,
                trigger,
                quiet=True,
            )
        from keystone.env import substitution_env

        try:
            desired = plan_from_json(answer["plan"], environ=substitution_env())
        except KeystoneError as exc:
            self._mark_failed(rev or "", str(exc), "refused")
            return self._finish({**base, "result": "refused", "error": str(exc)}, t0, trigger)
        changes, actions = plan_actions(self.agent.deployer.applied, desired)
        base.update(
            {
                "signer": answer.get("signer"),
                "fingerprint": answer.get("fingerprint"),
                "changes": changes.to_json(),
                "actions": [a.to_json() for a in actions],
                "warnings": answer.get("warnings", []),
            }
        )
        if dry_run:
            return self._finish({**base, "result": "dry-run"}, t0, trigger, quiet=True)
        return await self._deploy(answer, desired, base, t0, trigger)

    async def _deploy(
        self,
        answer: dict[str, Any],
        desired: DesiredPlan,
        base: dict[str, Any],
        t0: float,
        trigger: str,
    ) -> dict[str, Any]:
        rev: str = answer["revision"]
        agent = self.agent
        previous_plan = plan_to_json(agent.deployer.applied)
        if not self.ledger.get("lkg_plan"):
            self.ledger["lkg_plan"] = previous_plan
        journal = self.ledger.get("journal") or {}
        attempts = int(journal.get("attempts", 0)) + 1 if journal.get("revision") == rev else 1
        self.ledger["journal"] = {"revision": rev, "attempts": attempts, "started": time.time()}
        agent.save_now()
        self._cancel_soak()
        agent.set_artifact_root(
            Path(answer["checkout"]) if answer.get("checkout") else None, signed=True
        )
        try:
            result = await agent.apply(desired, source=f"git:{rev[:12]}", record=False)
        except KeystoneError as exc:
            self.ledger.pop("journal", None)
            self._mark_failed(rev, str(exc), "refused")
            agent.save_now()
            return self._finish({**base, "result": "refused", "error": str(exc)}, t0, trigger)
        finally:
            agent.set_artifact_root(None, signed=False)
        self.ledger.pop("journal", None)
        if not result.ok:
            reason = f"component {result.failed}: {result.reason}"
            self._mark_failed(rev, reason, "rolled-back")
            agent.save_now()
            return self._finish(
                {
                    **base,
                    "result": "rolled-back",
                    "error": reason,
                    "failed_component": result.failed,
                },
                t0,
                trigger,
            )
        self.ledger.update(
            {
                "applied": rev,
                "applied_at": time.time(),
                "signer": answer.get("signer"),
                "fingerprint": answer.get("fingerprint"),
                "source": answer.get("source"),
                "applied_plan_checkout": answer.get("checkout"),
            }
        )
        self.ledger.get("failed", {}).pop(rev, None)
        agent.save_now()
        self._mark_anchor(rev)
        if agent.metrics is not None:
            agent.metrics.set_revision(rev, answer.get("source") or "")
        self._start_soak(set(desired.components))
        return self._finish({**base, "result": "applied"}, t0, trigger)

    def _finish(
        self, record: dict[str, Any], t0: float, trigger: str, *, quiet: bool = False
    ) -> dict[str, Any]:
        record = {
            **record,
            "time": time.time(),
            "duration": round(time.monotonic() - t0, 3),
            "trigger": trigger,
        }
        self.ledger["last_sync"] = {
            k: record.get(k) for k in ("time", "result", "revision", "error", "trigger", "duration")
        }
        record["exit_code"] = EXIT_BY_RESULT.get(record["result"], 1)
        if self.agent.metrics is not None:
            # A USB/API bundle import is a bundle sync even on an agent that also polls a source.
            kind = "bundle" if trigger == "bundle" or self.source is None else self.source.type
            self.agent.metrics.sync(record["result"], kind, record["duration"])
        log = (
            logger.info
            if record["result"] in ("applied", "up-to-date", "dry-run")
            else logger.warning
        )
        log(
            "sync ({}): {} {}{}",
            trigger,
            record["result"],
            (record.get("revision") or "")[:12],
            f": {record['error']}" if record.get("error") else "",
        )
        if not quiet or trigger != "schedule":
            self.agent.events.append(
                {"kind": "sync", **{k: v for k, v in record.items() if k != "exit_code"}}
            )
        self.agent.save_soon()
        return record

    def _mark_failed(self, rev: str, reason: str, kind: str) -> None:
        if rev:
            self.ledger.setdefault("failed", {})[rev] = {
                "reason": reason,
                "kind": kind,
                "time": time.time(),
            }

    def _mark_anchor(self, rev: str) -> None:
        async def go() -> None:
            await self._worker(self._request("mark-applied", rev=rev))

        self.agent.background(go())

    # --- soak -------------------------------------------------------------------------------

    def _start_soak(self, names: set[str]) -> None:
        self._cancel_soak()
        self._soak_plan = names
        self._soak_reason = None
        self._soak_event = asyncio.Event()
        self._soak_task = asyncio.get_running_loop().create_task(self._soak())

    def _cancel_soak(self) -> None:
        if self._soak_task is not None and not self._soak_task.done():
            self._soak_task.cancel()
        self._soak_task = None

    def on_component_change(self, sup: Supervisor) -> None:
        """Called on every component state change; ends a soak when one stops being healthy."""
        if self._soak_task is None or self._soak_task.done() or sup.name not in self._soak_plan:
            return
        if sup.state in (State.UNHEALTHY, State.BACKOFF, State.FAILED) or (
            sup.state is State.STOPPED and sup.wanted
        ):
            self._soak_reason = f"component {sup.name} became {sup.state.value} during the soak: {sup.error or ''}".rstrip(
                ": "
            )
            self._soak_event.set()

    async def _soak(self) -> None:
        soak = self.source.soak if self.source else 30.0
        rev = self.ledger.get("applied")
        try:
            await asyncio.wait_for(self._soak_event.wait(), soak)
        except TimeoutError:
            self.ledger["last_known_good"] = rev
            self.ledger["lkg_plan"] = plan_to_json(self.agent.deployer.applied)
            self.ledger["lkg_checkout"] = self.ledger.get("applied_plan_checkout")
            logger.info("revision {} is last known-good after a {:g}s soak", (rev or "")[:12], soak)
            self.agent.events.append({"kind": "soak", "result": "ok", "revision": rev})
            self.agent.save_now()
            return
        await self._soak_failed(rev or "", self._soak_reason or "unhealthy during soak")

    async def _soak_failed(self, rev: str, reason: str) -> None:
        async with self._lock:
            logger.error(
                "revision {} failed its soak ({}); rolling back to last known-good",
                rev[:12],
                reason,
            )
            self._mark_failed(rev, reason, "rolled-back")
            from keystone.env import substitution_env

            lkg = self.ledger.get("last_known_good")
            plan = plan_from_json(
                self.ledger.get("lkg_plan") or {"components": []}, environ=substitution_env()
            )
            checkout = self.ledger.get("lkg_checkout")
            self.agent.set_artifact_root(Path(checkout) if checkout else None, signed=True)
            try:
                result = await self.agent.apply(
                    plan, source=f"git:{(lkg or 'none')[:12]}", record=False
                )
            finally:
                self.agent.set_artifact_root(None, signed=False)
            self.ledger.update({"applied": lkg, "applied_at": time.time()})
            if self.agent.metrics is not None:
                self.agent.metrics.rollback("ok" if result.ok else "failed")
            self.agent.events.append(
                {
                    "kind": "rollback",
                    "result": "rolled-back" if result.ok else "failed",
                    "revision": rev,
                    "to": lkg,
                    "error": reason,
                }
            )
            self.ledger["last_sync"] = {
                "time": time.time(),
                "result": "rolled-back",
                "revision": rev,
                "error": reason,
                "trigger": "soak",
                "duration": 0,
            }
            self.agent.save_now()

    # --- suspend ----------------------------------------------------------------------------

    async def suspend(self) -> dict[str, Any]:
        self.ledger["suspended"] = True
        if self.scheduler is not None:
            self.scheduler.pause()
        self.agent.events.append({"kind": "suspend", "result": "ok"})
        self.agent.save_now()
        return {"suspended": True}

    async def resume(self) -> dict[str, Any]:
        self.ledger["suspended"] = False
        if self.scheduler is not None:
            self.scheduler.resume()
        self.agent.events.append({"kind": "resume", "result": "ok"})
        self.agent.save_now()
        return {"suspended": False}

    def dry_plan(self) -> DesiredPlan:
        return self.agent.deployer.applied
