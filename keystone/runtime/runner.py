"""The Runner seam: what a supervisor needs from whatever runs a component.

A :class:`Runner` starts a component from a :class:`~keystone.runtime.spawn.SpawnSpec`, observes
its exit, signals and stops it (TERM, a grace period, KILL of everything it started), runs
one-shot commands (install, shutdown and reload scripts, ``cmd:`` health checks), and describes a
running component as a :class:`RunnerRecord` for the agent's snapshot, so that the next agent can
adopt it. :class:`~keystone.runtime.process.ProcessRunner` is the first implementation; a new
runner (a container runtime, say) implements the same methods with its own handle and record
types and picks its own ``kind``.

Snapshot entries carry the kind under ``"runner"``; entries written before runners had kinds
carry none and are process entries (:func:`record_kind`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar

from keystone.runtime.spawn import OUTPUT_CAP, RunResult, RunSecurity, SpawnSpec

#: The key of a snapshot entry that names the runner kind that wrote it.
KIND_KEY = "runner"
#: The kind of entries written before the key existed.
LEGACY_KIND = "process"


class RunnerHandle(Protocol):
    """A running component as its runner knows it; only the runner looks inside."""

    @property
    def name(self) -> str:
        """The component's name, used in every message."""
        ...

    @property
    def pid(self) -> int:
        """The process id the operator sees (``/v1/components``, ``KEYSTONE_PID``)."""
        ...


class RunnerRecord(Protocol):
    """What the snapshot keeps of a running component to adopt it after an agent restart."""

    @property
    def kind(self) -> str:
        """The runner kind, written under :data:`KIND_KEY`."""
        ...

    def to_json(self) -> dict[str, object]:
        """The snapshot entry (JSON-able), including ``{KIND_KEY: kind}``."""
        ...


def record_kind(data: Mapping[str, object]) -> str:
    """The runner kind of a snapshot entry; an entry without one is a process entry."""
    kind = data.get(KIND_KEY)
    return kind if isinstance(kind, str) and kind else LEGACY_KIND


def record_ints(
    data: Mapping[str, object], keys: Sequence[str], *, default: int | None = None
) -> list[int]:
    """The non-negative integer fields ``keys`` of a snapshot entry, in order (``default`` for a
    missing one; None: a missing one is an error).

    Raises:
        ValueError: a field is missing or not a non-negative integer, naming it.
    """
    numbers: list[int] = []
    for key in keys:
        value = data.get(key, default)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{key} must be a non-negative integer, got {value!r}")
        numbers.append(value)
    return numbers


def record_json(record: RunnerRecord | Mapping[str, object]) -> Mapping[str, object]:
    """A record as its snapshot entry, whether given as a record or as read from the snapshot."""
    return record if isinstance(record, Mapping) else record.to_json()


class CommandRunner(Protocol):
    """Runs one-shot commands to completion (what a ``cmd:`` health check needs)."""

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
        """Run ``argv`` in ``cwd`` with exactly ``env``; kill it whole after ``timeout`` seconds.

        ``security`` (user, no_new_privileges, capabilities) is applied in the child before
        ``exec``; None runs it with the agent's own privileges.

        Raises:
            ProcessError: the command could not be started.
        """
        ...


H = TypeVar("H", bound=RunnerHandle)


class Runner(CommandRunner, Protocol[H]):
    """Spawns, observes, signals, stops and adopts long-running components.

    ``H`` is the runner's handle type; a supervisor only passes back handles the runner gave it.
    """

    async def spawn(self, spec: SpawnSpec) -> H:
        """Start a component; return once it runs (its command was executed).

        Raises:
            ProcessError: it could not be started; the message names the component.
        """
        ...

    async def stop(self, handle: H, *, timeout: float) -> int | None:
        """TERM, up to ``timeout`` seconds of grace, then KILL of all it started; its status.

        Idempotent; the status is None when it cannot be known (e.g. an adopted process).

        Raises:
            ProcessError: something survived the KILL.
        """
        ...

    def exited(self, handle: H) -> Awaitable[int | None]:
        """Completes with the exit status (negative: killed by that signal; None: unknown)."""
        ...

    def alive(self, handle: H) -> bool:
        """True while the component runs."""
        ...

    def signal(self, handle: H, sig: int, *, group: bool = True) -> None:
        """Send ``sig`` to everything the component started (``group``) or its main process.

        Raises:
            ProcessError: it is not running or may not be signalled.
        """
        ...

    def describe(self, handle: H) -> RunnerRecord:
        """The snapshot record that :meth:`adopt_record` takes back after an agent restart."""
        ...

    def adopt_record(self, name: str, record: RunnerRecord | Mapping[str, object]) -> H | None:
        """Take over a component a previous agent left running; None when it is gone.

        Accepts records of this runner's kind (and, for the process runner, entries written
        before kinds existed); a record of another kind, or one that does not parse, gives None.
        """
        ...


#: A runner whose handle type the caller does not care about (supervisors, the deployer).
AnyRunner = Runner[Any]
