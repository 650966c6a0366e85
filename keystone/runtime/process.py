"""The process runner: spawning, reaping, signalling, stopping and adopting on one event loop.

Every process the agent starts has one owner, the :class:`ProcessRunner`, and it stops processes
the trio way: SIGTERM to the whole process group, a grace period, then SIGKILL to the whole group
(and to the component's cgroup, which also holds grandchildren that left the group). It is the
first implementation of :class:`~keystone.runtime.runner.Runner`.

How it stays on one event loop without a thread per child:

* Processes are started by :func:`~keystone.runtime.spawn.fork_exec` (``Popen`` with a CLOEXEC
  error pipe, so a failed ``exec`` is reported synchronously by :meth:`ProcessRunner.spawn`).
* Each child is watched through ``os.pidfd_open(pid)`` registered with ``loop.add_reader``; when the
  pidfd becomes readable the runner reaps it with ``os.waitpid(pid, WNOHANG)``. One runner watches
  all children; pidfds are closed as soon as a process is reaped and are CLOEXEC, so no child
  inherits them.
* Output of one-shot commands (:meth:`ProcessRunner.run`) is read from pipes with
  ``loop.add_reader``. Components write straight to ``stdout.log``/``stderr.log`` (opened
  ``O_APPEND`` by the runner), so they keep running when the agent restarts.

Each component runs in its own session and process group (``setsid``) so that it survives an
agent crash and can be killed whole; :meth:`ProcessRunner.adopt` takes such a process back after a
restart, after proving by its start time (field 22 of ``/proc/PID/stat``) that the pid was not
recycled.

Limits: ``open_files`` is ``RLIMIT_NOFILE`` set in the child only (with user, capabilities and
``no_new_privs``: :mod:`keystone.runtime.privileges`). ``memory_limit`` and ``cpu_quota`` are
cgroup v2 limits (:mod:`keystone.runtime.cgroups`); without a writable cgroup root they are not
enforced and the runner says so. ``/proc`` readers are in :mod:`keystone.runtime.procfs`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import signal
import subprocess
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from loguru import logger

from keystone.errors import ProcessError
from keystone.runtime.cgroups import (
    CONTROLLERS,
    CPU_PERIOD,
    ResourceReport,
    cgroup2_mount,
    cgroup_members,
    detect_cgroup_root,
    enable_controllers,
    kill_cgroup,
    make_cgroup,
    own_cgroup,
    remove_cgroup,
    remove_stale_cgroups,
)
from keystone.runtime.privileges import CAPABILITIES, capability_number, limit_steps
from keystone.runtime.procfs import (
    group_exists,
    is_live,
    pgid_members,
    read_start_ticks,
    stat_fields,
)
from keystone.runtime.runner import KIND_KEY, RunnerRecord, record_ints, record_json, record_kind
from keystone.runtime.spawn import (
    OUTPUT_CAP,
    NoReapPopen,
    PipeIO,
    RunResult,
    RunSecurity,
    SpawnSpec,
    Step,
    child_setup,
    fork_exec,
    pidfd_or_kill,
    spawn_failure,
)

# Names that lived here before the split, kept importable from this module.
__all__ = [
    "CAPABILITIES",
    "CONTROLLERS",
    "CPU_PERIOD",
    "KILL_WAIT",
    "ORPHAN_GRACE",
    "OUTPUT_CAP",
    "PROCESS_KIND",
    "ProcessHandle",
    "ProcessRecord",
    "ProcessRunner",
    "ResourceReport",
    "RunResult",
    "SpawnSpec",
    "capability_number",
    "cgroup2_mount",
    "cgroup_members",
    "detect_cgroup_root",
    "own_cgroup",
    "pgid_members",
    "read_start_ticks",
]

#: Seconds to wait for SIGKILLed processes to disappear before reporting them as unkillable.
KILL_WAIT = 10.0
#: Seconds that processes left behind by a component whose main process exited get between
#: SIGTERM and SIGKILL.
ORPHAN_GRACE = 5.0
#: Seconds between tries to remove a cgroup the kernel still counts a member of.
_CGROUP_RETRY = (0.1, 0.5, 2.0, 10.0, 60.0)
#: The runner kind of process snapshot entries.
PROCESS_KIND = "process"
_FINISHED_KEEP = 1024


@dataclass(frozen=True)
class ProcessHandle:
    """A started (or adopted) component process.

    ``pid`` plus ``start_ticks`` identify the process across agent restarts (a recycled pid has a
    later start time); persist them with :meth:`ProcessRunner.describe` to
    :meth:`ProcessRunner.adopt_record` it later.
    """

    name: str
    pid: int
    pgid: int
    start_ticks: int
    cgroup: Path | None


@dataclass(frozen=True)
class ProcessRecord:
    """The snapshot entry of a component process: ``{"runner", "pid", "pgid", "start_ticks",
    "cgroup"}`` (the agent adds ``version`` and ``hash``)."""

    pid: int
    pgid: int
    start_ticks: int
    cgroup: Path | None

    @property
    def kind(self) -> str:
        """Always :data:`PROCESS_KIND`."""
        return PROCESS_KIND

    @classmethod
    def of(cls, handle: ProcessHandle) -> ProcessRecord:
        """The record of a handle."""
        return cls(handle.pid, handle.pgid, handle.start_ticks, handle.cgroup)

    def to_json(self) -> dict[str, object]:
        """The snapshot entry."""
        return {
            KIND_KEY: PROCESS_KIND,
            "pid": self.pid,
            "pgid": self.pgid,
            "start_ticks": self.start_ticks,
            "cgroup": str(self.cgroup) if self.cgroup else None,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> ProcessRecord:
        """Parse a snapshot entry, old (no ``runner`` key) or new; extra keys are ignored.

        Raises:
            ValueError: a field is missing or of the wrong type, or the entry is of another kind.
        """
        if record_kind(data) != PROCESS_KIND:
            raise ValueError(f"not a process entry (runner = {record_kind(data)!r})")
        numbers = record_ints(data, ("pid", "pgid", "start_ticks"))
        cgroup = data.get("cgroup")
        if cgroup is not None and not isinstance(cgroup, str):
            raise ValueError(f"cgroup must be a path or null, got {cgroup!r}")
        return cls(numbers[0], numbers[1], numbers[2], Path(cgroup) if cgroup else None)


# --- the runner -----------------------------------------------------------------------------


class _Watch:
    """One watched process: its pidfd, its exit status and who waits for it."""

    __slots__ = (
        "child",
        "done",
        "grace",
        "handle",
        "pidfd",
        "registered",
        "report",
        "status",
        "waiters",
    )

    def __init__(
        self,
        handle: ProcessHandle,
        pidfd: int,
        *,
        child: bool,
        grace: float | None,
        report: ResourceReport | None,
    ) -> None:
        self.handle = handle
        self.pidfd: int | None = pidfd
        self.child = child
        self.grace = grace
        self.report = report
        self.status: int | None = None
        self.done = False
        self.registered: asyncio.AbstractEventLoop | None = None
        self.waiters: list[asyncio.Future[int | None]] = []


class ProcessRunner:
    """Owns every process the agent starts: spawn, watch, signal, stop, adopt, run.

    All methods that wait are coroutines on the running event loop; no thread is ever started.
    One runner serves the whole agent.
    """

    def __init__(
        self, *, cgroup_root: Path | None = None, orphan_grace: float = ORPHAN_GRACE
    ) -> None:
        """Create a runner.

        Args:
            cgroup_root: a writable cgroup v2 directory to create one child cgroup per spawn in
                (see :func:`detect_cgroup_root`); None disables cgroups, and with them memory
                and CPU limits.
            orphan_grace: seconds between SIGTERM and SIGKILL for processes a component's main
                process leaves behind when it exits on its own.
        """
        self.cgroup_root = cgroup_root
        self.orphan_grace = orphan_grace
        self._controllers: frozenset[str] | None = None
        self._watches: dict[int, _Watch] = {}
        self._unbound: set[_Watch] = set()  # watches made while no loop ran, for _bind
        self._finished: OrderedDict[tuple[int, int], int | None] = OrderedDict()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._seq = 0
        if cgroup_root is None:
            logger.info("cgroups: none writable; memory_limit and cpu_quota will not be enforced")
        else:
            on = sorted(self.controllers)
            logger.info("cgroups: {} (controllers: {})", cgroup_root, " ".join(on) or "none")

    # --- capabilities of this runner ---------------------------------------------------------

    @property
    def cgroups_enabled(self) -> bool:
        """True when each spawn gets its own cgroup (whole-tree kill; limits where controllers are on)."""
        return self.cgroup_root is not None

    @property
    def controllers(self) -> frozenset[str]:
        """The cgroup v2 controllers available to component cgroups (``memory``, ``cpu``...)."""
        if self.cgroup_root is None:
            return frozenset()
        if self._controllers is None:
            self._controllers = enable_controllers(self.cgroup_root)
        return self._controllers

    def resources(self, handle: ProcessHandle) -> ResourceReport | None:
        """What limits were enforced for a process this runner spawned (None if unknown)."""
        watch = self._watch_of(handle)
        return watch.report if watch is not None else None

    # --- event-loop plumbing ----------------------------------------------------------------

    def _bind(self) -> asyncio.AbstractEventLoop:
        """The running loop; (re-)register every pidfd with it when it changed."""
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            old = self._loop
            self._loop = loop
            for watch in self._watches.values():
                if watch.registered is not None and watch.registered is not loop:
                    if old is not None and not old.is_closed() and watch.pidfd is not None:
                        old.remove_reader(watch.pidfd)
                    watch.registered = None
                    watch.waiters.clear()
            pending = list(self._watches.values())  # once per new loop: O(n), rare
        else:
            # Only the watches made while no loop ran: a spawn, stop or exit costs the same
            # with ten components or ten thousand.
            pending = list(self._unbound)
        self._unbound.clear()
        for watch in pending:
            self._register(watch, loop)
        return loop

    def _register(self, watch: _Watch, loop: asyncio.AbstractEventLoop | None = None) -> None:
        if loop is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self._unbound.add(watch)
                return  # registered by the next call made on a running loop
            if loop is not self._loop:
                self._bind()
                return
        if watch.registered is loop or watch.pidfd is None:
            return
        loop.add_reader(watch.pidfd, self._on_readable, watch)
        watch.registered = loop

    def _on_readable(self, watch: _Watch) -> None:
        """The pidfd says the process exited: reap it (when it is ours) and wake the waiters."""
        status: int | None = None
        try:
            pid, raw = os.waitpid(watch.handle.pid, os.WNOHANG)
        except ChildProcessError:
            # Not our child (adopted after a restart), or reaped behind our back.
            pid, raw = watch.handle.pid, -1
        if pid == 0:
            # Cannot happen for an exited child; if it ever did, a level-triggered reader would
            # spin, so look again a little later instead.
            loop = watch.registered
            if loop is not None and watch.pidfd is not None:
                loop.remove_reader(watch.pidfd)
                watch.registered = None
                loop.call_later(0.1, self._register, watch, loop)
            return
        if raw != -1:
            status = os.waitstatus_to_exitcode(raw)
        self._finish(watch, status)

    def _finish(self, watch: _Watch, status: int | None) -> None:
        if watch.done:
            return
        watch.done = True
        watch.status = status
        if watch.pidfd is not None:
            if watch.registered is not None and not watch.registered.is_closed():
                watch.registered.remove_reader(watch.pidfd)
            os.close(watch.pidfd)
            watch.pidfd = None
        handle = watch.handle
        self._watches.pop(handle.pid, None)
        self._unbound.discard(watch)
        self._finished[(handle.pid, handle.start_ticks)] = status
        while len(self._finished) > _FINISHED_KEEP:
            self._finished.popitem(last=False)
        for fut in watch.waiters:
            if not fut.done():
                fut.set_result(status)
        watch.waiters.clear()
        if watch.grace is None:
            return  # a one-shot command: run() kills what it left behind
        if self._leftovers(handle):
            loop = watch.registered
            if loop is not None and not loop.is_closed():
                task = loop.create_task(self._clean_orphans(handle, watch.grace))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        else:
            self._drop_cgroup(handle.cgroup)

    def _drop_cgroup(self, cgroup: Path | None, attempt: int = 0) -> None:
        """Remove a spawn's cgroup once its processes are gone; while the kernel still counts
        a member (a process being torn down), try again with backoff instead of leaving it."""
        if remove_cgroup(cgroup) or cgroup is None:
            return
        loop = self._loop
        if attempt >= len(_CGROUP_RETRY) or loop is None or loop.is_closed():
            logger.warning(
                "cgroup {} still has processes; it is removed at the next agent start", cgroup
            )
            return
        loop.call_later(_CGROUP_RETRY[attempt], self._drop_cgroup, cgroup, attempt + 1)

    def remove_stale_cgroups(self) -> int:
        """At agent start: remove the empty cgroups earlier agents left under the root."""
        if self.cgroup_root is None:
            return 0
        removed = remove_stale_cgroups(self.cgroup_root)
        if removed:
            logger.info("cgroups: removed {} empty cgroups left by earlier agents", removed)
        return removed

    async def _clean_orphans(self, handle: ProcessHandle, grace: float) -> None:
        """Stop what a process that exited on its own left in its group or cgroup."""
        try:
            await self._terminate(handle, None, grace, quiet=True)
        except ProcessError as exc:
            logger.error("{}", exc)

    def _watch_of(self, handle: ProcessHandle) -> _Watch | None:
        watch = self._watches.get(handle.pid)
        if watch is not None and watch.handle.start_ticks == handle.start_ticks:
            return watch
        return None

    def _track(self, handle: ProcessHandle, *, grace: float) -> _Watch | None:
        """Watch a live process this runner did not start (None when it is gone)."""
        watch = self._watch_of(handle)
        if watch is not None:
            return watch
        try:
            pidfd = os.pidfd_open(handle.pid)
        except OSError:
            return None
        # Read the identity after opening the pidfd: the pidfd pins the process it names.
        if read_start_ticks(handle.pid) != handle.start_ticks or not is_live(
            stat_fields(handle.pid)
        ):
            os.close(pidfd)
            return None
        watch = _Watch(handle, pidfd, child=False, grace=grace, report=None)
        self._watches[handle.pid] = watch
        self._register(watch)
        return watch

    def _status_of(self, handle: ProcessHandle) -> int | None:
        return self._finished.get((handle.pid, handle.start_ticks))

    def _waiter(self, watch: _Watch, loop: asyncio.AbstractEventLoop) -> asyncio.Future[int | None]:
        fut: asyncio.Future[int | None] = loop.create_future()
        if watch.done:
            fut.set_result(watch.status)
            return fut
        watch.waiters.append(fut)

        def discard(f: asyncio.Future[int | None]) -> None:
            if f.cancelled():
                with contextlib.suppress(ValueError):
                    watch.waiters.remove(f)

        fut.add_done_callback(discard)
        return fut

    # --- spawn ------------------------------------------------------------------------------

    async def spawn(self, spec: SpawnSpec) -> ProcessHandle:
        """Start a component in its own session and process group.

        Returns once the child has exec'd its command (or fails before that).

        Raises:
            ProcessError: the command is not found or not executable, the work dir is missing,
                the user or a capability is unknown or not allowed, or a limit could not be
                applied. The message names the component and the command.
        """
        loop = self._bind()
        name = spec.name
        if not spec.argv or not spec.argv[0]:
            raise ProcessError(f"{name}: empty command: set [lifecycle.run.exec] command")
        if not spec.cwd.is_dir():
            raise ProcessError(f"{name}: working directory does not exist: {spec.cwd}")
        self._seq += 1
        cgroup, report = make_cgroup(self.cgroup_root, self.controllers, spec, self._seq)
        try:
            pid = fork_exec(spec, limit_steps(spec), cgroup)
        except ProcessError:
            remove_cgroup(cgroup)
            raise
        ticks = read_start_ticks(pid) or 0
        handle = ProcessHandle(name, pid, pid, ticks, cgroup)
        pidfd = pidfd_or_kill(name, pid)
        watch = _Watch(handle, pidfd, child=True, grace=self.orphan_grace, report=report)
        self._watches[pid] = watch
        self._register(watch, loop)
        logger.debug("{}: started pid {} ({})", name, pid, " ".join(spec.argv))
        for note in report.notes:
            logger.warning("{}: {}", name, note)
        return handle

    # --- observe and signal -----------------------------------------------------------------

    def exited(self, handle: ProcessHandle) -> asyncio.Future[int | None]:
        """A future resolved with the exit status when the process exits.

        The status is negative when a signal killed the process (like ``Popen.returncode``),
        and None for an adopted process that is not the agent's child (its status cannot be
        known). Each call returns a new future, so cancelling one (e.g. by ``wait_for``) does
        not disturb other waiters. Must be called on the running event loop.
        """
        loop = self._bind()
        watch = self._track(handle, grace=self.orphan_grace)
        if watch is None:
            fut: asyncio.Future[int | None] = loop.create_future()
            fut.set_result(self._status_of(handle))
            return fut
        return self._waiter(watch, loop)

    def alive(self, handle: ProcessHandle) -> bool:
        """True while the process runs (a zombie, exited but not yet reaped, is not alive)."""
        watch = self._watch_of(handle)
        if watch is not None:
            if watch.done or watch.pidfd is None:
                return False
            poller = select.poll()
            poller.register(watch.pidfd, select.POLLIN)
            return not poller.poll(0)
        return read_start_ticks(handle.pid) == handle.start_ticks and is_live(
            stat_fields(handle.pid)
        )

    def signal(self, handle: ProcessHandle, sig: int, *, group: bool = True) -> None:
        """Send ``sig`` to the process group (default) or to the process alone.

        Raises:
            ProcessError: nothing of the process (group) is running any more.
        """
        if group:
            if not group_exists(handle.pgid):
                raise ProcessError(
                    f"{handle.name}: not running (process group {handle.pgid} is empty)"
                )
            try:
                os.killpg(handle.pgid, sig)
            except ProcessLookupError:
                raise ProcessError(
                    f"{handle.name}: not running (process group {handle.pgid})"
                ) from None
            except PermissionError as exc:
                raise ProcessError(
                    f"{handle.name}: may not signal process group {handle.pgid}: {exc}"
                ) from exc
            return
        watch = self._watch_of(handle)
        try:
            if watch is not None and watch.pidfd is not None:
                signal.pidfd_send_signal(watch.pidfd, sig)
            elif self.alive(handle):
                os.kill(handle.pid, sig)
            else:
                raise ProcessLookupError
        except ProcessLookupError:
            raise ProcessError(f"{handle.name}: not running (pid {handle.pid})") from None
        except PermissionError as exc:
            raise ProcessError(f"{handle.name}: may not signal pid {handle.pid}: {exc}") from exc

    def kill_group(self, pgid: int) -> None:
        """SIGKILL a whole process group (e.g. a stale one found at start).

        Raises:
            ProcessError: ``pgid`` is 0, 1 or the agent's own group, or may not be signalled.
        """
        if pgid <= 1 or pgid == os.getpgrp():
            raise ProcessError(
                f"refusing to kill process group {pgid}: it is init's or the agent's own"
            )
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        except PermissionError as exc:
            raise ProcessError(f"may not kill process group {pgid}: {exc}") from exc

    # --- stop -------------------------------------------------------------------------------

    async def stop(self, handle: ProcessHandle, *, timeout: float) -> int | None:
        """Stop a process and everything it started; return its exit status.

        SIGTERM (and SIGCONT, so a stopped process sees it) to the process group; wait up to
        ``timeout`` for the process and its group to exit; then SIGKILL to whatever is left of
        the group and of the spawn's cgroup (grandchildren that left the group). Idempotent: on
        a process that already exited it cleans up leftovers and returns the status.

        Returns:
            The exit status (negative = killed by that signal), or None when unknown (an
            adopted process, or one that exited before this runner watched it).

        Raises:
            ProcessError: something survived SIGKILL for :data:`KILL_WAIT` seconds.
        """
        self._bind()
        watch = self._track(handle, grace=self.orphan_grace)
        await self._terminate(handle, watch, timeout, quiet=False)
        if watch is not None:
            return watch.status
        return self._status_of(handle)

    async def _terminate(
        self, handle: ProcessHandle, watch: _Watch | None, timeout: float, *, quiet: bool
    ) -> None:
        loop = self._bind()
        deadline = loop.time() + max(0.0, timeout)
        if (watch is not None and not watch.done) or group_exists(handle.pgid):
            for sig in (signal.SIGTERM, signal.SIGCONT):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(handle.pgid, sig)
        if not await self._wait_gone(handle, watch, deadline, cgroup=False) and not quiet:
            logger.warning(
                "{}: still running {:g}s after SIGTERM; sending SIGKILL to process group {}",
                handle.name,
                timeout,
                handle.pgid,
            )
        # Always: kills what ignored SIGTERM and what escaped the group into the cgroup.
        if group_exists(handle.pgid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(handle.pgid, signal.SIGKILL)
        if handle.cgroup is not None:
            kill_cgroup(handle.cgroup)
        if watch is not None and not watch.done and watch.pidfd is not None:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(watch.pidfd, signal.SIGKILL)
        if not await self._wait_gone(handle, watch, loop.time() + KILL_WAIT, cgroup=True):
            left = sorted(
                set(pgid_members(handle.pgid))
                | set(cgroup_members(handle.cgroup) if handle.cgroup else [])
            )
            raise ProcessError(
                f"{handle.name}: processes {left} survived SIGKILL for {KILL_WAIT:g}s "
                "(uninterruptible sleep, e.g. a hung mount?); they will be killed again at the next stop"
            )
        self._drop_cgroup(handle.cgroup)

    async def _wait_gone(
        self, handle: ProcessHandle, watch: _Watch | None, deadline: float, *, cgroup: bool
    ) -> bool:
        """Wait (on pidfds, no polling) until the process, its group and optionally its cgroup are gone."""
        loop = self._bind()
        while True:
            remaining = deadline - loop.time()
            if watch is not None and not watch.done:
                if remaining <= 0:
                    return False
                try:
                    await asyncio.wait_for(self._waiter(watch, loop), remaining)
                except TimeoutError:
                    return False
            # kill(-pgid, 0) first: the /proc scan only when the group is still there.
            members = set(pgid_members(handle.pgid)) if group_exists(handle.pgid) else set()
            if cgroup and handle.cgroup is not None:
                members.update(cgroup_members(handle.cgroup))
            if not members:
                return True
            remaining = deadline - loop.time()
            if remaining <= 0 or not await _wait_pids(loop, members, remaining):
                return False

    # --- adopt ------------------------------------------------------------------------------

    def adopt(
        self, name: str, pid: int, pgid: int, start_ticks: int, cgroup: Path | None
    ) -> ProcessHandle | None:
        """Take over a process started before an agent restart.

        Returns:
            A handle when ``pid`` is alive and has the recorded ``start_ticks`` (so it is the same
            process, not a recycled pid); None otherwise. :meth:`exited` and :meth:`stop` work
            on the handle through a pidfd; the exit status of a process that is not the agent's
            child is None.
        """
        known = self._watches.get(pid)
        if known is not None and known.handle.start_ticks == start_ticks:
            return known.handle
        cg = cgroup if cgroup is not None and (cgroup / "cgroup.procs").exists() else None
        handle = ProcessHandle(name, pid, pgid, start_ticks, cg)
        watch = self._track(handle, grace=self.orphan_grace)
        return handle if watch is not None else None

    def describe(self, handle: ProcessHandle) -> ProcessRecord:
        """The snapshot record of ``handle`` (what :meth:`adopt_record` takes back)."""
        return ProcessRecord.of(handle)

    def adopt_record(
        self, name: str, record: RunnerRecord | Mapping[str, object]
    ) -> ProcessHandle | None:
        """:meth:`adopt` the process a snapshot entry names (None: gone, or not a process entry).

        Takes entries of kind ``process`` and entries written before kinds existed
        (``{"pid", "pgid", "start_ticks", "cgroup", ...}``); other keys are ignored.
        """
        data = record_json(record)
        kind = record_kind(data)
        if kind != PROCESS_KIND:
            logger.warning("{}: snapshot entry of runner {!r}, not {!r}", name, kind, PROCESS_KIND)
            return None
        try:
            rec = ProcessRecord.from_json(data)
        except ValueError as exc:
            logger.warning("{}: unusable snapshot entry: {}", name, exc)
            return None
        return self.adopt(name, rec.pid, rec.pgid, rec.start_ticks, rec.cgroup)

    # --- one-shot commands ------------------------------------------------------------------

    async def run(
        self,
        argv: Sequence[str],
        *,
        cwd: Path,
        env: Mapping[str, str],
        timeout: float,
        input: bytes | None = None,
        log: Path | None = None,
        max_output: int = OUTPUT_CAP,
        security: RunSecurity | None = None,
    ) -> RunResult:
        """Run a one-shot command to completion in its own process group.

        Used for install and shutdown scripts (``/bin/sh -c``), ``cmd:`` health checks and
        worker processes. On timeout the whole group is SIGKILLed. When the command exits,
        whatever it left running in its group is SIGKILLed too: a one-shot leaves nothing behind.

        Args:
            argv: the command; ``argv[0]`` as in :class:`SpawnSpec`.
            cwd: working directory.
            env: the complete environment.
            timeout: seconds before the group is killed.
            input: bytes for stdin (stdin is /dev/null otherwise).
            log: append stdout and stderr to this file instead of capturing them.
            max_output: bytes of stdout (the first) and of stderr (the last) kept when capturing.
            security: the user, no_new_privileges and capabilities to run it with (an install
                script runs with its component's); None: the agent's own.

        Raises:
            ProcessError: the command could not be started (not found, not executable), or its
                user or capabilities cannot be applied (the message names the step).
        """
        loop = self._bind()
        if not argv or not argv[0]:
            raise ProcessError("cannot run an empty command")
        label = os.path.basename(argv[0]) or argv[0]
        steps: list[Step] = []
        if security is not None:
            steps = limit_steps(
                SpawnSpec(
                    name=label,
                    argv=tuple(argv),
                    cwd=cwd,
                    env=env,
                    log_dir=cwd,
                    user=security.user,
                    no_new_privileges=security.no_new_privileges,
                    capabilities=security.capabilities,
                )
            )
        report_r = report_w = -1
        started = loop.time()
        deadline = started + max(0.0, timeout)
        io = PipeIO(loop, max_output)
        child: list[int] = []  # the child's ends, closed as soon as it started
        try:
            stdin_fd: int = subprocess.DEVNULL
            stdin_w = out_r = err_r = -1
            if input is not None:
                stdin_fd, stdin_w = io.pipe(child_end="read")
                child.append(stdin_fd)
            if log is not None:
                log.parent.mkdir(parents=True, exist_ok=True)
                out_fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)
                child.append(out_fd)
                err_fd = out_fd
            else:
                out_r, out_fd = io.pipe(child_end="write")
                child.append(out_fd)
                err_r, err_fd = io.pipe(child_end="write")
                child.append(err_fd)
            preexec = None
            if steps:
                report_r, report_w = os.pipe2(os.O_CLOEXEC)
                preexec = child_setup(steps, report_w)
            try:
                proc = NoReapPopen(
                    list(argv),
                    cwd=cwd,
                    env=dict(env),
                    stdin=stdin_fd,
                    stdout=out_fd,
                    stderr=err_fd,
                    close_fds=True,
                    start_new_session=True,
                    preexec_fn=preexec,
                )
            except (OSError, ValueError, subprocess.SubprocessError) as exc:
                detail = ""
                if report_w >= 0:
                    os.close(report_w)
                    report_w = -1
                    detail = os.read(report_r, 4096).decode(errors="replace")
                raise ProcessError(spawn_failure(label, argv[0], cwd, env, exc, detail)) from exc
            finally:
                for fd in child:
                    os.close(fd)
                child.clear()
                for fd in (report_r, report_w):
                    if fd >= 0:
                        os.close(fd)
                report_r = report_w = -1
            pid = proc.pid
            handle = ProcessHandle(label, pid, pid, read_start_ticks(pid) or 0, None)
            watch = _Watch(handle, pidfd_or_kill(label, pid), child=True, grace=None, report=None)
            self._watches[pid] = watch
            self._register(watch, loop)
            if input is not None:
                io.feed(stdin_w, input)
            if out_r >= 0:
                io.collect(out_r, keep="head")
                io.collect(err_r, keep="tail")
            timed_out = False
            try:
                await asyncio.wait_for(self._waiter(watch, loop), max(0.0, deadline - loop.time()))
            except TimeoutError:
                timed_out = True
            ended = loop.time()
            if not watch.done or group_exists(pid):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGKILL)
                if not watch.done and watch.pidfd is not None:
                    with contextlib.suppress(ProcessLookupError):
                        signal.pidfd_send_signal(watch.pidfd, signal.SIGKILL)
                await self._wait_gone(handle, watch, loop.time() + KILL_WAIT, cgroup=False)
                if timed_out:
                    ended = loop.time()
            # Output may still sit in the pipes, or a process that left the group holds them.
            await io.drain(deadline - loop.time())
            status = watch.status if watch.status is not None else -signal.SIGKILL
            return RunResult(
                returncode=status,
                stdout=io.stdout,
                timed_out=timed_out,
                duration=ended - started,
                stderr=io.stderr,
                truncated=io.truncated,
            )
        finally:
            for fd in child:
                os.close(fd)
            io.close()

    # --- shutdown ---------------------------------------------------------------------------

    def close(self) -> None:
        """Stop watching (close pidfds, cancel clean-ups) without touching any process.

        Processes keep running, as they must when the agent exits and a new one adopts them.
        """
        for watch in list(self._watches.values()):
            if watch.pidfd is not None:
                if watch.registered is not None and not watch.registered.is_closed():
                    watch.registered.remove_reader(watch.pidfd)
                os.close(watch.pidfd)
                watch.pidfd = None
            for fut in watch.waiters:
                fut.cancel()
        self._watches.clear()
        self._unbound.clear()
        for task in list(self._tasks):
            task.cancel()

    def _leftovers(self, handle: ProcessHandle) -> bool:
        # O(1) in the number of processes on the device: no /proc scan on an exit.
        if group_exists(handle.pgid):
            return True
        return handle.cgroup is not None and bool(cgroup_members(handle.cgroup))


# --- helpers --------------------------------------------------------------------------------


async def _wait_pids(loop: asyncio.AbstractEventLoop, pids: set[int], timeout: float) -> bool:
    """Wait until every pid in ``pids`` has exited (through pidfds); False on timeout."""
    fds: list[int] = []
    for pid in pids:
        try:
            fds.append(os.pidfd_open(pid))
        except OSError:
            continue  # already gone
    if not fds:
        return True
    pending = set(fds)
    done: asyncio.Future[None] = loop.create_future()

    def ready(fd: int) -> None:
        loop.remove_reader(fd)
        pending.discard(fd)
        if not pending and not done.done():
            done.set_result(None)

    try:
        for fd in fds:
            loop.add_reader(fd, ready, fd)
        await asyncio.wait_for(done, timeout)
        return True
    except TimeoutError:
        return False
    finally:
        for fd in fds:
            if fd in pending:
                loop.remove_reader(fd)
            os.close(fd)
