"""The control service: what the HTTP API calls (``keystone.control.AgentControl``).

Every method may be called from any API thread: it hands a coroutine to the agent's event loop
and waits for its result. Everything that changes what runs (a plan apply, a sync, a bundle
import, a rollback, a component stop or restart) is a submission to the one desired-state slot
(``keystone.slot``), and its reply names the operation (``"operation": "<id>"``) that
``GET /v1/operations/{id}`` reports on.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import BinaryIO, TypeVar

from loguru import logger

from keystone import __version__
from keystone.config import AgentConfig
from keystone.control import JSON, Conflict, NotFound
from keystone.drift import DriftMonitor
from keystone.env import substitution_env
from keystone.errors import KeystoneError, UsageError, ValidationError
from keystone.node import Node, apply_record
from keystone.openssl import sha256
from keystone.plan import (
    DesiredPlan,
    FileRecipes,
    merge_entries,
    parse_plan,
    resolve_entries,
)
from keystone.recipesig import RecipeFileVerifier
from keystone.report import public_info
from keystone.runtime.deployer import PlannedChanges
from keystone.runtime.supervisor import State, Supervisor
from keystone.slot import DesiredSlot, Job, Operation
from keystone.sync.engine import SyncEngine
from keystone.sync.imports import receive_bundle
from keystone.sync.model import RequestKind, SyncRequest
from keystone.units import go_duration

T = TypeVar("T")


def _rfc3339(ts: float) -> str:
    """A Unix time as Go's ``time.RFC3339`` of a UTC time (``2026-01-02T15:04:05Z``)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


class ControlService:
    """Implements ``keystone.control.AgentControl`` over the node, the slot and the engine."""

    def __init__(self, config: AgentConfig, node: Node, slot: DesiredSlot) -> None:
        self.config = config
        self.node = node
        self.slot = slot
        self.engine: SyncEngine | None = None
        self.drift_monitor: DriftMonitor | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.started = time.time()
        self.started_mono = time.monotonic()
        self.closed = False  # set when the agent begins to shut down (Go's healthz "closed")

    def _call(self, factory: Callable[[], Awaitable[T]], timeout: float | None = 600.0) -> T:
        assert self.loop is not None

        async def runner() -> T:
            return await factory()

        fut = asyncio.run_coroutine_threadsafe(runner(), self.loop)
        return fut.result(timeout)

    # --- status -----------------------------------------------------------------------------

    def health(self) -> JSON:
        """Go's ``HealthStatus`` (``status``, ``uptime`` as a Go duration, ``closed``,
        ``time_utc``, ``clock_trusted``, ``clock_source``), then ours beside it.

        ``status`` is the agent's own liveness, ``ok`` while it answers, as in Go; whether a
        component is down is ``components_status`` (``ok`` or ``degraded``), and the
        components' own states are in ``GET /v1/components``.
        """
        sups = list(self.node.deployer.supervisors.values())
        degraded = any(s.state in (State.FAILED, State.UNHEALTHY, State.BACKOFF) for s in sups)
        uptime = max(0.0, time.monotonic() - self.started_mono)
        trusted, source = self._clock()
        return {
            "status": "ok",
            "uptime": go_duration(uptime),
            "closed": self.closed,
            "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "clock_trusted": trusted,
            "clock_source": source,
            "uptime_seconds": round(uptime, 3),
            "components_status": "degraded" if degraded else "ok",
            "version": __version__,
            "device": self.config.device_id,
            "revision": self.node.ledger.applied,
            "components": len(sups),
            **self._rollout(),
            **self._self_update(),
        }

    def _rollout(self) -> JSON:
        """``rollout`` (the device's wave, hold and outcome) while a rollout concerns it."""
        status = self.engine.rollout.status() if self.engine is not None else None
        return {"rollout": status} if status is not None else {}

    def _clock(self) -> tuple[bool, str]:
        """``clock_trusted`` and ``clock_source`` (``system``, ``high-water`` or ``build``, as
        Go names them) of the trust clock certificates are judged by."""
        # lazy: read only by /healthz; a small module without heavy imports
        from keystone.runtime.clock import TrustedClock

        policy = (os.environ.get("KEYSTONE_CLOCK_POLICY") or "").strip() or "high-water"
        try:
            reading = TrustedClock(self.node.runtime / "state", policy).read()
        except KeystoneError:
            reading = TrustedClock(self.node.runtime / "state").read()
        source = reading.source
        return reading.trusted, "build" if source == "build-time" else source

    def _self_update(self) -> JSON:
        # Only an agent that updates itself has anything to say (keystone.selfupdate).
        updater = self.node.self_update
        return {} if updater is None else {"self_update": updater.status_json()}

    def components(self) -> list[JSON]:
        sups = sorted(self.node.deployer.supervisors.values(), key=lambda s: s.name)
        monitor = self.drift_monitor
        if monitor is None:
            return [s.to_json() for s in sups]
        return [{**s.to_json(), "drift": monitor.of(s)} for s in sups]

    # --- drift ------------------------------------------------------------------------------

    def _monitor(self) -> DriftMonitor:
        if self.drift_monitor is None:
            raise Conflict("drift detection is not running in this agent")
        return self.drift_monitor

    def drift(self) -> JSON:
        monitor = self._monitor()

        async def read() -> JSON:  # on the loop: a check may be updating it
            return monitor.to_json()

        return self._call(read)

    def drift_check(self) -> JSON:
        monitor = self._monitor()

        async def go() -> JSON:
            return await monitor.check()

        return self._call(go)

    def plan_status(self) -> JSON:
        node = self.node
        status: JSON = {
            "planPath": node.plan_path,
            "status": "stopped" if node.stopped else node.plan_state,
            "error": node.plan_error,
            "unknownFields": node.unknown_fields,
            "damagedState": [r.to_json() for r in node.recoveries()],
        }
        if node.last_reconcile is not None:  # omitted until a pass has run, as in Go
            status["lastReconcile"] = _rfc3339(node.last_reconcile)
            status["lastReconcileResult"] = node.last_reconcile_result
        status["components"] = self.components()
        return status

    def plan_graph(self) -> JSON:
        return self.node.deployer.applied.graph.to_json()

    def metrics_text(self) -> tuple[bytes, str]:
        assert self.node.metrics is not None
        body, ctype = self.node.metrics.render()
        return body, ctype

    def history(self, *, limit: int) -> list[JSON]:
        return self.node.events.newest(limit)

    def operation(self, op_id: str, *, wait: float | None = None) -> JSON:
        """``GET /v1/operations/{id}``: queued, running or done with its result.

        ``wait`` (seconds) answers as soon as the operation is done, or when it passes.
        """

        async def go() -> JSON | None:
            op = await self.slot.wait(op_id, wait or 0)
            return None if op is None else op.to_json()

        found = self._call(go, None if wait is None else wait + 30)
        if found is None:
            raise NotFound(f"operation {op_id!r} is not known (the agent keeps the newest ones)")
        return found

    # --- components -------------------------------------------------------------------------

    def _sup(self, name: str) -> Supervisor:
        sup = self.node.deployer.supervisors.get(name)
        if sup is None:
            raise NotFound(f"component {name!r} is not in the applied plan")
        return sup

    def stop_component(self, name: str) -> str:
        """Stop one component, serialized with deployments; returns the operation id."""
        self._sup(name)

        async def stop(_op: str) -> JSON:
            # Looked up when it runs: a deployment queued before it may have replaced it.
            sup = self.node.deployer.supervisors.get(name)
            if sup is None:
                return {"component": name, "result": "not-found"}
            await sup.stop(reason="stopped by operator")
            return {"component": name, "result": "stopped"}

        async def go() -> str:
            op = self.slot.submit(Job("stop", stop, key=("stop", name)))
            await op.wait()
            return op.id

        return self._call(go)

    def restart_component(self, name: str, *, wait: str | None, timeout: float, dry: bool) -> JSON:
        """Go's ``RestartResult`` (``component``, ``pid``, ``dependents`` name -> pid, ``wait``,
        ``timeout``) or, with ``dry``, its ``RestartDryResult`` (``stopOrder``: the dependents
        stopped first, farthest first; ``startOrder``: the component, then its dependents)."""
        self._sup(name)
        deployer = self.node.deployer
        if dry:
            stop_order, start_order = deployer.restart_order(name)
            return {"stopOrder": stop_order, "startOrder": start_order}
        mode = wait or "pid"

        async def restart(_op: str) -> JSON:
            pid, dependents = await deployer.restart_component(name)
            return {"component": name, "pid": pid, "dependents": dependents}

        async def go() -> JSON:
            # The restart runs to completion whatever the client's timeout: a 504 only says
            # that the answer came late, never that a dependent was left stopped.
            op = self.slot.submit(Job("restart", restart, key=("restart", name)))
            result = await asyncio.wait_for(asyncio.shield(op.wait()), timeout)
            sup = self._sup(name)
            if mode == "health" and not sup.healthy:
                raise TimeoutError(f"{name} restarted but is {sup.state.value}: {sup.error or ''}")
            pids: dict[str, int] = {}
            for dep in result["dependents"]:
                other = self.node.deployer.supervisors.get(dep)
                dep_pid = other.reported()[2] if other is not None else 0
                if dep_pid:  # Go lists the dependents that have a process
                    pids[dep] = dep_pid
            return {
                "component": name,
                "pid": sup.reported()[2],
                "dependents": pids,
                "order": list(result["dependents"]),
                "operation": op.id,
            }

        try:
            result = self._call(go, timeout + 5)
        except TimeoutError as exc:
            raise TimeoutError(
                f"restart of {name} did not finish within {timeout:g}s ({exc}); it goes on in the agent"
            ) from exc
        return {
            "component": name,
            "pid": result["pid"],
            "dependents": result["dependents"],
            "wait": mode,
            "timeout": go_duration(timeout),
            "dependentsOrder": result["order"],
            "operation": result["operation"],
        }

    # --- recipes ----------------------------------------------------------------------------

    def recipes(self) -> list[JSON]:
        """The store's entries with their digest and file (``GET /v1/recipes?detail=true``)."""
        return [
            {
                "name": n,
                "version": v,
                "sha256": sha256(p.read_bytes()).hexdigest(),
                "path": str(p),
                "file": f"{n}-{v}.toml",
            }
            for n, v, p in self.node.store.list()
        ]

    def recipe_files(self) -> list[str]:
        """Go's ``GET /v1/recipes``: the store's file names, ``<name>-<version>.toml``, sorted."""
        return sorted(f"{n}-{v}.toml" for n, v, _ in self.node.store.list())

    def upload_recipe(self, text: str, *, force: bool) -> JSON:
        """Go's reply ``{status: "created", name, version}``, then ours beside it."""
        try:
            recipe, path, replaced = self.node.store.put(
                text, force=force, environ=substitution_env()
            )
        except FileExistsError as exc:
            raise Conflict(str(exc)) from None
        return {
            "status": "created",
            "name": recipe.name,
            "version": recipe.version,
            "path": str(path),
            "replaced": replaced,
            "unknownFields": list(recipe.unknown_fields),
        }

    def delete_recipe(self, name: str, version: str) -> None:
        for comp in self.node.deployer.applied.components.values():
            if comp.recipe_ref == f"{name}:{version}":
                raise Conflict(
                    f"recipe {name}:{version} is used by component {comp.name} of the applied plan"
                )
        if not self.node.store.delete(name, version):
            raise NotFound(f"recipe {name}:{version} is not in the store")

    # --- plans ------------------------------------------------------------------------------

    def plan_from_text(self, text: str) -> DesiredPlan:
        """Parse and resolve a plan sent to the API, once.

        A recipe is a store reference (``name:version``) or, as in the Go agent, a recipe file
        on the device: relative to the agent's working directory (never leaving it: no ``..``,
        no symlink out) or absolute. Files pass the recipe signature check that local plans
        pass (``<recipe>.sig`` when a trust bundle is configured).
        """
        pf = parse_plan(text, file="request body")
        entries, unknown = merge_entries([pf])
        reader = FileRecipes(
            Path.cwd(),
            self.node.store,
            verify=RecipeFileVerifier.from_env(),
            allow_absolute=True,
        )
        return resolve_entries(
            entries, reader, environ=substitution_env(), sources=("api",), unknown=unknown
        )

    def apply_plan(self, text: str, *, dry: bool) -> JSON:
        plan = self.plan_from_text(text)
        node = self.node
        planned = node.deployer.plan(plan)
        body: JSON = {
            "status": "dry-run" if dry else "applying",
            **planned.to_json(),
            "layers": [list(layer) for layer in plan.graph.layers],
            "unknownFields": list(plan.unknown_fields),
            "warnings": list(plan.warnings),
        }
        if dry:
            if plan.unknown_fields:
                raise ValidationError("; ".join(plan.unknown_fields))
            return body

        async def start() -> str:
            node.plan_state = "applying"  # visible to the next status read, before it runs
            return self.submit_apply(plan, source="api", planned=planned).id

        body["operation"] = self._call(start)
        return body

    def submit_apply(
        self, plan: DesiredPlan, *, source: str, planned: PlannedChanges | None = None
    ) -> Operation:
        """Queue a deployment of a parsed plan in the slot (latest wins); its operation."""
        node = self.node

        async def run(op_id: str) -> JSON:
            try:
                result = await node.apply(plan, source=source, planned=planned, record=True)
            except KeystoneError as exc:
                # The client may have gone; the journal must still say why nothing changed.
                logger.warning("plan apply ({}, {}) refused: {}", source, op_id, exc)
                return {**apply_record(source, error=exc), "operation": op_id}
            return {**apply_record(source, result=result), "operation": op_id}

        return self.slot.submit(Job("apply", run, desired=True))

    def reconcile(self) -> JSON:
        """Go's ``ReconcileResult``: ``skipped`` (with a ``reason``), ``repaired``, ``duration``."""
        return self._call(self.node.reconcile_now)

    # --- datasets ----------------------------------------------------------------------------

    def datasets(self) -> list[JSON]:
        return self._call(self._datasets_list)

    def dataset(self, name: str) -> JSON:
        async def one() -> JSON:
            try:
                if not self.node.datasets_json():
                    raise KeyError(name)
                return self.node.datasets.detail_json(name)
            except KeyError:
                raise NotFound(f"dataset {name!r} is declared by no component") from None

        return self._call(one)

    def refresh_datasets(self) -> list[JSON]:
        async def refresh() -> list[JSON]:
            if not self.node.datasets_json():
                return []
            await self.node.datasets.refresh_all()
            return self.node.datasets_json()

        return self._call(refresh, None)

    async def _datasets_list(self) -> list[JSON]:
        # On the loop: the bindings change there.
        return self.node.datasets_json()

    def stop_plan(self) -> str:
        """Stop every component, serialized with deployments; returns the operation id."""
        node = self.node

        async def stop(_op: str) -> JSON:
            node.stopped = True
            await node.deployer.stop_all(reason="plan stopped by operator")
            node.plan_state = "stopped"
            event = {"kind": "stop-plan", "result": "ok"}
            node.emit(event)
            node.save_now()
            return event

        async def go() -> str:
            op = self.slot.submit(Job("stop-plan", stop, key=("stop-plan",)))
            await op.wait()
            return op.id

        return self._call(go)

    # --- GitOps -----------------------------------------------------------------------------

    def _engine(self) -> SyncEngine:
        if self.engine is None:
            raise UsageError("the agent is still starting; try again in a moment")
        return self.engine

    def _polling_engine(self) -> SyncEngine:
        eng = self._engine()
        if self.config.source is None or not self.config.source.url:
            raise UsageError(
                "no [source] is configured on this agent; set [source] url in agent.toml"
            )
        return eng

    def _run(self, eng: SyncEngine, request: SyncRequest) -> JSON:
        async def go() -> JSON:
            op = eng.submit(request)
            result = await op.wait()
            return {**result, "operation": result.get("operation") or op.id}

        return self._call(go, None)

    def revision(self) -> JSON:
        info = self._call(self._engine().revision_info)
        return {
            **info,
            "device_key": public_info(self.node.runtime / "state"),
            "damaged_state": [r.to_json() for r in self.node.recoveries()],
        }

    def sync(self, *, dry_run: bool, allow_rollback: bool, retry: bool = False) -> JSON:
        eng = self._polling_engine()
        request = SyncRequest(
            trigger="manual", dry_run=dry_run, allow_rollback=allow_rollback, retry=retry
        )
        return self._run(eng, request)

    def rollback(self, *, to: str | None) -> JSON:
        eng = self._engine()
        request = SyncRequest(RequestKind.ROLLBACK, trigger="rollback", allow_rollback=True, to=to)
        return self._run(eng, request)

    def suspend(self) -> JSON:
        eng = self._polling_engine()
        return self._call(eng.suspend)

    def resume(self) -> JSON:
        eng = self._polling_engine()
        return self._call(eng.resume)

    def import_bundle(self, stream: BinaryIO, length: int | None) -> JSON:
        path = receive_bundle(self.node.runtime, stream, length)
        eng = self._engine()
        return self._run(eng, SyncRequest(RequestKind.IMPORT, trigger="bundle", bundle=path))
