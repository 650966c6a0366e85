"""A runner that starts nothing: handles are numbers, exits happen when a test says so."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from keystone.errors import ProcessError
from keystone.runtime.runner import RunnerRecord, record_json, record_kind
from keystone.runtime.spawn import OUTPUT_CAP, RunResult, SpawnSpec

FAKE_KIND = "fake"


@dataclass(frozen=True)
class FakeHandle:
    """A pretend process."""

    name: str
    pid: int


@dataclass(frozen=True)
class FakeRecord:
    """The snapshot entry of a pretend process."""

    pid: int

    @property
    def kind(self) -> str:
        return FAKE_KIND

    def to_json(self) -> dict[str, object]:
        return {"runner": FAKE_KIND, "pid": self.pid}


@dataclass
class FakeRunner:
    """Records what a supervisor asks for; one-shot commands answer from ``codes``.

    ``codes`` maps the last argument of a command (the shell script) to its exit status; the
    health check's status is ``probe_status``. A test ends a process with :meth:`exit`.
    """

    codes: dict[str, int] = field(default_factory=dict)
    probe: str = "probe"
    probe_status: int = 0
    spawn_error: str | None = None
    spawned: list[SpawnSpec] = field(default_factory=list)
    commands: list[tuple[str, Mapping[str, str], float]] = field(default_factory=list)
    stops: list[tuple[int, float]] = field(default_factory=list)
    signals: list[tuple[int, int, bool]] = field(default_factory=list)
    _next_pid: int = 100
    _status: dict[int, int | None] = field(default_factory=dict)
    _waiters: dict[int, list[asyncio.Future[int | None]]] = field(default_factory=dict)

    def _new(self, name: str, pid: int | None = None) -> FakeHandle:
        if pid is None:
            self._next_pid += 1
            pid = self._next_pid
        self._waiters[pid] = []
        return FakeHandle(name, pid)

    # --- the Runner protocol ------------------------------------------------------------------

    async def spawn(self, spec: SpawnSpec) -> FakeHandle:
        if self.spawn_error is not None:
            raise ProcessError(f"{spec.name}: {self.spawn_error}")
        self.spawned.append(spec)
        return self._new(spec.name)

    def exited(self, handle: FakeHandle) -> asyncio.Future[int | None]:
        fut: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()
        if handle.pid in self._status:
            fut.set_result(self._status[handle.pid])
        else:
            self._waiters[handle.pid].append(fut)
        return fut

    def alive(self, handle: FakeHandle) -> bool:
        return handle.pid not in self._status

    def signal(self, handle: FakeHandle, sig: int, *, group: bool = True) -> None:
        self.signals.append((handle.pid, sig, group))

    async def stop(self, handle: FakeHandle, *, timeout: float) -> int | None:
        self.stops.append((handle.pid, timeout))
        if self.alive(handle):
            self.exit(handle, -15)
        return self._status[handle.pid]

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
        security: object = None,
    ) -> RunResult:
        script = argv[-1]
        self.commands.append((script, dict(env), timeout))
        code = self.probe_status if script == self.probe else self.codes.get(script, 0)
        return RunResult(returncode=code, stdout=b"", timed_out=False, duration=0.0)

    def describe(self, handle: FakeHandle) -> FakeRecord:
        return FakeRecord(handle.pid)

    def adopt_record(
        self, name: str, record: RunnerRecord | Mapping[str, object]
    ) -> FakeHandle | None:
        data = record_json(record)
        pid = data.get("pid")
        if record_kind(data) != FAKE_KIND or not isinstance(pid, int):
            return None
        return self._new(name, pid)

    # --- for tests ----------------------------------------------------------------------------

    def exit(self, handle: FakeHandle, status: int | None) -> None:
        """The pretend process ends with ``status``."""
        self._status[handle.pid] = status
        for fut in self._waiters.pop(handle.pid, []):
            if not fut.done():
                fut.set_result(status)

    @property
    def health_checks(self) -> int:
        """How many health probes ran."""
        return sum(1 for script, _, _ in self.commands if script == self.probe)
