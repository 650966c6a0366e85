"""One supervisor per running component: a state machine with a restart policy.

A component's life is one ``State`` enum and one transition table (``TRANSITIONS``); the only
code that changes a state is ``Supervisor._set``, which checks the table. Waiting is on events,
never on loops of short sleeps: one task awaits the process exit, one runs the health probe at
its interval. Every wait (backoff, health interval, start timeout, settle time) and every
uptime goes through a :class:`~keystone.runtime.timing.Clock`, and everything done to the process
through a :class:`~keystone.runtime.runner.Runner`, so the table is tested on a fake clock with a
fake runner.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from loguru import logger

from keystone.errors import ProcessError
from keystone.plan import Component
from keystone.recipe import RestartPolicy
from keystone.runtime.health import ProbeResult
from keystone.runtime.markers import INSTANCE_ENV, new_instance, remove_marker, write_marker
from keystone.runtime.privileges import user_ids
from keystone.runtime.probes import ProbeScheduler
from keystone.runtime.reported import reported_health, reported_state
from keystone.runtime.runner import AnyRunner, CommandRunner, RunnerHandle, RunnerRecord
from keystone.runtime.spawn import RunSecurity, SpawnSpec
from keystone.runtime.timing import Clock, MonotonicClock

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class State(StrEnum):
    """Where a component is in its life."""

    PENDING = "pending"
    INSTALLING = "installing"
    STARTING = "starting"
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"
    BACKOFF = "backoff"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"


S = State
TRANSITIONS: Mapping[State, frozenset[State]] = {
    S.PENDING: frozenset({S.INSTALLING, S.STARTING, S.STOPPING, S.STOPPED, S.FAILED}),
    S.INSTALLING: frozenset({S.STARTING, S.FAILED, S.STOPPING, S.STOPPED}),
    S.STARTING: frozenset({S.HEALTHY, S.UNHEALTHY, S.BACKOFF, S.FAILED, S.STOPPING, S.STOPPED}),
    S.HEALTHY: frozenset({S.UNHEALTHY, S.BACKOFF, S.FAILED, S.STOPPING, S.STOPPED}),
    S.UNHEALTHY: frozenset({S.HEALTHY, S.BACKOFF, S.FAILED, S.STOPPING, S.STOPPED}),
    S.BACKOFF: frozenset({S.STARTING, S.FAILED, S.STOPPING, S.STOPPED}),
    S.STOPPING: frozenset({S.STOPPED}),
    S.STOPPED: frozenset({S.PENDING, S.INSTALLING, S.STARTING, S.STOPPING}),
    S.FAILED: frozenset({S.PENDING, S.INSTALLING, S.STARTING, S.STOPPING, S.STOPPED}),
}
RUNNING = frozenset({S.STARTING, S.HEALTHY, S.UNHEALTHY})


@dataclass(frozen=True)
class RestartTuning:
    """Backoff arithmetic: ``initial * factor**n`` capped at ``maximum``, +-``jitter``.

    A process that stayed up ``stable_after`` seconds resets the retry count; exhausting
    ``max_retries`` without such a run is a crash loop and leaves the component failed.
    """

    initial: float = 1.0
    maximum: float = 60.0
    factor: float = 2.0
    jitter: float = 0.2
    stable_after: float = 60.0
    settle: float = 1.0  # a component without a health check is ready when alive this long

    def delay(self, attempt: int, rnd: float) -> float:
        """Delay before restart number ``attempt`` (1-based); ``rnd`` in [0, 1)."""
        base = min(self.maximum, self.initial * self.factor ** max(0, attempt - 1))
        return max(0.0, base * (1.0 + self.jitter * (2.0 * rnd - 1.0)))


@dataclass(frozen=True)
class Paths:
    """Where a component lives under the runtime dir."""

    workdir: Path
    logdir: Path


def component_paths(runtime: Path, name: str, version: str) -> Paths:
    """``components/<name>/<version>`` and ``logs/<name>``."""
    return Paths(runtime / "components" / name / version, runtime / "logs" / name)


def clean_env(
    component: Component, workdir: Path, passthrough: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The whole environment of a component: a few basics and its recipe's ``env``.

    Never the agent's own environment (which holds its API token and other secrets).
    """
    env = {
        "PATH": DEFAULT_PATH,
        "LANG": "C.UTF-8",
        "HOME": str(workdir),
        "KEYSTONE_COMPONENT": component.name,
        "KEYSTONE_VERSION": component.version,
        "KEYSTONE_WORKDIR": str(workdir),
    }
    if passthrough:
        env.update(passthrough)
    run = component.recipe.run
    if run.exec is not None:
        env.update(run.exec.env)
    return env


def tail(path: Path, limit: int = 2048) -> str:
    """The last non-empty line(s) of a log, for error messages."""
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - limit))
            data = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    lines = [ln.strip() for ln in data.splitlines() if ln.strip()]
    return " | ".join(lines[-3:])


def privileged_install_refusal(component: Component, allowed: bool) -> str | None:
    """Why ``component``'s install script may not run with the agent's privileges (None: it
    may, or it does not ask)."""
    recipe = component.recipe
    if allowed or not recipe.install.require_privilege or not recipe.install.script:
        return None
    where = recipe.source or component.recipe_ref
    return (
        f"{where}: lifecycle.install.require_privilege: the install script of {component.name} "
        "asks to run with the agent's privileges, which this agent does not allow; set "
        "[security] allow_privileged_install = true in agent.toml (or "
        "KEYSTONE_ALLOW_PRIVILEGED_INSTALL=1), or remove require_privilege so that it runs as "
        "the component's [lifecycle.run.security] user"
    )


def give_workdir(workdir: Path, user: str) -> None:
    """Hand the work dir (the directory itself) to the component's user, so that its install
    script and process can write there and nowhere else the agent can."""
    try:
        pw = user_ids(user)
    except ValueError as exc:
        raise ProcessError(f"security.user = {user!r}: {exc}") from None
    st = workdir.stat()
    if (st.st_uid, st.st_gid) != pw:
        os.chown(workdir, *pw)


class Supervisor:
    """Runs one component version and keeps it alive according to its recipe.

    ``runner`` does everything to the process (any :class:`~keystone.runtime.runner.Runner`);
    ``clock`` times every wait and uptime (default: the real monotonic clock); ``rng`` draws the
    backoff jitter; ``probes`` schedules the health probes (shared by a deployer's supervisors,
    so their due probes run together; default: one of its own on ``clock``).
    """

    def __init__(
        self,
        component: Component,
        runner: AnyRunner,
        paths: Paths,
        *,
        tuning: RestartTuning | None = None,
        install_timeout: float = 120.0,
        as_root: bool | None = None,
        on_change: Callable[[Supervisor], None] | None = None,
        env_passthrough: Mapping[str, str] | None = None,
        rng: Callable[[], float] = random.random,
        clock: Clock | None = None,
        allow_privileged_install: bool = False,
        probes: ProbeScheduler | None = None,
    ) -> None:
        self.component = component
        self.allow_privileged_install = allow_privileged_install
        self.runner = runner
        self.paths = paths
        self.tuning = tuning or RestartTuning()
        self.install_timeout = install_timeout
        self.as_root = os.geteuid() == 0 if as_root is None else as_root
        self.on_change = on_change
        self.env = clean_env(component, paths.workdir, env_passthrough)
        self._rng = rng
        self.clock: Clock = clock or MonotonicClock()
        self.probes = probes or ProbeScheduler(self.clock)
        self.state = State.PENDING
        self.since = time.time()
        self.restarts = 0
        self.retries = 0
        self.error: str | None = None
        self.last_health: ProbeResult | None = None
        self.handle: RunnerHandle | None = None
        self.instance: str | None = None
        """The instance id of the running process (its ``KEYSTONE_INSTANCE`` and marker)."""
        self.started_at = 0.0
        self.wanted = False  # False after an explicit stop: never restarted behind the operator
        self._changed = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._health_task: asyncio.Task[None] | None = None
        self._exit_task: asyncio.Task[None] | None = None
        self._backoff_task: asyncio.Task[None] | None = None
        self._stop_lock = asyncio.Lock()
        self._killing: asyncio.Future[int | None] | None = None
        """The health check's kill of an unhealthy run, which :meth:`stop` waits for."""

    # --- properties -------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self.component.name

    @property
    def version(self) -> str:
        return self.component.version

    @property
    def pid(self) -> int | None:
        return self.handle.pid if self.handle and self.state in RUNNING else None

    @property
    def healthy(self) -> bool:
        return self.state is State.HEALTHY

    def reported(self) -> tuple[str, str, int]:
        """The Go agent's ``(state, last_health, pid)`` of this component (keystone.runtime.reported).

        ``running`` only while the process is alive; ``pid`` 0 and ``last_health`` ``unknown``
        otherwise.
        """
        handle = self.handle
        alive = handle is not None and self.state in RUNNING and self.runner.alive(handle)
        state = reported_state(self.state.value, alive=alive)
        verdict = None if self.last_health is None else self.last_health.ok
        pid = handle.pid if alive and handle is not None else 0
        return state, reported_health(state, verdict), pid

    def to_json(self) -> dict[str, object]:
        """The ``/v1/components`` entry: Go's keys and values, then ours beside them."""
        state, health, pid = self.reported()
        return {
            "name": self.name,
            "state": state,
            "restarts": self.restarts,
            "last_health": health,
            "pid": pid,
            **self._container_json(),
            "recipe": self.component.recipe.name,
            "version": self.version,
            "phase": self.state.value,
            "health_detail": self.last_health.detail if self.last_health else "",
            "healthy": self.healthy,
            "since": self.since,
            "error": self.error,
        }

    def _container_json(self) -> dict[str, object]:
        """A container component's id and name (its ``pid`` is 0, as the Go agent says)."""
        if self.component.recipe.run.container is None:
            return {}
        running = self.handle is not None and self.state in RUNNING
        return {
            "container_id": getattr(self.handle, "container_id", None) if running else None,
            "container": getattr(self.handle, "container_name", None) if running else None,
        }

    # --- the one place a state changes ------------------------------------------------------

    def _set(self, new: State, error: str | None = None) -> None:
        if new is self.state and error == self.error:
            return
        if new is not self.state and new not in TRANSITIONS[self.state]:
            raise RuntimeError(f"{self.name}: illegal transition {self.state} -> {new}")
        old = self.state
        self.state = new
        self.since = time.time()
        if error is not None or new in (State.HEALTHY, State.STARTING, State.INSTALLING):
            self.error = error
        if new is not old:
            log = (
                logger.warning
                if new in (State.FAILED, State.UNHEALTHY, State.BACKOFF)
                else logger.info
            )
            log(
                "{} {}: {} -> {}{}",
                self.name,
                self.version,
                old,
                new,
                f" ({error})" if error else "",
            )
        self._changed.set()
        self._changed = asyncio.Event()
        if self.on_change:
            self.on_change(self)

    async def wait_for(self, predicate: Callable[[State], bool], timeout: float | None) -> bool:
        """Wait until ``predicate(state)`` holds; False if ``timeout`` passes first."""
        clock = self.clock
        deadline = None if timeout is None else clock.now() + timeout
        while not predicate(self.state):
            remaining = None if deadline is None else deadline - clock.now()
            if remaining is not None and remaining <= 0:
                return False
            ev = self._changed
            try:
                await clock.wait_for(ev.wait(), remaining)
            except TimeoutError:
                return predicate(self.state)
        return True

    # --- start ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Install (once per content hash) and spawn. Failures leave the state FAILED."""
        self.wanted = True
        self.retries = 0
        if self.state in RUNNING or self.state is State.BACKOFF:
            return
        try:
            await self._install()
        except ProcessError as exc:
            self._set(State.FAILED, str(exc))
            return
        await self._spawn()

    def refuse_start(self, reason: str) -> None:
        """Do not start: leave the component FAILED with ``reason`` (a start gate said no).

        It stays wanted, so a reconcile asks the gate again and starts it once it says yes.
        """
        self.wanted = True
        if self.state in RUNNING or self.state is State.BACKOFF:
            return
        if self.state is State.STOPPED:
            self._set(State.PENDING)
        self._set(State.FAILED, reason)

    async def _install(self) -> None:
        script = self.component.recipe.install.script
        workdir = self.paths.workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.paths.logdir.mkdir(parents=True, exist_ok=True)
        marker = workdir / ".keystone-installed"
        digest = self.component.content_hash()
        if not script or (marker.exists() and marker.read_text().strip() == digest):
            return
        self._set(State.INSTALLING)
        timeout = self.component.recipe.install.timeout or self.install_timeout
        log = self.paths.logdir / "install.log"
        security = self._install_security()
        result = await self.runner.run(
            ["/bin/sh", "-c", script],
            cwd=workdir,
            env=self.env,
            timeout=timeout,
            log=log,
            security=security,
        )
        if result.timed_out:
            raise ProcessError(
                f"{self.name}: install script timed out after {timeout:g}s (log: {log})"
            )
        if result.returncode != 0:
            raise ProcessError(
                f"{self.name}: install script failed with exit status {result.returncode}: {tail(log) or 'no output'}"
            )
        marker.write_text(digest + "\n")

    def _install_security(self) -> RunSecurity | None:
        """Who the install script runs as: the component's own ``[lifecycle.run.security]``
        (its work dir handed to its user), or the agent itself when the recipe says
        ``require_privilege = true`` and the agent allows it.

        Raises:
            ProcessError: the recipe asks for privilege and the agent does not allow it.
        """
        recipe = self.component.recipe
        if recipe.install.require_privilege:
            why = privileged_install_refusal(self.component, self.allow_privileged_install)
            if why:
                raise ProcessError(why)
            logger.info("{}: the install script runs with the agent's privileges", self.name)
            return None
        sec = recipe.run.security
        user, caps = sec.user, sec.capabilities
        if not self.as_root:
            user, caps = None, None  # as for the process itself: not applied without root
        if user:
            give_workdir(self.paths.workdir, user)
        if not user and caps is None and not sec.no_new_privileges:
            return None
        return RunSecurity(user=user, no_new_privileges=sec.no_new_privileges, capabilities=caps)

    def _spawn_spec(self) -> SpawnSpec:
        run = self.component.recipe.run
        if run.container is not None:
            # A container gets its recipe's container env only; [lifecycle.run.exec], when
            # given, overrides the image's command.
            return SpawnSpec(
                name=self.name,
                argv=(run.exec.command, *run.exec.args) if run.exec else (),
                cwd=self.paths.workdir,
                env=self.env,
                log_dir=self.paths.logdir,
                container=run.container,
                version=self.version,
            )
        assert run.exec is not None
        res = self.component.recipe.resources
        sec = run.security
        user = sec.user
        caps = sec.capabilities
        if not self.as_root and (user or caps is not None):
            logger.warning(
                "{}: not running as root; security.user/capabilities are not applied", self.name
            )
            user, caps = None, None
        return SpawnSpec(
            name=self.name,
            argv=(run.exec.command, *run.exec.args),
            cwd=self.paths.workdir,
            env={**self.env, INSTANCE_ENV: self.instance} if self.instance else self.env,
            log_dir=self.paths.logdir,
            open_files=res.open_files,
            memory_limit=res.memory_limit,
            cpu_quota=res.cpu_quota,
            user=user,
            no_new_privileges=sec.no_new_privileges,
            capabilities=caps,
        )

    async def _spawn(self) -> None:
        self.paths.workdir.mkdir(parents=True, exist_ok=True)
        self.paths.logdir.mkdir(parents=True, exist_ok=True)
        self._forget_marker()
        self.instance = new_instance()
        try:
            handle = await self.runner.spawn(self._spawn_spec())
        except ProcessError as exc:
            self.instance = None
            self._set(State.FAILED, str(exc))
            return
        # Found again after a crash, whatever the snapshot says (keystone.recovery).
        write_marker(
            self.paths.workdir,
            self.instance,
            component=self.name,
            version=self.version,
            hash=self.component.content_hash(),
            record=self.runner.describe(handle).to_json(),
            stop_timeout=self.component.recipe.run.stop_timeout,
        )
        self._attach(handle)

    def _forget_marker(self) -> None:
        remove_marker(self.paths.workdir, self.instance)
        self.instance = None

    def _attach(self, handle: RunnerHandle) -> None:
        self.handle = handle
        self.started_at = self.clock.now()
        self.last_health = None  # a verdict on the previous process says nothing of this one
        self._set(State.STARTING)
        self._exit_task = self._spawn_task(self._watch_exit(handle))
        self._health_task = self._spawn_task(self._health_loop(handle))

    def adopt(self, handle: RunnerHandle, *, instance: str | None = None) -> None:
        """Take over a process left running by a previous agent (same pid and start time).

        ``handle`` comes from the runner's ``adopt_record`` of this component's snapshot entry
        (or of its marker); ``instance`` is its ``KEYSTONE_INSTANCE``, when known.
        """
        self.wanted = True
        self.instance = instance
        self._attach(handle)

    def describe(self) -> RunnerRecord | None:
        """The runner's snapshot record of the running process; None when nothing runs."""
        if self.handle is None or self.state not in RUNNING:
            return None
        return self.runner.describe(self.handle)

    def describe_stopping(self) -> RunnerRecord | None:
        """The record of a process being stopped (the next agent finishes stopping it)."""
        if self.handle is None or self.state is not State.STOPPING:
            return None
        return self.runner.describe(self.handle)

    def _spawn_task(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # --- while running ----------------------------------------------------------------------

    async def _watch_exit(self, handle: RunnerHandle) -> None:
        status = await self.runner.exited(handle)
        if self.handle is not handle or self.state in (State.STOPPING, State.STOPPED):
            return
        self._forget_marker()
        if self._health_task:
            self._health_task.cancel()
        uptime = self.clock.now() - self.started_at
        what = _describe_exit(status)
        detail = tail(self.paths.logdir / "stderr.log")
        reason = f"{what}" + (f": {detail}" if detail else "")
        self._after_exit(status, uptime, reason)

    def _after_exit(self, status: int | None, uptime: float, reason: str) -> None:
        policy = self.component.recipe.run.restart_policy
        if not self.wanted:
            self._set(State.STOPPED, reason)
            return
        if policy is RestartPolicy.NEVER or (policy is RestartPolicy.ON_FAILURE and status == 0):
            self._set(State.STOPPED if status == 0 else State.FAILED, reason)
            return
        if uptime >= self.tuning.stable_after:
            self.retries = 0
        max_retries = self.component.recipe.run.max_retries
        if self.retries >= max_retries:
            self._set(
                State.FAILED,
                f"crash loop: gave up after {self.retries} restarts (max_retries = {max_retries}); last: {reason}",
            )
            return
        self.retries += 1
        delay = self.tuning.delay(self.retries, self._rng())
        self._set(State.BACKOFF, f"{reason}; restart {self.retries}/{max_retries} in {delay:.1f}s")
        self._backoff_task = self._spawn_task(self._restart_after(delay))

    async def _restart_after(self, delay: float) -> None:
        await self.clock.sleep(delay)
        if self.state is not State.BACKOFF or not self.wanted:
            return
        self.restarts += 1
        await self._spawn()

    async def _health_loop(self, handle: RunnerHandle) -> None:
        health = self.component.recipe.run.health
        clock = self.clock
        if health is None:
            await clock.sleep(self.tuning.settle)
            if self.handle is handle and self.state is State.STARTING and self.runner.alive(handle):
                self._set(State.HEALTHY)
            return
        deadline = clock.now() + health.start_timeout
        delay = min(0.05, health.interval)
        # A container runner runs cmd: checks inside the container; others on the host.
        inside = getattr(self.runner, "in_component", None)
        probe_runner: CommandRunner = inside(handle) if inside is not None else self.runner
        probes = self.probes
        failures = 0
        wait = 0.0  # the first probe at once
        while self.handle is handle and self.state in RUNNING:
            result = await probes.probe(
                wait,
                health.check,
                timeout=health.timeout,
                runner=probe_runner,
                cwd=self.paths.workdir,
                env=self.env,
            )
            if self.handle is not handle or self.state not in RUNNING:
                return
            changed = result is not self.last_health and result != self.last_health
            self.last_health = result
            wait = health.interval
            if result.ok:
                failures = 0
                if self.state is not State.HEALTHY:
                    self._set(State.HEALTHY)  # tells on_change itself
                elif changed and self.on_change:
                    # The same answer again is no news: no snapshot, metrics or broker work.
                    self.on_change(self)
                continue
            if self.state is State.STARTING:
                if clock.now() >= deadline:
                    await self._unhealthy(
                        handle, f"not healthy within {health.start_timeout:g}s: {result.detail}"
                    )
                    return
                wait = delay
                delay = min(delay * 2, health.interval, 1.0)
                continue
            failures += 1
            if failures >= health.failure_threshold:
                await self._unhealthy(handle, f"{failures} failed health checks: {result.detail}")
                if self.state is not State.UNHEALTHY:
                    return
                failures = 0

    async def _unhealthy(self, handle: RunnerHandle, reason: str) -> None:
        """Mark unhealthy; restart it unless its policy is ``never``."""
        self._set(State.UNHEALTHY, reason)
        if self.component.recipe.run.restart_policy is RestartPolicy.NEVER:
            return
        # Kill it ourselves and take the restart path (the exit watcher ignores this exit).
        self.handle = None
        # Shielded: a stop() (a rollback) cancels this health task, and a kill cut short would
        # leave the process or container running, reported stopped; stop() waits for it instead.
        self._killing = asyncio.ensure_future(
            self.runner.stop(handle, timeout=self.component.recipe.run.stop_timeout)
        )
        await asyncio.shield(self._killing)
        self._forget_marker()
        self._after_exit(None, self.clock.now() - self.started_at, reason)

    # --- stop / restart / reload ------------------------------------------------------------

    async def stop(self, *, reason: str | None = None, keep_wanted: bool = False) -> None:
        """Stop the process (shutdown script, SIGTERM, grace, SIGKILL of the whole group)."""
        async with self._stop_lock:
            if not keep_wanted:
                self.wanted = False
            if self._backoff_task:
                self._backoff_task.cancel()
            if self._health_task:
                self._health_task.cancel()
            killing = self._killing
            if killing is not None and not killing.done():
                await asyncio.shield(killing)
            handle = self.handle
            if self.state in (State.STOPPED, State.PENDING) and handle is None:
                if self.state is State.PENDING:
                    self._set(State.STOPPED, reason)
                return
            if self.state is State.STOPPED and (handle is None or not self.runner.alive(handle)):
                return
            self._set(State.STOPPING, reason)
            recipe = self.component.recipe
            if handle is not None and self.runner.alive(handle):
                if recipe.shutdown and recipe.shutdown.script:
                    result = await self.runner.run(
                        ["/bin/sh", "-c", recipe.shutdown.script],
                        cwd=self.paths.workdir,
                        env={**self.env, "KEYSTONE_PID": str(handle.pid)},
                        timeout=recipe.shutdown.timeout,
                        log=self.paths.logdir / "shutdown.log",
                    )
                    if result.returncode != 0:
                        logger.warning(
                            "{}: shutdown script exited {}", self.name, result.returncode
                        )
                await self.runner.stop(handle, timeout=recipe.run.stop_timeout)
            self.handle = None
            self._forget_marker()
            self._set(State.STOPPED, reason)

    async def restart(self) -> None:
        """Stop and start again (retry count reset)."""
        await self.stop(reason="restart")
        await self.start()
        self.restarts += 1

    async def reload(self) -> None:
        """Run the recipe's reload action: a signal to the process, or a script."""
        rel = self.component.recipe.reload
        if rel is None or self.handle is None:
            raise ProcessError(f"{self.name}: no [lifecycle.reload] or not running")
        if rel.signal:
            self.runner.signal(self.handle, getattr(signal, rel.signal), group=False)
        elif rel.script:
            await self.runner.run(
                ["/bin/sh", "-c", rel.script],
                cwd=self.paths.workdir,
                env=self.env,
                timeout=rel.grace,
                log=self.paths.logdir / "reload.log",
            )

    async def close(self) -> None:
        """Cancel background tasks without touching the process (agent shutdown leaves none)."""
        for t in list(self._tasks):
            t.cancel()
        for t in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t


def _describe_exit(status: int | None) -> str:
    if status is None:
        return "exited"
    if status < 0:
        try:
            return f"killed by {signal.Signals(-status).name}"
        except ValueError:
            return f"killed by signal {-status}"
    return f"exited with status {status}"
