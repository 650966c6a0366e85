"""One serial lane for everything that changes what runs, with one "latest wins" desired slot.

Every trigger (the poll schedule, ``sync --once``, an API plan apply, a bundle import, a
rollback, later a broker message) and every single-component command (stop, restart) is a
*submission*: the slot gives it an operation id at once and runs it, one at a time, in order.

- A submission equal to one queued or running (same ``key``, or a key it accepts in ``joins``)
  joins it: both callers get the same operation and its result.
- A desired-state submission (``desired``) replaces a desired-state one still queued: the
  replaced one completes at once with its ``superseded`` result, naming the newer operation.
  A weak one (a scheduled poll) never replaces a queued request; it joins it instead.
- Commands (``desired=False``) queue behind whatever runs, first in first out; nothing drops them.

The slot keeps the newest operations for ``GET /v1/operations/{id}``. It owns no thread and no
idle task: a drain task exists only while there is work.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from loguru import logger

from keystone.openssl import token_hex

JSON = dict[str, Any]


class OpState(Enum):
    """Where an operation is."""

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"


@dataclass(frozen=True)
class Job:
    """What a submission asks for.

    Attributes:
        kind: ``sync``, ``import``, ``rollback``, ``apply``, ``stop``, ``restart``...
        run: does it; gets the operation id, returns the result document.
        key: what it does, for joining (None: it joins nothing and nothing joins it).
        joins: further keys of operations it may join (a plain sync joins any sync).
        desired: a desired-state request: latest wins among queued ones.
        weak: never replaces a queued request (a scheduled poll); joins it instead.
        superseded: the result document of this job when a newer one replaced it (given the
            newer operation's id); None: a generic one.
    """

    kind: str
    run: Callable[[str], Awaitable[JSON]]
    key: Hashable | None = None
    joins: frozenset[Hashable] = frozenset()
    desired: bool = False
    weak: bool = False
    superseded: Callable[[str, str], JSON] | None = None

    def may_join(self, other: Job) -> bool:
        """Whether this submission is a duplicate of ``other`` (queued or running)."""
        if self.key is None or other.key is None:
            return False
        return other.key == self.key or other.key in self.joins


@dataclass(eq=False)
class Operation:
    """One submission's life: queued, running, done with a result."""

    id: str
    job: Job
    submitted: float
    state: OpState = OpState.QUEUED
    started: float | None = None
    finished: float | None = None
    result: JSON | None = None
    error: str | None = None
    superseded_by: str | None = None
    exception: BaseException | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def kind(self) -> str:
        return self.job.kind

    async def wait(self) -> JSON:
        """The result, once done (raises what the job raised)."""
        await self.done.wait()
        if self.exception is not None:
            raise self.exception
        if self.result is None:
            raise OperationFailed(self.error or f"operation {self.id} failed")
        return self.result

    def to_json(self) -> JSON:
        """``GET /v1/operations/{id}``: its state and, once done, its result."""
        return {
            "id": self.id,
            "kind": self.kind,
            "state": self.state.value,
            "submitted": self.submitted,
            "started": self.started,
            "finished": self.finished,
            "result": self.result,
            "error": self.error,
            "superseded_by": self.superseded_by,
        }


class OperationFailed(RuntimeError):
    """An operation ended without a result (cancelled at shutdown)."""


def random_ids() -> Callable[[], str]:
    """Operation ids unique across agent restarts: a random prefix and a counter."""
    prefix = token_hex(4)
    counter = itertools.count(1)
    return lambda: f"op-{prefix}-{next(counter)}"


class DesiredSlot:
    """The serial lane (see the module docstring).

    Args:
        ids: makes operation ids (tests pass a counter).
        clock: wall-clock seconds for the operation records.
        keep: how many finished operations stay known.
    """

    def __init__(
        self,
        *,
        ids: Callable[[], str] | None = None,
        clock: Callable[[], float] = time.time,
        keep: int = 256,
    ) -> None:
        self._ids = ids or random_ids()
        self._clock = clock
        self._keep = keep
        self._ops: OrderedDict[str, Operation] = OrderedDict()
        self._queue: list[Operation] = []
        self._running: Operation | None = None
        self._drain: asyncio.Task[None] | None = None
        self._closed = False

    # --- submitting -----------------------------------------------------------------------

    def submit(self, job: Job) -> Operation:
        """Queue ``job`` (or join its duplicate); returns its operation at once."""
        if self._closed:
            raise RuntimeError("the agent is shutting down")
        for op in self._active():
            if job.may_join(op.job):
                return op
        queued = next((op for op in self._queue if op.job.desired), None)
        if job.desired and queued is not None and job.weak:
            return queued  # a poll never replaces an operator's request: it converges anyway
        op = Operation(self._ids(), job, self._clock())
        self._remember(op)
        if job.desired and queued is not None:
            self._queue.remove(queued)
            self._supersede(queued, op)
        self._queue.append(op)
        if self._drain is None or self._drain.done():
            self._drain = asyncio.get_running_loop().create_task(self._run_queue())
        return op

    async def run(self, job: Job) -> JSON:
        """Submit ``job`` and wait for its result."""
        return await self.submit(job).wait()

    def get(self, op_id: str) -> Operation | None:
        """A known operation by id."""
        return self._ops.get(op_id)

    async def wait(self, op_id: str, timeout: float | None) -> Operation | None:
        """The operation once done, or as it is when ``timeout`` passes (None: unknown id)."""
        op = self._ops.get(op_id)
        if op is None:
            return None
        if timeout is None or timeout > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(op.done.wait(), timeout)
        return op

    @property
    def running(self) -> Operation | None:
        return self._running

    @property
    def queued(self) -> list[Operation]:
        return list(self._queue)

    async def close(self) -> None:
        """Refuse new submissions; cancel what is queued and what runs."""
        self._closed = True
        for op in self._queue:
            self._finish(op, None, "cancelled: the agent is shutting down")
        self._queue.clear()
        if self._drain is not None and not self._drain.done():
            self._drain.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._drain

    # --- inside ---------------------------------------------------------------------------

    def _active(self) -> list[Operation]:
        return ([self._running] if self._running is not None else []) + self._queue

    def _remember(self, op: Operation) -> None:
        self._ops[op.id] = op
        while len(self._ops) > self._keep:
            oldest = next(iter(self._ops.values()))
            if oldest.state is not OpState.DONE:
                break
            self._ops.popitem(last=False)

    def _supersede(self, old: Operation, new: Operation) -> None:
        old.superseded_by = new.id
        build = old.job.superseded
        result = (
            build(old.id, new.id)
            if build is not None
            else {
                "result": "superseded",
                "error": f"superseded by {new.id}",
                "superseded_by": new.id,
                "operation": old.id,
            }
        )
        self._finish(old, result, None)

    def _finish(
        self,
        op: Operation,
        result: JSON | None,
        error: str | None,
        exception: BaseException | None = None,
    ) -> None:
        op.state = OpState.DONE
        op.finished = self._clock()
        op.result = result
        op.error = error
        op.exception = exception
        op.done.set()

    async def _run_queue(self) -> None:
        while self._queue:
            op = self._queue.pop(0)
            self._running = op
            op.state = OpState.RUNNING
            op.started = self._clock()
            try:
                result = await op.job.run(op.id)
            except asyncio.CancelledError:
                self._finish(op, None, "cancelled: the agent is shutting down")
                self._running = None
                raise
            except Exception as exc:  # one failed job must not stop the lane
                logger.opt(exception=exc).debug("operation {} ({}) raised", op.id, op.kind)
                self._finish(op, None, f"{type(exc).__name__}: {exc}", exc)
            else:
                self._finish(op, result, None)
            self._running = None
