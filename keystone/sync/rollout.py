"""Holding a verified revision back: rollout waves, halts, maintenance windows, deferrals.

The ``rollout`` step of a sync (after the diff, before the deployment) asks, in order:

1. does the revision change anything here? (no: nothing to hold, it is recorded at once)
2. is the rollout halted (``halted = true`` in the revision's ``rollout.toml``)?
3. has this device's wave opened (committer time + the waits before its wave)?
4. are the maintenance windows of the fleet, the agent and the device's plan files all open?
5. does a component that would be stopped defer the update (``[lifecycle.defer]``)?

A hold ends the sync ``waiting`` (or ``halted``) with a message for status, the history (one
entry each time the hold changes, not each poll) and the metrics, and schedules one sync at
the time the hold ends (a wave opening, a window opening, a deferral ending), so the device
deploys on time without a new commit and without polling faster. Everything it decides on
comes from the verified revision and the agent's own configuration.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from loguru import logger

from keystone.plan import DesiredPlan
from keystone.recipe import Defer
from keystone.rollout import Assignment, RolloutSpec, assign, parse_rollout
from keystone.runtime.deployer import PlannedChanges
from keystone.runtime.supervisor import clean_env, component_paths
from keystone.runtime.timing import Clock, MonotonicClock
from keystone.state import read_json, write_json
from keystone.sync.host import SyncHost
from keystone.sync.model import Outcome, SyncResult, VerifiedRevision
from keystone.units import parse_duration
from keystone.windows import Maintenance, closed_at, describe, next_open

JSON = dict[str, Any]
_DEFER = re.compile(r"^\s*defer\s+(\S+)\s*$", re.IGNORECASE)
MAX_ANSWER = 4096
"""Bytes of a deferral check's answer that are read."""

# How a sync that ends here leaves the hold: these end it, the others keep it.
_SETTLED = {
    Outcome.APPLIED,
    Outcome.UP_TO_DATE,
    Outcome.ROLLED_BACK,
    Outcome.REFUSED,
    Outcome.KNOWN_BAD,
}


@dataclass(frozen=True)
class Hold:
    """Why a verified revision is not deployed yet, and until when.

    Attributes:
        reason: ``wave``, ``window``, ``defer`` or ``halted``.
        message: for status and the history (``waiting for wave 2 at ...``).
        revision: the revision held back.
        at: when the hold ends (None: not by itself, as a halt).
        assignment: the device's wave (None without a ``rollout.toml``).
        component: the component that deferred (``defer`` only).
        windows: the window sets waited for (``window`` only): ``rollout.toml``,
            ``agent.toml`` or a plan file.
    """

    reason: str
    message: str
    revision: str
    at: float | None = None
    assignment: Assignment | None = None
    component: str | None = None
    windows: tuple[str, ...] = ()

    @property
    def outcome(self) -> Outcome:
        return Outcome.HALTED if self.reason == "halted" else Outcome.WAITING

    def key(self) -> tuple[object, ...]:
        return (self.reason, self.revision, self.at, self.component)

    def to_json(self) -> JSON:
        out: JSON = {
            "state": self.outcome.value,
            "reason": self.reason,
            "message": self.message,
            "revision": self.revision,
            "at": self.at,
        }
        if self.assignment is not None:
            out.update(
                wave=self.assignment.wave,
                waves=self.assignment.waves,
                canary=self.assignment.canary,
            )
        if self.component is not None:
            out["component"] = self.component
        if self.windows:
            out["windows"] = list(self.windows)
        return out


def decide(
    spec: RolloutSpec | None,
    *,
    device_id: str,
    labels: Sequence[str],
    revision: str,
    commit_time: float,
    now: float,
    agent_windows: Maintenance | None,
    plan_windows: Sequence[tuple[str, Maintenance]] = (),
) -> tuple[Assignment | None, Hold | None]:
    """The device's wave of ``revision`` and what holds it back at ``now`` (pure).

    Halted, then the wave, then the windows of the fleet (``rollout.toml``), of the agent
    (``agent.toml``) and of each plan file (``plan_windows``, by file) together: all must be
    open. A window hold names the sets closed at ``now``.
    """
    a = (
        assign(spec, device_id=device_id, labels=labels, revision=revision, commit_time=commit_time)
        if spec is not None
        else None
    )
    if a is not None and a.halted:
        return a, Hold("halted", "rollout halted", revision, None, a)
    if a is not None and now < a.at:
        return a, Hold("wave", f"waiting for wave {a.wave} at {describe(a.at)}", revision, a.at, a)
    named = [
        (name, m)
        for name, m in (
            ("rollout.toml", a.maintenance if a is not None else None),
            ("agent.toml", agent_windows),
            *plan_windows,
        )
        if m is not None
    ]
    if named:
        opens = next_open([(m.windows, m.zone()) for _, m in named], now)
        if opens is None:
            names = tuple(name for name, _ in named)
            return a, Hold(
                "window",
                f"waiting for a maintenance window: the windows of {_and(names)} never overlap",
                revision,
                None,
                a,
                windows=names,
            )
        if opens > now:
            closed = [(name, m) for name, m in named if closed_at(m, now)]
            which = "; ".join(
                f"{name}: " + ", ".join(repr(w.text) for w in m.windows) for name, m in closed
            )
            return a, Hold(
                "window",
                f"waiting for maintenance window at {describe(opens)}"
                + (f" ({which})" if which else ""),
                revision,
                opens,
                a,
                windows=tuple(name for name, _ in closed),
            )
    return a, None


def _and(names: Sequence[str]) -> str:
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


def parse_defer_answer(text: str) -> float | None:
    """Seconds asked for by a deferral check's answer (None: proceed).

    ``defer 30``, ``defer 5m`` on the first line, or JSON ``{"defer": 30}``.
    """
    text = text.strip()
    if not text:
        return None
    if text.startswith("{"):
        try:
            doc = json.loads(text)
        except ValueError:
            return None
        value = doc.get("defer") if isinstance(doc, dict) else None
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            return None
        return float(value)
    m = _DEFER.match(text.splitlines()[0])
    if not m:
        return None
    raw = m.group(1)
    try:
        seconds = float(raw)
    except ValueError:
        try:
            seconds = parse_duration(raw)
        except ValueError:
            return None
    return seconds if seconds > 0 else None


async def ask(defer: Defer, *, cwd: str | None = None, env: Mapping[str, str] | None = None) -> str:
    """Ask a component's deferral check; its answer text ('' when it gave none in time)."""
    try:
        async with asyncio.timeout(defer.timeout):
            if defer.check.startswith("cmd:"):
                return await _ask_command(defer.check[4:], cwd=cwd, env=env)
            return await _ask_http(defer.check)
    except TimeoutError:
        logger.warning("deferral check {} gave no answer in {:g}s", defer.check, defer.timeout)
    except (OSError, ValueError, UnicodeError) as exc:
        logger.warning("deferral check {} failed: {}", defer.check, exc)
    return ""


async def _ask_command(command: str, *, cwd: str | None, env: Mapping[str, str] | None) -> str:
    proc = await asyncio.create_subprocess_shell(
        command,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        cwd=cwd,
        env=dict(env) if env is not None else None,
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        out = await proc.stdout.read(MAX_ANSWER)
        code = await proc.wait()
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
    return out.decode("utf-8", "replace") if code == 0 else ""


async def _ask_http(check: str) -> str:
    url = urlsplit(check)
    https = url.scheme == "https"
    host = url.hostname or ""
    port = url.port or (443 if https else 80)
    ssl_ctx: Any = None
    if https:
        import ssl

        ssl_ctx = ssl.create_default_context()
    reader, writer = await asyncio.open_connection(
        host, port, ssl=ssl_ctx, server_hostname=host if https else None
    )
    try:
        target = (url.path or "/") + (f"?{url.query}" if url.query else "")
        writer.write(
            f"GET {target} HTTP/1.0\r\nHost: {url.netloc}\r\nAccept: */*\r\n"
            "Connection: close\r\n\r\n".encode("latin-1")
        )
        await writer.drain()
        data = b""
        while len(data) < MAX_ANSWER + 8192:
            chunk = await reader.read(4096)
            if not chunk:
                break
            data += chunk
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    parts = head.split(b"\r\n", 1)[0].split()
    if len(parts) < 2 or not parts[1].isdigit() or not 200 <= int(parts[1]) < 300:
        return ""
    return body[:MAX_ANSWER].decode("utf-8", "replace")


class Wake:
    """One sync at a wall time: the end of a hold. A newer schedule replaces the older one."""

    def __init__(
        self, fire: Callable[[], object], *, wall: Callable[[], float], clock: Clock
    ) -> None:
        self.fire = fire
        self.wall = wall
        self.clock = clock
        self.at: float | None = None
        self._task: asyncio.Task[None] | None = None

    def schedule(self, at: float) -> None:
        if self.at == at and self._task is not None and not self._task.done():
            return
        self.cancel()
        self.at = at
        self._task = asyncio.get_running_loop().create_task(self._run(at))

    def cancel(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
        self._task = None
        self.at = None

    async def _run(self, at: float) -> None:
        # The wall clock may be stepped while we sleep: look again before firing.
        while (delay := at - self.wall()) > 0:
            await self.clock.sleep(delay)
        self.at = None
        self._task = None
        self.fire()


class RolloutTracker:
    """The engine's memory of holds across syncs: status, history, metrics, the wake-up.

    Args:
        fire: submit one sync (the engine's, trigger ``rollout``).
        wall: wall time.
        clock: what the wake-up sleeps on (tests drive a FakeClock).
        device_id, labels: the device, as the agent is configured.
        maintenance: the agent's own windows (``[maintenance]`` in agent.toml).
        runtime: the agent's runtime dir (a ``cmd:`` deferral check runs in the component's
            work dir with the component's environment, never the agent's); the deferrals
            granted so far are kept in ``state/deferrals.json`` there, so a restart of the
            agent does not reset their bound.
    """

    def __init__(
        self,
        fire: Callable[[], object],
        *,
        wall: Callable[[], float],
        clock: Clock | None = None,
        device_id: str = "",
        labels: Sequence[str] = (),
        maintenance: Maintenance | None = None,
        runtime: Path | None = None,
    ) -> None:
        self.wall = wall
        self.runtime = runtime
        self.wake = Wake(fire, wall=wall, clock=clock or MonotonicClock())
        self.device_id = device_id
        self.labels = tuple(labels)
        self.maintenance = maintenance
        self.hold: Hold | None = None
        self.assignment: tuple[str, Assignment] | None = None
        self.outcome: tuple[str, str] | None = None
        self.state_file = runtime / "state" / "deferrals.json" if runtime is not None else None
        self.deferred: dict[tuple[str, str], float] = self._load()

    def _load(self) -> dict[tuple[str, str], float]:
        doc = read_json(self.state_file, {}) if self.state_file is not None else {}
        out: dict[tuple[str, str], float] = {}
        for rev, comps in doc.items() if isinstance(doc, dict) else ():
            for name, seconds in comps.items() if isinstance(comps, dict) else ():
                if isinstance(seconds, int | float) and not isinstance(seconds, bool):
                    out[(str(rev), str(name))] = float(seconds)
        return out

    def _save(self) -> None:
        if self.state_file is None:
            return
        doc: dict[str, dict[str, float]] = {}
        for (rev, name), seconds in self.deferred.items():
            doc.setdefault(rev, {})[name] = seconds
        try:
            self.state_file.parent.mkdir(parents=True, exist_ok=True)
            write_json(self.state_file, doc)
        except OSError as exc:  # the bound then holds until the agent restarts
            logger.warning("cannot keep the deferrals in {}: {}", self.state_file, exc)

    # --- the step's questions ---------------------------------------------------------------

    async def check(
        self,
        host: SyncHost,
        verified: VerifiedRevision,
        planned: PlannedChanges,
        applied: DesiredPlan,
        plan_windows: Sequence[tuple[str, Maintenance]] = (),
    ) -> Hold | None:
        """What holds ``verified`` back now (None: deploy it); records a hold it finds.

        ``plan_windows`` are the ``[maintenance]`` windows of the desired plan's files.
        """
        rev = verified.revision
        if planned.changes.empty:
            return None
        spec = (
            parse_rollout(verified.rollout, file=f"rollout.toml@{rev[:12]}")
            if verified.rollout
            else None
        )
        now = self.wall()
        a, hold = decide(
            spec,
            device_id=self.device_id,
            labels=self.labels,
            revision=rev,
            commit_time=verified.commit_time or now,
            now=now,
            agent_windows=self.maintenance,
            plan_windows=plan_windows,
        )
        if a is not None:
            self.assignment = (rev, a)
        if hold is None:
            hold = await self._deferral(rev, planned, applied, a)
        if hold is not None:
            self._hold(host, hold)
        return hold

    async def _deferral(
        self, rev: str, planned: PlannedChanges, applied: DesiredPlan, a: Assignment | None
    ) -> Hold | None:
        ch = planned.changes
        for name in (*ch.changed, *ch.restarted, *ch.removed):
            comp = applied.components.get(name)
            defer = comp.recipe.defer if comp is not None else None
            if defer is None:
                continue
            used = self.deferred.get((rev, name), 0.0)
            left = defer.max - used
            if left <= 0:
                logger.info(
                    "{} has deferred the update of {} for {:g}s, its bound: proceeding",
                    name,
                    rev[:12],
                    used,
                )
                continue
            cwd: str | None = None
            env: dict[str, str] | None = None
            if self.runtime is not None and comp is not None:
                workdir = component_paths(self.runtime, name, comp.version).workdir
                env = clean_env(comp, workdir)
                cwd = str(workdir) if workdir.is_dir() else None
            asked = parse_defer_answer(await ask(defer, cwd=cwd, env=env))
            if asked is None:
                continue
            grant = min(asked, left)
            self.deferred[(rev, name)] = used + grant
            self._save()
            at = self.wall() + grant
            return Hold(
                "defer",
                f"component {name} deferred the update until {describe(at)} "
                f"({used + grant:g}s of at most {defer.max:g}s)",
                rev,
                at,
                a,
                component=name,
            )
        return None

    def _hold(self, host: SyncHost, hold: Hold) -> None:
        before = self.hold
        self.hold = hold
        if hold.at is not None:
            self.wake.schedule(hold.at)
        else:
            self.wake.cancel()
        if before is None or before.key() != hold.key():
            logger.info("revision {}: {}", hold.revision[:12], hold.message)
            host.emit({"kind": "rollout", "result": hold.outcome.value, **_event(hold)})
        self._metrics(host, hold.revision, hold.outcome.value)

    # --- after a sync -----------------------------------------------------------------------

    def after(self, host: SyncHost, result: SyncResult) -> None:
        """A sync ended: a deployment (or a new tip refused) ends the hold it was under."""
        if result.outcome not in _SETTLED:
            return
        if self.hold is not None:
            self.hold = None
            self.wake.cancel()
        rev = result.revision or ""
        if result.outcome is Outcome.APPLIED:
            if self.deferred:
                self.deferred.clear()
                self._save()
            self._metrics(host, rev, "applied")
        elif result.outcome is Outcome.ROLLED_BACK:
            self._metrics(host, rev, "rolled-back")

    def soaked(self, host: SyncHost, rev: str, ok: bool) -> None:
        """The soak of ``rev`` ended: healthy, or rolled back.

        A newer revision already held back (its wave, a window) is what the device rolls out
        now: the older soak's end does not take its series.
        """
        if self.hold is not None and self.hold.revision != rev:
            return
        self._metrics(host, rev, "healthy" if ok else "rolled-back")

    def _metrics(self, host: SyncHost, rev: str, outcome: str) -> None:
        metrics = host.metrics
        a = self.assignment[1] if self.assignment and self.assignment[0] == rev else None
        if metrics is None or (a is None and self.hold is None and self.outcome is None):
            return  # no rollout here: no rollout series
        self.outcome = (rev, outcome)
        hold = self.hold if self.hold is not None and self.hold.revision == rev else None
        metrics.rollout(
            revision=rev,
            wave=a.wave if a else 0,
            canary=bool(a and a.canary),
            outcome=outcome,
            until=hold.at if hold is not None else None,
            halted=hold is not None and hold.reason == "halted",
        )

    # --- status -----------------------------------------------------------------------------

    def status(self) -> JSON | None:
        """``rollout`` in status: the hold, or the wave of the last revision (None: neither)."""
        if self.hold is not None:
            return self.hold.to_json()
        if self.assignment is None:
            return None
        rev, a = self.assignment
        out: JSON = {
            "state": self.outcome[1] if self.outcome and self.outcome[0] == rev else "applied",
            "revision": rev,
            "wave": a.wave,
            "waves": a.waves,
            "canary": a.canary,
            "at": a.at,
        }
        return out


def _event(hold: Hold) -> JSON:
    out = hold.to_json()
    out.pop("state")
    out["error"] = out.pop("message")
    return out
