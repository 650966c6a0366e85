"""The metrics as prometheus-client rendered them before keystone.metrics wrote the text itself.

This is keystone/metrics.py's ``Metrics`` as it was (prometheus-client's Counter, Gauge,
Histogram and Info on a registry of their own, ``generate_latest``), with one change: a ``wall``
clock for the timestamps and the uptime, so that both render the same bytes. The component
bookkeeping (``set_component``, ``refresh``) is the same code and is reused, not kept twice.
test_metrics_text.py drives both with the same events and compares what they render.
"""

from __future__ import annotations

import contextlib
import platform
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from keystone import __version__
from keystone.metrics import DURATION_BUCKETS, PHASES, STATES
from keystone.metrics import Metrics as _Book


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
        self,
        *,
        proc: Path = Path("/proc"),
        monotonic: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        import prometheus_client.metrics as pm
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

        # The Go agent exports no *_created series; they would double every counter's size.
        disable_created: Any = pm.disable_created_metrics
        disable_created()
        self._book = _Book(proc=proc, monotonic=monotonic, wall=wall)
        self._wall = wall
        self.started = wall()
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
        self.uptime.set_function(lambda: self._wall() - self.started)
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
            lambda: max(0.0, self._rollout_until - self._wall()) if self._rollout_until else 0.0
        )
        # Series that dashboards divide by exist from the start, at zero.
        for result in ("ok", "failed"):
            self.reconcile_total.labels(result)
            self.rollbacks.labels(result)
        for result in ("ok", "rolled-back", "failed"):
            self.deployments.labels(result)

    # --- events (called by the agent) -------------------------------------------------------

    def set_component(self, *args: Any, **kw: Any) -> None:
        self._book.set_component(*args, **kw)

    def remove_component(self, name: str) -> None:
        self._book.remove_component(name)

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
        self.sync_last.set(self._wall())

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
        self.reconcile_last.set(self._wall())

    # --- scrape -----------------------------------------------------------------------------

    def refresh(self) -> None:
        self._book.refresh()

    def render(self) -> tuple[bytes, str]:
        """The exposition text (Prometheus text format 0.0.4) and its content type."""
        from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest

        self.refresh()
        return generate_latest(self.registry), CONTENT_TYPE_PLAIN_0_0_4

    def components_snapshot(self) -> dict[str, Any]:
        return self._book.components_snapshot()


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
