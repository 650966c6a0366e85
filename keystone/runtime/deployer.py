"""The DAG deployer: applies a desired plan layer by layer and rolls back on failure.

Order of a deployment: prepare every artifact the change set needs (nothing running is touched
yet); stop removed components in reverse layer order; stop changed components and their hard/soft
dependents in reverse layer order; start added, changed and restarted components layer by layer,
in parallel within a layer, each layer only once the previous one is healthy. If a component does
not become healthy within its deadline, every touched component goes back to its previous version
in reverse order and the failure names the component and the reason. Previous versions keep their
work dirs (``components/<name>/<version>``), so a rollback starts at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from loguru import logger

from keystone.diff import Action, ChangeSet, plan_actions
from keystone.errors import DeploymentFailed, ValidationError
from keystone.plan import Component, DesiredPlan
from keystone.runtime.probes import ProbeScheduler
from keystone.runtime.runner import AnyRunner
from keystone.runtime.supervisor import (
    RUNNING,
    RestartTuning,
    State,
    Supervisor,
    component_paths,
    privileged_install_refusal,
)
from keystone.runtime.timing import Clock, MonotonicClock


@dataclass(frozen=True)
class ArtifactContext:
    """Where one deployment's repo-relative artifact paths resolve, and how strict it is.

    Attributes:
        repo_root: the verified checkout of the revision being deployed; None means the
            current directory (a local plan).
        require_sha256: every artifact must pin a sha256 (recipes that came signed).
    """

    repo_root: Path | None = None
    require_sha256: bool = False

    def root(self) -> Path:
        """The directory repo-relative artifact paths resolve against."""
        return self.repo_root if self.repo_root is not None else Path.cwd()


LOCAL_ARTIFACTS = ArtifactContext()
"""A local plan: paths from the current directory, unpinned artifacts allowed."""


class ArtifactPreparer(Protocol):
    """Fetches and verifies artifacts before a deployment touches anything."""

    async def prepare(
        self, components: Sequence[Component], *, context: ArtifactContext = LOCAL_ARTIFACTS
    ) -> None:
        """Fetch and verify the artifacts of ``components``; raise a KeystoneError to refuse."""
        ...

    async def install(
        self, component: Component, workdir: Path, *, context: ArtifactContext = LOCAL_ARTIFACTS
    ) -> None:
        """Place the prepared artifacts of ``component`` into its work dir."""
        ...


@dataclass
class DeployResult:
    """What a deployment did."""

    ok: bool
    changes: ChangeSet
    actions: list[Action]
    failed: str | None = None
    reason: str | None = None
    rolled_back: bool = False
    rollback_errors: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, object]:
        return {
            "ok": self.ok,
            "changes": self.changes.to_json(),
            "actions": [a.to_json() for a in self.actions],
            "failed": self.failed,
            "reason": self.reason,
            "rolled_back": self.rolled_back,
            "rollback_errors": self.rollback_errors,
        }


@dataclass(frozen=True)
class PlannedChanges:
    """The diff of one deployment, computed once: from ``base`` to ``desired``.

    A deployment given one whose ``base`` is no longer the applied plan computes it again.
    """

    base: DesiredPlan
    desired: DesiredPlan
    changes: ChangeSet
    actions: tuple[Action, ...]

    def to_json(self) -> dict[str, object]:
        """``{changes, actions}`` as the API and the sync records show them."""
        return {
            "changes": self.changes.to_json(),
            "actions": [a.to_json() for a in self.actions],
        }


def plan_changes(current: DesiredPlan, desired: DesiredPlan) -> PlannedChanges:
    """The change set and ordered actions that take ``current`` to ``desired`` (pure)."""
    changes, actions = plan_actions(current, desired)
    return PlannedChanges(current, desired, changes, tuple(actions))


class Deployer:
    """Owns the supervisors of the applied plan and moves them to a desired plan."""

    def __init__(
        self,
        runner: AnyRunner,
        runtime_dir: Path,
        *,
        preparer: ArtifactPreparer | None = None,
        tuning: RestartTuning | None = None,
        install_timeout: float = 120.0,
        on_change: Callable[[Supervisor], None] | None = None,
        clock: Clock | None = None,
        component_env: Callable[[Component], Mapping[str, str]] | None = None,
        start_gate: Callable[[Component], Awaitable[str | None]] | None = None,
        runner_for: Callable[[Component], AnyRunner] | None = None,
        prepare_component: Callable[[Component], Awaitable[None]] | None = None,
        allow_privileged_install: bool = False,
    ) -> None:
        self.runner = runner
        # The runner of one component (by its recipe's run type; default: ``runner``), and a
        # check of each component about to start that runs before anything stops (a
        # container's engine and image); it refuses with a KeystoneError.
        self.runner_for = runner_for
        self.prepare_component = prepare_component
        # May an install script run with the agent's privileges when its recipe asks
        # (require_privilege = true)? ([security] allow_privileged_install in agent.toml)
        self.allow_privileged_install = allow_privileged_install
        # Extra environment for a component's process (its datasets' paths), and a check
        # before each start that may refuse it with a reason (a required dataset missing).
        self.component_env = component_env
        self.start_gate = start_gate
        self.clock: Clock = clock or MonotonicClock()
        # One schedule for every supervisor's health probes: due probes run in one turn.
        self.probes = ProbeScheduler(self.clock)
        self.runtime_dir = runtime_dir
        self.preparer = preparer
        self.tuning = tuning or RestartTuning()
        self.install_timeout = install_timeout
        self.on_change = on_change
        self.applied: DesiredPlan = DesiredPlan.empty()
        self.supervisors: dict[str, Supervisor] = {}
        self.lock = asyncio.Lock()

    def make_supervisor(self, component: Component) -> Supervisor:
        """A supervisor for ``component`` in its versioned work dir."""
        return Supervisor(
            component,
            self.runner_for(component) if self.runner_for else self.runner,
            component_paths(self.runtime_dir, component.name, component.version),
            tuning=self.tuning,
            install_timeout=self.install_timeout,
            on_change=self.on_change,
            env_passthrough=self.component_env(component) if self.component_env else None,
            clock=self.clock,
            allow_privileged_install=self.allow_privileged_install,
            probes=self.probes,
        )

    async def _start(self, sups: Sequence[Supervisor]) -> None:
        """Start ``sups`` together; one the start gate refuses is left FAILED with the reason."""
        go = list(sups)
        if self.start_gate is not None:
            go = []
            for sup in sups:
                why = await self.start_gate(sup.component)
                if why:
                    sup.refuse_start(why)
                else:
                    go.append(sup)
        await asyncio.gather(*(s.start() for s in go))

    def dry_run(self, desired: DesiredPlan) -> tuple[ChangeSet, list[Action]]:
        """The actions a deployment of ``desired`` would take; nothing is done."""
        planned = self.plan(desired)
        return planned.changes, list(planned.actions)

    def plan(self, desired: DesiredPlan) -> PlannedChanges:
        """The change set from the applied plan to ``desired``, to hand to :meth:`deploy`."""
        return plan_changes(self.applied, desired)

    async def deploy(
        self,
        desired: DesiredPlan,
        *,
        planned: PlannedChanges | None = None,
        artifacts: ArtifactContext = LOCAL_ARTIFACTS,
    ) -> DeployResult:
        """Apply ``desired``; on failure roll back and raise nothing (see ``DeployResult``).

        Args:
            desired: the validated plan.
            planned: its diff, computed by the caller (``plan``); computed here when absent or
                when the applied plan changed since.
            artifacts: where this deployment's repo-relative artifacts resolve.

        Artifact preparation errors propagate (KeystoneError) before anything is touched, and
        so does a ValidationError for an install script that asks for the agent's privileges
        when they are not allowed.
        """
        for comp in desired.components.values():
            why = privileged_install_refusal(comp, self.allow_privileged_install)
            if why:
                # Refused before anything is touched: what runs keeps running.
                raise ValidationError(why, field="lifecycle.install.require_privilege")
        async with self.lock:
            if (
                planned is None
                or planned.base is not self.applied
                or planned.desired is not desired
            ):
                planned = plan_changes(self.applied, desired)
            return await self._deploy(planned, artifacts)

    async def _deploy(self, planned: PlannedChanges, artifacts: ArtifactContext) -> DeployResult:
        current, desired = planned.base, planned.desired
        changes, actions = planned.changes, list(planned.actions)
        result = DeployResult(True, changes, actions)
        if changes.empty:
            self.applied = desired
            for name, comp in desired.components.items():
                if name in self.supervisors:
                    self.supervisors[name].component = comp
            return result
        starting = [desired.components[a.component] for a in actions if a.action == "start"]
        fresh = [c for c in starting if c.name not in changes.restarted]
        if self.preparer is not None and fresh:
            await self.preparer.prepare(fresh, context=artifacts)
        if self.prepare_component is not None:
            for comp in fresh:
                await self.prepare_component(comp)

        old: dict[str, Supervisor] = {}
        started: list[Supervisor] = []
        try:
            for a in actions:
                if a.action != "stop":
                    continue
                sup = self.supervisors.get(a.component)
                if sup is not None:
                    old[a.component] = sup
                    await sup.stop(reason=a.reason)
            for layer_no, _layer in enumerate(desired.graph.layers):
                batch = [a for a in actions if a.action == "start" and a.layer == layer_no]
                if not batch:
                    continue
                sups = []
                for a in batch:
                    comp = desired.components[a.component]
                    sup = self.make_supervisor(comp)
                    if self.preparer is not None and comp.recipe.artifacts:
                        await self.preparer.install(comp, sup.paths.workdir, context=artifacts)
                    sups.append(sup)
                    started.append(sup)
                    self.supervisors[comp.name] = sup
                await self._start(sups)
                failure = await self._wait_layer(sups)
                if failure is not None:
                    result.ok = False
                    result.failed, result.reason = failure
                    break
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug or an OS error mid-deployment: still roll back
            logger.exception("deployment failed unexpectedly")
            result.ok = False
            result.reason = f"{type(exc).__name__}: {exc}"
        if result.ok:
            for name in changes.removed:
                self.supervisors.pop(name, None)
            self.applied = desired
            return result
        logger.error("deployment failed: {}: {}; rolling back", result.failed, result.reason)
        result.rollback_errors = await self._rollback(current, started, old)
        result.rolled_back = True
        return result

    async def _wait_layer(self, sups: list[Supervisor]) -> tuple[str, str] | None:
        """Wait until every supervisor is healthy; the first failure wins."""

        async def one(s: Supervisor) -> tuple[str, str] | None:
            health = s.component.recipe.run.health
            deadline = (health.start_timeout if health else self.tuning.settle) + 5.0
            ok = await s.wait_for(
                lambda st: (
                    st is not State.STARTING
                    and st is not State.INSTALLING
                    and st is not State.PENDING
                ),
                deadline,
            )
            if ok and s.state is State.HEALTHY:
                return None
            if not ok:
                return s.name, f"not healthy within {deadline:g}s"
            return s.name, f"{s.state.value}: {s.error or 'no reason given'}"

        tasks = [asyncio.ensure_future(one(s)) for s in sups]
        try:
            for fut in asyncio.as_completed(tasks):
                failure = await fut
                if failure is not None:
                    return failure
        finally:
            for t in tasks:
                t.cancel()
        return None

    async def _rollback(
        self, previous: DesiredPlan, started: list[Supervisor], old: dict[str, Supervisor]
    ) -> list[str]:
        errors: list[str] = []
        for sup in reversed(started):
            await sup.stop(reason="rollback")
            if self.supervisors.get(sup.name) is sup:
                del self.supervisors[sup.name]
        for layer in previous.graph.layers:
            sups = [old[n] for n in layer if n in old]
            for s in sups:
                self.supervisors[s.name] = s
            if not sups:
                continue
            await asyncio.gather(*(s.start() for s in sups))
            failure = await self._wait_layer(sups)
            if failure is not None:
                errors.append(f"{failure[0]}: {failure[1]}")
        self.applied = previous
        return errors

    def raise_for(self, result: DeployResult) -> None:
        """Raise DeploymentFailed for a failed result."""
        if not result.ok:
            raise DeploymentFailed(
                f"deployment failed: component {result.failed}: {result.reason}; rolled back to the previous plan",
                component=result.failed,
            )

    async def stop_all(self, *, reason: str = "stop") -> None:
        """Stop every component in reverse layer order."""
        async with self.lock:
            for layer in reversed(self.applied.graph.layers):
                await asyncio.gather(
                    *(
                        self.supervisors[n].stop(reason=reason)
                        for n in layer
                        if n in self.supervisors
                    )
                )
            for name, sup in list(self.supervisors.items()):
                if name not in self.applied.components:
                    await sup.stop(reason=reason)

    async def start_all(self) -> DeployResult:
        """Start every component of the applied plan that is not running (after ``stop_all``)."""
        async with self.lock:
            return await self._start_missing(repair_only=False)

    async def reconcile(self) -> list[str]:
        """Start again what the applied plan says should run and does not; returns their names."""
        async with self.lock:
            result = await self._start_missing(repair_only=True)
            return [a.component for a in result.actions]

    async def _start_missing(self, *, repair_only: bool) -> DeployResult:
        actions: list[Action] = []
        failure: tuple[str, str] | None = None
        for layer_no, layer in enumerate(self.applied.graph.layers):
            sups = []
            for name in layer:
                sup = self.supervisors.get(name)
                if sup is None:
                    sup = self.make_supervisor(self.applied.components[name])
                    self.supervisors[name] = sup
                elif (
                    sup.state in RUNNING
                    or sup.state is State.BACKOFF
                    or (repair_only and not sup.wanted and sup.state is not State.FAILED)
                ):
                    continue
                actions.append(
                    Action(
                        "start", name, sup.version, layer_no, "repair" if repair_only else "start"
                    )
                )
                sups.append(sup)
            if sups:
                await self._start(sups)
                failure = failure or await self._wait_layer(sups)
        changes = ChangeSet((), (), (), (), tuple(self.applied.components))
        return DeployResult(failure is None, changes, actions, *(failure or (None, None)))

    async def restart_component(
        self, name: str, *, reinstall: Callable[[Supervisor], Awaitable[None]] | None = None
    ) -> tuple[int | None, list[str]]:
        """Restart ``name`` and its hard/soft dependents; returns (pid, dependents).

        ``reinstall``, when given, runs while ``name`` is stopped, before it starts again (a
        drift repair puts its installed files back there); it reports its own failures and
        does not raise, so the component and its dependents always start again.

        Dependents stop first (reverse order) and start again once ``name`` has left its
        starting state (healthy, or given up on by its own start timeout), so a restart never
        leaves them stopped. Callers that must answer sooner wait on this with a timeout and
        shield it: the restart itself always completes.
        """
        async with self.lock:
            graph = self.applied.graph
            dependents = sorted(graph.dependents([name]), key=lambda n: (graph.layer_of(n), n))
            for n in reversed(dependents):
                await self.supervisors[n].stop(reason=f"dependency {name} restarting")
            sup = self.supervisors[name]
            await sup.stop(reason="restart")
            if reinstall is not None:
                await reinstall(sup)
            await sup.start()
            sup.restarts += 1
            await sup.wait_for(lambda st: st not in (State.STARTING, State.INSTALLING), None)
            for n in dependents:
                await self.supervisors[n].start()
            return sup.pid, dependents

    def restart_order(self, name: str) -> tuple[list[str], list[str]]:
        """(stopOrder, startOrder) of a restart of ``name`` (dry run), as Go reports them:
        ``stopOrder`` lists the dependents stopped before it (farthest first), ``startOrder``
        the component, then its dependents (nearest first)."""
        graph = self.applied.graph
        deps = sorted(graph.dependents([name]), key=lambda n: (graph.layer_of(n), n))
        return list(reversed(deps)), [name, *deps]
