"""Prometheus metrics, prefixed ``keystone_`` (DESIGN section 11), and their text format.

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
The series are small counters, gauges and histograms of this module's own, and ``render()``
writes the Prometheus text format 0.0.4 itself, byte for byte what prometheus-client's
``generate_latest`` wrote for them: prometheus-client is not loaded by the agent.
"""

from __future__ import annotations

import os
import re
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
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

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
"""The Prometheus text exposition format 0.0.4, what ``render`` writes."""

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


def python_version() -> str:
    """``platform.python_version()`` without the ``platform`` module: the version at the head
    of ``sys.version`` (``3.11.7``, ``3.13.0rc1``), a missing patch level read as ``.0``."""
    head = re.match(r"[\w.+]+", sys.version, re.ASCII)
    version = head.group() if head else ""
    parts = version.split(".")
    return ".".join([*parts, "0"]) if len(parts) == 2 else version


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


# --- the text exposition format ---------------------------------------------------------------
#
# Written here rather than by prometheus-client, which would stay resident (with wsgiref,
# urllib.request, mmap and its collectors) for a few dozen lines of output. Like the Go agent,
# no *_created series (they would double every counter's size). tests/unit/test_metrics_text.py
# renders the same series with prometheus-client's generate_latest and compares the bytes.

_METRIC_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")


def format_value(value: float) -> str:
    """A sample value as prometheus-client writes it: ``+Inf``, ``-Inf``, ``NaN``, Python's
    shortest repr otherwise, except that a positive number of 7 or more integer digits is
    written with an exponent, as Go would (``1e6`` is ``1e+06``, ``1234567.5`` ``1.2345675e+06``).
    """
    d = float(value)
    if d != d:
        return "NaN"
    if d in (float("inf"), float("-inf")):
        return "+Inf" if d > 0 else "-Inf"
    text = repr(d)
    dot = text.find(".")
    if d <= 0 or dot <= 6:  # no dot (already 1e+16 form) is -1
        return text
    digits = (text[:dot] + text[dot + 1 :]).rstrip("0")
    mantissa = f"{digits[0]}.{digits[1:]}".rstrip(".")
    return f"{mantissa}e+{dot - 1:02d}"


def _name(name: str, valid: re.Pattern[str], colon: bool) -> str:
    """A metric (``colon``) or label name as is, or with each character outside the legacy
    set (letters, ``_``, digits after the first, ``:`` in metric names) replaced by ``_``."""
    if valid.match(name):
        return name
    return "".join(
        c
        if ("a" <= c <= "z" or "A" <= c <= "Z" or c == "_" or (colon and c == ":"))
        or ("0" <= c <= "9" and i > 0)
        else "_"
        for i, c in enumerate(name)
    )


def _escape_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _sample(out: list[str], name: str, labels: Iterable[tuple[str, str]], value: float) -> None:
    """One ``name{label="value",...} value`` line, labels sorted by name."""
    pairs = ",".join(
        f'{_name(k, _LABEL_NAME, False)}="{_escape_value(v)}"'
        for k, v in sorted(dict(labels).items())
    )
    label_text = f"{{{pairs}}}" if pairs else ""
    out.append(f"{_name(name, _METRIC_NAME, True)}{label_text} {format_value(value)}\n")


def _one_hot(
    out: list[str],
    metric: str,
    help_text: str,
    label: str,
    choices: Sequence[str],
    current: list[tuple[str, str]],
) -> None:
    """A gauge family with one series per (component, choice): 1 for the component's current
    choice, 0 for the others (a value outside ``choices`` gets a series of its own)."""
    _header(out, metric, help_text, "gauge")
    for name, now in current:
        for choice in choices if now in choices else (*choices, now):
            _sample(out, metric, (("name", name), (label, choice)), 1.0 if choice == now else 0.0)


def _header(out: list[str], name: str, help_text: str, kind: str) -> None:
    """The ``# HELP`` and ``# TYPE`` lines of a family."""
    name = _name(name, _METRIC_NAME, True)
    help_text = help_text.replace("\\", "\\\\").replace("\n", "\\n")
    out.append(f"# HELP {name} {help_text}\n# TYPE {name} {kind}\n")


class _Family:
    """A metric family: its series by label values, created on first use, kept in that order.

    A family without labels has one series, created with it.
    """

    kind = "gauge"

    def __init__(self, name: str, help_text: str, labelnames: Sequence[str] = ()) -> None:
        self.name, self.help, self.labelnames = name, help_text, tuple(labelnames)
        self._lock = threading.Lock()
        self._series: dict[tuple[str, ...], Any] = {}
        if not self.labelnames:
            self._series[()] = self._new()

    def _new(self) -> Any:
        return [0.0]

    def _key(self, values: Sequence[object]) -> tuple[str, ...]:
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name}: {len(self.labelnames)} label values, not {values!r}")
        return tuple(str(v) for v in values)

    def _get(self, values: Sequence[object]) -> Any:
        key = self._key(values)
        with self._lock:
            series = self._series.get(key)
            if series is None:
                series = self._series[key] = self._new()
            return series

    def remove(self, *values: object) -> None:
        """Drop one series; one that does not exist is no error."""
        key = self._key(values)
        with self._lock:
            self._series.pop(key, None)

    def clear(self) -> None:
        """Drop every series."""
        with self._lock:
            self._series.clear()

    def _items(self) -> list[tuple[tuple[tuple[str, str], ...], Any]]:
        with self._lock:
            return [
                (tuple(zip(self.labelnames, k, strict=True)), _copy(s))
                for k, s in self._series.items()
            ]

    def render(self, out: list[str]) -> None:
        _header(out, self.name, self.help, self.kind)
        for labels, series in self._items():
            _sample(out, self.name, labels, series[0])


def _copy(series: Any) -> Any:
    return [list(x) if isinstance(x, list) else x for x in series]


class _Value:
    """One series of a counter or a gauge (what ``labels()`` answers)."""

    def __init__(self, family: _Family, cell: list[float]) -> None:
        self._family, self._cell = family, cell

    def inc(self, amount: float = 1.0) -> None:
        if amount < 0 and self._family.kind == "counter":
            raise ValueError(f"{self._family.name}: a counter only goes up, not by {amount}")
        with self._family._lock:
            self._cell[0] += amount

    def set(self, value: float) -> None:
        with self._family._lock:
            self._cell[0] = float(value)


class _Counter(_Family):
    """A counter; ``name`` is the exposed one, ``_total`` included."""

    kind = "counter"

    def labels(self, *values: object) -> _Value:
        return _Value(self, self._get(values))

    def inc(self, amount: float = 1.0) -> None:
        self.labels().inc(amount)


class _Gauge(_Family):
    """A gauge; ``read`` (one without labels) gives its value at each scrape instead."""

    def __init__(
        self,
        name: str,
        help_text: str,
        labelnames: Sequence[str] = (),
        *,
        read: Callable[[], float] | None = None,
    ) -> None:
        super().__init__(name, help_text, labelnames)
        self._read = read

    def labels(self, *values: object) -> _Value:
        return _Value(self, self._get(values))

    def set(self, value: float) -> None:
        self.labels().set(value)

    def render(self, out: list[str]) -> None:
        if self._read is None:
            super().render(out)
            return
        _header(out, self.name, self.help, self.kind)
        _sample(out, self.name, (), self._read())


class _Histogram(_Family):
    """A histogram without labels: counts per bucket (``+Inf`` added), their sum."""

    kind = "histogram"

    def __init__(self, name: str, help_text: str, buckets: Sequence[float]) -> None:
        self.bounds = (*(float(b) for b in buckets), float("inf"))
        super().__init__(name, help_text)

    def _new(self) -> Any:
        # [per-bucket counts (not cumulative), sum]
        return [[0.0] * len(self.bounds), 0.0]

    def observe(self, amount: float) -> None:
        with self._lock:
            series = self._series[()]
            series[1] += amount
            for i, bound in enumerate(self.bounds):
                if amount <= bound:
                    series[0][i] += 1.0
                    break

    def render(self, out: list[str]) -> None:
        _header(out, self.name, self.help, self.kind)
        for labels, (counts, total) in self._items():
            acc = 0.0
            for bound, n in zip(self.bounds, counts, strict=True):
                acc += n
                le = (*labels, ("le", format_value(bound)))
                _sample(out, f"{self.name}_bucket", le, acc)
            _sample(out, f"{self.name}_count", labels, acc)
            _sample(out, f"{self.name}_sum", labels, total)


class _Info(_Family):
    """An info metric: one series ``<name>_info`` of value 1 whose labels are the info."""

    def __init__(self, name: str, help_text: str) -> None:
        super().__init__(f"{name}_info", help_text)
        self._info: dict[str, str] = {}

    def info(self, values: dict[str, str]) -> None:
        with self._lock:
            self._info = dict(values)

    def render(self, out: list[str]) -> None:
        with self._lock:
            info = tuple(self._info.items())
        _header(out, self.name, self.help, "gauge")
        _sample(out, self.name, info, 1.0)


def _render_samples(out: list[str], sources: list[Callable[[], Iterable[Any]]]) -> None:
    """Families made at scrape time from plain samples, grouped by name in first-seen order.

    A counter's family is named without ``_total``, its series with it; the label names of a
    family are those of its first sample.
    """
    families: dict[str, _SampleFamily] = {}
    for source in sources:
        try:
            samples = list(source())
        except Exception:  # a scrape must not fail for one source (it is read in a thread)
            continue
        for smp in samples:
            fam = families.get(smp.name)
            if fam is None:
                fam = families[smp.name] = _SampleFamily(
                    smp.kind, smp.help, tuple(k for k, _ in smp.labels)
                )
            # A later sample's values are paired with the first one's keys (prometheus-client's
            # families did the same).
            values = [v for _, v in smp.labels]
            fam.series.append((tuple(zip(fam.keys, values, strict=False)), smp.value))
    for name, fam in families.items():
        kind = "counter" if fam.kind == "counter" else "gauge"
        if kind == "counter":
            name = (name[: -len("_total")] if name.endswith("_total") else name) + "_total"
        _header(out, name, fam.help, kind)
        for labels, value in fam.series:
            _sample(out, name, labels, value)


@dataclass
class _SampleFamily:
    kind: str
    help: str
    keys: tuple[str, ...]
    series: list[tuple[tuple[tuple[str, str], ...], float]] = field(default_factory=list)


class Metrics:
    """Every Keystone metric, rendered by :meth:`render` in the order they are defined here.

    Args:
        proc: the proc filesystem (tests may point it elsewhere).
        monotonic: clock for CPU rates (seconds).
        wall: the Unix time of uptime and the ``*_timestamp_seconds`` gauges.
    """

    def __init__(
        self,
        *,
        proc: Path = Path("/proc"),
        monotonic: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self._proc = proc
        self._monotonic = monotonic
        self._wall = wall
        self._lock = threading.Lock()
        self._components: dict[str, _Component] = {}
        self.started = wall()
        self._build: dict[str, str] | None = None
        self._families: list[_Family | Callable[[list[str]], None]] = [self._render_components]
        r = self._families.append

        self.reconcile_total = _Counter(
            "keystone_reconcile_total", "Reconcile passes by result", ["result"]
        )
        r(self.reconcile_total)
        self.reconcile_duration = _Histogram(
            "keystone_reconcile_duration_seconds",
            "Duration of reconcile passes",
            DURATION_BUCKETS,
        )
        r(self.reconcile_duration)
        self.reconcile_repairs = _Counter(
            "keystone_reconcile_repairs_total",
            "Components started again by reconcile passes",
            ["component"],
        )
        r(self.reconcile_repairs)
        self.reconcile_last = _Gauge(
            "keystone_reconcile_last_timestamp_seconds", "Unix time of the last reconcile pass"
        )
        r(self.reconcile_last)
        self.clock_trusted = _Gauge(
            "keystone_clock_trusted",
            "1 if the system clock is not behind the trusted clock's high-water mark",
        )
        r(self.clock_trusted)
        self.clock_trusted.set(1)
        # The Python version is read at the first scrape (no platform module for it).
        self.build = _Info("keystone_build", "Agent build")
        r(self.build)
        self.uptime = _Gauge(
            "keystone_uptime_seconds",
            "Seconds since the agent started",
            read=lambda: self._wall() - self.started,
        )
        r(self.uptime)
        self.deployments = _Counter(
            "keystone_deployments_total", "Deployments by result", ["result"]
        )
        r(self.deployments)
        self.rollbacks = _Counter(
            "keystone_rollbacks_total", "Rollbacks to the last known-good by result", ["result"]
        )
        r(self.rollbacks)
        self.sync_total = _Counter(
            "keystone_sync_total", "Sync attempts by result and source", ["result", "source"]
        )
        r(self.sync_total)
        self.sync_duration = _Histogram(
            "keystone_sync_duration_seconds", "Duration of sync attempts", DURATION_BUCKETS
        )
        r(self.sync_duration)
        self.sync_last = _Gauge(
            "keystone_sync_last_timestamp_seconds", "Unix time of the last sync attempt"
        )
        r(self.sync_last)
        self.revision = _Info("keystone_revision", "The applied revision and where it came from")
        r(self.revision)
        self.signature_failures = _Counter(
            "keystone_signature_failures_total",
            "Revisions or artifacts refused by a signature or trust check, by kind",
            ["kind"],
        )
        r(self.signature_failures)
        self.cache_bytes = _Gauge(
            "keystone_artifact_cache_bytes", "Bytes held in the artifact cache"
        )
        r(self.cache_bytes)
        self.drift_files = _Gauge(
            "keystone_drift_files",
            "Installed files that differ from their install manifest, by kind",
            ["name", "kind"],
        )
        r(self.drift_files)
        self.drift_repairs = _Counter(
            "keystone_drift_repairs_total",
            "Reinstalls of drifted components by result",
            ["name", "result"],
        )
        r(self.drift_repairs)
        self.delta_bytes = _Counter(
            "keystone_artifact_delta_bytes_total",
            "Delta updates: patch bytes downloaded, and bytes the full downloads would have added",
            ["kind"],
        )
        r(self.delta_bytes)
        self.artifact_fetches = _Counter(
            "keystone_artifact_fetches_total",
            "Artifacts fetched, by path: the whole artifact or a delta patch",
            ["path"],
        )
        r(self.artifact_fetches)
        for kind in ("downloaded", "saved"):
            self.delta_bytes.labels(kind)
        for path in ("full", "delta"):
            self.artifact_fetches.labels(path)
        # Series computed at scrape time from plain samples (the datasets'), see add_samples.
        self._sample_sources: list[Callable[[], Iterable[Any]]] = []
        r(lambda out: _render_samples(out, self._sample_sources))
        self.broker_connected = _Gauge(
            "keystone_broker_connected",
            "1 while the broker adapter is connected, 0 otherwise",
            ["adapter"],
        )
        r(self.broker_connected)
        self.broker_dropped = _Counter(
            "keystone_broker_events_dropped_total",
            "Events dropped from a broker adapter's full buffer while the broker was away",
            ["adapter"],
        )
        r(self.broker_dropped)
        # Staged rollouts: one outcome series per device (the revision it rolls out now), so
        # count by (revision, outcome) over the fleet shows how the canaries fare.
        self.rollout_outcome = _Gauge(
            "keystone_rollout_outcome",
            "1 for the revision this device rolls out (or last rolled out), its wave and outcome",
            ["revision", "wave", "canary", "outcome"],
        )
        r(self.rollout_outcome)
        self.rollout_wave = _Gauge(
            "keystone_rollout_wave",
            "This device's wave (1-based) of the revision it rolls out; 0 without a rollout",
        )
        r(self.rollout_wave)
        self._rollout_until: float | None = None
        self.rollout_wait = _Gauge(
            "keystone_rollout_wait_seconds",
            "Seconds until this device may deploy the revision held back (0: not waiting)",
            read=lambda: (
                max(0.0, self._rollout_until - self._wall()) if self._rollout_until else 0.0
            ),
        )
        r(self.rollout_wait)
        self.rollout_halted = _Gauge(
            "keystone_rollout_halted", "1 while the revision is held by a halted rollout"
        )
        r(self.rollout_halted)
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
                self.drift_files.remove(name, kind)  # never set: nothing to drop
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
        self.refresh()
        if self._build is None:
            self._build = {"version": __version__, "python": python_version()}
            self.build.info(self._build)
        out: list[str] = []
        for family in self._families:
            if isinstance(family, _Family):
                family.render(out)
            else:
                family(out)
        return "".join(out).encode(), CONTENT_TYPE

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

    def _render_components(self, out: list[str]) -> None:
        """The per-component families, from the recorded states (names in order)."""
        comps = self.components_snapshot()
        names = sorted(comps)
        _one_hot(
            out,
            "keystone_component_state",
            "Component state (1 for the current state, 0 for the others)",
            "state",
            STATES,
            [(name, comps[name].state) for name in names],
        )
        _header(
            out,
            "keystone_component_state_health",
            "Component state with its health (1 for the current combination)",
            "gauge",
        )
        for name in names:
            c = comps[name]
            pair = (("name", name), ("state", c.state), ("health", c.health))
            _sample(out, "keystone_component_state_health", pair, 1.0)
        _one_hot(
            out,
            "keystone_component_phase",
            "Component lifecycle phase of the supervisor (1 for the current phase, 0 for the others)",
            "phase",
            PHASES,
            [(name, comps[name].phase) for name in names],
        )
        _header(
            out,
            "keystone_component_restarts_total",
            "Restarts of the component since the agent started",
            "counter",
        )
        for name in names:
            _sample(
                out, "keystone_component_restarts_total", (("name", name),), comps[name].restarts
            )
        _header(out, "keystone_component_healthy", "Component health (1 healthy, 0 not)", "gauge")
        for name in names:
            healthy = 1.0 if comps[name].healthy else 0.0
            _sample(out, "keystone_component_healthy", (("name", name),), healthy)
        _header(
            out,
            "keystone_component_cpu_percent",
            "CPU of the component's process, percent of one core",
            "gauge",
        )
        for name in names:
            if (cpu := comps[name].cpu_percent) is not None:
                _sample(out, "keystone_component_cpu_percent", (("name", name),), cpu)
        _header(
            out,
            "keystone_component_memory_rss_bytes",
            "Resident memory of the component's process",
            "gauge",
        )
        for name in names:
            if (rss := comps[name].rss_bytes) is not None:
                _sample(out, "keystone_component_memory_rss_bytes", (("name", name),), rss)
