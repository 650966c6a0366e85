"""Drift detection in the agent: re-hash installed files on a slow schedule or on demand, report
what drifted, and repair it where the recipe says ``drift = "repair"``.

``DriftMonitor.check`` looks at every component of the applied plan whose work dir has an
install manifest (``keystone.runtime.drift``). Hashing runs in one worker thread at a time (one
check at a time, one file at a time, 1 MiB reads), so the loop never blocks and memory stays
flat whatever the size of the tree. A change of a component's drift (new drift, different
files, drift gone) writes a ``drift`` history entry; the gauge ``keystone_drift_files`` always
shows the last check. A component whose recipe says ``drift = "repair"`` gets a repair
submitted to the desired-state slot, behind any deployment: it stops, its added files are
removed, its artifacts are installed again from the cache (a new manifest), and it starts
again with its dependents (``Deployer.restart_component``), then a ``drift-repair`` entry.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from loguru import logger

from keystone.metrics import Metrics
from keystone.runtime import drift
from keystone.runtime.deployer import ArtifactPreparer, Deployer
from keystone.runtime.supervisor import Supervisor
from keystone.slot import Job, Operation


def _same(a: drift.Drift | None, b: drift.Drift | None) -> bool:
    if a is None or b is None:
        return a is b
    return (a.changed, a.added, a.removed) == (b.changed, b.added, b.removed)


class DriftMonitor:
    """The drift of each installed component, kept up to date by checks.

    Args:
        deployer: whose supervisors (and their work dirs) are checked.
        emit: writes a history entry.
        metrics: the agent's metrics (None: none).
        submit: hands a repair to the desired-state slot (None: repairs are not possible).
    """

    def __init__(
        self,
        deployer: Deployer,
        *,
        emit: Callable[[dict[str, Any]], Any],
        metrics: Metrics | None = None,
        submit: Callable[[Job], Operation] | None = None,
    ) -> None:
        self.deployer = deployer
        self.emit = emit
        self.metrics = metrics
        self.submit = submit
        self.state: dict[str, tuple[Path, drift.Drift]] = {}
        self.last_check: float | None = None
        self.checks = 0
        self._lock = asyncio.Lock()
        self._kick: asyncio.Event | None = None

    # --- status -------------------------------------------------------------------------------

    def of(self, sup: Supervisor) -> dict[str, Any] | None:
        """The ``drift`` field of a component's status: None when never checked (or no
        manifest) for the work dir it runs from now."""
        found = self.state.get(sup.name)
        if found is None or found[0] != sup.paths.workdir:
            return None
        return found[1].to_json()

    def to_json(self) -> dict[str, Any]:
        """``GET /v1/drift``: the last check of every component, and when the agent last
        checked."""
        comps: list[dict[str, Any]] = []
        drifted: list[str] = []
        for name, sup in sorted(self.deployer.supervisors.items()):
            d = self.of(sup)
            if d is not None and d["drifted"]:
                drifted.append(name)
            comps.append(
                {
                    "name": name,
                    "version": sup.version,
                    "policy": sup.component.recipe.drift,
                    "drift": d,
                }
            )
        return {
            "last_check": None if self.last_check is None else round(self.last_check, 3),
            "checks": self.checks,
            "drifted": drifted,
            "components": comps,
        }

    # --- checks -------------------------------------------------------------------------------

    async def check(self, names: list[str] | None = None) -> dict[str, Any]:
        """Check ``names`` (default: every component) now; repairs are submitted, not awaited."""
        async with self._lock:
            sups = [
                s
                for n, s in sorted(self.deployer.supervisors.items())
                if names is None or n in names
            ]
            for sup in sups:
                await self._check_one(sup)
            for name in list(self.state):
                if name not in self.deployer.supervisors:
                    del self.state[name]
                    if self.metrics is not None:
                        self.metrics.set_drift(name, None)
            self.last_check = time.time()
            self.checks += 1
        return self.to_json()

    async def _check_one(self, sup: Supervisor) -> drift.Drift | None:
        workdir = sup.paths.workdir
        try:
            found = await asyncio.to_thread(drift.check, workdir)
        except OSError as exc:
            logger.warning("drift check of {} failed: {}", sup.name, exc)
            return None
        before = self.state.get(sup.name)
        previous = before[1] if before is not None and before[0] == workdir else None
        if found is None:
            self.state.pop(sup.name, None)
            if self.metrics is not None:
                self.metrics.set_drift(sup.name, None)
            return None
        self.state[sup.name] = (workdir, found)
        if self.metrics is not None:
            self.metrics.set_drift(sup.name, found.counts())
        if not _same(previous, found) and (found.drifted or (previous and previous.drifted)):
            self.emit(
                {
                    "kind": "drift",
                    "component": sup.name,
                    "version": sup.version,
                    "result": "drifted" if found.drifted else "clean",
                    **found.to_json(),
                }
            )
            if found.drifted:
                logger.warning(
                    "{}: installed files drifted: {} changed, {} added, {} removed",
                    sup.name,
                    len(found.changed),
                    len(found.added),
                    len(found.removed),
                )
        if found.drifted and sup.component.recipe.drift == "repair":
            self._submit_repair(sup.name)
        return found

    # --- repair -------------------------------------------------------------------------------

    def _submit_repair(self, name: str) -> Operation | None:
        if self.submit is None:
            return None

        async def run(_op: str) -> dict[str, Any]:
            return await self.repair(name)

        return self.submit(Job("drift-repair", run, key=("drift-repair", name)))

    async def repair(self, name: str) -> dict[str, Any]:
        """Reinstall ``name``'s artifacts from the cache and restart it with its dependents
        (run by the slot, serialized with deployments)."""
        sup = self.deployer.supervisors.get(name)
        preparer: ArtifactPreparer | None = self.deployer.preparer
        if sup is None or preparer is None:
            return {"component": name, "result": "not-found"}
        errors: list[str] = []

        async def reinstall(s: Supervisor) -> None:
            workdir = s.paths.workdir
            try:
                found = await asyncio.to_thread(drift.check, workdir)
                if found is not None:
                    await asyncio.to_thread(drift.clear_added, workdir, found)
                await preparer.install(s.component, workdir)
            except Exception as exc:  # reported, and the component starts again regardless
                logger.error("drift repair of {}: reinstall failed: {}", name, exc)
                errors.append(f"{type(exc).__name__}: {exc}")

        current = await asyncio.to_thread(drift.check, sup.paths.workdir)
        if current is None or not current.drifted:
            # queued behind a deployment that replaced the files, or put right by hand
            return {"component": name, "result": "clean"}
        if sup.wanted:
            pid, dependents = await self.deployer.restart_component(name, reinstall=reinstall)
        else:  # stopped by an operator: put the files back, leave it stopped
            await reinstall(sup)
            pid, dependents = sup.pid, []
        after = await self._recheck(name)
        result = "failed" if errors or (after is not None and after.drifted) else "ok"
        if self.metrics is not None:
            self.metrics.drift_repair(name, result)
        entry: dict[str, Any] = {
            "kind": "drift-repair",
            "component": name,
            "result": result,
            "pid": pid,
            "dependents": dependents,
        }
        if errors:
            entry["error"] = "; ".join(errors)
        self.emit(entry)
        return {**entry, "drift": None if after is None else after.to_json()}

    async def _recheck(self, name: str) -> drift.Drift | None:
        sup = self.deployer.supervisors.get(name)
        if sup is None:
            return None
        workdir = sup.paths.workdir
        found = await asyncio.to_thread(drift.check, workdir)
        if found is None:
            return None
        previous = self.state.get(name)
        self.state[name] = (workdir, found)
        if self.metrics is not None:
            self.metrics.set_drift(name, found.counts())
        if previous is not None and previous[1].drifted and not found.drifted:
            self.emit(
                {
                    "kind": "drift",
                    "component": name,
                    "version": sup.version,
                    "result": "clean",
                    **found.to_json(),
                }
            )
        return found

    # --- schedule -----------------------------------------------------------------------------

    async def run(self, interval: float) -> None:
        """Check every ``interval`` seconds (the first check one interval after start)."""
        while True:
            await asyncio.sleep(interval)
            try:
                await self.check()
            except Exception:  # a bug in one check must not end the schedule
                logger.exception("scheduled drift check failed")
