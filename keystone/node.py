"""The device's running side: the deployer and its supervisors, the snapshot, history, metrics.

``Node`` applies plans, keeps the snapshot on disk (``keystone.ledger.Snapshot``), restores it
after a restart (adopting the processes that survived), repairs what should run, trims the
artifact cache, and runs the sync worker. It is what the sync engine sees through
``keystone.sync.host.SyncHost`` and what the control service reads for status.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loguru import logger

from keystone.config import AgentConfig
from keystone.env import substitution_env
from keystone.errors import KeystoneError
from keystone.ledger import SNAPSHOT_FILE, Ledger, ProcessRecord, Snapshot
from keystone.metrics import Metrics
from keystone.plan import Component, DesiredPlan, RecipeStore, plan_from_json, plan_to_json
from keystone.recipe import AGENT_TYPE, parse_recipe
from keystone.recovery import Stray, Sweep, closed_subset, process_pgids, read_anchor, stop_all
from keystone.runtime.artifact_client import WorkerPreparer
from keystone.runtime.deployer import (
    LOCAL_ARTIFACTS,
    ArtifactContext,
    Deployer,
    DeployResult,
    PlannedChanges,
)
from keystone.runtime.process import ProcessHandle, ProcessRunner, detect_cgroup_root
from keystone.runtime.runner import AnyRunner, record_kind
from keystone.runtime.supervisor import RestartTuning, Supervisor
from keystone.state import History, atomic_write
from keystone.statefile import RECOVERIES, Recovery, report_missing, set_aside
from keystone.sync.model import WorkerAnswer, WorkerOp, WorkerRequest, sync_deadline_message
from keystone.units import go_duration, parse_duration
from keystone.workerproc import ErrorInfo, call

if TYPE_CHECKING:
    from keystone.datasets.agent import AgentDatasets
    from keystone.datasets.bundle import BundleEntry
    from keystone.datasets.manager import RefreshResult
    from keystone.runtime.container import ContainerRunner
    from keystone.selfupdate import SelfUpdater

SYNC_WORKER = "keystone.sync.worker"


class Node:
    """One device's deployer, state and bookkeeping (implements ``SyncHost``)."""

    def __init__(self, config: AgentConfig, *, tuning: RestartTuning | None = None) -> None:
        self.config = config
        self.runtime = config.runtime.resolve()
        for sub in ("state", "components", "logs", "artifacts", "recipes"):
            (self.runtime / sub).mkdir(parents=True, exist_ok=True)
        self.snapshot_path = self.runtime / "state" / "agent.json"
        self.events = History(self.runtime / "state" / "history.jsonl")
        self.store = RecipeStore(self.runtime / "recipes")
        self.runner = ProcessRunner(cgroup_root=detect_cgroup_root())
        self.runner.remove_stale_cgroups()  # left by earlier agents (a crash, a power cut)
        self.preparer = WorkerPreparer(
            self.runner, self.runtime, allow_unsigned=config.trust.allow_unsigned_artifacts
        )
        install_timeout = parse_duration(os.environ.get("KEYSTONE_INSTALL_TIMEOUT", "2m"))
        # Created on first use (a plan with datasets): its modules stay out of other agents.
        self._datasets: AgentDatasets | None = None
        self._datasets_started = False
        self.deployer = Deployer(
            self.runner,
            self.runtime,
            preparer=self.preparer,
            tuning=tuning,
            install_timeout=install_timeout,
            on_change=self._on_component_change,
            component_env=self._component_env,
            start_gate=self._start_gate,
            allow_privileged_install=config.allow_privileged_install,
            runner_for=self.runner_for,
            prepare_component=self._prepare_component,
        )
        self.metrics: Metrics | None = Metrics()
        self.preparer.on_prepared = self._on_artifact_prepared
        self.ledger = Ledger()
        self.plan_path = ""
        self.plan_state = "idle"
        self.plan_error: str | None = None
        self.unknown_fields: list[str] = []
        self.last_reconcile: float | None = None
        self.last_reconcile_result = ""  # Go's lastReconcileResult: ok, repaired ..., skipped: ...
        self.stopped = False
        self.on_component_change: Callable[[Supervisor], None] | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.saver = SnapshotSaver(self.snapshot_path)
        self._background: set[asyncio.Task[Any]] = set()
        self._metric_names: set[str] = set()
        self._containers: ContainerRunner | None = None
        # Self-update (keystone.selfupdate), made on first use; the agent wires its slot and
        # handover into it through configure_updater.
        self._updater: SelfUpdater | None = None
        self.configure_updater: Callable[[SelfUpdater], None] | None = None
        self.recover_to: str | None = None
        """A verified revision newer than the snapshot's, for the first sync to deploy."""
        # The history as found, before this agent appends to it (a recovery record, say).
        self.events.check()
        self._history_found = self._had_state()
        RECOVERIES.listen(self._on_recovery)
        if self.metrics is not None:
            self.metrics.add_samples(self._recovery_samples)

    # --- SyncHost ---------------------------------------------------------------------------

    @property
    def applied_plan(self) -> DesiredPlan:
        return self.deployer.applied

    def environ(self) -> Mapping[str, str]:
        return substitution_env()

    def emit(self, event: dict[str, Any]) -> None:
        self.events.append(event)

    def save_soon(self) -> None:
        """Write the snapshot soon: changes are batched (at most one write per
        ``KEYSTONE_SNAPSHOT_BATCH``), an unchanged snapshot is not written, and a change of the
        last sync's time alone (a quiet poll) waits up to ``KEYSTONE_SNAPSHOT_QUIET``."""
        if self.loop is not None:
            self.saver.soon(self.loop, self.snapshot)

    def save_now(self) -> None:
        """Write the snapshot now, unless what is on disk says the same (before a deployment
        is reported done, at shutdown)."""
        self.saver.now(self.snapshot())

    def background(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run ``coro`` on the loop, owned by the node (cancelled at shutdown)."""
        assert self.loop is not None
        task = self.loop.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def run_worker(self, request: WorkerRequest, *, timeout: float) -> WorkerAnswer:
        """Run the sync worker once; a timeout or a crash is a failed answer."""
        reply = await call(
            self.runner,
            SYNC_WORKER,
            request.to_json(),
            cwd=self.runtime,
            # [limits] of agent.toml reach the worker's parsers and transports this way.
            env={**os.environ, **self.config.limits.environ()},
            timeout=timeout,
        )
        if reply.timed_out:
            return WorkerAnswer.failed(
                ErrorInfo("SyncDeadline", "retryable", sync_deadline_message(timeout))
            )
        if reply.answer is None:
            return WorkerAnswer.failed(
                ErrorInfo(
                    "WorkerCrash",
                    "bug",
                    f"sync worker exited {reply.returncode} without an answer",
                )
            )
        return WorkerAnswer.from_json(reply.answer)

    async def apply(
        self,
        plan: DesiredPlan,
        *,
        source: str,
        planned: PlannedChanges | None = None,
        artifacts: ArtifactContext = LOCAL_ARTIFACTS,
        record: bool = False,
    ) -> DeployResult:
        """Deploy ``plan`` (a validated DesiredPlan) with its change set.

        ``record=True`` writes an ``apply`` history entry (a local or API plan); the sync
        engine writes one record per sync with the revision instead.
        """
        self.plan_state = "applying"
        self.plan_error = None
        self.unknown_fields = list(plan.unknown_fields)
        self.stopped = False
        agent: Component | None = None
        try:
            if any(c.recipe.metadata.type == AGENT_TYPE for c in plan.components.values()):
                plan, agent = await self._prepare_agent(plan, artifacts)
                planned = None  # computed again for the plan without the agent
            result = await self.deployer.deploy(plan, planned=planned, artifacts=artifacts)
        except KeystoneError as exc:
            self.plan_state = "failed"
            self.plan_error = str(exc)
            if record:
                self.emit(apply_record(source, error=exc))
            self.save_soon()
            raise
        self._prune_metrics()
        if self._datasets is not None:
            self._datasets.sync_plan(self.deployer.applied)
        if result.ok:
            self.plan_path = source
        # The outcome is on disk before anyone is told: a device that loses power right after
        # "running" comes back on this plan and adopts its processes.
        self.save_now()
        self.plan_state = "running" if result.ok else "failed"
        self.plan_error = None if result.ok else f"{result.failed}: {result.reason} (rolled back)"
        if result.ok:
            self.background(self.gc())
            if agent is not None or self._updater is not None:
                self.updater.want(agent, from_sync=not record)
        if record:
            self.record_deploy("apply", result, source=source)
        elif self.metrics is not None:
            self.metrics.deployment("ok" if result.ok else "rolled-back")
            if result.rolled_back:
                self.metrics.rollback("ok" if not result.rollback_errors else "failed")
        self.save_soon()
        return result

    async def repair(self) -> list[str]:
        """Start what the applied plan says should run and does not (never a stopped plan)."""
        result = await self.reconcile_now()
        return list(result.get("repaired") or [])

    async def reconcile_now(self) -> dict[str, Any]:
        """One reconcile pass, as Go's ``ReconcileResult``: ``skipped`` (and its ``reason``),
        ``repaired`` (sorted, omitted when empty) and ``duration`` (a Go duration, to the ms).

        It is skipped when no plan is applied or an operator stopped the plan; the outcome is
        kept for the plan status (``lastReconcile``, ``lastReconcileResult``).
        """
        t0 = time.monotonic()
        reason = ""
        if not self.deployer.applied.components:
            reason = "no plan has been applied yet"
        elif self.stopped:
            reason = (
                'plan is "stopped"; a plan stopped by an operator is never resumed automatically'
            )
        repaired: list[str] = []
        outcome = "skipped" if reason else "ok"
        try:
            if not reason:
                repaired = sorted(await self.deployer.reconcile())
        except Exception as exc:
            outcome = "failed"
            self._record_reconcile(outcome, time.monotonic() - t0, f"failed: {exc}", [])
            raise
        if reason:
            summary = f"skipped: {reason}"
        elif repaired:
            summary = "repaired " + ", ".join(repaired)
        else:
            summary = "ok"
        elapsed = time.monotonic() - t0
        self._record_reconcile(outcome, elapsed, summary, repaired)
        if repaired:
            logger.info("repaired: {}", ", ".join(repaired))
            self.emit({"kind": "repair", "result": "ok", "components": repaired})
        result: dict[str, Any] = {"skipped": bool(reason)}
        if reason:
            result["reason"] = reason
        if repaired:
            result["repaired"] = repaired
        result["duration"] = go_duration(round(elapsed, 3))
        return result

    def _record_reconcile(
        self, outcome: str, elapsed: float, summary: str, repaired: list[str]
    ) -> None:
        self.last_reconcile = time.time()
        self.last_reconcile_result = summary
        if self.metrics is not None:
            self.metrics.reconcile(outcome, elapsed, repaired)

    # --- snapshot ---------------------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        """The state to write: applied plan, the processes running it, the ledger."""
        processes = {}
        for name, sup in self.deployer.supervisors.items():
            record = sup.describe()
            stopping = sup.describe_stopping() if record is None else None
            if record is not None or stopping is not None:
                processes[name] = ProcessRecord(
                    runner=(record or stopping).to_json(),  # type: ignore[union-attr]
                    version=sup.version,
                    hash=sup.component.content_hash(),
                    stopping=stopping is not None,
                )
        return Snapshot(
            plan=plan_to_json(self.deployer.applied),
            plan_path=self.plan_path,
            stopped=self.stopped,
            processes=processes,
            ledger=self.ledger.to_json(),
            saved_at=time.time(),
        )

    async def restore(self) -> None:
        """Load the snapshot, adopt surviving processes, stop stale ones, start the rest.

        Every state file is read through its schema first (damage is set aside and reported).
        The snapshot is reconciled with the mirror's anti-rollback anchor: when the anchor is a
        verified descendant of the snapshot's revision, the snapshot is stale and its plan is
        never started; the processes that already run the anchor's plan are kept and the first
        sync deploys the anchor (:attr:`recover_to`). Every component process found alive that
        nobody adopts (a stale version, one being stopped when the agent died, one whose
        record was lost) is stopped before anything starts.
        """
        loaded = Snapshot.load(self.snapshot_path)
        damaged = loaded is None and any(
            r.file == SNAPSHOT_FILE for r in RECOVERIES if r.path == str(self.snapshot_path)
        )
        snap = loaded or Snapshot()
        for problem in snap.problems:
            self._damaged_copy(self.snapshot_path, problem)
        if loaded is None and not damaged and self._history_found:
            report_missing(self.snapshot_path, "the history is there, the snapshot is not")
        self.stopped = snap.stopped
        self.plan_path = snap.plan_path
        self.ledger = Ledger.from_json(snap.ledger)
        plan = DesiredPlan.empty()
        if snap.plan:
            try:
                plan = plan_from_json(snap.plan, environ=substitution_env())
            except KeystoneError as exc:
                self._damaged_copy(self.snapshot_path, f"its plan does not validate: {exc}")
                self.ledger.applied = None  # what ran is unknown now: trust the mirror's anchor
        self._check_history(loaded)
        self._check_clock(loaded)
        target = await self._reconcile_anchor(plan)
        sweep = Sweep(self.runner, self.runtime / "components")
        sweep.collect()
        strays: list[Stray] = []
        adopted: dict[str, tuple[Any, str | None]] = {}
        for name, rec in snap.processes.items():
            runner = self.runner_of_kind(record_kind(rec.runner))
            handle = runner.adopt_record(name, rec.runner)
            comp = target.components.get(name)
            if handle is None:
                if runner is self.runner and rec.runner.get("pid") is None:
                    self._damaged_copy(self.snapshot_path, f"processes.{name}: not a usable record")
                continue
            if (
                comp is not None
                and comp.content_hash() == rec.hash
                and not rec.stopping
                and not self.stopped
            ):
                adopted[name] = (
                    handle,
                    sweep.instance_of(handle.pgid) if runner is self.runner else None,
                )
            elif runner is not self.runner:
                logger.info("stopping stale {} ({}) left by the previous run", name, rec.runner)
                await runner.stop(handle, timeout=10.0)
            elif sweep.ours(handle.pid):
                why = "it was being stopped" if rec.stopping else "stale, not in the plan to run"
                marker = sweep.marker_of(handle.pid)
                timeout = marker.stop_timeout if marker is not None else 10.0
                strays.append(Stray(name, handle, timeout, why))
            else:
                logger.warning(
                    "{}: pid {} of the snapshot runs something that is not this agent's; left alone",
                    name,
                    handle.pid,
                )
        known = process_pgids({n: h for n, (h, _) in adopted.items()})
        known |= {s.handle.pgid for s in strays}
        more, found = sweep.candidates(known, target, adopted)
        adopted.update({n: (h, i) for n, (h, i) in more.items() if not self.stopped})
        strays += found + [
            Stray(n, h, 10.0, "the plan is stopped") for n, (h, _) in more.items() if self.stopped
        ]
        if self.recover_to is not None:
            keep = closed_subset(target, adopted)
            for name in set(adopted) - set(keep.components):
                handle = adopted.pop(name)[0]
                if isinstance(handle, ProcessHandle):
                    strays.append(Stray(name, handle, 10.0, "its dependency is not running"))
                else:  # a container: its own runner stops it
                    await self.containers.stop(handle, timeout=10.0)
            target = keep
        await stop_all(self.runner, strays)
        self.deployer.applied = target
        for name, (handle, instance) in adopted.items():
            comp = target.components[name]
            sup = self.deployer.make_supervisor(comp)
            self.deployer.supervisors[name] = sup
            sup.adopt(handle, instance=instance)
            if comp.recipe.run.container is not None:
                # docker/nerdctl: follow the adopted container's logs again (podman's
                # containers write to the log files themselves)
                await self.containers.resume_logs(handle, sup.paths.logdir)
            if comp.recipe.datasets:
                # Running already: its datasets are on disk; keep them fresh from here.
                self.datasets.bind(comp)
                self.datasets.scheduler.sync_bindings()
            logger.info("adopted {} (pid {}) from the previous run", name, handle.pid)
        runtimes = [
            c.recipe.run.container.runtime
            for c in target.components.values()
            if c.recipe.run.container is not None
        ]
        if runtimes or self._containers is not None:
            await self.containers.sweep(runtimes)
        if target.components and not self.stopped and self.recover_to is None:
            result = await self.deployer.start_all()
            self.record_deploy("restore", result)
        self.save_soon()

    def _had_state(self) -> bool:
        """Something says this agent ran before (so a missing snapshot was lost)."""
        try:
            return self.events.path.stat().st_size > 0
        except OSError:
            return False

    def _damaged_copy(self, path: Path, problem: str) -> None:
        """Report damage inside a file still in use: a copy is kept aside, the file rewritten."""
        try:
            copy = path.with_name(f"{path.name}.damaged.tmp")
            shutil.copy2(path, copy)
        except OSError:
            set_aside(path, problem)
            return
        set_aside(copy, problem, name=path.name, original=path)

    def _check_history(self, snap: Snapshot | None) -> None:
        """A history emptied, deleted or older than the snapshot is reported.

        (Its schema was checked when the node was made, before anything was appended.)
        """
        if snap is None:
            return
        led = Ledger.from_json(snap.ledger)
        reported = any(r.path == str(self.events.path) for r in RECOVERIES)
        if not self._history_found and (led.applied or snap.plan):
            if not reported:
                report_missing(
                    self.events.path, "emptied or deleted: the snapshot has an applied plan"
                )
            return
        if not led.applied_at or reported:
            return
        # The sync that applied the snapshot's revision is in the history, written after it.
        times = [r.get("time") for r in self.events.newest(200) if r.get("kind") == "sync"]
        if not any(isinstance(t, int | float) and t >= led.applied_at for t in times):
            self._damaged_copy(
                self.events.path,
                "older than the snapshot (an older copy?): it does not have the sync that "
                "applied the snapshot's revision",
            )

    def _check_clock(self, snap: Snapshot | None) -> None:
        """The trust clock's mark through its schema, raised to the last time the agent saved.

        The mark lags by design (it is written when certificates are judged), so an older copy
        cannot be told from a normal one: it is raised to the snapshot's time, which the device
        has certainly seen, and never reported.
        """
        # lazy: the trust clock, only read here at start and by artifact verification
        from keystone.runtime.clock import TrustedClock

        clock = TrustedClock(self.runtime / "state")
        mark = clock.mark()  # validates (a damaged mark is set aside and reported)
        path = clock.mark_path
        seen = snap.saved_at if snap is not None else 0.0
        if path is None or not path.exists() or seen <= mark:
            return
        try:
            clock.observe(seen)
        except OSError as exc:
            logger.warning("cannot raise the trust clock mark: {}", exc)

    async def _reconcile_anchor(self, plan: DesiredPlan) -> DesiredPlan:
        """The plan to run: the snapshot's, or the mirror anchor's when that is newer."""
        anchor = read_anchor(self.runtime / "repo")
        applied = self.ledger.applied
        if not anchor or anchor == applied:
            return plan
        # lazy: the sync settings, only for an agent whose snapshot and mirror disagree
        from dataclasses import replace

        from keystone.sync.pipeline import SyncSettings

        settings = SyncSettings.from_config(self.config, self.runtime)
        answer = await self.run_worker(
            WorkerRequest(
                WorkerOp.VERIFY_REV,
                runtime=str(self.runtime),
                source=settings.source,
                trust=replace(settings.trust, max_age=0.0),
                applied=applied,
                rev=anchor,
                device_id=settings.device_id,
                labels=settings.labels,
                environ=dict(self.environ()),
            ),
            timeout=settings.worker_timeout,
        )
        if not answer.ok or answer.plan is None:
            why = answer.error.message if answer.error else "no plan"
            if applied:
                logger.info(
                    "the mirror's anchor {} is not newer than the applied {} ({}); keeping {}",
                    anchor[:12],
                    applied[:12],
                    why,
                    applied[:12],
                )
                if self.loop is not None:
                    self.background(self._mark_anchor(applied, settings))
            else:
                logger.warning(
                    "the mirror's anchor {} does not verify ({}); nothing is started from it",
                    anchor[:12],
                    why,
                )
            return plan
        try:
            newer = plan_from_json(dict(answer.plan), environ=substitution_env())
        except KeystoneError as exc:
            logger.warning(
                "the plan of the mirror's anchor {} does not validate: {}", anchor[:12], exc
            )
            return plan
        if applied:
            self._damaged_copy(
                self.snapshot_path,
                f"older than the mirror's anti-rollback anchor: it applied {applied[:12]}, the "
                f"mirror's verified {anchor[:12]} descends from it; {applied[:12]} is not "
                f"started, {anchor[:12]} is deployed",
            )
        else:
            logger.warning(
                "no applied revision in the snapshot; the mirror's verified anchor {} is deployed",
                anchor[:12],
            )
        self.recover_to = anchor
        return newer

    async def _mark_anchor(self, rev: str, settings: Any) -> None:
        await self.run_worker(
            WorkerRequest(
                WorkerOp.MARK_APPLIED,
                runtime=str(self.runtime),
                source=settings.source,
                trust=settings.trust,
                rev=rev,
            ),
            timeout=settings.worker_timeout,
        )

    # --- damaged state ----------------------------------------------------------------------

    def _mine(self, rec: Recovery) -> bool:
        return rec.path.startswith(str(self.runtime) + os.sep)

    def recoveries(self) -> list[Recovery]:
        """The state files of this runtime recovered since the agent started."""
        return [r for r in RECOVERIES if self._mine(r)]

    def _on_recovery(self, rec: Recovery) -> None:
        if self._mine(rec):
            self.emit({"kind": "recovery", "result": "recovered", **rec.to_json()})

    def _recovery_samples(self) -> list[Any]:
        counts: dict[str, int] = {}
        for r in self.recoveries():
            counts[r.file] = counts.get(r.file, 0) + 1
        return [
            _Sample(
                "keystone_state_recovered_total",
                "counter",
                "State files found damaged, missing or stale and recovered from, by file",
                (("file", f),),
                float(n),
            )
            for f, n in sorted(counts.items())
        ]

    # --- runners ----------------------------------------------------------------------------

    @property
    def containers(self) -> ContainerRunner:
        """The container runner, made on first use (a container recipe or record)."""
        if self._containers is None:
            # lazy: an agent without containers never loads the container runner
            from keystone.runtime.container import ContainerRunner, owner_label

            cfg = self.config.containers
            self._containers = ContainerRunner(
                owner=owner_label(self.runtime),
                engine=cfg.engine,
                oci_runtime=cfg.runtime,
                extra_args=cfg.extra_args,
                host=self.runner,
            )
        return self._containers

    def runner_for(self, component: Component) -> AnyRunner:
        """The runner of a component: by its recipe's run type."""
        return self.containers if component.recipe.run.container is not None else self.runner

    def runner_of_kind(self, kind: str) -> AnyRunner:
        """The runner whose snapshot entries are of ``kind``."""
        return self.containers if kind == "container" else self.runner

    async def _prepare_component(self, component: Component) -> None:
        """Before anything stops: a container's engine is there and its image is (pulled)."""
        container = component.recipe.run.container
        if container is not None:
            await self._load_bundle_images(container.runtime)
            await self.containers.prepare(component.name, container)

    async def _load_bundle_images(self, runtime: str) -> None:
        """Load the image archives a verified bundle staged (``bundles/images``) into the engine.

        Each archive is removed once the engine took it (or refused it: the refusal is the
        deployment's error, and a damaged archive must not block the next one).
        """
        staged = self.runtime / "bundles" / "images"
        for archive in sorted(staged.glob("*.tar")) if staged.is_dir() else []:
            try:
                loaded = await self.containers.load_image(archive, engine=runtime)
            except KeystoneError as exc:
                raise KeystoneError(f"image archive {archive.name} from the bundle: {exc}") from exc
            finally:
                archive.unlink(missing_ok=True)
            logger.info("loaded container image from the bundle: {}", loaded or archive.name)
            self.emit(
                {"kind": "image", "result": "loaded", "archive": archive.name, "loaded": loaded}
            )

    def record_deploy(self, kind: str, result: DeployResult, **extra: Any) -> None:
        """Count and journal a deployment."""
        outcome = "ok" if result.ok else "rolled-back"
        if self.metrics is not None:
            self.metrics.deployment(outcome)
            if result.rolled_back:
                self.metrics.rollback("ok" if not result.rollback_errors else "failed")
        if kind != "restore" or not result.ok:
            self.emit({"kind": kind, "result": outcome, **result.to_json(), **extra})

    # --- self-update ------------------------------------------------------------------------

    @property
    def updater(self) -> SelfUpdater:
        """The agent's self-update side, made on first use (a plan that pins the agent)."""
        if self._updater is None:
            # lazy: the self-update module, only for an agent that updates itself
            from keystone.selfupdate import SelfUpdater

            self._updater = SelfUpdater(
                self.runtime,
                self.runner,
                self.preparer,
                ledger=lambda: self.ledger,
                emit=self.emit,
                save=self.save_now,
            )
            if self.configure_updater is not None:
                self.configure_updater(self._updater)
        return self._updater

    @property
    def self_update(self) -> SelfUpdater | None:
        """The self-update side if this agent has one (nothing is made)."""
        return self._updater

    def has_updater_state(self) -> bool:
        """Whether an earlier run left self-update state (so the updater must look at it)."""
        return (self.runtime / "agent" / "selfupdate.json").exists() or (
            self.runtime / "agent" / "handover.json"
        ).exists()

    async def _prepare_agent(
        self, plan: DesiredPlan, artifacts: ArtifactContext
    ) -> tuple[DesiredPlan, Component]:
        """Split the agent component off ``plan``; install its version if it is a new one."""
        from keystone.selfupdate import split_plan  # lazy: as in updater

        rest, agent = split_plan(plan)
        assert agent is not None
        await self.updater.prepare(agent, artifacts)
        return rest, agent

    async def detach(self) -> None:
        """Stop supervising and save, leaving every component running (a self-update hands
        them to the next agent, which adopts them from the snapshot)."""
        if self._datasets is not None:
            await self._datasets.stop()
        for t in list(self._background):
            t.cancel()
        for sup in self.deployer.supervisors.values():
            await sup.close()
        self.save_now()

    # --- housekeeping -----------------------------------------------------------------------

    # --- datasets ---------------------------------------------------------------------------

    @property
    def datasets(self) -> AgentDatasets:
        """The agent's dataset side (store, resolver, manager, scheduler), made on first use."""
        if self._datasets is None:
            # lazy: the dataset modules (tarfile, zipfile, manifests) only for a plan with datasets
            from keystone.datasets.agent import AgentDatasets

            self._datasets = AgentDatasets(
                self.runtime,
                lambda: self.deployer.supervisors,
                device_id=self.config.device_id,
                on_result=self._on_dataset_result,
            )
            if self.metrics is not None:
                self.metrics.add_samples(self._datasets.metric_samples)
            if self._datasets_started:
                self._datasets.start()
        return self._datasets

    def start_datasets(self) -> None:
        """Run the dataset schedule on the loop (now, or when the first dataset appears)."""
        self._datasets_started = True
        if self._datasets is not None:
            self._datasets.start()

    def datasets_json(self) -> list[dict[str, Any]]:
        """``GET /v1/datasets``: empty while no component declares a dataset."""
        return [] if self._datasets is None else self._datasets.list_json()

    def _component_env(self, component: Component) -> dict[str, str]:
        return self.datasets.component_env(component) if component.recipe.datasets else {}

    async def _start_gate(self, component: Component) -> str | None:
        if not component.recipe.datasets and self._datasets is None:
            return None
        return await self.datasets.start_gate(component)

    def _on_dataset_result(self, result: RefreshResult) -> None:
        if result.result != "unchanged":
            self.emit(
                {
                    "kind": "dataset",
                    "result": result.result,
                    "dataset": result.name,
                    "version": result.version,
                    **({"reason": result.reason} if result.reason else {}),
                    **({"rolled_back": True} if result.rolled_back else {}),
                }
            )

    async def import_bundle_datasets(
        self, root: Path, error: str | None, *, plan: DesiredPlan | None = None
    ) -> list[dict[str, Any]]:
        """A verified bundle's datasets through the dataset manager (``SyncHost``); never raises.

        Each entry is verified as a refresh is (signature, anti-replay, digest). The datasets
        are those of ``plan`` (the revision about to deploy; else the applied plan), whose
        components are bound first; one nobody declares is reported ``skipped``. The staged
        copy is removed afterwards.
        """
        # lazy: the dataset modules, only for a bundle that carries datasets
        from keystone.datasets.bundle import read_bundle_datasets

        records: list[dict[str, Any]] = []
        if error:
            records.append({"name": "", "result": "failed", "reason": error})
        else:
            try:
                records += await self._import_staged(read_bundle_datasets(root), plan)
            except (KeystoneError, OSError) as exc:
                records.append({"name": "", "result": "failed", "reason": str(exc)})
            finally:
                shutil.rmtree(root, ignore_errors=True)
        for r in records:
            if r["result"] == "failed":
                logger.warning(
                    "[dataset] name={} msg=from the bundle: refused: {}", r["name"], r["reason"]
                )
        return records

    async def _import_staged(
        self, entries: Iterable[BundleEntry], plan: DesiredPlan | None = None
    ) -> list[dict[str, Any]]:
        records: list[dict[str, Any]] = []
        target = plan if plan is not None else self.applied_plan
        declared = {spec.name for c in target.components.values() for spec in c.recipe.datasets}
        wanted = []
        for entry in entries:
            if entry[0] in declared:
                wanted.append(entry)
            else:
                records.append(
                    {"name": entry[0], "result": "skipped", "reason": "declared by no recipe"}
                )
        if not wanted:
            return records
        for comp in target.components.values():
            if comp.recipe.datasets:
                self.datasets.bind(comp)  # the components about to run, before they start
        for result in await self.datasets.import_entries(wanted):
            self._on_dataset_result(result)
            records.append(
                {
                    "name": result.name,
                    "result": result.result,
                    "version": result.version,
                    **({"reason": result.reason} if result.reason else {}),
                }
            )
        return records

    def _on_artifact_prepared(self, prepared: Mapping[str, Any]) -> None:
        # The worker's own log stays in the worker; the path taken is the agent's to say.
        via = str(prepared.get("via") or "cache")
        wire = int(prepared.get("wire_bytes") or 0)
        saved = int(prepared.get("saved_bytes") or 0)
        what = f"artifact {prepared.get('uri')} of component {prepared.get('component')!r}"
        if via == "delta":
            logger.info(
                "{}: installed from a delta patch: {} B on the wire, ~{} B saved", what, wire, saved
            )
        elif via == "full" and prepared.get("delta_fallback"):
            logger.info(
                "{}: delta unavailable ({}); downloaded the whole artifact ({} B)",
                what,
                prepared.get("delta_fallback"),
                wire,
            )
        elif via == "full":
            logger.info("{}: downloaded whole ({} B)", what, wire)
        if self.metrics is not None:
            self.metrics.artifact_fetched(via, wire, saved)

    def _on_component_change(self, sup: Supervisor) -> None:
        if self.metrics is not None and self.deployer.supervisors.get(sup.name) is sup:
            self._set_metric(sup)
            self._metric_names.add(sup.name)
        if self.on_component_change is not None:
            self.on_component_change(sup)
        if self.loop is not None:
            # A process started or gone is on disk at the next turn of the loop, as it always
            # was (a restarted agent adopts or stops exactly what it finds there); other
            # changes are batched.
            urgent = self.saver.written_pid(sup.name) != sup.pid
            self.saver.soon(self.loop, self.snapshot, urgent=urgent)

    def _prune_metrics(self) -> None:
        """Drop the series of components that are no longer in the plan."""
        if self.metrics is None:
            return
        for name in self._metric_names - set(self.deployer.supervisors):
            self.metrics.remove_component(name)
        self._metric_names &= set(self.deployer.supervisors)
        for name, sup in self.deployer.supervisors.items():
            self._set_metric(sup)
            self._metric_names.add(name)

    def _set_metric(self, sup: Supervisor) -> None:
        assert self.metrics is not None
        state, health, pid = sup.reported()  # Go's values, as GET /v1/components reports them
        self.metrics.set_component(
            sup.name, sup.state.value, sup.healthy, sup.restarts, pid, state=state, health=health
        )

    async def gc(self) -> None:
        """Trim the artifact cache, keeping what the applied and last known-good plans need."""
        applied = self.deployer.applied.components.values()
        keep = {a.sha256 for c in applied for a in c.recipe.artifacts if a.sha256}
        keep |= {p["sha256"] for c in applied for p in self.preparer.prepared_for(c)}
        lkg = self.ledger.lkg_plan or {}
        for comp in lkg.get("components") or []:
            try:
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

    async def close(self) -> None:
        """Cancel background work, stop every component in reverse order, save."""
        if self._datasets is not None:
            await self._datasets.stop()
        for t in list(self._background):
            t.cancel()
        await self.deployer.stop_all(reason="agent shutdown")
        for sup in self.deployer.supervisors.values():
            await sup.close()
        self.save_now()


class SnapshotSaver:
    """Writes the snapshot file, sparing the flash: unchanged snapshots are not written, bursts
    of changes are batched, and a quiet poll (only the last sync's time moved) is written at
    most once per ``quiet`` seconds. ``now`` always writes a real change at once.

    Args:
        path: ``state/agent.json``.
        batch: the least time between two writes for changes (``KEYSTONE_SNAPSHOT_BATCH``, 1s).
        quiet: the least time between two writes for last-sync times only
            (``KEYSTONE_SNAPSHOT_QUIET``, 15m).
    """

    def __init__(
        self, path: Path, *, batch: float | None = None, quiet: float | None = None
    ) -> None:
        self.path = path
        self.batch = batch if batch is not None else _env_seconds("KEYSTONE_SNAPSHOT_BATCH", 1.0)
        self.quiet = quiet if quiet is not None else _env_seconds("KEYSTONE_SNAPSHOT_QUIET", 900.0)
        self.writes = 0
        self.bytes_written = 0
        self._last: dict[str, Any] | None = None  # the written document without saved_at
        self._last_quiet: dict[str, Any] | None = None
        self._written_at = -math.inf
        self._handle: asyncio.TimerHandle | asyncio.Handle | None = None
        self._due = math.inf

    def soon(
        self,
        loop: asyncio.AbstractEventLoop,
        build: Callable[[], Snapshot],
        *,
        urgent: bool = False,
    ) -> None:
        """Schedule a write of ``build()`` no sooner than ``batch`` after the last one, or at
        the next turn of the loop when ``urgent`` (a process started or ended)."""
        self._schedule(loop, build, -math.inf if urgent else self._written_at + self.batch)

    def written_pid(self, name: str) -> int | None:
        """The pid the snapshot on disk records for component ``name`` (None: none)."""
        rec = (self._last or {}).get("processes", {}).get(name)
        pid = rec.get("pid") if isinstance(rec, Mapping) else None
        return pid if isinstance(pid, int) else None

    def _schedule(
        self, loop: asyncio.AbstractEventLoop, build: Callable[[], Snapshot], due: float
    ) -> None:
        if self._handle is not None:
            if self._due <= due:
                return  # a write already due sooner takes the newest state
            self._handle.cancel()
        self._due = due
        delay = due - time.monotonic()
        if delay > 0:
            self._handle = loop.call_later(delay, self._fire, loop, build)
        else:
            self._handle = loop.call_soon(self._fire, loop, build)

    def _fire(self, loop: asyncio.AbstractEventLoop, build: Callable[[], Snapshot]) -> None:
        self._handle, self._due = None, math.inf
        snap = build()
        doc = snap.to_json()
        full, quiet = _views(doc)
        if full == self._last and self.path.exists():
            return
        if quiet == self._last_quiet and self.path.exists():
            due = self._written_at + self.quiet
            if time.monotonic() < due:
                self._schedule(loop, build, due)
                return
        self._write(doc, full, quiet)

    def now(self, snap: Snapshot) -> None:
        """Write ``snap`` now unless the file already says the same."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle, self._due = None, math.inf
        doc = snap.to_json()
        full, quiet = _views(doc)
        if full == self._last and self.path.exists():
            return
        self._write(doc, full, quiet)

    def _write(self, doc: dict[str, Any], full: dict[str, Any], quiet: dict[str, Any]) -> None:
        data = (json.dumps(doc, separators=(",", ":"), sort_keys=True) + "\n").encode()
        atomic_write(self.path, data)
        self.writes += 1
        self.bytes_written += len(data)
        self._last, self._last_quiet = full, quiet
        self._written_at = time.monotonic()


def _views(doc: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The snapshot without its write time, and also without the last sync's time."""
    full = {k: v for k, v in doc.items() if k != "saved_at"}
    quiet = dict(full)
    sync = quiet.get("sync")
    if isinstance(sync, Mapping) and isinstance(sync.get("last_sync"), Mapping):
        last = {k: v for k, v in sync["last_sync"].items() if k not in ("time", "duration")}
        quiet["sync"] = {**sync, "last_sync": last}
    return full, quiet


def _env_seconds(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return float(raw) if raw.replace(".", "", 1).isdigit() else parse_duration(raw)
    except ValueError:
        logger.warning("{}={!r} is not a duration; using {:g}s", name, raw, default)
        return default


def apply_record(
    source: str, *, result: DeployResult | None = None, error: BaseException | None = None
) -> dict[str, Any]:
    """The history entry of a local or API plan apply (what ``keystone apply --wait`` reads)."""
    if error is not None or result is None:
        return {"kind": "apply", "result": "refused", "error": str(error), "source": source}
    outcome = "ok" if result.ok else "rolled-back"
    return {"kind": "apply", "result": outcome, **result.to_json(), "source": source}


@dataclass(frozen=True)
class _Sample:
    """One scrape-time series (see ``Metrics.add_samples``)."""

    name: str
    kind: str
    help: str
    labels: tuple[tuple[str, str], ...]
    value: float
