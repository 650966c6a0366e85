"""Datasets: data a component reads and the agent keeps fresh, verified, without restarting it.

The Go Keystone's ``[[datasets]]`` (``internal/dataset`` and the agent's dataset lifecycle):

* :mod:`~keystone.datasets.spec`: the recipe table and ``[lifecycle.reload]`` rules;
* :mod:`~keystone.datasets.store`: versions, the atomic ``current`` link, retention, state;
* :mod:`~keystone.datasets.refresh`: fetch, verify the signed manifest, anti-replay, stage;
* :mod:`~keystone.datasets.manager`: activation, reload, health-gated rollback, start gating;
* :mod:`~keystone.datasets.notify`: the reload and health seams;
* :mod:`~keystone.datasets.schedule`: jittered per-dataset refresh on a driven clock;
* :mod:`~keystone.datasets.status`: ``/v1/datasets`` JSON and the metric samples;
* :mod:`~keystone.datasets.bundle`: datasets carried in a bundle.

Only the recipe-level names are imported eagerly (the recipe loader needs them and nothing
else); the rest load on first use, so ``keystone.recipe`` stays as light as it was.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from keystone.datasets.spec import (
    DatasetSpec,
    ReloadPlan,
    env_name,
    parse_datasets,
    parse_signal,
    reload_plan,
)

if TYPE_CHECKING:
    from keystone.datasets.manager import Binding, DatasetManager, RefreshResult
    from keystone.datasets.notify import (
        HealthObserver,
        Notifier,
        NotRunning,
        ProcessNotifier,
        ReloadFailed,
        SupervisorHealth,
    )
    from keystone.datasets.refresh import DatasetRefused, DatasetUnavailable, Documents, Resolver
    from keystone.datasets.schedule import Clock, DatasetScheduler, SystemClock
    from keystone.datasets.store import DatasetState, DatasetStore

_LAZY = {
    "Binding": "manager",
    "DatasetManager": "manager",
    "RefreshResult": "manager",
    "HealthObserver": "notify",
    "Notifier": "notify",
    "NotRunning": "notify",
    "ProcessNotifier": "notify",
    "ReloadFailed": "notify",
    "SupervisorHealth": "notify",
    "DatasetRefused": "refresh",
    "DatasetUnavailable": "refresh",
    "Documents": "refresh",
    "Resolver": "refresh",
    "Clock": "schedule",
    "DatasetScheduler": "schedule",
    "SystemClock": "schedule",
    "DatasetState": "store",
    "DatasetStore": "store",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'keystone.datasets' has no attribute {name!r}")
    return getattr(importlib.import_module(f"keystone.datasets.{module}"), name)


__all__ = [
    "Binding",
    "Clock",
    "DatasetManager",
    "DatasetRefused",
    "DatasetScheduler",
    "DatasetSpec",
    "DatasetState",
    "DatasetStore",
    "DatasetUnavailable",
    "Documents",
    "HealthObserver",
    "NotRunning",
    "Notifier",
    "ProcessNotifier",
    "RefreshResult",
    "ReloadFailed",
    "ReloadPlan",
    "Resolver",
    "SupervisorHealth",
    "SystemClock",
    "env_name",
    "parse_datasets",
    "parse_signal",
    "reload_plan",
]
