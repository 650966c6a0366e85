"""The local runtime: processes, health probes, supervision, deployment and artifacts.

Nothing here knows about git or bundles; ``keystone.sync`` joins sources and runtime. The public
names below load on first use, so a worker process that needs only ``runtime.artifacts`` does
not pay for the supervisor.
"""

from __future__ import annotations

import importlib
from typing import Any

_PUBLIC = {
    "Action": "deployer",
    "ArtifactPreparer": "deployer",
    "DeployResult": "deployer",
    "Deployer": "deployer",
    "plan_actions": "deployer",
    "ProbeResult": "health",
    "probe": "health",
    "ProcessHandle": "process",
    "ProcessRecord": "process",
    "ProcessRunner": "process",
    "ResourceReport": "cgroups",
    "RunResult": "spawn",
    "SpawnSpec": "spawn",
    "detect_cgroup_root": "cgroups",
    "AnyRunner": "runner",
    "CommandRunner": "runner",
    "Runner": "runner",
    "RunnerHandle": "runner",
    "RunnerRecord": "runner",
    "RestartTuning": "supervisor",
    "State": "supervisor",
    "Supervisor": "supervisor",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'keystone.runtime' has no attribute {name!r}")
    return getattr(importlib.import_module(f"keystone.runtime.{_PUBLIC[name]}"), name)
