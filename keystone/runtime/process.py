"""Spawning, reaping, signalling and stopping component processes on one event loop.

Every process the agent starts has one owner, the :class:`ProcessRunner`, and it stops processes
the trio way: SIGTERM to the whole process group, a grace period, then SIGKILL to the whole group
(and to the component's cgroup, which also holds grandchildren that left the group).

How it stays on one event loop without a thread per child:

* Processes are started with :class:`subprocess.Popen` (fork/exec with a CLOEXEC error pipe, so a
  failed ``exec`` is reported synchronously by :meth:`ProcessRunner.spawn`). asyncio's
  ``create_subprocess_*`` is not used: on Python 3.11 its child watcher starts a thread per child.
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

Limits: ``open_files`` is ``RLIMIT_NOFILE`` set in the child only. ``memory_limit`` and
``cpu_quota`` are cgroup v2 ``memory.max`` and ``cpu.max`` in a per-spawn cgroup under a writable
(delegated) cgroup root. Without one they are *not* enforced and the runner says so (a log line,
:attr:`ProcessRunner.cgroups_enabled`, :meth:`ProcessRunner.resources`). ``RLIMIT_AS`` is
deliberately not used instead: it caps virtual address space, not memory use, and runtimes that
reserve large address ranges up front (Go, the JVM, glibc malloc arenas per thread, sanitizers)
fail to start or crash at random under it while a small RLIMIT_AS still lets a process touch all
the memory it maps.

Work done in the child between ``fork`` and ``exec`` (cgroup join, rlimit, capabilities, user,
``no_new_privs``) uses only objects prepared in the parent (no imports, no name lookups), so it is
safe even when the agent has other threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import grp
import os
import pwd
import resource
import select
import signal
import subprocess
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from loguru import logger

from keystone.errors import ProcessError

#: Bytes of ``stdout`` (and of ``stderr``) that :meth:`ProcessRunner.run` keeps without a log.
OUTPUT_CAP = 1 << 20
#: Seconds to wait for SIGKILLed processes to disappear before reporting them as unkillable.
KILL_WAIT = 10.0
#: Seconds that processes left behind by a component whose main process exited get between
#: SIGTERM and SIGKILL.
ORPHAN_GRACE = 5.0
#: The cgroup v2 controllers the runner enables under its root when it can.
CONTROLLERS = ("cpu", "memory", "pids")
#: cpu.max period in microseconds (the kernel's default).
CPU_PERIOD = 100_000
_FINISHED_KEEP = 1024

# prctl(2) and capability constants (linux/prctl.h, linux/capability.h).
PR_SET_KEEPCAPS = 8
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_RAISE = 2
PR_CAP_AMBIENT_CLEAR_ALL = 4
_LINUX_CAPABILITY_VERSION_3 = 0x20080522

#: Linux capability numbers by name (linux/capability.h, up to 6.x).
CAPABILITIES: Mapping[str, int] = {
    name: number
    for number, name in enumerate(
        (
            "CAP_CHOWN",
            "CAP_DAC_OVERRIDE",
            "CAP_DAC_READ_SEARCH",
            "CAP_FOWNER",
            "CAP_FSETID",
            "CAP_KILL",
            "CAP_SETGID",
            "CAP_SETUID",
            "CAP_SETPCAP",
            "CAP_LINUX_IMMUTABLE",
            "CAP_NET_BIND_SERVICE",
            "CAP_NET_BROADCAST",
            "CAP_NET_ADMIN",
            "CAP_NET_RAW",
            "CAP_IPC_LOCK",
            "CAP_IPC_OWNER",
            "CAP_SYS_MODULE",
            "CAP_SYS_RAWIO",
            "CAP_SYS_CHROOT",
            "CAP_SYS_PTRACE",
            "CAP_SYS_PACCT",
            "CAP_SYS_ADMIN",
            "CAP_SYS_BOOT",
            "CAP_SYS_NICE",
            "CAP_SYS_RESOURCE",
            "CAP_SYS_TIME",
            "CAP_SYS_TTY_CONFIG",
            "CAP_MKNOD",
            "CAP_LEASE",
            "CAP_AUDIT_WRITE",
            "CAP_AUDIT_CONTROL",
            "CAP_SETFCAP",
            "CAP_MAC_OVERRIDE",
            "CAP_MAC_ADMIN",
            "CAP_SYSLOG",
            "CAP_WAKE_ALARM",
            "CAP_BLOCK_SUSPEND",
            "CAP_AUDIT_READ",
            "CAP_PERFMON",
            "CAP_BPF",
            "CAP_CHECKPOINT_RESTORE",
        )
    )
}


# --- values ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class SpawnSpec:
    """Everything needed to start one long-running component process.

    Attributes:
        name: component name, used in every message.
        argv: the command; ``argv[0]`` is resolved against ``cwd`` when it contains ``/``,
            otherwise searched in the ``PATH`` of ``env``.
        cwd: working directory (must exist).
        env: the complete environment of the child; nothing of the agent's leaks in.
        log_dir: stdout goes to ``log_dir/stdout.log`` and stderr to ``log_dir/stderr.log``,
            opened ``O_APPEND`` (created if missing) and handed to the child directly.
        open_files: ``RLIMIT_NOFILE`` (soft and hard) of the child only.
        memory_limit: bytes, cgroup v2 ``memory.max`` when the runner has a cgroup root.
        cpu_quota: cores (0.5 = half a core), cgroup v2 ``cpu.max``.
        user: ``user``, ``uid``, ``user:group`` or ``uid:gid``. Switched to only when the agent
            runs as root; otherwise it must name the current user.
        no_new_privileges: ``prctl(PR_SET_NO_NEW_PRIVS)`` in the child.
        capabilities: None leaves capabilities alone; a tuple (``()`` = none) becomes the
            child's bounding, permitted, effective, inheritable and ambient sets.
    """

    name: str
    argv: tuple[str, ...]
    cwd: Path
    env: Mapping[str, str]
    log_dir: Path
    open_files: int | None = None
    memory_limit: int | None = None
    cpu_quota: float | None = None
    user: str | None = None
    no_new_privileges: bool = False
    capabilities: tuple[str, ...] | None = None


@dataclass(frozen=True)
class ProcessHandle:
    """A started (or adopted) component process.

    ``pid`` plus ``start_ticks`` identify the process across agent restarts (a recycled pid has a
    later start time); persist all fields to :meth:`ProcessRunner.adopt` it later.
    """

    name: str
    pid: int
    pgid: int
    start_ticks: int
    cgroup: Path | None


@dataclass(frozen=True)
class RunResult:
    """The outcome of a one-shot command.

    Attributes:
        returncode: exit status; negative when killed by a signal (``-9`` after a timeout).
        stdout: captured standard output (the first :data:`OUTPUT_CAP` bytes) when the command
            ran without ``log``; empty otherwise.
        timed_out: the command was killed because it outlived its timeout.
        duration: seconds from start to exit.
        stderr: captured standard error (the *last* :data:`OUTPUT_CAP` bytes, where a
            traceback or error message is) when the command ran without ``log``.
        truncated: stdout was longer than the cap and was cut.
    """

    returncode: int
    stdout: bytes
    timed_out: bool
    duration: float
    stderr: bytes = b""
    truncated: bool = False


@dataclass(frozen=True)
class ResourceReport:
    """Which of a spawn's resource limits are really enforced, and why not."""

    cgroup: Path | None
    open_files: int | None
    memory_enforced: bool
    cpu_enforced: bool
    notes: tuple[str, ...] = ()


# --- /proc helpers --------------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str] | None:
    """Fields 3.. of ``/proc/PID/stat`` (after the parenthesised command name), or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    end = data.rfind(b")")
    if end < 0:
        return None
    return data[end + 2 :].decode("ascii", "replace").split()


def read_start_ticks(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot (field 22 of ``/proc/PID/stat``).

    Returns None when the process does not exist. Together with the pid it identifies a process
    across agent restarts: a recycled pid has a different start time.
    """
    fields = _stat_fields(pid)
    if fields is None or len(fields) < 20:
        return None
    return int(fields[19])


def _live(fields: list[str] | None) -> bool:
    return fields is not None and fields[0] not in ("Z", "X", "x")


def pgid_members(pgid: int) -> list[int]:
    """Pids of the live processes (zombies excluded) whose process group is ``pgid``.

    Scans ``/proc``; a dead member whose parent has not reaped it yet is not counted.
    """
    members: list[int] = []
    with os.scandir("/proc") as entries:
        for entry in entries:
            if not entry.name.isdigit():
                continue
            fields = _stat_fields(int(entry.name))
            if _live(fields) and fields is not None and int(fields[2]) == pgid:
                members.append(int(entry.name))
    return sorted(members)


def cgroup_members(cgroup: Path) -> list[int]:
    """Pids of the live processes in a cgroup v2 directory (empty when it is gone)."""
    try:
        text = (cgroup / "cgroup.procs").read_text()
    except OSError:
        return []
    return sorted(p for p in map(int, text.split()) if _live(_stat_fields(p)))


# --- cgroups --------------------------------------------------------------------------------


def cgroup2_mount() -> Path | None:
    """Mount point of the cgroup v2 hierarchy (``/sys/fs/cgroup`` or ``.../unified``)."""
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        left, _, right = line.partition(" - ")
        if right.split(" ", 1)[0] == "cgroup2":
            fields = left.split()
            if fields[3] == "/":
                # mountinfo escapes spaces and the like as \ooo octal.
                point = fields[4].encode().decode("unicode_escape")
                return Path(point)
    return None


def own_cgroup() -> str | None:
    """This process's cgroup v2 path (the ``0::`` line of ``/proc/self/cgroup``)."""
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            if line.startswith("0::"):
                return line[3:]
    except OSError:
        return None
    return None


def _writable_cgroup(path: Path) -> bool:
    return (
        (path / "cgroup.procs").is_file()
        and os.access(path, os.W_OK)
        and os.access(path / "cgroup.procs", os.W_OK)
    )


def _systemd_unit(cgroup_path: str) -> bool:
    """True when a cgroup path is a systemd unit's (``....service``, ``.scope``, ``.slice``)."""
    return any(seg.endswith((".service", ".scope", ".slice")) for seg in cgroup_path.split("/"))


def _delegated(cgroup: Path) -> bool:
    """True when systemd marked ``cgroup`` as delegated (``Delegate=yes``, systemd >= 251)."""
    for attr in ("trusted.delegate", "user.delegate"):
        with contextlib.suppress(OSError):
            if os.getxattr(cgroup, attr) == b"1":
                return True
    return False


def _enable_controllers(cgroup: Path) -> frozenset[str]:
    """Enable what it can of :data:`CONTROLLERS` for ``cgroup``'s children; return what is on."""
    try:
        available = set((cgroup / "cgroup.controllers").read_text().split())
        enabled = set((cgroup / "cgroup.subtree_control").read_text().split())
    except OSError:
        return frozenset()
    for name in CONTROLLERS:
        if name in available and name not in enabled:
            with contextlib.suppress(OSError):
                (cgroup / "cgroup.subtree_control").write_text(f"+{name}")
    try:
        return frozenset((cgroup / "cgroup.subtree_control").read_text().split())
    except OSError:
        return frozenset()


def detect_cgroup_root(environ: Mapping[str, str] | None = None) -> Path | None:
    """Find or make a cgroup v2 directory the agent may create component cgroups in.

    ``KEYSTONE_CGROUP_ROOT`` in ``environ`` (default: ``os.environ``) names one explicitly.
    Otherwise the root is ``keystone/`` under the agent's own cgroup, provided the agent may
    write there and, when that cgroup is a systemd unit's, systemd delegated it
    (``Delegate=yes``; add ``KillMode=process`` so that components outlive an agent restart). When the agent is the only process in its own cgroup it
    first moves itself into a ``keystone-agent/`` leaf, because cgroup v2 lets a cgroup with
    member processes enable no controllers for its children; when it shares its cgroup with
    other processes, component cgroups still group and kill whole trees but carry no limits.

    Returns:
        The root, or None when there is no cgroup v2 hierarchy or the agent may not write to
        it (then memory and CPU limits are not enforced).
    """
    env = os.environ if environ is None else environ
    explicit = env.get("KEYSTONE_CGROUP_ROOT")
    if explicit:
        root = Path(explicit)
        if _writable_cgroup(root):
            return root
        logger.warning("KEYSTONE_CGROUP_ROOT={} is not a writable cgroup v2 directory", root)
        return None
    mount = cgroup2_mount()
    own = own_cgroup()
    if mount is None or own is None:
        return None
    own_dir = mount / own.lstrip("/")
    if not _writable_cgroup(own_dir):
        return None
    if _systemd_unit(own) and not _delegated(own_dir):
        # systemd is the single writer of its units' cgroups unless it delegated one.
        logger.info(
            "cgroup {} belongs to systemd and is not delegated: add Delegate=yes to the unit "
            "(or set KEYSTONE_CGROUP_ROOT) to enforce memory_limit and cpu_quota",
            own_dir,
        )
        return None
    try:
        root = own_dir / "keystone"
        root.mkdir(exist_ok=True)
        available = set((own_dir / "cgroup.controllers").read_text().split()) & set(CONTROLLERS)
        if available - _enable_controllers(own_dir) and own_dir != mount:
            members = (own_dir / "cgroup.procs").read_text().split()
            if members == [str(os.getpid())]:
                leaf = own_dir / "keystone-agent"
                leaf.mkdir(exist_ok=True)
                (leaf / "cgroup.procs").write_text(str(os.getpid()))
                _enable_controllers(own_dir)
    except OSError as exc:
        logger.warning("cgroup v2 at {} is not usable: {}", own_dir, exc)
        return None
    return root


def _kill_cgroup(cgroup: Path) -> None:
    """SIGKILL every process in ``cgroup`` (``cgroup.kill``, or one by one on older kernels)."""
    kill = cgroup / "cgroup.kill"
    if kill.exists():
        with contextlib.suppress(OSError):
            kill.write_text("1")
            return
    for pid in cgroup_members(cgroup):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


def _remove_cgroup(cgroup: Path | None) -> None:
    if cgroup is None:
        return
    try:
        cgroup.rmdir()
    except FileNotFoundError:
        pass
    except OSError as exc:
        logger.debug("cgroup {} not removed yet: {}", cgroup, exc)


# --- identity and capabilities --------------------------------------------------------------


@dataclass(frozen=True)
class _Identity:
    uid: int
    gid: int
    groups: tuple[int, ...]


def _resolve_user(spec: str) -> _Identity:
    """``user``, ``uid``, ``user:group`` or ``uid:gid`` to numbers (raises ValueError)."""
    user, _, group = spec.partition(":")
    if not user:
        raise ValueError("expected user, uid, user:group or uid:gid")
    name: str | None = None
    if user.isdigit():
        uid = int(user)
        try:
            entry = pwd.getpwuid(uid)
            name, gid = entry.pw_name, entry.pw_gid
        except KeyError:
            gid = uid
    else:
        try:
            entry = pwd.getpwnam(user)
        except KeyError:
            raise ValueError(f"no such user {user!r}") from None
        uid, gid, name = entry.pw_uid, entry.pw_gid, entry.pw_name
    if group:
        if group.isdigit():
            gid = int(group)
        else:
            try:
                gid = grp.getgrnam(group).gr_gid
            except KeyError:
                raise ValueError(f"no such group {group!r}") from None
    groups = tuple(os.getgrouplist(name, gid)) if name is not None else (gid,)
    return _Identity(uid, gid, groups)


def capability_number(name: str) -> int | None:
    """``CAP_NET_BIND_SERVICE`` (or ``net_bind_service``) to its number; None if unknown."""
    key = name.strip().upper()
    if not key.startswith("CAP_"):
        key = "CAP_" + key
    return CAPABILITIES.get(key)


def _cap_name(number: int) -> str:
    for cap_name, cap_number in CAPABILITIES.items():
        if cap_number == number:
            return cap_name
    return f"capability {number}"


def _cap_last_cap() -> int:
    try:
        return int(Path("/proc/sys/kernel/cap_last_cap").read_text())
    except (OSError, ValueError):
        return max(CAPABILITIES.values())


class _Libc:
    """prctl(2) and capset(2) through ctypes, bound once in the parent (never in a child)."""

    _instance: _Libc | None = None

    def __init__(self) -> None:
        import ctypes

        self.ctypes = ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        self.prctl = libc.prctl
        self.prctl.argtypes = [
            ctypes.c_int,
            ctypes.c_ulong,
            ctypes.c_ulong,
            ctypes.c_ulong,
            ctypes.c_ulong,
        ]
        self.prctl.restype = ctypes.c_int
        self.capset = libc.capset
        self.capset.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        self.capset.restype = ctypes.c_int

    @classmethod
    def get(cls) -> _Libc:
        if cls._instance is None:
            cls._instance = _Libc()
        return cls._instance

    def prctl_call(self, option: int, arg2: int = 0, arg3: int = 0) -> Callable[[], None]:
        """A ready-to-call ``prctl(option, arg2, arg3, 0, 0)`` that raises OSError on failure."""
        prctl, get_errno = self.prctl, self.ctypes.get_errno

        def call() -> None:
            if prctl(option, arg2, arg3, 0, 0) != 0:
                err = get_errno()
                raise OSError(err, os.strerror(err))

        return call

    def capset_call(self, caps: frozenset[int]) -> Callable[[], None]:
        """A ready-to-call capset(2) making ``caps`` the effective, permitted and inheritable sets."""
        ctypes = self.ctypes
        header = (ctypes.c_uint32 * 2)(_LINUX_CAPABILITY_VERSION_3, 0)
        data = (ctypes.c_uint32 * 6)()
        for cap in caps:
            word = 3 * (cap // 32)
            bit = 1 << (cap % 32)
            for i in range(3):  # effective, permitted, inheritable
                data[word + i] |= bit
        capset, get_errno = self.capset, ctypes.get_errno

        def call() -> None:
            if capset(ctypes.addressof(header), ctypes.addressof(data)) != 0:
                err = get_errno()
                raise OSError(err, os.strerror(err))

        return call


def _child_setup(steps: list[tuple[str, Callable[[], None]]], report_fd: int) -> Callable[[], None]:
    """The ``preexec_fn``: run ``steps`` in order; on failure tell the parent which one and why."""

    def setup() -> None:
        for what, step in steps:
            try:
                step()
            except BaseException as exc:
                with contextlib.suppress(OSError):
                    os.write(report_fd, f"{what}: {exc}".encode(errors="replace"))
                raise

    return setup


class _Popen(subprocess.Popen[bytes]):
    """Popen that never reaps or warns on its own: the runner reaps through pidfds.

    ``Popen.__del__`` of a running child puts it on ``subprocess._active``, and the next
    ``Popen()`` would then ``waitpid`` it and steal the exit status from the runner.
    """

    def __del__(self) -> None:
        return None


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
            self._controllers = _enable_controllers(self.cgroup_root)
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
        for watch in list(self._watches.values()):
            self._register(watch, loop)
        return loop

    def _register(self, watch: _Watch, loop: asyncio.AbstractEventLoop | None = None) -> None:
        if loop is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
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
            _remove_cgroup(handle.cgroup)

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
        if read_start_ticks(handle.pid) != handle.start_ticks or not _live(
            _stat_fields(handle.pid)
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
        steps: list[tuple[str, Callable[[], None]]] = []
        cgroup, report = self._make_cgroup(spec)
        opened: list[int] = []
        try:
            if cgroup is not None:
                procs = os.open(cgroup / "cgroup.procs", os.O_WRONLY | os.O_CLOEXEC)
                opened.append(procs)
                steps.append((f"joining cgroup {cgroup}", lambda: _write_all(procs, b"0")))
            steps += self._limit_steps(spec)
            spec.log_dir.mkdir(parents=True, exist_ok=True)
            flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC
            out = os.open(spec.log_dir / "stdout.log", flags, 0o640)
            opened.append(out)
            err = os.open(spec.log_dir / "stderr.log", flags, 0o640)
            opened.append(err)
            report_r, report_w = os.pipe2(os.O_CLOEXEC)
            opened += [report_r, report_w]
            preexec = _child_setup(steps, report_w) if steps else None
            try:
                proc = _Popen(
                    list(spec.argv),
                    cwd=spec.cwd,
                    env=dict(spec.env),
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=err,
                    close_fds=True,
                    start_new_session=True,
                    preexec_fn=preexec,
                )
            except (OSError, ValueError, subprocess.SubprocessError) as exc:
                os.close(report_w)
                opened.remove(report_w)
                detail = os.read(report_r, 4096).decode(errors="replace")
                raise ProcessError(
                    _spawn_failure(name, spec.argv[0], spec.cwd, spec.env, exc, detail)
                ) from exc
        except ProcessError:
            _remove_cgroup(cgroup)
            raise
        except OSError as exc:
            _remove_cgroup(cgroup)
            raise ProcessError(f"{name}: cannot prepare the process: {exc}") from exc
        finally:
            for fd in opened:
                os.close(fd)
        pid = proc.pid
        ticks = read_start_ticks(pid) or 0
        handle = ProcessHandle(name, pid, pid, ticks, cgroup)
        pidfd = _pidfd_or_kill(name, pid)
        watch = _Watch(handle, pidfd, child=True, grace=self.orphan_grace, report=report)
        self._watches[pid] = watch
        self._register(watch, loop)
        logger.debug("{}: started pid {} ({})", name, pid, " ".join(spec.argv))
        for note in report.notes:
            logger.warning("{}: {}", name, note)
        return handle

    def _make_cgroup(self, spec: SpawnSpec) -> tuple[Path | None, ResourceReport]:
        """Create this spawn's cgroup and write its limits; say what is enforced."""
        notes: list[str] = []
        memory_ok = cpu_ok = False
        cgroup: Path | None = None
        if self.cgroup_root is None:
            why = "no writable cgroup v2 hierarchy (run the agent as root or with Delegate=yes)"
            if spec.memory_limit is not None:
                notes.append(f"memory_limit = {spec.memory_limit} is not enforced: {why}")
            if spec.cpu_quota is not None:
                notes.append(f"cpu_quota = {spec.cpu_quota:g} is not enforced: {why}")
            return None, ResourceReport(None, spec.open_files, False, False, tuple(notes))
        controllers = self.controllers
        self._seq += 1
        cgroup = self.cgroup_root / f"{spec.name}.{os.getpid()}.{self._seq}"
        try:
            cgroup.mkdir()
        except OSError as exc:
            notes.append(
                f"no cgroup ({cgroup}: {exc.strerror}); memory and CPU limits are not enforced"
            )
            return None, ResourceReport(None, spec.open_files, False, False, tuple(notes))
        if spec.memory_limit is not None:
            if "memory" in controllers:
                try:
                    (cgroup / "memory.max").write_text(str(spec.memory_limit))
                    memory_ok = True
                    # An OOM kill takes the whole component down, not one of its processes.
                    with contextlib.suppress(OSError):
                        (cgroup / "memory.oom.group").write_text("1")
                except OSError as exc:
                    notes.append(
                        f"memory_limit not enforced: writing {cgroup}/memory.max: {exc.strerror}"
                    )
            else:
                notes.append(
                    f"memory_limit not enforced: the memory controller is not enabled in {self.cgroup_root}"
                )
        if spec.cpu_quota is not None:
            if "cpu" in controllers:
                quota = max(1000, round(spec.cpu_quota * CPU_PERIOD))
                try:
                    (cgroup / "cpu.max").write_text(f"{quota} {CPU_PERIOD}")
                    cpu_ok = True
                except OSError as exc:
                    notes.append(
                        f"cpu_quota not enforced: writing {cgroup}/cpu.max: {exc.strerror}"
                    )
            else:
                notes.append(
                    f"cpu_quota not enforced: the cpu controller is not enabled in {self.cgroup_root}"
                )
        return cgroup, ResourceReport(cgroup, spec.open_files, memory_ok, cpu_ok, tuple(notes))

    def _limit_steps(self, spec: SpawnSpec) -> list[tuple[str, Callable[[], None]]]:
        """The in-child steps for rlimit, capabilities, user and no_new_privs, in that order.

        The order matters: raising RLIMIT_NOFILE and dropping the bounding set need
        privileges that switching to another user takes away.
        """
        name = spec.name
        steps: list[tuple[str, Callable[[], None]]] = []
        root = os.geteuid() == 0
        if spec.open_files is not None:
            n = spec.open_files
            if n < 1:
                raise ProcessError(f"{name}: open_files must be at least 1, got {n}")
            _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            if not root and hard != resource.RLIM_INFINITY and n > hard:
                raise ProcessError(
                    f"{name}: open_files = {n} exceeds the agent's hard limit {hard}; "
                    "lower it or run the agent as root"
                )
            steps.append(
                (
                    f"setting RLIMIT_NOFILE to {n}",
                    lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (n, n)),
                )
            )
        ident: _Identity | None = None
        if spec.user:
            try:
                ident = _resolve_user(spec.user)
            except ValueError as exc:
                raise ProcessError(f"{name}: security.user = {spec.user!r}: {exc}") from None
            if not root:
                if ident.uid != os.geteuid() or ident.gid != os.getegid():
                    raise ProcessError(
                        f"{name}: security.user = {spec.user!r} needs the agent to run as root "
                        f"(it runs as uid {os.geteuid()}); remove it or run the agent as root"
                    )
                ident = None  # already that user
        caps: frozenset[int] | None = None
        if spec.capabilities is not None:
            numbers: dict[str, int] = {}
            for cap_name in spec.capabilities:
                number = capability_number(cap_name)
                if number is None:
                    raise ProcessError(
                        f"{name}: unknown capability {cap_name!r} (expected e.g. CAP_NET_BIND_SERVICE)"
                    )
                numbers[cap_name] = number
            caps = frozenset(numbers.values())
            last = _cap_last_cap()
            if any(c > last for c in caps):
                raise ProcessError(
                    f"{name}: capabilities {sorted(numbers)}: this kernel knows none above {last}"
                )
            if not root and caps:
                raise ProcessError(
                    f"{name}: capabilities {sorted(numbers)} need the agent to run as root; "
                    "remove them or run the agent as root"
                )
        libc = _Libc.get() if caps is not None or spec.no_new_privileges else None
        if caps is not None and libc is not None and root:
            for number in range(_cap_last_cap() + 1):
                if number not in caps:
                    steps.append(
                        (
                            f"dropping {_cap_name(number)} from the bounding set",
                            libc.prctl_call(PR_CAPBSET_DROP, number),
                        )
                    )
            if ident is not None and caps:
                steps.append(
                    (
                        "keeping capabilities across the user switch",
                        libc.prctl_call(PR_SET_KEEPCAPS, 1),
                    )
                )
        if ident is not None:
            uid, gid, groups = ident.uid, ident.gid, list(ident.groups)
            steps.append((f"setting supplementary groups {groups}", lambda: os.setgroups(groups)))
            steps.append((f"switching to gid {gid}", lambda: os.setresgid(gid, gid, gid)))
            steps.append((f"switching to uid {uid}", lambda: os.setresuid(uid, uid, uid)))
        if caps is not None and libc is not None:
            steps.append(("setting capabilities", libc.capset_call(caps)))
            steps.append(
                (
                    "clearing ambient capabilities",
                    libc.prctl_call(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL),
                )
            )
            for number in sorted(caps):
                # Ambient capabilities are what survives exec for a non-root user.
                steps.append(
                    (
                        f"raising ambient {_cap_name(number)}",
                        libc.prctl_call(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, number),
                    )
                )
        if spec.no_new_privileges and libc is not None:
            steps.append(("setting no_new_privs", libc.prctl_call(PR_SET_NO_NEW_PRIVS, 1)))
        return steps

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
        return read_start_ticks(handle.pid) == handle.start_ticks and _live(
            _stat_fields(handle.pid)
        )

    def signal(self, handle: ProcessHandle, sig: int, *, group: bool = True) -> None:
        """Send ``sig`` to the process group (default) or to the process alone.

        Raises:
            ProcessError: nothing of the process (group) is running any more.
        """
        if group:
            if not pgid_members(handle.pgid):
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
        if (watch is not None and not watch.done) or pgid_members(handle.pgid):
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
        if pgid_members(handle.pgid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(handle.pgid, signal.SIGKILL)
        if handle.cgroup is not None:
            _kill_cgroup(handle.cgroup)
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
        _remove_cgroup(handle.cgroup)

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
            members = set(pgid_members(handle.pgid))
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

        Raises:
            ProcessError: the command could not be started (not found, not executable).
        """
        loop = self._bind()
        if not argv or not argv[0]:
            raise ProcessError("cannot run an empty command")
        label = os.path.basename(argv[0]) or argv[0]
        started = loop.time()
        deadline = started + max(0.0, timeout)
        io = _PipeIO(loop, max_output)
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
            try:
                proc = _Popen(
                    list(argv),
                    cwd=cwd,
                    env=dict(env),
                    stdin=stdin_fd,
                    stdout=out_fd,
                    stderr=err_fd,
                    close_fds=True,
                    start_new_session=True,
                )
            except (OSError, ValueError, subprocess.SubprocessError) as exc:
                raise ProcessError(_spawn_failure(label, argv[0], cwd, env, exc, "")) from exc
            finally:
                for fd in child:
                    os.close(fd)
                child.clear()
            pid = proc.pid
            handle = ProcessHandle(label, pid, pid, read_start_ticks(pid) or 0, None)
            watch = _Watch(handle, _pidfd_or_kill(label, pid), child=True, grace=None, report=None)
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
            if not watch.done or pgid_members(pid):
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
        for task in list(self._tasks):
            task.cancel()

    def _leftovers(self, handle: ProcessHandle) -> bool:
        if pgid_members(handle.pgid):
            return True
        return handle.cgroup is not None and bool(cgroup_members(handle.cgroup))


# --- helpers --------------------------------------------------------------------------------


def _pidfd_or_kill(name: str, pid: int) -> int:
    """A pidfd for a child just started; if none can be had, kill and reap it and raise."""
    try:
        return os.pidfd_open(pid)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.killpg(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
        raise ProcessError(
            f"{name}: cannot watch pid {pid} ({exc.strerror}); it was killed"
        ) from exc


def _write_all(fd: int, data: bytes) -> None:
    os.write(fd, data)


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


class _PipeIO:
    """Feeds stdin and collects stdout/stderr of one command with loop readers and writers.

    Owns the parent's ends of the pipes it creates and closes each one exactly once.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, cap: int) -> None:
        self.loop = loop
        self.cap = max(0, cap)
        self.truncated = False
        self._out = bytearray()
        self._err = bytearray()
        self._owned: set[int] = set()
        self._readers: dict[int, Callable[[], None]] = {}
        self._eof: asyncio.Future[None] = loop.create_future()

    @property
    def stdout(self) -> bytes:
        return bytes(self._out)

    @property
    def stderr(self) -> bytes:
        return bytes(self._err[-self.cap :]) if self.cap else b""

    def pipe(self, *, child_end: str) -> tuple[int, int]:
        """A CLOEXEC pipe ``(read, write)``; the end not given to the child is owned here."""
        r, w = os.pipe2(os.O_CLOEXEC)
        self._owned.add(w if child_end == "read" else r)
        return r, w

    def _release(self, fd: int) -> None:
        if fd in self._owned:
            self._owned.discard(fd)
            if not self.loop.is_closed():
                self.loop.remove_reader(fd)
                self.loop.remove_writer(fd)
            os.close(fd)

    def feed(self, fd: int, data: bytes) -> None:
        """Write ``data`` to ``fd`` as the child reads it, then close it (the child sees EOF)."""
        os.set_blocking(fd, False)
        view = memoryview(data)
        offset = 0

        def write() -> None:
            nonlocal offset
            try:
                offset += os.write(fd, view[offset : offset + 65536])
            except BlockingIOError:
                return
            except OSError:  # EPIPE: the command does not read (all of) its input
                offset = len(view)
            if offset >= len(view):
                self._release(fd)

        if not view:
            self._release(fd)
            return
        self.loop.add_writer(fd, write)

    def collect(self, fd: int, *, keep: str) -> None:
        """Read ``fd`` until EOF into stdout (``keep="head"``) or stderr (``keep="tail"``)."""
        os.set_blocking(fd, False)
        buf = self._out if keep == "head" else self._err

        def read() -> None:
            while True:
                try:
                    chunk = os.read(fd, 65536)
                except BlockingIOError:
                    return
                except OSError:
                    chunk = b""
                if not chunk:
                    self._readers.pop(fd, None)
                    self._release(fd)
                    if not self._readers and not self._eof.done():
                        self._eof.set_result(None)
                    return
                if keep == "head":
                    room = self.cap - len(buf)
                    if len(chunk) > room:
                        self.truncated = True
                    buf.extend(chunk[: max(0, room)])
                else:
                    buf.extend(chunk)
                    if len(buf) > 2 * self.cap:
                        del buf[: len(buf) - self.cap]
                if len(chunk) < 65536:
                    return

        self._readers[fd] = read
        self.loop.add_reader(fd, read)

    async def drain(self, timeout: float) -> None:
        """Read until every pipe reports EOF or ``timeout`` passes, then take what is buffered."""
        if self._readers and timeout > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._eof), timeout)
        for read in list(self._readers.values()):
            read()  # non-blocking: whatever a lingering writer already put in the pipe

    def close(self) -> None:
        for fd in list(self._owned):
            self._release(fd)
        self._readers.clear()


def _spawn_failure(
    name: str, command: str, cwd: Path, env: Mapping[str, str], exc: BaseException, detail: str
) -> str:
    """A message saying which command could not start, where, and what to check."""
    where = f"(in {cwd})" if "/" in command else f"(searched PATH={env.get('PATH', os.defpath)})"
    if isinstance(exc, OSError):
        if (
            isinstance(exc, FileNotFoundError)
            and exc.filename is not None
            and str(exc.filename) == str(cwd)
        ):
            return f"{name}: working directory does not exist: {cwd}"
        if isinstance(exc, FileNotFoundError):
            target = cwd / command if "/" in command else None
            if target is not None and target.exists():
                return (
                    f"{name}: cannot execute {command} {where}: its interpreter was not found "
                    "(check the #! line)"
                )
            return f"{name}: command not found: {command} {where}"
        if isinstance(exc, PermissionError):
            return (
                f"{name}: permission denied executing {command} {where}: make it executable "
                "(chmod +x) on a filesystem not mounted noexec"
            )
        if exc.errno == errno.ENOEXEC:
            return (
                f"{name}: {command} {where} is not an executable format (a script needs a #! line)"
            )
        return f"{name}: cannot start {command} {where}: {exc.strerror or exc}"
    if isinstance(exc, ValueError):
        return f"{name}: cannot start {command}: invalid command or environment: {exc}"
    return f"{name}: could not prepare the process before starting {command}: {detail or exc}"
