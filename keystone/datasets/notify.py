"""Telling a component its dataset changed, without restarting it, and judging whether it survived.

:class:`Notifier` is the seam: :class:`ProcessNotifier` sends the recipe's reload signal to the
component's main process (to the process, not its group: SIGHUP to a group kills children that do
not handle it) or runs its reload script with a timeout (Go's ``reload.go``).

:class:`HealthObserver` is the other seam: after a reload the agent watches the component for the
grace period; :class:`SupervisorHealth` adapts a supervisor-like object (``state`` and
``wait_for``) to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal as _signal
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

from loguru import logger

from keystone.datasets.spec import ReloadPlan, parse_signal
from keystone.errors import ProcessError

RELOAD_TIMEOUT = 30.0  # Go's reloadTimeout: a hung script must not hold the other datasets


class ReloadFailed(ProcessError):
    """The reload signal could not be delivered, or the reload script failed."""


class NotRunning(ProcessError):
    """The component has no running process: there is nobody to tell (it reads at start)."""


class Notifier(Protocol):
    """Tells one component that its dataset changed."""

    async def reload(self, component: str, plan: ReloadPlan) -> None: ...


class HealthObserver(Protocol):
    """Watches a component through the grace period after a reload."""

    async def watch(self, component: str, grace: float) -> str | None:
        """None when the component stayed healthy for ``grace`` seconds, else the reason."""
        ...


class ProcessNotifier:
    """Signal the main process, or run the reload script from the component's work dir.

    Args:
        pid_of: the component's main pid, or None when it is not running.
        cwd_of: its work dir (scripts run there); None for the agent's.
        env_of: the environment a script gets.
        timeout: bound on a reload script.
    """

    def __init__(
        self,
        pid_of: Callable[[str], int | None],
        *,
        cwd_of: Callable[[str], Path | None] = lambda _c: None,
        env_of: Callable[[str], Mapping[str, str] | None] = lambda _c: None,
        timeout: float = RELOAD_TIMEOUT,
    ) -> None:
        self.pid_of = pid_of
        self.cwd_of = cwd_of
        self.env_of = env_of
        self.timeout = timeout

    async def reload(self, component: str, plan: ReloadPlan) -> None:
        """Deliver the reload.

        Raises:
            NotRunning: no process to signal.
            ReloadFailed: the signal could not be sent, or the script failed or timed out.
        """
        if plan.signal:
            self._signal(component, plan.signal)
        elif plan.script:
            await self._script(component, plan.script)

    def _signal(self, component: str, name: str) -> None:
        try:
            sig = parse_signal(name)
        except ValueError as exc:
            raise ReloadFailed(str(exc)) from None
        pid = self.pid_of(component)
        if not pid or pid <= 0:
            raise NotRunning(f"{component} has no running process to send {name} to")
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            raise NotRunning(f"process {pid} of {component} is gone") from None
        except OSError as exc:
            raise ReloadFailed(f"sending {name} to {component} (pid {pid}): {exc}") from exc
        logger.info(
            "[dataset] component={} pid={} signal={} msg=reload signalled", component, pid, name
        )

    async def _script(self, component: str, script: str) -> None:
        env = self.env_of(component)
        proc = await asyncio.create_subprocess_exec(
            "/bin/sh",
            "-c",
            script,
            cwd=self.cwd_of(component),
            env=None if env is None else dict(env),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), self.timeout)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, _signal.SIGKILL)
            await proc.wait()
            raise ReloadFailed(
                f"the reload script of {component} did not finish within {self.timeout:g}s"
            ) from None
        if proc.returncode != 0:
            tail = out.decode(errors="replace").strip()[-500:]
            raise ReloadFailed(f"the reload script of {component} exited {proc.returncode}: {tail}")
        logger.info("[dataset] component={} msg=reload script ran", component)


class SupervisorHealth:
    """A :class:`HealthObserver` over supervisors (anything with ``state`` and ``wait_for``).

    The component must not leave the healthy states during the grace period, and must be healthy
    at its end. Without a health check a supervisor only knows "the process is alive", which is
    all this can then confirm (documented: declare a health check on a dataset consumer).

    Args:
        lookup: the supervisor of a component, or None when there is none.
    """

    OK_STATES = frozenset({"healthy"})

    def __init__(self, lookup: Callable[[str], Any]) -> None:
        self.lookup = lookup

    async def watch(self, component: str, grace: float) -> str | None:
        sup = self.lookup(component)
        if sup is None:
            return "the component is not supervised"
        left = await sup.wait_for(lambda s: str(s) not in self.OK_STATES, grace)
        if left:
            detail = getattr(sup, "error", None) or ""
            return f"the component turned {sup.state}" + (f" ({detail})" if detail else "")
        return None
