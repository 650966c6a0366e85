"""Per-process markers: what the agent started survives the agent, so it is found again.

Every component process the agent spawns gets an instance id (``KEYSTONE_INSTANCE`` in its
environment, beside ``KEYSTONE_COMPONENT`` and ``KEYSTONE_WORKDIR``) and a marker in its work dir,
``.keystone-process-<instance>.json``: the runner's record (pid, process group, start time from
``/proc/<pid>/stat``, cgroup), the component's name, version and content hash, and its stop
timeout. A clean stop removes it. After a crash the next agent finds the markers and, with
:func:`scan_processes`, every live process whose environment says it is one of this runtime's
components, so nothing it started is left running unmanaged: each is adopted (same name and hash
as the plan to run) or stopped (see :mod:`keystone.recovery`).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from loguru import logger

from keystone.openssl import token_hex
from keystone.state import atomic_write
from keystone.statefile import StateDamage, integer, number, obj, read_state, string, version

MARKER_PREFIX = ".keystone-process-"
MARKER_VERSION = 1
INSTANCE_ENV = "KEYSTONE_INSTANCE"
COMPONENT_ENV = "KEYSTONE_COMPONENT"
WORKDIR_ENV = "KEYSTONE_WORKDIR"
VERSION_ENV = "KEYSTONE_VERSION"
_ENVIRON_CAP = 1 << 20


def new_instance() -> str:
    """A fresh instance id (16 hex digits)."""
    return token_hex(8)


@dataclass(frozen=True)
class Marker:
    """One marker file: which process runs which component."""

    path: Path
    instance: str
    component: str
    version: str
    hash: str
    record: Mapping[str, object]
    stop_timeout: float
    started: float

    @property
    def pid(self) -> int:
        pid = self.record.get("pid")
        return pid if isinstance(pid, int) else 0

    def to_json(self) -> dict[str, Any]:
        return {
            "version": MARKER_VERSION,
            "instance": self.instance,
            "component": self.component,
            "component_version": self.version,
            "hash": self.hash,
            "record": dict(self.record),
            "stop_timeout": self.stop_timeout,
            "started": self.started,
        }

    @classmethod
    def parse(cls, path: Path, doc: Any) -> Marker:
        """Raises StateDamage naming the field."""
        doc = obj(doc, path.name)
        version(doc, path.name, MARKER_VERSION)
        record = obj(doc.get("record"), "record")
        for key in ("pid", "pgid", "start_ticks"):
            if key in record and integer(record.get(key), f"record.{key}") < 0:
                raise StateDamage(f"record.{key}: expected a non-negative integer")
        return cls(
            path=path,
            instance=string(doc.get("instance"), "instance"),
            component=string(doc.get("component"), "component"),
            version=string(doc.get("component_version"), "component_version", optional=True),
            hash=string(doc.get("hash"), "hash"),
            record=record,
            stop_timeout=number(doc.get("stop_timeout"), "stop_timeout", default=10.0),
            started=number(doc.get("started"), "started", default=0.0),
        )


def marker_path(workdir: Path, instance: str) -> Path:
    return workdir / f"{MARKER_PREFIX}{instance}.json"


def write_marker(
    workdir: Path,
    instance: str,
    *,
    component: str,
    version: str,
    hash: str,
    record: Mapping[str, object],
    stop_timeout: float,
) -> Path:
    """Write the marker of a process just spawned (a failure is logged, never fatal)."""
    path = marker_path(workdir, instance)
    m = Marker(path, instance, component, version, hash, record, stop_timeout, time.time())
    try:
        atomic_write(path, (json.dumps(m.to_json(), sort_keys=True) + "\n").encode())
    except OSError as exc:
        logger.warning("{}: cannot write its process marker {}: {}", component, path, exc)
    return path


def remove_marker(workdir: Path, instance: str | None) -> None:
    """Forget the marker of a process that was stopped (or is gone)."""
    if not instance:
        return
    try:
        marker_path(workdir, instance).unlink(missing_ok=True)
    except OSError as exc:
        logger.warning("cannot remove process marker in {}: {}", workdir, exc)


def read_markers(components_dir: Path) -> dict[str, Marker]:
    """Every marker under ``components/<name>/<version>/``, by instance (damaged ones set aside)."""
    out: dict[str, Marker] = {}
    try:
        names = list(components_dir.iterdir())
    except OSError:
        return out
    for comp in names:
        try:
            versions = list(comp.iterdir()) if comp.is_dir() else []
        except OSError:
            continue
        for vdir in versions:
            for path in _marker_files(vdir):
                m = read_state(path, partial(Marker.parse, path), name="marker")
                if m is not None:
                    out[m.instance] = m
    return out


def _marker_files(vdir: Path) -> Iterator[Path]:
    try:
        with os.scandir(vdir) as entries:
            for e in entries:
                if (
                    e.name.startswith(MARKER_PREFIX)
                    and e.name.endswith(".json")
                    and e.is_file(follow_symlinks=False)
                ):
                    yield Path(e.path)
    except OSError:
        return


@dataclass(frozen=True)
class LiveProcess:
    """A live process whose environment names it as one of this runtime's components."""

    pid: int
    pgid: int
    start_ticks: int
    component: str
    version: str
    instance: str | None
    """None for a one-shot (install, shutdown or health check command) of an earlier agent."""
    workdir: str


def read_environ(pid: int) -> dict[str, str] | None:
    """The environment ``pid`` was started with (None when unreadable or gone)."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            data = f.read(_ENVIRON_CAP)
    except OSError:
        return None
    env: dict[str, str] = {}
    for item in data.split(b"\0"):
        key, sep, value = item.partition(b"=")
        if sep and key.startswith(b"KEYSTONE_"):
            env[key.decode("ascii", "replace")] = value.decode("utf-8", "replace")
    return env


def scan_processes(components_dir: Path) -> list[LiveProcess]:
    """Every live process (not this one) started for a component under ``components_dir``.

    Reads ``/proc/*/environ`` once (processes of other users are skipped unless the agent is
    root): a process is one of ours when its ``KEYSTONE_WORKDIR`` lies under
    ``components_dir``.
    """
    # lazy: the /proc readers of the runtime, already loaded by the runner
    from keystone.runtime.procfs import is_live, stat_fields

    root = str(components_dir.resolve()) + os.sep
    me = os.getpid()
    found: list[LiveProcess] = []
    try:
        entries = [e.name for e in os.scandir("/proc") if e.name.isdigit()]
    except OSError:
        return found
    for name in entries:
        pid = int(name)
        if pid == me:
            continue
        env = read_environ(pid)
        if not env:
            continue
        workdir = env.get(WORKDIR_ENV, "")
        if not workdir.startswith(root) or COMPONENT_ENV not in env:
            continue
        fields = stat_fields(pid)
        if not is_live(fields) or fields is None or len(fields) < 20:
            continue
        found.append(
            LiveProcess(
                pid=pid,
                pgid=int(fields[2]),
                start_ticks=int(fields[19]),
                component=env.get(COMPONENT_ENV, ""),
                version=env.get(VERSION_ENV, ""),
                instance=env.get(INSTANCE_ENV) or None,
                workdir=workdir,
            )
        )
    return found
