"""The datasets of a running agent: one store, resolver, manager and scheduler, wired to the deployer.

:class:`AgentDatasets` is what the node holds. The deployer asks it, through two seams that know
nothing of datasets:

* ``component_env(component)``: ``KEYSTONE_DATASET_<NAME>`` for the component's process;
* ``start_gate(component)``: before a component starts, its datasets are bound (reload by the
  recipe's signal or script through :class:`~keystone.datasets.notify.ProcessNotifier`, health
  judged by :class:`~keystone.datasets.notify.SupervisorHealth`) and brought in when missing or
  due; a required one missing or past ``max_age`` answers the reason, and the start is refused.

After every deployment :meth:`AgentDatasets.sync_plan` unbinds the components that left the plan;
the scheduler refreshes what stays bound on its own jittered schedule.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from loguru import logger

from keystone.datasets.manager import DatasetManager, RefreshResult
from keystone.datasets.notify import ProcessNotifier, SupervisorHealth
from keystone.datasets.refresh import Resolver, trusted_clock_hooks
from keystone.datasets.schedule import DatasetScheduler
from keystone.datasets.spec import ReloadPlan, reload_plan
from keystone.datasets.status import dataset_detail, datasets_json, metric_samples
from keystone.datasets.store import DatasetStore
from keystone.errors import KeystoneError
from keystone.plan import Component, DesiredPlan
from keystone.runtime.clock import HIGH_WATER, TrustedClock


def _flag(environ: Mapping[str, str], name: str) -> bool:
    return environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def reload_of(component: Component) -> ReloadPlan:
    """The component's ``[lifecycle.reload]`` as a dataset reload plan (none declared: empty)."""
    r = component.recipe.reload
    if r is None:
        return ReloadPlan()
    return reload_plan(
        r.signal, r.script, r.grace, run_type=component.recipe.run.type, file=component.origin
    )


class AgentDatasets:
    """The agent's dataset side.

    Args:
        runtime: the agent's runtime dir (datasets live in ``runtime/datasets``; the trusted
            clock's mark in ``runtime/state``).
        supervisors: the deployer's live supervisors (pid, work dir, health of a component).
        device_id: seeds each dataset's refresh offset.
        environ: ``KEYSTONE_TRUST_BUNDLE``, ``KEYSTONE_LEAF_CERT``, ``KEYSTONE_CLOCK_POLICY``,
            ``KEYSTONE_INSECURE_SKIP_VERIFY``.
        on_result: told every refresh's outcome (history, logs).
        resolver: a resolver to use instead of the configured one (tests).
    """

    def __init__(
        self,
        runtime: Path,
        supervisors: Callable[[], Mapping[str, Any]],
        *,
        device_id: str = "",
        environ: Mapping[str, str] | None = None,
        insecure_skip_verify: bool = False,
        on_result: Callable[[RefreshResult], None] | None = None,
        resolver: Resolver | None = None,
    ) -> None:
        env = dict(os.environ if environ is None else environ)
        self.store = DatasetStore(runtime / "datasets")
        self.clock = TrustedClock(runtime / "state", env.get("KEYSTONE_CLOCK_POLICY") or HIGH_WATER)
        verification_time, observe, trusted = trusted_clock_hooks(self.clock)
        bundle = env.get("KEYSTONE_TRUST_BUNDLE", "").strip()
        insecure = insecure_skip_verify or _flag(env, "KEYSTONE_INSECURE_SKIP_VERIFY")
        self.resolver = resolver or Resolver(
            self.store,
            trust_bundle=Path(bundle) if bundle else None,
            verification_time=verification_time,
            observe_published=observe,
            insecure_skip_verify=insecure,
            environ=env,
        )
        self.manager = DatasetManager(self.store, self.resolver, clock_trusted=trusted)
        self._supervisors = supervisors
        self.notifier = ProcessNotifier(self._pid_of, cwd_of=self._cwd_of, env_of=self._env_of)
        self.health = SupervisorHealth(lambda name: self._supervisors().get(name))
        self.on_result = on_result
        self.scheduler = DatasetScheduler(
            self.manager, device_id=device_id, on_result=self._observed
        )
        self._task: asyncio.Task[None] | None = None

    # --- what the deployer asks ---------------------------------------------------------------

    def component_env(self, component: Component) -> dict[str, str]:
        """``KEYSTONE_DATASET_<NAME>`` -> the absolute ``current`` link, for each of its datasets."""
        return {s.env_name: str(self.store.path(s.name)) for s in component.recipe.datasets}

    async def start_gate(self, component: Component) -> str | None:
        """Bind and bring in ``component``'s datasets; the reason it must not start, or None."""
        specs = component.recipe.datasets
        if not specs:
            self.unbind(component.name)
            return None
        try:
            self.bind(component)
        except (ValueError, KeystoneError) as exc:
            return f"{component.name} cannot start: {exc}"
        ok, why = await self.manager.prepare_for_start(component.name)
        # Scheduled from the refresh just made, not from before it.
        for spec in specs:
            self.scheduler.next_due.pop(spec.name, None)
        self.scheduler.sync_bindings()
        if not ok:
            return why
        if why:
            logger.warning("[dataset] component={} msg={}", component.name, why)
        return None

    def bind(self, component: Component) -> None:
        """Attach the component's datasets unless they are bound already with the same specs."""
        plan = reload_of(component)
        current = self.manager.of(component.name)
        if [(b.spec, b.reload) for b in current] == [
            (s, plan) for s in sorted(component.recipe.datasets, key=lambda s: s.name)
        ]:
            return
        self.manager.bind(
            component.name,
            component.recipe.datasets,
            reload=plan,
            notifier=self.notifier,
            health=self.health,
        )

    def unbind(self, name: str) -> None:
        """Forget a component's datasets (their files stay for a later version)."""
        if self.manager.of(name):
            self.manager.unbind(name)
            self.scheduler.sync_bindings()

    def sync_plan(self, plan: DesiredPlan) -> None:
        """Unbind the components that left ``plan`` or no longer declare datasets."""
        keep = {n for n, c in plan.components.items() if c.recipe.datasets}
        for name in {b.component for b in self.manager.bindings.values()} - keep:
            self.unbind(name)

    # --- the schedule ----------------------------------------------------------------------------

    def start(self) -> None:
        """Run the scheduler on the current loop."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self.scheduler.run())

    async def stop(self) -> None:
        """End the scheduler (a refresh in flight finishes its step first)."""
        self.scheduler.stop()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def _observed(self, result: RefreshResult) -> None:
        if self.on_result is not None:
            self.on_result(result)

    # --- what the API asks -----------------------------------------------------------------------

    def list_json(self) -> list[dict[str, Any]]:
        """``GET /v1/datasets`` (Go's shape)."""
        return datasets_json(self.manager)

    def detail_json(self, name: str) -> dict[str, Any]:
        """``GET /v1/datasets/{name}``.

        Raises:
            KeyError: no component declares ``name``.
        """
        return dataset_detail(self.manager, name)

    async def refresh_all(self) -> list[RefreshResult]:
        """``POST /v1/datasets:refresh``: every dataset now, through the full verification."""
        return await self.manager.refresh_all()

    async def import_entries(
        self, entries: Iterable[tuple[str, bytes, bytes | None, bytes | None, Path]]
    ) -> list[RefreshResult]:
        """Datasets carried by a bundle whose revision verified."""
        return await self.manager.import_entries(entries)

    def metric_samples(self) -> list[Any]:
        """The dataset series (:func:`keystone.datasets.status.metric_samples`)."""
        return metric_samples(self.manager)

    # --- process lookups -------------------------------------------------------------------------

    def _pid_of(self, name: str) -> int | None:
        sup = self._supervisors().get(name)
        pid = getattr(sup, "pid", None) if sup is not None else None
        return int(pid) if pid else None

    def _cwd_of(self, name: str) -> Path | None:
        sup = self._supervisors().get(name)
        return sup.paths.workdir if sup is not None else None

    def _env_of(self, name: str) -> Mapping[str, str] | None:
        sup = self._supervisors().get(name)
        return dict(sup.env) if sup is not None else None
