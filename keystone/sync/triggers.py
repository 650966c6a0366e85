"""Triggers: what asks for a sync. Each submits requests to the engine's slot.

A trigger has ``start`` and ``stop`` and knows nothing of the pipeline: the poll schedule, the
bundles staged while no agent ran, and the USB watcher are the first ones; a broker ("sync
now" over MQTT) is one more class here, started by the agent's wiring like the others.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

from loguru import logger

from keystone.ledger import ImportedBundle
from keystone.sync.engine import SyncEngine
from keystone.sync.imports import file_digest, staged_bundles, watched_bundles
from keystone.sync.model import SyncRequest
from keystone.sync.scheduler import SyncScheduler


class Trigger(Protocol):
    """Something that submits sync requests while it runs."""

    def start(self) -> None:
        """Begin submitting (called on the agent's event loop)."""
        ...

    async def stop(self) -> None:
        """Stop submitting; what was submitted goes on in the slot."""
        ...


class PollTrigger:
    """The poll schedule: a sync every interval (per-device offset, backoff), then a repair."""

    def __init__(
        self, engine: SyncEngine, *, interval: float, jitter: float, device_id: str
    ) -> None:
        self.engine = engine
        self.scheduler = SyncScheduler(
            self.tick, interval=interval, jitter=jitter, device_id=device_id
        )

    def start(self) -> None:
        self.scheduler.start(paused=self.engine.ledger.suspended)
        self.engine.poller = self

    async def stop(self) -> None:
        self.scheduler.shutdown()

    async def tick(self) -> None:
        """The scheduled poll: sync (joining one queued or in flight), then repair."""
        if self.engine.ledger.suspended:
            return
        result = await self.engine.submit(SyncRequest(trigger="schedule")).wait()
        self.scheduler.record(reachable=result.get("result") != "unreachable")
        await self.engine.host.repair()

    def pause(self) -> None:
        self.scheduler.pause()

    def resume(self) -> None:
        self.scheduler.resume()

    def next_run(self) -> float | None:
        return self.scheduler.next_run()


class _TaskTrigger(abc.ABC):
    """A trigger that is one task on the loop: subclasses say what the task does."""

    def __init__(self) -> None:
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self.run())

    async def stop(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    @abc.abstractmethod
    async def run(self) -> None:
        """The trigger's work, until done or cancelled by :meth:`stop`."""


class StagedBundles(_TaskTrigger):
    """Bundles staged by ``keystone bundle import`` while no agent ran: imported at start."""

    def __init__(self, engine: SyncEngine, runtime: Path) -> None:
        super().__init__()
        self.engine = engine
        self.runtime = runtime

    async def run(self) -> None:
        for path in staged_bundles(self.runtime):
            result = await self.engine.import_bundle(path)
            logger.info("staged bundle {}: {}", path.name, result.get("result"))
            path.unlink(missing_ok=True)


class BundleWatch(_TaskTrigger):
    """Each bundle that appears under a watched mount pattern (a USB stick) is imported once.

    The mounts are scanned every ``every`` seconds; a file is known by its sha256 (in the
    ledger), so the same bundle on another stick is not imported again. ``on_imported(path,
    sha256, result)`` runs after each import (the report written back on the stick); its
    failures are logged, never fatal.
    """

    def __init__(
        self,
        engine: SyncEngine,
        patterns: tuple[str, ...],
        *,
        every: float = 5.0,
        on_imported: Callable[[Path, str, dict[str, Any]], Awaitable[Any]] | None = None,
    ) -> None:
        super().__init__()
        self.engine = engine
        self.patterns = patterns
        self.every = every
        self.on_imported = on_imported
        self._seen: set[tuple[str, int, int]] = set()

    async def run(self) -> None:
        while True:
            await self.scan()
            await asyncio.sleep(self.every)

    async def scan(self) -> None:
        """One look at the watched mounts; imports what is new."""
        engine = self.engine
        imported = engine.ledger.imported_bundles
        for path in await asyncio.to_thread(watched_bundles, list(self.patterns)):
            try:
                st = path.stat()
            except OSError:
                continue
            key = (str(path), st.st_size, st.st_mtime_ns)
            if key in self._seen:
                continue
            self._seen.add(key)
            try:
                digest = await asyncio.to_thread(file_digest, path)
            except OSError as exc:  # the stick was pulled mid-scan: try again when it is back
                self._seen.discard(key)
                logger.warning("watched bundle {}: cannot read it: {}", path, exc)
                continue
            if digest in imported:
                continue
            imported[digest] = ImportedBundle(str(path), engine.clocks.wall())
            try:
                result = await engine.import_bundle(path)
            except Exception:
                # One bad file must not end the watch: later sticks still update the device.
                logger.exception("watched bundle {}: import failed", path)
                result = {"result": "error"}
            imported[digest] = ImportedBundle(
                str(path), imported[digest].time, str(result.get("result"))
            )
            engine.host.save_soon()
            if self.on_imported is not None:
                try:
                    await self.on_imported(path, digest, dict(result))
                except Exception:  # a report that cannot be made never stops the watch
                    logger.exception("watched bundle {}: after-import hook failed", path)
