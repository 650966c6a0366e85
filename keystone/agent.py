"""The composition root: builds the runtime, API, metrics and sync loop, and runs them.

The agent is one asyncio event loop. The HTTP API runs in its own small thread pool and reaches
the loop through ``AgentControl`` methods, each of which hands a coroutine to the loop and waits
for its result. State is persisted atomically under ``runtime/state`` after every change.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

from loguru import logger

from keystone import __version__
from keystone.config import AgentConfig
from keystone.control import JSON, Conflict, NotFound
from keystone.env import substitution_env
from keystone.errors import KeystoneError, UsageError, ValidationError
from keystone.plan import (
    DesiredPlan,
    FileRecipes,
    RecipeStore,
    merge_entries,
    parse_plan,
    plan_from_json,
    plan_to_json,
    resolve_entries,
)
from keystone.runtime.deployer import Deployer, DeployResult
from keystone.runtime.process import ProcessRunner, detect_cgroup_root
from keystone.runtime.supervisor import RUNNING, RestartTuning, State, Supervisor
from keystone.state import History, read_json, write_json
from keystone.units import parse_duration

T = TypeVar("T")


class Agent:
    """One device's agent. Implements ``keystone.control.AgentControl``."""

    def __init__(
        self, config: AgentConfig, *, http: str | None = None, tuning: RestartTuning | None = None
    ) -> None:
        self.config = config
        self.runtime = config.runtime.resolve()
        self.listen = http or config.api.listen
        self.started = time.time()
        self.loop: asyncio.AbstractEventLoop | None = None
        for sub in ("state", "components", "logs", "artifacts", "recipes"):
            (self.runtime / sub).mkdir(parents=True, exist_ok=True)
        self.snapshot_path = self.runtime / "state" / "agent.json"
        self.events = History(self.runtime / "state" / "history.jsonl")
        self.store = RecipeStore(self.runtime / "recipes")
        self.runner = ProcessRunner(cgroup_root=detect_cgroup_root())
        install_timeout = parse_duration(os.environ.get("KEYSTONE_INSTALL_TIMEOUT", "2m"))
        self.deployer = Deployer(
            self.runner,
            self.runtime,
            preparer=self._make_preparer(),
            tuning=tuning,
            install_timeout=install_timeout,
            on_change=self._on_component_change,
        )
        self.plan_path = ""
        self.plan_state = "idle"
        self.plan_error: str | None = None
        self.unknown_fields: list[str] = []
        self.last_reconcile: float | None = None
        self.stopped = False
        self.ledger: dict[str, Any] = {}
        self.sync_engine: Any = None
        self._save_pending = False
        self._shutdown: asyncio.Event | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self.api: Any = None
        self.metrics: Any = None
        self._metric_names: set[str] = set()
        self.notifier: Any = None
        self._init_metrics()

    # --- wiring -----------------------------------------------------------------------------

    def _make_preparer(self) -> Any:
        from keystone.runtime.artifact_client import WorkerPreparer

        self.preparer = WorkerPreparer(
            self.runner, self.runtime, allow_unsigned=self.config.trust.allow_unsigned_artifacts
        )
        return self.preparer

    def set_artifact_root(self, root: Path | None, *, signed: bool) -> None:
        """Where repo-relative artifact paths resolve for the next deployment (a verified
        checkout of the revision), and whether its recipes came signed (sha256 required)."""
        self.preparer.repo_root = root if root is not None else Path.cwd()
        self.preparer.require_sha256 = signed

    def _init_metrics(self) -> None:
        from keystone.metrics import Metrics

        self.metrics = Metrics()

    def _on_component_change(self, sup: Supervisor) -> None:
        if self.metrics is not None and self.deployer.supervisors.get(sup.name) is sup:
            self.metrics.set_component(
                sup.name, sup.state.value, sup.healthy, sup.restarts, sup.pid
            )
            self._metric_names.add(sup.name)
        if self.sync_engine is not None:
            self.sync_engine.on_component_change(sup)
        self.save_soon()

    def _prune_metrics(self) -> None:
        """Drop the series of components that are no longer in the plan."""
        if self.metrics is None:
            return
        for name in self._metric_names - set(self.deployer.supervisors):
            self.metrics.remove_component(name)
        self._metric_names &= set(self.deployer.supervisors)
        for name, sup in self.deployer.supervisors.items():
            self.metrics.set_component(name, sup.state.value, sup.healthy, sup.restarts, sup.pid)
            self._metric_names.add(name)

    def save_soon(self) -> None:
        """Write the snapshot at the next turn of the loop (coalesced)."""
        self._save_soon()

    def save_now(self) -> None:
        """Write the snapshot now."""
        self._save()

    def background(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run ``coro`` on the loop, owned by the agent (cancelled at shutdown)."""
        self._background_task(coro)

    def _save_soon(self) -> None:
        if self._save_pending or self.loop is None:
            return
        self._save_pending = True
        self.loop.call_soon(self._save)

    def _save(self) -> None:
        self._save_pending = False
        processes = {}
        for name, sup in self.deployer.supervisors.items():
            h = sup.handle
            if h is not None and sup.state in RUNNING:
                processes[name] = {
                    "pid": h.pid,
                    "pgid": h.pgid,
                    "start_ticks": h.start_ticks,
                    "cgroup": str(h.cgroup) if h.cgroup else None,
                    "version": sup.version,
                    "hash": sup.component.content_hash(),
                }
        write_json(
            self.snapshot_path,
            {
                "version": 1,
                "plan": plan_to_json(self.deployer.applied),
                "plan_path": self.plan_path,
                "stopped": self.stopped,
                "processes": processes,
                "sync": self.ledger,
                "saved_at": time.time(),
            },
        )

    # --- lifecycle --------------------------------------------------------------------------

    def load_plan_file(self, path: Path, *, root: Path | None = None) -> DesiredPlan:
        """Validate a local plan file and its recipes (raises before anything runs)."""
        text = _read_plan(path)
        pf = parse_plan(text, file=str(path))
        entries, unknown = merge_entries([pf])
        return resolve_entries(
            entries,
            FileRecipes(root or Path.cwd(), self.store),
            environ=substitution_env(),
            sources=(str(path),),
            unknown=unknown,
        )

    async def _restore(self) -> None:
        """Load the snapshot, adopt surviving processes, stop stale ones, start the rest."""
        snap = read_json(self.snapshot_path, {}) or {}
        self.stopped = bool(snap.get("stopped"))
        self.plan_path = snap.get("plan_path", "")
        self.ledger = snap.get("sync") or {}
        plan = DesiredPlan.empty()
        if snap.get("plan"):
            try:
                plan = plan_from_json(snap["plan"], environ=substitution_env())
            except KeystoneError as exc:
                logger.error("saved plan no longer validates ({}); starting with none", exc)
        self.deployer.applied = plan
        for name, rec in (snap.get("processes") or {}).items():
            cgroup = Path(rec["cgroup"]) if rec.get("cgroup") else None
            handle = self.runner.adopt(name, rec["pid"], rec["pgid"], rec["start_ticks"], cgroup)
            comp = plan.components.get(name)
            if (
                handle is not None
                and comp is not None
                and comp.content_hash() == rec.get("hash")
                and not self.stopped
            ):
                sup = self.deployer.make_supervisor(comp)
                self.deployer.supervisors[name] = sup
                sup.adopt(handle)
                logger.info("adopted {} (pid {}) from the previous run", name, handle.pid)
            elif handle is not None:
                logger.info("stopping stale {} (pid {}) left by the previous run", name, handle.pid)
                await self.runner.stop(handle, timeout=10.0)
        if plan.components and not self.stopped:
            result = await self.deployer.start_all()
            self._record_deploy("restore", result)

    def _record_deploy(self, kind: str, result: DeployResult, **extra: Any) -> None:
        """Count and journal a deployment."""
        outcome = "ok" if result.ok else "rolled-back"
        if self.metrics is not None:
            self.metrics.deployment(outcome)
            if result.rolled_back:
                self.metrics.rollback("ok" if not result.rollback_errors else "failed")
        if kind != "restore" or not result.ok:
            self.events.append({"kind": kind, "result": outcome, **result.to_json(), **extra})

    async def apply(self, plan: DesiredPlan, *, source: str, record: bool = True) -> DeployResult:
        """Deploy ``plan`` (a validated DesiredPlan) and record the outcome.

        ``record=False`` leaves the history entry to the caller (the sync engine writes one
        record per sync with the revision).
        """
        self.plan_state = "applying"
        self.plan_error = None
        self.unknown_fields = list(plan.unknown_fields)
        self.stopped = False
        try:
            result = await self.deployer.deploy(plan)
        except KeystoneError as exc:
            self.plan_state = "failed"
            self.plan_error = str(exc)
            if record:
                self.events.append(
                    {"kind": "apply", "result": "refused", "error": str(exc), "source": source}
                )
            self._save_soon()
            raise
        self._prune_metrics()
        self.plan_state = "running" if result.ok else "failed"
        self.plan_error = None if result.ok else f"{result.failed}: {result.reason} (rolled back)"
        if result.ok:
            self.plan_path = source
            self._background_task(self._gc())
        if record:
            self._record_deploy("apply", result, source=source)
        elif self.metrics is not None:
            self.metrics.deployment("ok" if result.ok else "rolled-back")
            if result.rolled_back:
                self.metrics.rollback("ok" if not result.rollback_errors else "failed")
        self._save_soon()
        return result

    async def run(self, *, initial: DesiredPlan | None = None, initial_source: str = "") -> int:
        """Run until SIGTERM/SIGINT; stop every component in reverse order; return 0."""
        self.loop = asyncio.get_running_loop()
        self._shutdown = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(sig, self._shutdown.set)
        self._start_api()
        await self._restore()
        if initial is not None:
            result = await self.apply(initial, source=initial_source)
            if not result.ok:
                logger.error("initial plan failed: {}: {}", result.failed, result.reason)
        self.plan_state = (
            "stopped"
            if self.stopped
            else ("running" if self.deployer.applied.components else "idle")
        )
        self._start_notifier()
        self._start_sync()
        self._start_reconcile_timer()
        self._background_task(self._rotate_logs())
        logger.info(
            "agent ready: {} component(s); API on {}", len(self.deployer.supervisors), self.listen
        )
        await self._shutdown.wait()
        logger.info("shutting down: stopping components in reverse order")
        if self.notifier is not None:
            self.notifier.stopping()
        if self.sync_engine is not None:
            await self.sync_engine.close()
        for t in list(self._background):
            t.cancel()
        await self.deployer.stop_all(reason="agent shutdown")
        for sup in self.deployer.supervisors.values():
            await sup.close()
        self._save()
        if self.api is not None:
            self.api.stop()
        return 0

    async def _gc(self) -> None:
        """Trim the artifact cache, keeping what the applied and last known-good plans need."""
        applied = self.deployer.applied.components.values()
        keep = {a.sha256 for c in applied for a in c.recipe.artifacts if a.sha256}
        keep |= {p["sha256"] for c in applied for p in self.preparer.prepared_for(c)}
        lkg = self.ledger.get("lkg_plan") or {}
        for comp in lkg.get("components") or []:
            try:
                from keystone.recipe import parse_recipe

                recipe = parse_recipe(
                    comp["recipe_text"],
                    file=comp.get("recipe_source", ""),
                    environ=substitution_env(),
                )
            except KeystoneError:
                continue
            keep |= {a.sha256 for a in recipe.artifacts if a.sha256}
        if (
            not any(c.recipe.artifacts for c in self.deployer.applied.components.values())
            and not keep
        ):
            return
        try:
            report = await self.preparer.gc(keep)
        except KeystoneError as exc:
            logger.warning("artifact cache GC failed: {}", exc)
            return
        if self.metrics is not None and report.get("remaining_bytes") is not None:
            self.metrics.set_cache_bytes(int(report["remaining_bytes"]))
        if self.metrics is not None and self.preparer.clock_trusted is not None:
            self.metrics.set_clock_trusted(self.preparer.clock_trusted)

    def request_shutdown(self) -> None:
        if self.loop is not None and self._shutdown is not None:
            self.loop.call_soon_threadsafe(self._shutdown.set)

    def _background_task(self, coro: Coroutine[Any, Any, Any]) -> None:
        assert self.loop is not None
        task = self.loop.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _start_api(self) -> None:
        from keystone.api import ApiServer, TlsConfig, resolve_token

        tls = None
        api = self.config.api
        if api.tls_cert and api.tls_key:
            tls = TlsConfig(cert=api.tls_cert, key=api.tls_key, client_ca=api.client_ca)
        token = resolve_token(self.runtime, os.environ)
        self.api = ApiServer(
            self, listen=self.listen, token=token, token_file=self.runtime / "api.token", tls=tls
        )
        self.api.start()

    def _start_notifier(self) -> None:
        from keystone.systemd import Notifier

        self.notifier = Notifier()
        self.notifier.ready()
        interval = self.notifier.watchdog_interval()
        if interval:
            self._background_task(self._watchdog(interval))

    async def _watchdog(self, interval: float) -> None:
        while True:
            self.notifier.ping()
            await asyncio.sleep(interval)

    def _start_sync(self) -> None:
        """The sync engine: polling when a source is configured; always, for bundle imports."""
        from keystone.sync.engine import SyncEngine

        self.sync_engine = SyncEngine(self)
        self.sync_engine.start()

    def _start_reconcile_timer(self) -> None:
        interval = self.config.reconcile_interval
        if interval <= 0 or (self.config.source is not None and self.config.source.url):
            return  # with a source, every sync tick repairs too

        async def loop() -> None:
            from keystone.sync.scheduler import device_offset

            jitter = (
                self.config.reconcile_jitter
                if self.config.reconcile_jitter is not None
                else interval * 0.1
            )
            await asyncio.sleep(device_offset(self.config.device_id, jitter))
            while True:
                await self.repair()
                await asyncio.sleep(interval)

        self._background_task(loop())

    async def _rotate_logs(self, every: float = 60.0) -> None:
        """Rotate component logs past ``KEYSTONE_LOG_MAX_BYTES`` (10 MiB), keeping 3 old files."""
        from keystone.runtime.logs import rotate_logs
        from keystone.units import parse_size

        max_bytes = parse_size(os.environ.get("KEYSTONE_LOG_MAX_BYTES") or "10M")
        while True:
            await asyncio.sleep(every)
            dirs = {sup.paths.logdir for sup in self.deployer.supervisors.values()}
            for d in dirs:
                try:
                    await asyncio.to_thread(rotate_logs, d, max_bytes, 3)
                except OSError as exc:
                    logger.warning("log rotation in {} failed: {}", d, exc)

    async def repair(self) -> list[str]:
        """Start what the applied plan says should run and does not (never a stopped plan)."""
        if self.stopped:
            return []
        t0 = time.monotonic()
        repaired = await self.deployer.reconcile()
        self.last_reconcile = time.time()
        if self.metrics is not None:
            self.metrics.reconcile("ok", time.monotonic() - t0, len(repaired))
        if repaired:
            logger.info("repaired: {}", ", ".join(repaired))
            self.events.append({"kind": "repair", "result": "ok", "components": repaired})
        return repaired

    # --- AgentControl (called from API threads) ---------------------------------------------

    def _call(self, factory: Callable[[], Awaitable[T]], timeout: float | None = 600.0) -> T:
        assert self.loop is not None

        async def runner() -> T:
            return await factory()

        fut = asyncio.run_coroutine_threadsafe(runner(), self.loop)
        return fut.result(timeout)

    def health(self) -> JSON:
        sups = list(self.deployer.supervisors.values())
        degraded = any(s.state in (State.FAILED, State.UNHEALTHY, State.BACKOFF) for s in sups)
        return {
            "status": "degraded" if degraded else "ok",
            "uptime": round(time.time() - self.started, 3),
            "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "version": __version__,
            "device": self.config.device_id,
            "revision": self.ledger.get("applied"),
            "components": len(sups),
        }

    def components(self) -> list[JSON]:
        return [
            s.to_json() for s in sorted(self.deployer.supervisors.values(), key=lambda s: s.name)
        ]

    def _sup(self, name: str) -> Supervisor:
        sup = self.deployer.supervisors.get(name)
        if sup is None:
            raise NotFound(f"component {name!r} is not in the applied plan")
        return sup

    def stop_component(self, name: str) -> None:
        sup = self._sup(name)
        self._call(lambda: sup.stop(reason="stopped by operator"))

    def restart_component(self, name: str, *, wait: str | None, timeout: float, dry: bool) -> JSON:
        sup = self._sup(name)
        if dry:
            stop_order, start_order = self.deployer.restart_order(name)
            return {"stopOrder": stop_order, "startOrder": start_order}

        async def go() -> tuple[int | None, list[str]]:
            # The restart runs to completion whatever the client's timeout: a 504 only says
            # that the answer came late, never that a dependent was left stopped.
            task = asyncio.ensure_future(self.deployer.restart_component(name))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
            if wait is None:
                # "no wait": the stop/start sequence itself, bounded by the timeout.
                return await asyncio.wait_for(asyncio.shield(task), timeout)
            result = await asyncio.wait_for(asyncio.shield(task), timeout)
            if wait == "health" and not sup.healthy:
                raise TimeoutError(f"{name} restarted but is {sup.state.value}: {sup.error or ''}")
            return result

        try:
            pid, dependents = self._call(go, timeout + 5)
        except TimeoutError as exc:
            raise TimeoutError(
                f"restart of {name} did not finish within {timeout:g}s ({exc}); it goes on in the agent"
            ) from exc
        return {
            "component": name,
            "pid": pid if pid is not None else sup.pid,
            "dependents": dependents,
        }

    def recipes(self) -> list[JSON]:
        import hashlib

        return [
            {
                "name": n,
                "version": v,
                "sha256": hashlib.sha256(p.read_bytes()).hexdigest(),
                "path": str(p),
            }
            for n, v, p in self.store.list()
        ]

    def upload_recipe(self, text: str, *, force: bool) -> JSON:
        try:
            recipe, path, replaced = self.store.put(text, force=force, environ=substitution_env())
        except FileExistsError as exc:
            raise Conflict(str(exc)) from None
        return {
            "name": recipe.name,
            "version": recipe.version,
            "path": str(path),
            "replaced": replaced,
            "unknownFields": list(recipe.unknown_fields),
        }

    def delete_recipe(self, name: str, version: str) -> None:
        for comp in self.deployer.applied.components.values():
            if comp.recipe_ref == f"{name}:{version}":
                raise Conflict(
                    f"recipe {name}:{version} is used by component {comp.name} of the applied plan"
                )
        if not self.store.delete(name, version):
            raise NotFound(f"recipe {name}:{version} is not in the store")

    def plan_status(self) -> JSON:
        return {
            "planPath": self.plan_path,
            "status": "stopped" if self.stopped else self.plan_state,
            "error": self.plan_error,
            "unknownFields": self.unknown_fields,
            "lastReconcile": self.last_reconcile,
            "components": self.components(),
        }

    def plan_graph(self) -> JSON:
        return self.deployer.applied.graph.to_json()

    def _plan_from_text(self, text: str) -> DesiredPlan:
        pf = parse_plan(text, file="request body")
        entries, unknown = merge_entries([pf])
        # The API never reads a path a client names: only store references resolve.
        store_only = FileRecipes(Path("/nonexistent-api-root"), self.store)

        def reader(e: Any) -> tuple[str, str]:
            from keystone.plan import STORE_REF

            if not STORE_REF.match(e.recipe) or "/" in e.recipe:
                raise ValidationError(
                    f"recipe {e.recipe!r}: the API takes store references name:version only; "
                    "upload recipes first (keystone upload-recipe)",
                    file=e.file,
                    line=e.line,
                    field="recipe",
                )
            return store_only(e)

        return resolve_entries(
            entries, reader, environ=substitution_env(), sources=("api",), unknown=unknown
        )

    def apply_plan(self, text: str, *, dry: bool) -> JSON:
        plan = self._plan_from_text(text)
        changes, actions = self.deployer.dry_run(plan)
        body: JSON = {
            "status": "dry-run" if dry else "applying",
            "changes": changes.to_json(),
            "actions": [a.to_json() for a in actions],
            "layers": [list(layer) for layer in plan.graph.layers],
            "unknownFields": list(plan.unknown_fields),
            "warnings": list(plan.warnings),
        }
        if dry:
            if plan.unknown_fields:
                raise ValidationError("; ".join(plan.unknown_fields))
            return body

        async def start() -> None:
            self.plan_state = "applying"  # visible to the next status read, before the task runs
            self._background_task(self.apply(plan, source="api"))

        self._call(start)
        return body

    def reconcile(self) -> JSON:
        return {"repaired": self._call(self.repair)}

    def stop_plan(self) -> None:
        async def go() -> None:
            self.stopped = True
            await self.deployer.stop_all(reason="plan stopped by operator")
            self.plan_state = "stopped"
            self.events.append({"kind": "stop-plan", "result": "ok"})
            self._save()

        self._call(go)

    def metrics_text(self) -> tuple[bytes, str]:
        body, ctype = self.metrics.render()
        return body, ctype

    # --- GitOps ------------------------------------------------------------------------------

    def _engine(self) -> Any:
        if self.sync_engine is None:
            raise UsageError("the agent is still starting; try again in a moment")
        return self.sync_engine

    def _polling_engine(self) -> Any:
        eng = self._engine()
        if self.config.source is None or not self.config.source.url:
            raise UsageError(
                "no [source] is configured on this agent; set [source] url in agent.toml"
            )
        return eng

    def revision(self) -> JSON:
        info: JSON = self._call(self._engine().revision_info)
        return info

    def sync(self, *, dry_run: bool, allow_rollback: bool, retry: bool = False) -> JSON:
        eng = self._polling_engine()
        result: JSON = self._call(
            lambda: eng.sync_now(
                dry_run=dry_run, allow_rollback=allow_rollback, trigger="manual", retry=retry
            ),
            None,
        )
        return result

    def history(self, *, limit: int) -> list[JSON]:
        return self.events.newest(limit)

    def rollback(self, *, to: str | None) -> JSON:
        eng = self._engine()
        result: JSON = self._call(lambda: eng.rollback(to=to), None)
        return result

    def suspend(self) -> JSON:
        eng = self._polling_engine()
        result: JSON = self._call(lambda: eng.suspend())
        return result

    def resume(self) -> JSON:
        eng = self._polling_engine()
        result: JSON = self._call(lambda: eng.resume())
        return result

    def import_bundle(self, stream: BinaryIO, length: int | None) -> JSON:
        from keystone.sync.imports import receive_bundle

        path = receive_bundle(self.runtime, stream, length)
        eng = self._engine()
        result: JSON = self._call(lambda: eng.import_bundle(path), None)
        return result


def _read_plan(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValidationError("plan file not found", file=str(path)) from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as exc:
        raise ValidationError(f"cannot read plan: {exc}", file=str(path)) from None
