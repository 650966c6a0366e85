"""/metrics text: the bytes keystone.metrics writes are those prometheus-client wrote.

Each test renders the same series twice: with keystone.metrics, and with prometheus-client's
``generate_latest`` over an equivalent registry (tests/unit/prom_reference.py: the metrics as
they were, on Counter, Gauge, Histogram and Info; or a family built here).
"""

from __future__ import annotations

import math
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from prometheus_client import utils as prom_utils
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest

from keystone import metrics as km
from tests.unit import prom_reference

Event = Callable[[Any], None]
go_float: Callable[[float], str] = prom_utils.floatToGoString


@dataclass(frozen=True)
class Smp:
    """A plain sample, as keystone.datasets.status.Sample."""

    name: str
    kind: str
    help: str
    labels: tuple[tuple[str, str], ...]
    value: float


def fake_proc(root: Path, pid: int, *, ticks: int, rss_pages: int, start: int, up: float) -> None:
    d = root / str(pid)
    d.mkdir(parents=True, exist_ok=True)
    fields = ["S", *["0"] * 10, str(ticks), "0", *["0"] * 6, str(start), "0", str(rss_pages)]
    (d / "stat").write_text(f"{pid} (x) " + " ".join(fields) + "\n")
    (root / "uptime").write_text(f"{up:.2f} 0.00\n")


WEIRD = 'quote " backslash \\ newline \n tab \t unicode é ✓ end\\'

EVENTS: dict[str, list[Event]] = {
    "fresh": [],
    "every event once": [
        lambda m: m.set_component("db", "healthy", True, 2, 42),
        lambda m: m.reconcile("ok", 0.2, ["db"]),
        lambda m: m.deployment("ok"),
        lambda m: m.rollback("ok"),
        lambda m: m.sync("applied", "git", 1.5),
        lambda m: m.set_revision("a" * 40, "git"),
        lambda m: m.signature_failure("commit"),
        lambda m: m.set_cache_bytes(1234),
        lambda m: m.set_clock_trusted(False),
        lambda m: m.set_drift("db", {"changed": 2, "removed": 1}),
        lambda m: m.drift_repair("db", "ok"),
        lambda m: m.set_broker_connected("mqtt", True),
        lambda m: m.broker_events_dropped("nats", 0),
        lambda m: m.artifact_fetched("delta", 100, 5000),
        lambda m: m.artifact_fetched("full", 100, 0),
        lambda m: m.artifact_fetched("cache", 1, 1),
        lambda m: m.rollout(
            revision="b" * 40, wave=2, canary=True, outcome="waiting", until=None, halted=False
        ),
    ],
    "label values that need escaping": [
        lambda m: m.set_component(WEIRD, "healthy", True, 0, None),
        lambda m: m.set_component('quote"d', "draining", False, 1, None, state="odd\\state"),
        lambda m: m.reconcile("ok", 0.0, [WEIRD, "", "\n"]),
        lambda m: m.set_revision(WEIRD, "usb\nstick"),
        lambda m: m.sync(WEIRD, '"', 0.1),
        lambda m: m.set_drift(WEIRD, {"added": 7}),
        lambda m: m.drift_repair(WEIRD, "failed"),
        lambda m: m.set_broker_connected(WEIRD, False),
        lambda m: m.broker_events_dropped(WEIRD, 3),
        lambda m: m.signature_failure(WEIRD),
        lambda m: m.rollout(
            revision=WEIRD, wave=1, canary=False, outcome="halted", until=None, halted=True
        ),
    ],
    "floats: exponents, tiny, huge, infinite": [
        lambda m: m.sync("applied", "git", 12345678.9),
        lambda m: m.sync("applied", "git", 1e-7),
        lambda m: m.sync("applied", "git", 1e6),
        lambda m: m.sync("applied", "git", 0.05),  # on a bucket's bound
        lambda m: m.sync("applied", "git", 900.0),
        lambda m: m.sync("applied", "git", -3.0),  # clamped to 0
        lambda m: m.sync("applied", "git", math.inf),
        lambda m: m.reconcile("failed", 1e300, ["x"] * 3),
        lambda m: m.reconcile("failed", math.nan),
        lambda m: m.set_cache_bytes(10**12),
        lambda m: m.set_cache_bytes(123456789012345678901234567890),
        lambda m: m.broker_events_dropped("mqtt", 10**7),
        lambda m: m.artifact_fetched("delta", 2**53 + 1, 10**6),
        lambda m: m.rollout(
            revision="r", wave=10**9, canary=True, outcome="applied", until=None, halted=False
        ),
    ],
    "components: phases, states, cpu and memory, removal": [
        lambda m: m.set_component("a", "starting", False, 0, 42),
        lambda m: m.set_component("b", "failed", False, 5, 43),
        lambda m: m.set_component("c", "backoff", False, 2, None),
        lambda m: m.set_component("a", "healthy", True, 0, 42),
        lambda m: m.set_component("d", "draining", False, 0, None),  # a phase not listed
        lambda m: m.set_component("e", "healthy", False, 0, None, state="running", health="x"),
        lambda m: m.remove_component("c"),
        lambda m: m.remove_component("never-there"),
    ],
    "series removed, replaced and cleared": [
        lambda m: m.set_drift("db", {"changed": 1}),
        lambda m: m.set_drift("api", {"added": 1}),
        lambda m: m.set_drift("db", None),
        lambda m: m.set_drift("never-there", None),  # removing nothing is no error
        lambda m: m.set_drift("db", {"removed": 4}),  # back, now after api
        lambda m: m.set_revision("a", "git"),
        lambda m: m.set_revision("b", "bundle"),
        lambda m: m.rollout(
            revision="r1", wave=1, canary=True, outcome="waiting", until=None, halted=False
        ),
        lambda m: m.rollout(
            revision="r2", wave=3, canary=False, outcome="healthy", until=None, halted=False
        ),
    ],
    "a rollout waiting": [
        lambda m: m.rollout(
            revision="r", wave=2, canary=False, outcome="waiting", until=1e9 + 30.25, halted=False
        ),
    ],
    "samples from sources": [
        lambda m: m.add_samples(
            lambda: [
                Smp("keystone_dataset_stale", "gauge", "h\\elp\nnext", (("name", "a"),), 1.0),
                Smp(
                    "keystone_dataset_activations_total",
                    "counter",
                    "Activations",
                    (("name", "a"), ("outcome", "ok")),
                    3,
                ),
                Smp("keystone_dataset_stale", "gauge", "ignored", (("name", WEIRD),), math.nan),
                Smp("keystone_plain_counter", "counter", "no _total", (), 2.5),
                Smp("keystone_dataset_age_seconds", "gauge", "age", (("x", "1"),), -math.inf),
                # Keys of the first sample of a family, values by position.
                Smp("keystone_dataset_stale", "gauge", "h", (("other", "b"), ("more", "c")), 0),
            ]
        ),
        lambda m: m.add_samples(lambda: 1 // 0),  # a failing source is left out
        lambda m: m.add_samples(
            lambda: [Smp("keystone_state_recovered_total", "counter", "r", (("file", "f"),), 1)]
        ),
    ],
}


def render_both(tmp_path: Path, events: list[Event]) -> list[tuple[tuple[bytes, str], ...]]:
    """Apply the events to both, in lockstep on one clock that moves, and scrape each twice."""
    fake_proc(tmp_path, 42, ticks=700, rss_pages=321, start=1000, up=300.0)
    fake_proc(tmp_path, 43, ticks=12345, rss_pages=10**6, start=5, up=300.0)
    now = [1e9 + 0.125]
    mono = [50.0]

    def wall() -> float:
        return now[0]

    def monotonic() -> float:
        return mono[0]

    ours = km.Metrics(proc=tmp_path, monotonic=monotonic, wall=wall)
    theirs = prom_reference.Metrics(proc=tmp_path, monotonic=monotonic, wall=wall)
    for event in events:
        now[0] += 1.75
        event(ours)
        event(theirs)
    now[0] += 0.5
    mono[0] += 2.0
    first = ours.render(), theirs.render()
    # A second scrape: CPU is now a rate over the interval.
    fake_proc(tmp_path, 42, ticks=900, rss_pages=300, start=1000, up=302.0)
    mono[0] += 2.0
    return [first, (ours.render(), theirs.render())]


class TestSameBytes:
    @pytest.mark.parametrize("case", list(EVENTS))
    def test_same_bytes_as_prometheus_client(self, case: str, tmp_path: Path) -> None:
        """After the same events on the same clock, /metrics is byte for byte what
        prometheus-client's generate_latest wrote, and has the same content type."""
        for (ours, ctype), (theirs, their_ctype) in render_both(tmp_path, EVENTS[case]):
            assert ctype == their_ctype == CONTENT_TYPE_PLAIN_0_0_4
            assert ours.decode().splitlines() == theirs.decode().splitlines()
            assert ours == theirs

    def test_no_created_series_and_the_exposed_suffixes(self, tmp_path: Path) -> None:
        """Counters end in _total, histograms have _bucket (with +Inf), _count and _sum, and
        no _created series appears, as with prometheus-client's created series disabled."""
        ((ours, _), _), _ = render_both(tmp_path, EVENTS["every event once"])
        text = ours.decode()
        assert "_created" not in text
        assert "# TYPE keystone_deployments_total counter\n" in text
        assert 'keystone_sync_duration_seconds_bucket{le="+Inf"} 1.0\n' in text
        assert "keystone_sync_duration_seconds_count 1.0\n" in text
        assert "keystone_sync_duration_seconds_sum 1.5\n" in text

    def test_build_info_without_platform(self) -> None:
        """The Python version of keystone_build_info is platform.python_version()."""
        import platform

        assert km.python_version() == platform.python_version()


def render_family(family: Any) -> bytes:
    registry = CollectorRegistry(auto_describe=False)

    class One:
        def collect(self) -> Iterator[Any]:
            yield family

    registry.register(One())
    return generate_latest(registry)


names = st.text(st.characters(codec="utf-8"), min_size=1, max_size=12)
texts = st.text(st.characters(codec="utf-8"), max_size=20)
values = st.floats(allow_nan=True, allow_infinity=True) | st.integers(-(10**20), 10**20)


class TestFormat:
    @pytest.mark.parametrize(
        "value",
        [
            0.0,
            -0.0,
            1.0,
            0.1,
            1e6,
            999999.0,
            1e7,
            12345678.0,
            1.7962311910496678e09,
            1e16,
            1e22,
            1e300,
            5e-324,
            1e-7,
            -1e7,
            -12345678.9,
            math.inf,
            -math.inf,
            math.nan,
            2**53 + 1,
            10**30,
        ],
    )
    def test_values_as_the_go_client_writes_them(self, value: float) -> None:
        """+Inf, -Inf, NaN, and positive values of 8 or more integer digits in 1e+07 form."""
        assert km.format_value(value) == go_float(value)

    @given(values)
    def test_any_value(self, value: float) -> None:
        """Every float (and int) is written as prometheus-client writes it."""
        assert km.format_value(value) == go_float(value)

    @given(names, texts, st.lists(st.tuples(names, texts), max_size=3), values)
    def test_any_gauge_family(
        self, name: str, help_text: str, labels: list[tuple[str, str]], value: float
    ) -> None:
        """Names with characters outside the legacy set, escaped label values and help text
        come out as prometheus-client writes them (label names deduplicated first)."""
        pairs = tuple(dict(labels).items())
        fam = GaugeMetricFamily(name, help_text, labels=[k for k, _ in pairs])
        fam.add_metric([v for _, v in pairs], value)
        out: list[str] = []
        km._render_samples(out, [lambda: [Smp(name, "gauge", help_text, pairs, value)]])
        assert "".join(out).encode() == render_family(fam)

    @given(names, texts, st.lists(st.tuples(names, texts), max_size=2), values)
    def test_any_counter_family(
        self, name: str, help_text: str, labels: list[tuple[str, str]], value: float
    ) -> None:
        """A counter's family and series end in _total whether its name did or not."""
        pairs = tuple(dict(labels).items())
        for full in (name, f"{name}_total"):
            fam = CounterMetricFamily(full, help_text, labels=[k for k, _ in pairs])
            fam.add_metric([v for _, v in pairs], value)
            out: list[str] = []
            smp = [Smp(full, "counter", help_text, pairs, value)]
            km._render_samples(out, [smp.copy])
            assert "".join(out).encode() == render_family(fam)


class TestImportCost:
    def test_rendering_loads_no_prometheus_client_or_platform(self) -> None:
        """The agent's metrics and a scrape of them load neither prometheus-client nor
        platform (they would stay resident for the agent's life)."""
        code = (
            "import sys\n"
            "from keystone.metrics import Metrics\n"
            "m = Metrics()\n"
            "m.sync('applied', 'git', 1.0)\n"
            "assert m.render()[0]\n"
            "print([x for x in ('prometheus_client', 'platform', 'wsgiref') if x in sys.modules])\n"
        )
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
        )
        assert out.stdout == "[]\n", out.stderr
