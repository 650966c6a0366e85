"""cgroup v2: finding a writable root, one cgroup per spawn with its limits, kill and clean-up.

``memory_limit`` and ``cpu_quota`` are cgroup v2 ``memory.max`` and ``cpu.max`` in a per-spawn
cgroup under a writable (delegated) cgroup root. Without one they are *not* enforced and the runner
says so (a log line, ``ProcessRunner.cgroups_enabled``, :class:`ResourceReport`). ``RLIMIT_AS`` is
deliberately not used instead: it caps virtual address space, not memory use, and runtimes that
reserve large address ranges up front (Go, the JVM, glibc malloc arenas per thread, sanitizers)
fail to start or crash at random under it while a small RLIMIT_AS still lets a process touch all
the memory it maps. A spawn's cgroup also holds the grandchildren that left its process group, so
killing the cgroup kills the whole tree.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from loguru import logger

from keystone.runtime.procfs import pid_alive
from keystone.runtime.spawn import SpawnSpec

#: The cgroup v2 controllers the runner enables under its root when it can.
CONTROLLERS = ("cpu", "memory", "pids")
#: cpu.max period in microseconds (the kernel's default).
CPU_PERIOD = 100_000


@dataclass(frozen=True)
class ResourceReport:
    """Which of a spawn's resource limits are really enforced, and why not."""

    cgroup: Path | None
    open_files: int | None
    memory_enforced: bool
    cpu_enforced: bool
    notes: tuple[str, ...] = ()


def cgroup_members(cgroup: Path) -> list[int]:
    """Pids of the live processes in a cgroup v2 directory (empty when it is gone)."""
    try:
        text = (cgroup / "cgroup.procs").read_text()
    except OSError:
        return []
    return sorted(p for p in map(int, text.split()) if pid_alive(p))


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


def enable_controllers(cgroup: Path) -> frozenset[str]:
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
        if available - enable_controllers(own_dir) and own_dir != mount:
            members = (own_dir / "cgroup.procs").read_text().split()
            if members == [str(os.getpid())]:
                leaf = own_dir / "keystone-agent"
                leaf.mkdir(exist_ok=True)
                (leaf / "cgroup.procs").write_text(str(os.getpid()))
                enable_controllers(own_dir)
    except OSError as exc:
        logger.warning("cgroup v2 at {} is not usable: {}", own_dir, exc)
        return None
    return root


def kill_cgroup(cgroup: Path) -> None:
    """SIGKILL every process in ``cgroup`` (``cgroup.kill``, or one by one on older kernels)."""
    kill = cgroup / "cgroup.kill"
    if kill.exists():
        with contextlib.suppress(OSError):
            kill.write_text("1")
            return
    for pid in cgroup_members(cgroup):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


def remove_cgroup(cgroup: Path | None) -> bool:
    """Remove an empty spawn cgroup (and empty cgroups a component made inside it).

    Returns:
        True when it is gone; False when it still has members (the caller tries again).
    """
    if cgroup is None:
        return True
    try:
        children = [p for p in cgroup.iterdir() if p.is_dir()]
    except FileNotFoundError:
        return True
    except OSError:
        children = []
    for child in children:
        remove_cgroup(child)
    try:
        cgroup.rmdir()
    except FileNotFoundError:
        pass
    except OSError as exc:
        logger.debug("cgroup {} not removed yet: {}", cgroup, exc)
        return False
    return True


def _owner_pid(cgroup: Path) -> int | None:
    """The agent pid in a spawn cgroup's name (``<component>.<agent pid>.<seq>``)."""
    parts = cgroup.name.rsplit(".", 2)
    if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
        return int(parts[1])
    return None


def remove_stale_cgroups(root: Path) -> int:
    """Remove the empty spawn cgroups under ``root`` left by agents that are gone (a crash,
    a power cut); return how many. A cgroup with live members (a component to adopt) stays,
    and so does every cgroup of an agent that still runs (it may be about to use it)."""
    removed = 0
    try:
        entries = [p for p in root.iterdir() if p.is_dir()]
    except OSError:
        return 0
    for cgroup in entries:
        owner = _owner_pid(cgroup)
        if owner is None or (owner != os.getpid() and pid_alive(owner)):
            continue
        if cgroup_members(cgroup):
            continue
        if remove_cgroup(cgroup):
            removed += 1
    return removed


def make_cgroup(
    root: Path | None, controllers: frozenset[str], spec: SpawnSpec, seq: int
) -> tuple[Path | None, ResourceReport]:
    """Create the cgroup of one spawn under ``root`` and write its limits; say what is enforced.

    Args:
        root: the runner's cgroup root (None: no cgroups, nothing enforced).
        controllers: the controllers enabled for ``root``'s children.
        spec: the spawn, for its name and limits.
        seq: the runner's spawn counter, which makes the cgroup's name unique.
    """
    notes: list[str] = []
    memory_ok = cpu_ok = False
    cgroup: Path | None = None
    if root is None:
        why = "no writable cgroup v2 hierarchy (run the agent as root or with Delegate=yes)"
        if spec.memory_limit is not None:
            notes.append(f"memory_limit = {spec.memory_limit} is not enforced: {why}")
        if spec.cpu_quota is not None:
            notes.append(f"cpu_quota = {spec.cpu_quota:g} is not enforced: {why}")
        return None, ResourceReport(None, spec.open_files, False, False, tuple(notes))
    cgroup = root / f"{spec.name}.{os.getpid()}.{seq}"
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
                f"memory_limit not enforced: the memory controller is not enabled in {root}"
            )
    if spec.cpu_quota is not None:
        if "cpu" in controllers:
            quota = max(1000, round(spec.cpu_quota * CPU_PERIOD))
            try:
                (cgroup / "cpu.max").write_text(f"{quota} {CPU_PERIOD}")
                cpu_ok = True
            except OSError as exc:
                notes.append(f"cpu_quota not enforced: writing {cgroup}/cpu.max: {exc.strerror}")
        else:
            notes.append(f"cpu_quota not enforced: the cpu controller is not enabled in {root}")
    return cgroup, ResourceReport(cgroup, spec.open_files, memory_ok, cpu_ok, tuple(notes))
