"""Prometheus metrics, prefixed ``keystone_``, with the Go Keystone's names (DESIGN section 11).

The agent calls the event methods; CPU and resident memory of component processes are read from
``/proc`` at scrape time, so no thread or timer runs for metrics.
"""

from __future__ import annotations

import contextlib
import os
import platform
import time
from pathlib import Path
from typing import Any

from keystone import __version__

STATES = (
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
_TICK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


class Metrics:
    """One registry with every Keystone metric."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

        r = self.registry = CollectorRegistry(auto_describe=True)
        self.started = time.time()
        self.component_state = Gauge(
            "keystone_component_state",
            "1 for the component's current state",
            ["component", "state"],
            registry=r,
        )
        self.state_health = Gauge(
            "keystone_component_state_health", "1 healthy, 0 otherwise", ["component"], registry=r
        )
        self.restarts = Gauge(
            "keystone_component_restarts_total",
            "Restarts of the component",
            ["component"],
            registry=r,
        )
        self.healthy = Gauge(
            "keystone_component_healthy",
            "1 if the last health check passed",
            ["component"],
            registry=r,
        )
        self.cpu = Gauge(
            "keystone_component_cpu_percent",
            "CPU use of the component process, percent of one core",
            ["component"],
            registry=r,
        )
        self.rss = Gauge(
            "keystone_component_memory_rss_bytes",
            "Resident memory of the component process",
            ["component"],
            registry=r,
        )
        self.reconcile_total = Counter(
            "keystone_reconcile_total", "Reconcile runs by result", ["result"], registry=r
        )
        self.reconcile_duration = Histogram(
            "keystone_reconcile_duration_seconds", "Reconcile duration", registry=r
        )
        self.repairs = Counter(
            "keystone_reconcile_repairs_total", "Components started again by reconcile", registry=r
        )
        self.reconcile_last = Gauge(
            "keystone_reconcile_last_timestamp_seconds", "Time of the last reconcile", registry=r
        )
        self.clock_trusted = Gauge(
            "keystone_clock_trusted", "1 if the trusted clock is not behind its mark", registry=r
        )
        self.build = Info("keystone_build", "Agent build", registry=r)
        self.build.info({"version": __version__, "python": platform.python_version()})
        self.uptime = Gauge("keystone_uptime_seconds", "Agent uptime", registry=r)
        self.uptime.set_function(lambda: time.time() - self.started)
        self.deployments = Counter(
            "keystone_deployments_total", "Deployments by result", ["result"], registry=r
        )
        self.rollbacks = Counter(
            "keystone_rollbacks_total", "Rollbacks by result", ["result"], registry=r
        )
        self.sync_total = Counter(
            "keystone_sync_total",
            "Sync attempts by result and source",
            ["result", "source"],
            registry=r,
        )
        self.sync_duration = Histogram(
            "keystone_sync_duration_seconds", "Sync duration", registry=r
        )
        self.sync_last = Gauge(
            "keystone_sync_last_timestamp_seconds", "Time of the last sync", registry=r
        )
        self.revision = Info("keystone_revision", "The applied revision", registry=r)
        self.signature_failures = Counter(
            "keystone_signature_failures_total", "Refused revisions by kind", ["kind"], registry=r
        )
        self.cache_bytes = Gauge(
            "keystone_artifact_cache_bytes", "Size of the artifact cache", registry=r
        )
        self.clock_trusted.set(1)
        self._pids: dict[str, int] = {}
        self._cpu_prev: dict[str, tuple[float, int]] = {}
        self._states: dict[str, str] = {}

    # --- events -----------------------------------------------------------------------------

    def set_component(
        self, name: str, state: str, healthy: bool, restarts: int, pid: int | None
    ) -> None:
        """Record a component's state (called on every change)."""
        old = self._states.get(name)
        if old and old != state:
            self.component_state.labels(name, old).set(0)
        self._states[name] = state
        self.component_state.labels(name, state).set(1)
        self.state_health.labels(name).set(1 if healthy else 0)
        self.healthy.labels(name).set(1 if healthy else 0)
        self.restarts.labels(name).set(restarts)
        if pid:
            self._pids[name] = pid
        else:
            self._pids.pop(name, None)

    def remove_component(self, name: str) -> None:
        """Forget a component removed from the plan."""
        for gauge in (self.state_health, self.restarts, self.healthy, self.cpu, self.rss):
            with contextlib.suppress(KeyError):
                gauge.remove(name)
        for state in STATES:
            with contextlib.suppress(KeyError):
                self.component_state.remove(name, state)
        self._pids.pop(name, None)
        self._states.pop(name, None)

    def deployment(self, result: str) -> None:
        self.deployments.labels(result).inc()

    def rollback(self, result: str) -> None:
        self.rollbacks.labels(result).inc()

    def sync(self, result: str, source: str, duration: float) -> None:
        self.sync_total.labels(result, source).inc()
        self.sync_duration.observe(duration)
        self.sync_last.set(time.time())

    def set_revision(self, revision: str, source: str) -> None:
        self.revision.info({"revision": revision, "source": source})

    def signature_failure(self, kind: str) -> None:
        self.signature_failures.labels(kind).inc()

    def set_cache_bytes(self, n: int) -> None:
        self.cache_bytes.set(n)

    def set_clock_trusted(self, trusted: bool) -> None:
        self.clock_trusted.set(1 if trusted else 0)

    def reconcile(self, result: str, duration: float, repairs: int) -> None:
        self.reconcile_total.labels(result).inc()
        self.reconcile_duration.observe(duration)
        self.repairs.inc(repairs)
        self.reconcile_last.set(time.time())

    # --- scrape -----------------------------------------------------------------------------

    def _refresh(self) -> None:
        now = time.monotonic()
        for name, pid in list(self._pids.items()):
            stat = _proc_stat(pid)
            if stat is None:
                continue
            ticks, rss_pages = stat
            self.rss.labels(name).set(rss_pages * _PAGE)
            prev = self._cpu_prev.get(name)
            if prev is not None and now > prev[0]:
                self.cpu.labels(name).set(
                    max(0.0, (ticks - prev[1]) / _TICK / (now - prev[0]) * 100)
                )
            self._cpu_prev[name] = (now, ticks)

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        self._refresh()
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def _proc_stat(pid: int) -> tuple[int, int] | None:
    """(utime + stime ticks, rss pages) of a process, or None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields: list[Any] = text.rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12]), int(fields[21])
