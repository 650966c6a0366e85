"""What ``GET /v1/components`` and the metrics report: the Go Keystone's states, from ours.

The supervisor has a finer lifecycle (``keystone.runtime.supervisor.State``, reported as
``phase``); the API's ``state`` and ``last_health`` use the Go agent's vocabulary so that its
scripts and alerts keep working (``keystone_component_state{state="running"}``):

==============  ===========  =====================================================
phase           state        why
==============  ===========  =====================================================
``pending``     ``none``     known from the plan, nothing installed or started yet
``installing``  ``none``     its install script runs; no process of this version yet
``starting``    ``running``  a live, supervised process (health not proven yet)
``healthy``     ``running``  a live, supervised process
``unhealthy``   ``running``  a live, supervised process failing its probe
``backoff``     ``stopped``  the process exited; a restart is scheduled
``stopping``    ``stopped``  being stopped: its supervision has ended
``stopped``     ``stopped``  not running (never started, stopped, or exited 0)
``failed``      ``failed``   crashed with no restart left, or refused to start
==============  ===========  =====================================================

Liveness (the Go agent's guarantees): a component is ``running`` only while its process is
alive; otherwise it reads ``stopped`` with ``pid`` 0, and ``last_health`` is ``unknown``
whenever it is not running (a component that is gone cannot still be healthy). Only a component
with a health check gets a verdict (``healthy`` / ``unhealthy``); the rest stay ``unknown``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

NONE: Final = "none"
STOPPED: Final = "stopped"
RUNNING: Final = "running"
FAILED: Final = "failed"

STATES: tuple[str, ...] = (NONE, STOPPED, RUNNING, FAILED)
"""Every value of ``state``, in the order the metrics list them."""

HEALTHS: tuple[str, ...] = ("healthy", "unhealthy", "unknown")
"""Every value of ``last_health``."""

PHASE_TO_STATE: Mapping[str, str] = {
    "pending": NONE,
    "installing": NONE,
    "starting": RUNNING,
    "healthy": RUNNING,
    "unhealthy": RUNNING,
    "backoff": STOPPED,
    "stopping": STOPPED,
    "stopped": STOPPED,
    "failed": FAILED,
}
"""The one mapping of a supervisor phase to the Go state (the table above)."""


def reported_state(phase: str, *, alive: bool) -> str:
    """The Go ``state`` of a component in ``phase`` whose process is (not) ``alive``."""
    state = PHASE_TO_STATE.get(phase, STOPPED)
    if state == RUNNING and not alive:
        return STOPPED  # the exit is not observed yet: never advertise a dead process
    return state


def reported_health(state: str, verdict: bool | None) -> str:
    """The Go ``last_health``: the last probe's verdict while running, else ``unknown``."""
    if state != RUNNING or verdict is None:
        return "unknown"
    return "healthy" if verdict else "unhealthy"
