"""Prometheus metrics, prefixed ``keystone_`` (DESIGN section 11), on one registry.

The component metrics keep the Go Keystone's names and labels (``name``, ``state``, ``health``)
so its dashboards and alerts keep working::

    keystone_component_state{name,state}                1 for the current state, 0 for the others
                                                        (state: none, stopped, running, failed)
    keystone_component_state_health{name,state,health}  1 for the current state+health pair
                                                        (health: healthy, unhealthy, unknown)
    keystone_component_restarts_total{name}             restarts since the agent started
    keystone_component_healthy{name}                    1 healthy, 0 otherwise
    keystone_component_cpu_percent{name}                CPU of the component's process, % of a core
    keystone_component_memory_rss_bytes{name}           its resident memory
    keystone_reconcile_total{result}, keystone_reconcile_duration_seconds,
    keystone_reconcile_repairs_total{component}, keystone_reconcile_last_timestamp_seconds,
    keystone_clock_trusted

``state`` and ``health`` are the values ``GET /v1/components`` reports (the mapping from the
supervisor's phases is :mod:`keystone.runtime.reported`), so Go's alert
``keystone_component_state{state="running"} == 0`` fires for a component that is not running.

Added: ``keystone_component_phase{name,phase}`` (1 for the supervisor's current phase: pending,
installing, starting, healthy, unhealthy, backoff, stopping, stopped, failed),
``keystone_build_info{version,python}``, ``keystone_uptime_seconds``,
``keystone_deployments_total{result}``, ``keystone_rollbacks_total{result}``, and the sync
metrics ``keystone_sync_total{result,source}``, ``keystone_sync_duration_seconds``,
``keystone_sync_last_timestamp_seconds``, ``keystone_revision_info{revision,source}``,
``keystone_signature_failures_total{kind}``, ``keystone_artifact_cache_bytes``,
``keystone_drift_files{name,kind}`` (installed files ``changed``, ``added`` or ``removed`` since
install at the last check) with ``keystone_drift_repairs_total{name,result}``;
the delta update counters ``keystone_artifact_delta_bytes_total{kind}`` (``downloaded``: patch bytes
fetched; ``saved``: what the full downloads would have taken beyond them) and
``keystone_artifact_fetches_total{path}`` (``full`` or ``delta``); and the Go agent's dataset
series (:mod:`keystone.datasets.status`, through :meth:`Metrics.add_samples`):
``keystone_dataset_age_seconds``, ``_stale``, ``_activations_total``, ``_refreshes_total``,
``_last_timestamp_seconds``;
the broker adapters' ``keystone_broker_connected{adapter}`` and
``keystone_broker_events_dropped_total{adapter}``; staged rollouts'
``keystone_rollout_outcome{revision,wave,canary,outcome}`` (one series: ``waiting``, ``halted``,
``applied``, ``healthy`` after the soak, ``rolled-back``), ``keystone_rollout_wave``,
``keystone_rollout_wait_seconds`` and ``keystone_rollout_halted``.

The agent calls the event methods from its loop; ``render()`` runs in an API thread. CPU and
memory are read from ``/proc/<pid>/stat`` at scrape time, so no thread or timer runs for metrics.
"""

from __future__ import annotations

import contextlib
import os
import platform
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from keystone import __version__
from keystone.runtime.reported import HEALTHS, STATES, reported_state

PHASES: tuple[str, ...] = (
    "pending",
    "installing",
    "starting",
    "healthy",
    "unhealthy",
    "backoff",
    "stopping",
    "stopped",
    "failed",
)
"""Every supervisor phase (keystone.runtime.supervisor.State), each a ``keystone_component_phase``
series; ``STATES`` (keystone.runtime.reported) are the Go states of ``keystone_component_state``."""

__all__ = ["HEALTHS", "PHASES", "STATES", "Metrics", "health_label", "read_proc_stat"]

DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0)

_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class ProcSample:
    """CPU ticks (user + system), resident pages and start time (ticks since boot) of a pid."""

    ticks: int
    rss_pages: int
    start: int


def read_proc_stat(pid: int, proc: Path = Path("/proc")) -> ProcSample | None:
    """Fields 14, 15, 22 and 24 of ``/proc/<pid>/stat``; None when the process is gone.

    The command name (field 2) may hold spaces and parentheses, so fields are counted after
    its last ``)``. ``rss`` there is the same figure as ``VmRSS`` in ``/proc/<pid>/status``,
    read from one file instead of two.
    """
    try:
        text = (proc / str(pid) / "stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[-1].split()
    try:
        return ProcSample(int(fields[11]) + int(fields[12]), int(fields[21]), int(fields[19]))
    except (IndexError, ValueError):
        return None


def _boot_ticks(proc: Path = Path("/proc")) -> float | None:
    """Clock ticks since boot (the clock of the start time in ``/proc/<pid>/stat``)."""
    try:
        return float((proc / "uptime").read_text().split()[0]) * _TICKS
    except (OSError, ValueError, IndexError):
        return None


def health_label(state: str, healthy: bool) -> str:
    """The ``health`` label when the caller gives none: ``healthy`` for a healthy running
    component, ``unhealthy`` for one running but failing, else ``unknown`` (as ``last_health``)."""
    if state != "running":
        return "unknown"
    return "healthy" if healthy else "unhealthy"


@dataclass
class _Component:
    phase: str
    state: str
    healthy: bool
    health: str
    restarts: int
    pid: int | None
    cpu_percent: float | None = None
    rss_bytes: int | None = None
    # last CPU sample: (monotonic seconds, ticks, process start) to compute a rate
    sample: tuple[float, int, int] | None = None


class _SampleCollector:
    """A prometheus collector over plain samples, grouped into families by name."""

    def __init__(self, sources: list[Callable[[], Iterable[Any]]]) -> None:
        self.sources = sources

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        families: dict[str, Any] = {}
        for source in self.sources:
            try:
                samples = list(source())
            except Exception:  # a scrape must not fail for one source (it is read in a thread)
                continue
            for smp in samples:
                fam = families.get(smp.name)
                if fam is None:
                    keys = [k for k, _ in smp.labels]
                    make = CounterMetricFamily if smp.kind == "counter" else GaugeMetricFamily
                    fam = families[smp.name] = make(smp.name, smp.help, labels=keys)
                fam.add_metric([v for _, v in smp.labels], smp.value)
        yield from families.values()


class Metrics:
    """Every Keystone metric, on ``self.registry``.

    Args:
        proc: the proc filesystem (tests may point it elsewhere).
        monotonic: clock for CPU rates (seconds).
    """

    def __init__(
        self, *, proc: Path = Path("/proc"), monotonic: Callable[[], float] = time.monotonic
    ) -> None:
        import prometheus_client.metrics as pm
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

        # The Go agent exports no *_created series; they would double every counter's size.
        disable_created: Any = pm.disable_created_metrics
        disable_created()
        self._proc = proc
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._components: dict[str, _Component] = {}
        self.started = time.time()
        r = self.registry = CollectorRegistry(auto_describe=True)
        r.register(_ComponentCollector(self))

        self.reconcile_total = Counter(
            "keystone_reconcile_total", "Reconcile passes by result", ["result"], registry=r
        )
        self.reconcile_duration = Histogram(
            "keystone_reconcile_duration_seconds",
            "Duration of reconcile passes",
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.reconcile_repairs = Counter(
            "keystone_reconcile_repairs_total",
            "Components started again by reconcile passes",
            ["component"],
            registry=r,
        )
        self.reconcile_last = Gauge(
            "keystone_reconcile_last_timestamp_seconds",
            "Unix time of the last reconcile pass",
            registry=r,
        )
        self.clock_trusted = Gauge(
            "keystone_clock_trusted",
            "1 if the system clock is not behind the trusted clock's high-water mark",
            registry=r,
        )
        self.clock_trusted.set(1)
        self.build = Info("keystone_build", "Agent build", registry=r)
        self.build.info({"version": __version__, "python": platform.python_version()})
        self.uptime = Gauge(
            "keystone_uptime_seconds", "Seconds since the agent started", registry=r
        )
        self.uptime.set_function(lambda: time.time() - self.started)
        self.deployments = Counter(
            "keystone_deployments_total", "Deployments by result", ["result"], registry=r
        )
        self.rollbacks = Counter(
            "keystone_rollbacks_total",
            "Rollbacks to the last known-good by result",
            ["result"],
            registry=r,
        )
        self.sync_total = Counter(
            "keystone_sync_total",
            "Sync attempts by result and source",
            ["result", "source"],
            registry=r,
        )
        self.sync_duration = Histogram(
            "keystone_sync_duration_seconds",
            "Duration of sync attempts",
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.sync_last = Gauge(
            "keystone_sync_last_timestamp_seconds", "Unix time of the last sync attempt", registry=r
        )
        self.revision = Info(
            "keystone_revision", "The applied revision and where it came from", registry=r
        )
        self.signature_failures = Counter(
            "keystone_signature_failures_total",
            "Revisions or artifacts refused by a signature or trust check, by kind",
            ["kind"],
            registry=r,
        )
        self.cache_bytes = Gauge(
            "keystone_artifact_cache_bytes", "Bytes held in the artifact cache", registry=r
        )
        self.drift_files = Gauge(
            "keystone_drift_files",
            "Installed files that differ from their install manifest, by kind",
            ["name", "kind"],
            registry=r,
        )
        self.drift_repairs = Counter(
            "keystone_drift_repairs_total",
            "Reinstalls of drifted components by result",
            ["name", "result"],
            registry=r,
        )
        self.delta_bytes = Counter(
            "keystone_artifact_delta_bytes_total",
            "Delta updates: patch bytes downloaded, and bytes the full downloads would have added",
            ["kind"],
            registry=r,
        )
        self.artifact_fetches = Counter(
            "keystone_artifact_fetches_total",
            "Artifacts fetched, by path: the whole artifact or a delta patch",
            ["path"],
            registry=r,
        )
        for kind in ("downloaded", "saved"):
            self.delta_bytes.labels(kind)
        for path in ("full", "delta"):
            self.artifact_fetches.labels(path)
        # Series computed at scrape time from plain samples (the datasets'), see add_samples.
        self._sample_sources: list[Callable[[], Iterable[Any]]] = []
        r.register(_SampleCollector(self._sample_sources))
        self.broker_connected = Gauge(
            "keystone_broker_connected",
            "1 while the broker adapter is connected, 0 otherwise",
            ["adapter"],
            registry=r,
        )
        self.broker_dropped = Counter(
            "keystone_broker_events_dropped_total",
            "Events dropped from a broker adapter's full buffer while the broker was away",
            ["adapter"],
            registry=r,
        )
        # Staged rollouts: one outcome series per device (the revision it rolls out now), so
        # count by (revision, outcome) over the fleet shows how the canaries fare.
        self.rollout_outcome = Gauge(
            "keystone_rollout_outcome",
            "1 for the revision this device rolls out (or last rolled out), its wave and outcome",
            ["revision", "wave", "canary", "outcome"],
            registry=r,
        )
        self.rollout_wave = Gauge(
            "keystone_rollout_wave",
            "This device's wave (1-based) of the revision it rolls out; 0 without a rollout",
            registry=r,
        )
        self.rollout_wait = Gauge(
            "keystone_rollout_wait_seconds",
            "Seconds until this device may deploy the revision held back (0: not waiting)",
            registry=r,
        )
        self.rollout_halted = Gauge(
            "keystone_rollout_halted",
            "1 while the revision is held by a halted rollout",
            registry=r,
        )
        self._rollout_until: float | None = None
        self.rollout_wait.set_function(
            lambda: max(0.0, self._rollout_until - time.time()) if self._rollout_until else 0.0
        )
        # Series that dashboards divide by exist from the start, at zero.
        for result in ("ok", "failed"):
            self.reconcile_total.labels(result)
            self.rollbacks.labels(result)
        for result in ("ok", "rolled-back", "failed"):
            self.deployments.labels(result)

    # --- events (called by the agent) -------------------------------------------------------

    def set_component(
        self,
        name: str,
        phase: str,
        healthy: bool,
        restarts: int,
        pid: int | None,
        *,
        state: str | None = None,
        health: str | None = None,
    ) -> None:
        """Record a component's phase, state, health, restart count and pid (on every change).

        ``state`` is the Go state (``Supervisor.reported``); without it, it is the phase's
        (keystone.runtime.reported). ``health`` is ``last_health``; without it, it is derived
        from the state and ``healthy``.
        """
        go_state = state or reported_state(phase, alive=True)
        label = health or health_label(go_state, healthy)
        with self._lock:
            comp = self._components.get(name)
            if comp is None:
                self._components[name] = _Component(
                    phase, go_state, healthy, label, restarts, pid or None
                )
                return
            if comp.pid != (pid or None):
                comp.sample, comp.cpu_percent, comp.rss_bytes = None, None, None
            comp.phase, comp.state, comp.healthy, comp.health = phase, go_state, healthy, label
            comp.restarts, comp.pid = restarts, pid or None

    def remove_component(self, name: str) -> None:
        """Forget a component that left the plan (its series disappear)."""
        with self._lock:
            self._components.pop(name, None)

    def deployment(self, result: str) -> None:
        """Count a deployment: ``ok``, ``rolled-back`` or ``failed``."""
        self.deployments.labels(result).inc()

    def rollback(self, result: str) -> None:
        """Count a rollback to the last known-good: ``ok`` or ``failed``."""
        self.rollbacks.labels(result).inc()

    def sync(self, result: str, source: str, duration: float) -> None:
        """Count a sync attempt (result as the sync record says it) and its duration."""
        self.sync_total.labels(result, source).inc()
        self.sync_duration.observe(max(0.0, duration))
        self.sync_last.set(time.time())

    def set_revision(self, revision: str, source: str) -> None:
        """The applied revision and its source (``git``, ``http``, ``bundle``...)."""
        self.revision.info({"revision": revision, "source": source})

    def rollout(
        self,
        *,
        revision: str,
        wave: int,
        canary: bool,
        outcome: str,
        until: float | None,
        halted: bool,
    ) -> None:
        """Where this device stands in a rollout: one outcome series, wave, wait, halt."""
        self.rollout_outcome.clear()
        self.rollout_outcome.labels(revision, str(wave), str(canary).lower(), outcome).set(1)
        self.rollout_wave.set(wave)
        self._rollout_until = until
        self.rollout_halted.set(1 if halted else 0)

    def signature_failure(self, kind: str) -> None:
        """Count a refused signature or trust check by kind (``commit``, ``artifact``...)."""
        self.signature_failures.labels(kind).inc()

    def set_cache_bytes(self, n: int) -> None:
        """Bytes in the artifact cache (after a GC or a download)."""
        self.cache_bytes.set(n)

    def add_samples(self, source: Callable[[], Iterable[Any]]) -> None:
        """Export what ``source`` answers at each scrape: objects with ``name``, ``kind``
        (``gauge``/``counter``), ``help``, ``labels`` (pairs) and ``value``
        (:class:`keystone.datasets.status.Sample`: the dataset series)."""
        self._sample_sources.append(source)

    def artifact_fetched(self, via: str, wire_bytes: int, saved_bytes: int) -> None:
        """Count one artifact brought in by ``full`` download or ``delta`` patch (cache: nothing)."""
        if via not in ("full", "delta"):
            return
        self.artifact_fetches.labels(via).inc()
        if via == "delta":
            self.delta_bytes.labels("downloaded").inc(max(0, wire_bytes))
            self.delta_bytes.labels("saved").inc(max(0, saved_bytes))

    def set_clock_trusted(self, trusted: bool) -> None:
        """Whether the system clock is at or after the trusted clock's mark."""
        self.clock_trusted.set(1 if trusted else 0)

    def set_drift(self, name: str, counts: dict[str, int] | None) -> None:
        """A component's drifted file counts (``changed``, ``added``, ``removed``); None drops
        its series (no manifest, or it left the plan)."""
        for kind in ("changed", "added", "removed"):
            if counts is None:
                with contextlib.suppress(KeyError):  # never set: nothing to drop
                    self.drift_files.remove(name, kind)
            else:
                self.drift_files.labels(name, kind).set(counts.get(kind, 0))

    def drift_repair(self, name: str, result: str) -> None:
        """Count a drift repair of ``name``: ``ok`` or ``failed``."""
        self.drift_repairs.labels(name, result).inc()

    def set_broker_connected(self, adapter: str, connected: bool) -> None:
        """A broker adapter (``mqtt``, ``nats``) connected or lost its broker."""
        self.broker_connected.labels(adapter).set(1 if connected else 0)

    def broker_events_dropped(self, adapter: str, n: int = 1) -> None:
        """Count events a broker adapter dropped from its full buffer (0 creates the series)."""
        self.broker_dropped.labels(adapter).inc(n)

    def reconcile(self, result: str, duration: float, repaired: Sequence[str] = ()) -> None:
        """Count a reconcile pass, its duration and each component it started again.

        ``keystone_reconcile_repairs_total`` is labelled ``component``, as in Go, so the Go
        docs' ``KeystoneComponentRepeatedlyRepaired`` alert names the component.
        """
        self.reconcile_total.labels(result).inc()
        self.reconcile_duration.observe(max(0.0, duration))
        for name in repaired:
            self.reconcile_repairs.labels(name).inc()
        self.reconcile_last.set(time.time())

    # --- scrape -----------------------------------------------------------------------------

    def refresh(self) -> None:
        """Read CPU and resident memory of every known pid from /proc (a few µs per pid)."""
        with self._lock:
            pids = {n: c.pid for n, c in self._components.items() if c.pid}
        # /proc is read without the lock; a record whose pid changed meanwhile is left alone.
        samples = {n: (pid, read_proc_stat(pid, self._proc)) for n, pid in pids.items()}
        boot = _boot_ticks(self._proc) if samples else None
        now = self._monotonic()
        with self._lock:
            for name, (pid, s) in samples.items():
                comp = self._components.get(name)
                if comp is None or comp.pid != pid:
                    continue
                if s is None:
                    comp.cpu_percent, comp.rss_bytes, comp.sample = None, None, None
                    continue
                comp.rss_bytes = s.rss_pages * _PAGE
                prev = comp.sample
                if prev is not None and prev[2] == s.start and now > prev[0]:
                    rate = (s.ticks - prev[1]) / _TICKS / (now - prev[0]) * 100
                else:
                    # First look at this process: its average since it started.
                    age = (boot - s.start) if boot is not None else 0.0
                    rate = s.ticks / age * 100 if age > 0 else 0.0
                comp.cpu_percent = max(0.0, rate)
                comp.sample = (now, s.ticks, s.start)

    def render(self) -> tuple[bytes, str]:
        """The exposition text (Prometheus text format 0.0.4) and its content type."""
        from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest

        self.refresh()
        return generate_latest(self.registry), CONTENT_TYPE_PLAIN_0_0_4

    def components_snapshot(self) -> dict[str, _Component]:
        """A copy of the per-component records (for the collector and tests)."""
        with self._lock:
            return {
                n: _Component(
                    c.phase,
                    c.state,
                    c.healthy,
                    c.health,
                    c.restarts,
                    c.pid,
                    c.cpu_percent,
                    c.rss_bytes,
                )
                for n, c in self._components.items()
            }


class _ComponentCollector:
    """Builds the per-component families at scrape time from the recorded states."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        comps = self.metrics.components_snapshot()
        state = GaugeMetricFamily(
            "keystone_component_state",
            "Component state (1 for the current state, 0 for the others)",
            labels=["name", "state"],
        )
        phase = GaugeMetricFamily(
            "keystone_component_phase",
            "Component lifecycle phase of the supervisor (1 for the current phase, 0 for the others)",
            labels=["name", "phase"],
        )
        state_health = GaugeMetricFamily(
            "keystone_component_state_health",
            "Component state with its health (1 for the current combination)",
            labels=["name", "state", "health"],
        )
        restarts = CounterMetricFamily(
            "keystone_component_restarts",
            "Restarts of the component since the agent started",
            labels=["name"],
        )
        healthy = GaugeMetricFamily(
            "keystone_component_healthy", "Component health (1 healthy, 0 not)", labels=["name"]
        )
        cpu = GaugeMetricFamily(
            "keystone_component_cpu_percent",
            "CPU of the component's process, percent of one core",
            labels=["name"],
        )
        rss = GaugeMetricFamily(
            "keystone_component_memory_rss_bytes",
            "Resident memory of the component's process",
            labels=["name"],
        )
        for name in sorted(comps):
            c = comps[name]
            for s in STATES if c.state in STATES else (*STATES, c.state):
                state.add_metric([name, s], 1.0 if s == c.state else 0.0)
            for p in PHASES if c.phase in PHASES else (*PHASES, c.phase):
                phase.add_metric([name, p], 1.0 if p == c.phase else 0.0)
            state_health.add_metric([name, c.state, c.health], 1.0)
            restarts.add_metric([name], float(c.restarts))
            healthy.add_metric([name], 1.0 if c.healthy else 0.0)
            if c.cpu_percent is not None:
                cpu.add_metric([name], c.cpu_percent)
            if c.rss_bytes is not None:
                rss.add_metric([name], float(c.rss_bytes))
        yield from (state, state_health, phase, restarts, healthy, cpu, rss)
