"""The dataset lifecycle of an agent: bindings, refresh, activation, reload, health-gated rollback.

A component's datasets are bound to it (:meth:`DatasetManager.bind`). A refresh
(:meth:`DatasetManager.refresh`) runs the resolver (fetch, verify, anti-replay, stage) in a
thread, then activates: ``current`` switches atomically, the component is told (its reload
signal or script; no restart), and for the grace period its health is watched. If it turns
unhealthy the previous version is put back, the component told again, and the new manifest is
marked bad so it is never activated again here. Then ``keep`` versions are retained.

Before a component starts, :meth:`DatasetManager.prepare_for_start` brings its datasets in when
missing or due, and :meth:`DatasetManager.ready_for_start` says whether it may start: a required
dataset that is missing or older than ``max_age`` blocks it; an optional one is reported.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path

from loguru import logger

from keystone import manifest as _manifest
from keystone.datasets.notify import HealthObserver, Notifier, NotRunning, ReloadFailed
from keystone.datasets.refresh import (
    DatasetRefused,
    DatasetUnavailable,
    Documents,
    Resolver,
    Staged,
)
from keystone.datasets.spec import DatasetSpec, ReloadPlan
from keystone.datasets.store import BadRecord, DatasetState, DatasetStore, VersionRecord
from keystone.errors import KeystoneError

REASON_LIMIT = 200  # Go's truncateReason: a status line, not a log

UPDATED = "updated"
UNCHANGED = "unchanged"
FAILED = "failed"


def _short(text: str) -> str:
    text = text.strip()
    return text if len(text) <= REASON_LIMIT else text[:REASON_LIMIT] + "…"


@dataclass(frozen=True)
class Binding:
    """One dataset attached to one component, with what it takes to tell that component."""

    spec: DatasetSpec
    component: str
    reload: ReloadPlan = field(default_factory=ReloadPlan)
    notifier: Notifier | None = None
    health: HealthObserver | None = None


@dataclass(frozen=True)
class RefreshResult:
    """The outcome of one refresh: ``updated``, ``unchanged`` or ``failed`` (Go's results)."""

    name: str
    result: str
    version: str = ""
    reason: str = ""
    rolled_back: bool = False


class DatasetManager:
    """Every bound dataset of an agent, over one store and one resolver.

    Args:
        store: the dataset tree (``runtime/datasets``).
        resolver: fetch, verify and stage.
        wall: the wall clock (epoch seconds), for ages and last-refresh times.
        clock_trusted: whether ``wall`` can be believed; when not, ages are unknown.
    """

    def __init__(
        self,
        store: DatasetStore,
        resolver: Resolver,
        *,
        wall: Callable[[], float] = time.time,
        clock_trusted: Callable[[], bool] = lambda: True,
    ) -> None:
        self.store = store
        self.resolver = resolver
        self.wall = wall
        self.clock_trusted = clock_trusted
        self.bindings: dict[str, Binding] = {}
        self.refreshes: Counter[tuple[str, str]] = Counter()
        self.activations: Counter[tuple[str, str]] = Counter()
        self._locks: dict[str, asyncio.Lock] = {}

    # --- bindings -----------------------------------------------------------------------------

    def bind(
        self,
        component: str,
        specs: Sequence[DatasetSpec],
        *,
        reload: ReloadPlan | None = None,
        notifier: Notifier | None = None,
        health: HealthObserver | None = None,
    ) -> None:
        """Attach a component's datasets (replacing what it had); clean up interrupted runs.

        Raises:
            ValueError: a dataset name is already bound to another component.
        """
        for spec in specs:
            other = self.bindings.get(spec.name)
            if other is not None and other.component != component:
                raise ValueError(
                    f"dataset {spec.name!r} is declared by both {other.component} and {component}"
                )
        self.unbind(component)
        for spec in specs:
            self.store.recover(spec.name)
            self.bindings[spec.name] = Binding(
                spec, component, reload or ReloadPlan(), notifier, health
            )

    def unbind(self, component: str) -> None:
        """Forget a component's datasets (their files stay on disk)."""
        for name in [n for n, b in self.bindings.items() if b.component == component]:
            del self.bindings[name]

    def of(self, component: str) -> list[Binding]:
        """The bindings of one component, in name order."""
        return sorted(
            (b for b in self.bindings.values() if b.component == component),
            key=lambda b: b.spec.name,
        )

    def env_for(self, component: str) -> dict[str, str]:
        """``KEYSTONE_DATASET_<NAME>=<absolute current link>`` for each of its datasets."""
        return {b.spec.env_name: str(self.store.path(b.spec.name)) for b in self.of(component)}

    # --- ages and gating ----------------------------------------------------------------------

    def age(self, name: str) -> float | None:
        """Seconds since the active version was published; None when unknown (or none)."""
        state = self.store.load_state(name)
        record = state.versions.get(self.store.active(name))
        if record is None or not self.clock_trusted():
            return None
        return max(0.0, self.wall() - record.published.timestamp())

    def ready_for_start(self, component: str) -> tuple[bool, str]:
        """Whether ``component`` may start as far as its datasets go, and why not.

        A required dataset that is missing, or older than ``max_age``, blocks the start; an
        optional one is reported (logged, in the reason) and skipped. With an untrusted clock the
        age is unknown and does not block (a wrong clock must not keep a device down).
        """
        blocking: list[str] = []
        notes: list[str] = []
        for b in self.of(component):
            spec = b.spec
            active = self.store.active(spec.name)
            if not active:
                last = self.store.load_state(spec.name).last_result
                why = f"dataset {spec.name} is missing" + (f" ({last})" if last else "")
                (blocking if spec.required else notes).append(why)
                continue
            age = self.age(spec.name)
            if age is not None and age > spec.max_age:
                why = (
                    f"dataset {spec.name} version {active} is {age:.0f}s old, past its max_age "
                    f"of {spec.max_age:.0f}s"
                )
                (blocking if spec.required else notes).append(why)
        for note in notes:
            logger.warning(
                "[dataset] component={} msg=optional {}; starting without it", component, note
            )
        if blocking:
            return False, f"{component} cannot start: " + "; ".join(blocking)
        return True, "; ".join(f"optional {n}" for n in notes)

    def due(self, name: str) -> bool:
        """Whether a dataset's refresh interval has elapsed since its last refresh (any outcome)."""
        b = self.bindings[name]
        last = self.store.load_state(name).last_refresh
        return last is None or self.wall() - last >= b.spec.refresh

    async def prepare_for_start(self, component: str) -> tuple[bool, str]:
        """Fetch each dataset of ``component`` that is missing or due, then :meth:`ready_for_start`.

        No reload: the component is not running yet. A failure leaves what is on disk in use.
        """
        for b in self.of(component):
            if self.store.active(b.spec.name) and not self.due(b.spec.name):
                continue
            await self.refresh(b.spec.name, notify=False)
        return self.ready_for_start(component)

    # --- refresh ------------------------------------------------------------------------------

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    async def refresh(
        self,
        name: str,
        *,
        notify: bool = True,
        docs: Documents | None = None,
        payload_uri: str | None = None,
    ) -> RefreshResult:
        """Refresh one bound dataset now (or import ``docs`` from a bundle); never raises.

        Raises:
            KeyError: ``name`` is not bound.
        """
        b = self.bindings[name]
        async with self._lock(name):
            try:
                staged: Staged = await asyncio.to_thread(
                    self.resolver.resolve, b.spec, docs, payload_uri=payload_uri
                )
            except (DatasetRefused, DatasetUnavailable) as exc:
                return self._record_failure(b, str(exc))
            except Exception as exc:  # one dataset's bug must not stop the others
                logger.exception("[dataset] name={} msg=refresh crashed", name)
                return self._record_failure(b, f"{type(exc).__name__}: {exc}")
            if not staged.changed:
                self.refreshes[(name, UNCHANGED)] += 1
                self._record(b, staged.manifest, UNCHANGED)
                return RefreshResult(name, UNCHANGED, staged.version)
            return await self._activate(b, staged, notify=notify)

    def _record_failure(self, b: Binding, reason: str) -> RefreshResult:
        logger.warning("[dataset] name={} msg=refresh failed: {}", b.spec.name, reason)
        self.refreshes[(b.spec.name, FAILED)] += 1
        state = self.store.load_state(b.spec.name)
        self._save(
            replace(
                state,
                manifest_uri=b.spec.manifest,
                last_refresh=self.wall(),
                last_result=_short(reason),
            )
        )
        return RefreshResult(b.spec.name, FAILED, self.store.active(b.spec.name), _short(reason))

    def _record(self, b: Binding, m: _manifest.Manifest | None, result: str) -> DatasetState:
        state = self.store.load_state(b.spec.name)
        state = replace(
            state, manifest_uri=b.spec.manifest, last_refresh=self.wall(), last_result=result
        )
        if m is not None:
            state = replace(
                state, accepted_published=m.published, accepted_sha256=m.artifact.sha256
            )
        self._save(state)
        return state

    def _save(self, state: DatasetState) -> None:
        try:
            self.store.save_state(state)
        except OSError as exc:
            logger.error("[dataset] name={} msg=cannot persist its state: {}", state.name, exc)

    async def _activate(self, b: Binding, staged: Staged, *, notify: bool) -> RefreshResult:
        name, m = b.spec.name, staged.manifest
        previous = self.store.active(name)
        state = self.store.load_state(name)
        versions = {
            **state.versions,
            staged.version: VersionRecord(m.published, m.artifact.sha256, m.artifact.size),
        }
        self._save(replace(state, versions=versions))
        started = time.monotonic()
        try:
            self.store.activate(name, staged.version)
        except (OSError, KeystoneError) as exc:
            self.activations[(name, FAILED)] += 1
            return self._record_failure(b, f"dataset {name}: activating {staged.version}: {exc}")
        logger.info(
            "[dataset] name={} version={} previous={} msg=activated in {:.3f}s",
            name,
            staged.version,
            previous or "(none)",
            time.monotonic() - started,
        )
        # Accepted from here on: the anti-replay anchor moves even if the component rejects it.
        self._record(b, m, "ok")
        failure = await self._tell(b) if notify else None
        if failure is not None:
            return await self._roll_back(b, staged, previous, failure)
        self.activations[(name, "ok")] += 1
        self.refreshes[(name, UPDATED)] += 1
        await asyncio.to_thread(self._retain, b, previous)
        return RefreshResult(name, UPDATED, staged.version)

    def _retain(self, b: Binding, previous: str) -> None:
        """Prune old versions and their cached payloads (in a thread: trees can be large)."""
        name = b.spec.name
        try:
            removed = self.store.prune(name, b.spec.keep, (previous,))
            if removed:
                logger.info("[dataset] name={} msg=kept; pruned {}", name, ", ".join(removed))
            kept = self.store.load_state(name).versions
            self.resolver.payloads.collect(b.spec, {r.sha256 for r in kept.values()})
        except OSError as exc:
            logger.warning("[dataset] name={} msg=retention failed: {}", name, exc)

    async def _tell(self, b: Binding) -> str | None:
        """Reload the component and watch it through the grace period; the failure, or None."""
        if not b.reload.declared or b.notifier is None:
            return None
        try:
            await b.notifier.reload(b.component, b.reload)
        except NotRunning as exc:
            logger.info("[dataset] name={} msg=not reloaded: {}", b.spec.name, exc)
            return None
        except ReloadFailed as exc:
            return f"reload failed: {exc}"
        if b.health is None:
            return None
        return await b.health.watch(b.component, b.reload.grace)

    async def _roll_back(
        self, b: Binding, staged: Staged, previous: str, failure: str
    ) -> RefreshResult:
        name, m = b.spec.name, staged.manifest
        logger.warning(
            "[dataset] name={} component={} msg={}; rolling back to {}",
            name,
            b.component,
            failure,
            previous or "(none)",
        )
        reason = _short(f"{b.component} did not survive {staged.version}: {failure}")
        if not previous:
            # The first version is also the one that broke it: removing it would leave a
            # dangling link. Leave it and report.
            self.activations[(name, FAILED)] += 1
            self.refreshes[(name, FAILED)] += 1
            self._record(b, m, reason)
            return RefreshResult(name, FAILED, staged.version, reason)
        try:
            self.store.activate(name, previous)
        except (OSError, KeystoneError) as exc:
            logger.error("[dataset] name={} msg=ROLLBACK FAILED to {}: {}", name, previous, exc)
        else:
            if b.reload.declared and b.notifier is not None:
                try:
                    await b.notifier.reload(b.component, b.reload)
                except (NotRunning, ReloadFailed) as exc:
                    logger.warning("[dataset] name={} msg=reload after rollback: {}", name, exc)
        state = self.store.load_state(name)
        bad = BadRecord(staged.version, m.published, m.artifact.sha256, reason)
        self._save(
            replace(
                state,
                bad=(*state.bad, bad)[-16:],
                last_refresh=self.wall(),
                last_result=reason,
            )
        )
        self.activations[(name, "rolled-back")] += 1
        self.refreshes[(name, FAILED)] += 1
        await asyncio.to_thread(self._retain, b, previous)
        return RefreshResult(name, FAILED, previous, reason, rolled_back=True)

    async def refresh_all(self, names: Iterable[str] | None = None) -> list[RefreshResult]:
        """Refresh the given (default: every bound) dataset, one after the other."""
        return [await self.refresh(n) for n in sorted(names or self.bindings)]

    # --- bundles ------------------------------------------------------------------------------

    async def import_entries(
        self, entries: Iterable[tuple[str, bytes, bytes | None, bytes | None, Path]]
    ) -> list[RefreshResult]:
        """Import ``(dataset, manifest, signature, certificate, payload file)`` from a bundle.

        Each goes through the same verification as a refresh (signature, anti-replay, digest)
        and the same activation; an entry for a dataset nobody declared is skipped.
        """
        out: list[RefreshResult] = []
        for name, body, sig, cert, payload in entries:
            if name not in self.bindings:
                logger.info("[dataset] name={} msg=in the bundle but declared by no recipe", name)
                continue
            docs = Documents(body, sig, cert, source=f"bundle:{name}")
            out.append(await self.refresh(name, docs=docs, payload_uri=str(payload)))
        return out

    # --- for status -----------------------------------------------------------------------------

    def states(self) -> Mapping[str, DatasetState]:
        """The persisted state of every bound dataset."""
        return {n: self.store.load_state(n) for n in sorted(self.bindings)}

    def published(self, name: str) -> datetime | None:
        """The ``published`` of the active version, if any."""
        record = self.store.load_state(name).versions.get(self.store.active(name))
        return record.published if record else None
