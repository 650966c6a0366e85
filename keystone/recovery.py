"""Starting again after a crash or damaged state: what runs, and which revision to trust.

The agent's own records can be lost or stale (a SIGKILL, a power cut, a restored backup); two
things survive them and are trusted instead:

* **The mirror's anti-rollback anchor** (``refs/keystone/applied`` in ``runtime/repo``), written
  after every applied revision. :func:`read_anchor` reads it without loading git; the node has
  it verified by the sync worker and, when it is a verified descendant of what the snapshot
  says was applied, it wins: the older revision is never started again.
* **The processes themselves**: every component process carries ``KEYSTONE_COMPONENT``,
  ``KEYSTONE_INSTANCE`` and ``KEYSTONE_WORKDIR`` and has a marker in its work dir
  (:mod:`keystone.runtime.markers`). :class:`Sweep` finds every live one that nobody adopted and
  either adopts it (a marker with the name and hash of the plan to run) or stops it (SIGTERM to
  its process group, its stop timeout, then SIGKILL). Pids are checked against their start time
  (``/proc/<pid>/stat``) before anything is signalled, so a recycled pid is never touched.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from loguru import logger

from keystone.dag import build_graph
from keystone.errors import KeystoneError
from keystone.plan import Component, DesiredPlan
from keystone.recipe import DependencyType
from keystone.runtime.markers import LiveProcess, Marker, read_markers, scan_processes
from keystone.runtime.process import ProcessHandle, ProcessRunner, cgroup2_mount

ANCHOR_REF = "refs/keystone/applied"
_HEX40 = re.compile(r"[0-9a-f]{40}")
_MAX_REF_BYTES = 1 << 20


def read_anchor(repo: Path, name: str = ANCHOR_REF) -> str | None:
    """The commit a ref of the bare mirror at ``repo`` names (loose or packed); None if absent.

    A ref that does not hold a commit id is treated as absent (and said so).
    """
    loose = repo / name
    try:
        text = loose.read_bytes()[:_MAX_REF_BYTES].decode("ascii", "replace").strip()
    except FileNotFoundError:
        text = ""
    except OSError as exc:
        logger.warning("cannot read {}: {}", loose, exc)
        return None
    if text:
        if _HEX40.fullmatch(text):
            return text
        logger.warning("{} does not hold a commit id; ignoring the mirror's anchor", loose)
        return None
    try:
        packed = (repo / "packed-refs").read_bytes()[:_MAX_REF_BYTES]
    except OSError:
        return None
    for line in packed.decode("ascii", "replace").splitlines():
        sha, _, ref = line.partition(" ")
        if ref.strip() == name and _HEX40.fullmatch(sha):
            return sha
    return None


def closed_subset(plan: DesiredPlan, names: Iterable[str]) -> DesiredPlan:
    """The part of ``plan`` made of ``names`` whose hard and ordering dependencies are in it too.

    What can be kept running while the rest of ``plan`` is deployed: a component whose
    dependency is not kept would run before that dependency is ready.
    """
    want = set(names)
    kept: dict[str, Component] = {}
    for layer in plan.graph.layers:
        for name in layer:
            if name not in want:
                continue
            deps = [
                e.dependency
                for e in plan.graph.dependencies(name)
                if e.type is not DependencyType.SOFT
            ]
            if all(d in kept for d in deps):
                kept[name] = plan.components[name]
    try:
        graph = build_graph({n: c.recipe for n, c in kept.items()})
    except KeystoneError:
        return DesiredPlan.empty()
    return DesiredPlan(kept, graph, plan.sources)


@dataclass
class Stray:
    """One process group to stop: what it is, and how long it may take to stop."""

    name: str
    handle: ProcessHandle
    timeout: float
    why: str


@dataclass
class Sweep:
    """The component processes found alive at start, sorted into adopted and to stop."""

    runner: ProcessRunner
    components_dir: Path
    markers: dict[str, Marker] = field(default_factory=dict)
    live: list[LiveProcess] = field(default_factory=list)

    def collect(self) -> None:
        """Read the markers and scan ``/proc`` once."""
        self.markers = read_markers(self.components_dir)
        self.live = scan_processes(self.components_dir)

    def cgroup_of(self, pid: int) -> Path | None:
        """The spawn cgroup of ``pid`` when it lies under the runner's cgroup root.

        Stopping through it also kills what left the process group (and cleared its
        environment), and removes the cgroup.
        """
        root = self.runner.cgroup_root
        mount = cgroup2_mount() if root is not None else None
        if root is None or mount is None:
            return None
        try:
            lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
        except OSError:
            return None
        for line in lines:
            if line.startswith("0::"):
                path = mount / line[3:].lstrip("/")
                if path.parent == root:
                    return path
        return None

    def ours(self, pid: int) -> bool:
        """``pid`` was started by an agent of this runtime (its environment or a marker says so)."""
        return any(p.pid == pid for p in self.live) or self.marker_of(pid) is not None

    def marker_of(self, pid: int) -> Marker | None:
        for m in self.markers.values():
            if m.pid == pid:
                return m
        return None

    def instance_of(self, pgid: int) -> str | None:
        """The ``KEYSTONE_INSTANCE`` of the process group ``pgid`` (its leader's first)."""
        for p in sorted(self.live, key=lambda p: p.pid != pgid):
            if p.pgid == pgid and p.instance:
                return p.instance
        return None

    def candidates(
        self, known_pgids: set[int], plan: DesiredPlan, taken: Iterable[str]
    ) -> tuple[dict[str, tuple[ProcessHandle, str]], list[Stray]]:
        """Split the groups nobody owns yet into adoptable (by marker) and strays.

        A group is adoptable when its marker names a component of ``plan`` with the same
        content hash, that component is not ``taken`` already, and the marker's pid is alive
        with its recorded start time. Everything else is a stray.
        """
        taken = set(taken)
        groups: dict[int, list[LiveProcess]] = {}
        for p in self.live:
            if p.pgid not in known_pgids:
                groups.setdefault(p.pgid, []).append(p)
        adopt: dict[str, tuple[ProcessHandle, str]] = {}
        strays: list[Stray] = []
        for pgid, members in sorted(groups.items()):
            members.sort(key=lambda p: p.pid != pgid)  # the group leader first
            lead = members[0]
            marker = self.markers.get(lead.instance or "")
            comp = plan.components.get(marker.component) if marker is not None else None
            if (
                marker is not None
                and comp is not None
                and comp.content_hash() == marker.hash
                and marker.component not in taken
                and marker.component not in adopt
                and marker.record.get("pgid") == pgid
            ):
                handle = self.runner.adopt_record(marker.component, marker.record)
                if handle is not None:
                    adopt[marker.component] = (handle, marker.instance)
                    continue
            cgroup = self.cgroup_of(lead.pid)
            handle = self.runner.adopt(lead.component, lead.pid, pgid, lead.start_ticks, cgroup)
            if handle is None:
                continue  # gone (or its pid reused) since the scan: nothing to stop
            if lead.instance is None:
                why = "a command left running by the previous agent"
            elif marker is None:
                why = "started by the previous agent, no marker"
            elif comp is None:
                why = f"{marker.component} {marker.version} is not in the plan to run"
            elif comp.content_hash() != marker.hash:
                why = f"{marker.component} {marker.version} is not the version of the plan to run"
            else:
                why = f"a second {marker.component} process"
            timeout = marker.stop_timeout if marker is not None else 10.0
            strays.append(Stray(lead.component or "?", handle, timeout, why))
        return adopt, strays


async def stop_all(runner: ProcessRunner, strays: list[Stray]) -> None:
    """Stop every stray together and wait until all are gone (errors are logged)."""

    async def one(s: Stray) -> None:
        logger.warning(
            "stopping {} (pid {}, process group {}): {}",
            s.name,
            s.handle.pid,
            s.handle.pgid,
            s.why,
        )
        try:
            await runner.stop(s.handle, timeout=s.timeout)
        except KeystoneError as exc:
            logger.error("{}", exc)

    await asyncio.gather(*(one(s) for s in strays))


def process_pgids(handles: Mapping[str, object]) -> set[int]:
    """The process groups of the handles that are process handles."""
    return {h.pgid for h in handles.values() if isinstance(h, ProcessHandle)}
