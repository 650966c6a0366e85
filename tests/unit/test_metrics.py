"""Metrics: the Go names and labels, parsed back with prometheus-client's own text parser."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from keystone.metrics import PHASES, STATES, Metrics, health_label, read_proc_stat
from keystone.runtime.reported import PHASE_TO_STATE
from tests.conftest import wait_until

TICKS = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")

GO_NAMES = (
    "keystone_component_state",
    "keystone_component_state_health",
    "keystone_component_restarts_total",
    "keystone_component_healthy",
    "keystone_component_cpu_percent",
    "keystone_component_memory_rss_bytes",
    "keystone_reconcile_total",
    "keystone_reconcile_duration_seconds_count",
    "keystone_reconcile_repairs_total",
    "keystone_reconcile_last_timestamp_seconds",
    "keystone_clock_trusted",
)
OUR_NAMES = (
    "keystone_build_info",
    "keystone_uptime_seconds",
    "keystone_deployments_total",
    "keystone_rollbacks_total",
    "keystone_sync_total",
    "keystone_sync_duration_seconds_count",
    "keystone_sync_last_timestamp_seconds",
    "keystone_revision_info",
    "keystone_signature_failures_total",
    "keystone_artifact_cache_bytes",
)


def scrape(m: Metrics) -> list[Any]:
    """Every sample of one scrape, through prometheus-client's parser."""
    body, ctype = m.render()
    assert ctype.startswith("text/plain; version=0.0.4")
    return [s for f in text_string_to_metric_families(body.decode()) for s in f.samples]


def value(samples: list[Any], metric: str, /, **labels: str) -> float | None:
    """The value of the sample with this name and these labels, or None."""
    for s in samples:
        if s.name == metric and all(s.labels.get(k) == v for k, v in labels.items()):
            return float(s.value)
    return None


@pytest.fixture
def busy() -> Iterator[subprocess.Popen[bytes]]:
    """A child that spins on the CPU and holds ~20 MB, until killed."""
    code = "b = bytearray(20 << 20)\nfor i in range(0, len(b), 4096): b[i] = 1\nwhile True: pass\n"
    proc = subprocess.Popen([sys.executable, "-c", code])
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


class TestNames:
    def test_every_name_after_events(self) -> None:
        """After one event of each kind, a scrape carries every Go name and every added one."""
        m = Metrics()
        m.set_component("db", "healthy", True, 2, os.getpid())
        m.reconcile("ok", 0.2, ["db"])
        m.deployment("ok")
        m.rollback("ok")
        m.sync("applied", "git", 1.5)
        m.set_revision("a" * 40, "git")
        m.signature_failure("commit")
        m.set_cache_bytes(1234)
        names = {s.name for s in scrape(m)}
        missing = [n for n in GO_NAMES + OUR_NAMES if n not in names]
        assert missing == []

    def test_families_exist_before_any_event(self) -> None:
        """A fresh agent already exposes every family (dashboards need no first event)."""
        m = Metrics()
        body, _ = m.render()
        families = {f.name for f in text_string_to_metric_families(body.decode())}
        for name in ("keystone_sync", "keystone_signature_failures", "keystone_deployments"):
            assert name in families
        samples = scrape(m)
        assert value(samples, "keystone_deployments_total", result="rolled-back") == 0
        assert value(samples, "keystone_clock_trusted") == 1
        assert (value(samples, "keystone_uptime_seconds") or 0) >= 0

    def test_no_created_series(self) -> None:
        """Like the Go agent: no *_created series doubling every counter."""
        m = Metrics()
        m.deployment("ok")
        assert not [s for s in scrape(m) if s.name.endswith("_created")]

    def test_build_info(self) -> None:
        """keystone_build_info carries the version and the Python version."""
        import platform

        from keystone import __version__

        s = scrape(Metrics())
        assert value(s, "keystone_build_info", version=__version__) == 1
        assert value(s, "keystone_build_info", python=platform.python_version()) == 1

    def test_two_registries_do_not_clash(self) -> None:
        """Each Metrics has its own registry (tests and the agent may create several)."""
        a, b = Metrics(), Metrics()
        a.deployment("ok")
        assert value(scrape(a), "keystone_deployments_total", result="ok") == 1
        assert value(scrape(b), "keystone_deployments_total", result="ok") == 0


class TestComponents:
    def test_state_is_one_for_the_current_state_only(self) -> None:
        """keystone_component_state{name,state} carries Go's states (none, stopped, running,
        failed), 1 for the current one and 0 for the others; the phase has its own series."""
        m = Metrics()
        m.set_component("api", "starting", False, 0, None)
        m.set_component("api", "healthy", True, 0, None)
        s = scrape(m)
        assert STATES == ("none", "stopped", "running", "failed")
        for state in STATES:
            want = 1.0 if state == "running" else 0.0
            assert value(s, "keystone_component_state", name="api", state=state) == want
        for phase in PHASES:
            want = 1.0 if phase == "healthy" else 0.0
            assert value(s, "keystone_component_phase", name="api", phase=phase) == want

    @pytest.mark.parametrize(
        ("phase", "state"),
        [
            ("pending", "none"),
            ("installing", "none"),
            ("starting", "running"),
            ("healthy", "running"),
            ("unhealthy", "running"),
            ("backoff", "stopped"),
            ("stopping", "stopped"),
            ("stopped", "stopped"),
            ("failed", "failed"),
        ],
    )
    def test_every_phase_maps_to_a_go_state(self, phase: str, state: str) -> None:
        """The one mapping (keystone.runtime.reported) covers every supervisor phase."""
        assert set(PHASE_TO_STATE) == set(PHASES)
        assert PHASE_TO_STATE[phase] == state
        m = Metrics()
        m.set_component("db", phase, False, 0, None)
        assert value(scrape(m), "keystone_component_state", name="db", state=state) == 1

    def test_go_alert_fires_for_a_component_not_running(self) -> None:
        """Go's KeystoneComponentDown: ``keystone_component_state{state="running"} == 0 unless
        on(name) keystone_component_state{state="running"} == 1`` selects exactly the
        components that are not running."""
        m = Metrics()
        m.set_component("up", "healthy", True, 0, None)
        m.set_component("crashed", "failed", False, 5, None)
        m.set_component("waiting", "backoff", False, 2, None)
        running = {
            x.labels["name"]: x.value
            for x in scrape(m)
            if x.name == "keystone_component_state" and x.labels["state"] == "running"
        }
        firing = {n for n, v in running.items() if v == 0} - {
            n for n, v in running.items() if v == 1
        }
        assert firing == {"crashed", "waiting"}

    @pytest.mark.parametrize(
        ("state", "healthy", "health"),
        [
            ("running", True, "healthy"),
            ("running", False, "unhealthy"),
            ("failed", False, "unknown"),
            ("stopped", False, "unknown"),
            ("none", False, "unknown"),
        ],
    )
    def test_state_health(self, state: str, healthy: bool, health: str) -> None:
        """keystone_component_state_health{name,state,health} is 1 for the current pair, with
        Go's values: health is unknown whenever the component is not running."""
        assert health_label(state, healthy) == health
        m = Metrics()
        m.set_component("db", "healthy", healthy, 0, None, state=state)
        s = scrape(m)
        pairs = [x for x in s if x.name == "keystone_component_state_health"]
        assert [(x.labels, x.value) for x in pairs] == [
            ({"name": "db", "state": state, "health": health}, 1.0)
        ]
        assert value(s, "keystone_component_healthy", name="db") == (1 if healthy else 0)

    def test_explicit_health_label(self) -> None:
        """The agent names the health itself (the component's last_health)."""
        m = Metrics()
        m.set_component("db", "starting", False, 0, None, state="running", health="unknown")
        assert value(scrape(m), "keystone_component_state_health", health="unknown") == 1

    def test_restarts_is_a_counter(self) -> None:
        """keystone_component_restarts_total is a counter with the restart count."""
        m = Metrics()
        m.set_component("db", "healthy", True, 3, None)
        body, _ = m.render()
        fam = [
            f
            for f in text_string_to_metric_families(body.decode())
            if f.name == "keystone_component_restarts"
        ]
        assert fam and fam[0].type == "counter"
        assert value(scrape(m), "keystone_component_restarts_total", name="db") == 3

    def test_an_unknown_phase_is_still_exported(self) -> None:
        """A phase this module does not list gets its own series (and the known ones are 0)."""
        m = Metrics()
        m.set_component("db", "draining", False, 0, None)
        s = scrape(m)
        assert value(s, "keystone_component_phase", name="db", phase="draining") == 1
        assert value(s, "keystone_component_phase", name="db", phase="healthy") == 0
        assert value(s, "keystone_component_state", name="db", state="stopped") == 1

    def test_remove_component(self) -> None:
        """A component removed from the plan leaves no series behind."""
        m = Metrics()
        m.set_component("db", "healthy", True, 0, os.getpid())
        m.set_component("api", "healthy", True, 0, None)
        m.remove_component("db")
        names = {s.labels.get("name") for s in scrape(m) if s.name.startswith("keystone_comp")}
        assert names == {"api"}

    def test_concurrent_updates_and_scrapes(self) -> None:
        """The agent's loop updating while API threads scrape never breaks a scrape."""
        m = Metrics()
        stop = threading.Event()
        errors: list[BaseException] = []

        def writer() -> None:
            i = 0
            while not stop.is_set():
                name = f"c{i % 40}"
                m.set_component(name, STATES[i % len(STATES)], i % 2 == 0, i, os.getpid())
                if i % 7 == 0:
                    m.remove_component(name)
                i += 1

        t = threading.Thread(target=writer)
        t.start()
        try:
            # Each /proc read gives the GIL away and waits for the writer's switch interval:
            # a scrape takes ~0.3 s here, so ten are plenty to meet the writer mid-update.
            for _ in range(10):
                try:
                    scrape(m)
                except BaseException as exc:  # the test reports any failure below
                    errors.append(exc)
        finally:
            stop.set()
            t.join()
        assert errors == []


class TestProc:
    def test_cpu_and_rss_of_a_real_process(self, busy: subprocess.Popen[bytes]) -> None:
        """CPU and RSS come from /proc for the component's pid."""
        wait_until(
            lambda: (s := read_proc_stat(busy.pid)) is not None and s.ticks >= TICKS // 5,
            what="the child to use some CPU",
        )
        m = Metrics()
        m.set_component("spin", "healthy", True, 0, busy.pid)
        first = scrape(m)
        assert (value(first, "keystone_component_cpu_percent", name="spin") or 0) > 0
        rss = value(first, "keystone_component_memory_rss_bytes", name="spin") or 0
        status = Path(f"/proc/{busy.pid}/status").read_text()
        vmrss = next(int(x.split()[1]) for x in status.splitlines() if x.startswith("VmRSS"))
        assert rss > 20 << 20 and vmrss * 1024 / 2 < rss < vmrss * 1024 * 2

    def test_a_gone_process_has_no_cpu_or_rss(self) -> None:
        """When the pid is gone the CPU and RSS series disappear, the state stays."""
        proc = subprocess.Popen([sys.executable, "-c", "pass"])
        proc.wait()
        m = Metrics()
        m.set_component("gone", "failed", False, 1, proc.pid)
        s = scrape(m)
        assert value(s, "keystone_component_cpu_percent", name="gone") is None
        assert value(s, "keystone_component_memory_rss_bytes", name="gone") is None
        assert value(s, "keystone_component_state", name="gone", state="failed") == 1


def fake_proc(root: Path, pid: int, *, ticks: int, rss_pages: int, start: int, up: float) -> None:
    """A /proc with one process whose command name contains ') (' and spaces."""
    d = root / str(pid)
    d.mkdir(parents=True, exist_ok=True)
    fields = ["S", *["0"] * 10, str(ticks), "0", *["0"] * 6, str(start), "0", str(rss_pages)]
    (d / "stat").write_text(f"{pid} (odd) (name x) " + " ".join(fields) + "\n")
    (root / "uptime").write_text(f"{up:.2f} 0.00\n")


class TestCpuArithmetic:
    def test_stat_fields_after_the_last_parenthesis(self, tmp_path: Path) -> None:
        """utime+stime, rss and starttime are counted after the command name's last ')'."""
        fake_proc(tmp_path, 42, ticks=7, rss_pages=10, start=3, up=1.0)
        s = read_proc_stat(42, tmp_path)
        assert s is not None and (s.ticks, s.rss_pages, s.start) == (7, 10, 3)
        assert read_proc_stat(43, tmp_path) is None

    def test_first_scrape_is_the_average_since_start_then_the_rate(self, tmp_path: Path) -> None:
        """First look: ticks over the process's age; then: tick delta over the scrape interval."""
        now = [100.0]
        m = Metrics(proc=tmp_path, monotonic=lambda: now[0])
        # Started 10 s after boot, 20 s ago (boot+30 s), 5 s of CPU in total: 25 %.
        fake_proc(tmp_path, 42, ticks=5 * TICKS, rss_pages=100, start=10 * TICKS, up=30.0)
        m.set_component("x", "healthy", True, 0, 42)
        s = scrape(m)
        assert value(s, "keystone_component_cpu_percent", name="x") == pytest.approx(25.0)
        assert value(s, "keystone_component_memory_rss_bytes", name="x") == 100 * PAGE
        # 2 s later, 1 more second of CPU: 50 % over the interval.
        now[0] += 2.0
        fake_proc(tmp_path, 42, ticks=6 * TICKS, rss_pages=100, start=10 * TICKS, up=32.0)
        s = scrape(m)
        assert value(s, "keystone_component_cpu_percent", name="x") == pytest.approx(50.0)

    def test_a_reused_pid_starts_over(self, tmp_path: Path) -> None:
        """A pid whose start time changed is another process: no rate across the two."""
        now = [100.0]
        m = Metrics(proc=tmp_path, monotonic=lambda: now[0])
        fake_proc(tmp_path, 42, ticks=50 * TICKS, rss_pages=1, start=10 * TICKS, up=110.0)
        m.set_component("x", "healthy", True, 0, 42)
        scrape(m)
        now[0] += 1.0
        # Same pid, new process started at boot+100 s, 1 s of CPU in its 10 s of life.
        fake_proc(tmp_path, 42, ticks=TICKS, rss_pages=1, start=100 * TICKS, up=110.0)
        s = scrape(m)
        assert value(s, "keystone_component_cpu_percent", name="x") == pytest.approx(10.0)

    def test_a_new_pid_resets_the_sample(self, tmp_path: Path) -> None:
        """After a restart (new pid) the first scrape is again the average since start."""
        now = [100.0]
        m = Metrics(proc=tmp_path, monotonic=lambda: now[0])
        fake_proc(tmp_path, 42, ticks=10 * TICKS, rss_pages=1, start=0, up=100.0)
        fake_proc(tmp_path, 43, ticks=2 * TICKS, rss_pages=1, start=96 * TICKS, up=100.0)
        m.set_component("x", "healthy", True, 0, 42)
        scrape(m)
        m.set_component("x", "healthy", True, 1, 43)
        now[0] += 1.0
        s = scrape(m)
        assert value(s, "keystone_component_cpu_percent", name="x") == pytest.approx(50.0)


class TestEvents:
    def test_counters_and_gauges(self) -> None:
        """Each event method moves its own series."""
        m = Metrics()
        m.deployment("ok")
        m.deployment("rolled-back")
        m.deployment("rolled-back")
        m.rollback("failed")
        m.sync("applied", "git", 2.0)
        m.sync("refused", "bundle", 0.5)
        m.signature_failure("commit")
        m.set_cache_bytes(4096)
        m.set_clock_trusted(False)
        m.reconcile("ok", 0.1, ["api", "db"])
        m.reconcile("ok", 0.1, ["db"])
        m.reconcile("ok", 0.1)
        s = scrape(m)
        assert value(s, "keystone_deployments_total", result="rolled-back") == 2
        assert value(s, "keystone_rollbacks_total", result="failed") == 1
        assert value(s, "keystone_sync_total", result="applied", source="git") == 1
        assert value(s, "keystone_sync_total", result="refused", source="bundle") == 1
        assert value(s, "keystone_sync_duration_seconds_count") == 2
        assert value(s, "keystone_sync_duration_seconds_sum") == pytest.approx(2.5)
        assert (value(s, "keystone_sync_last_timestamp_seconds") or 0) > 0
        assert value(s, "keystone_signature_failures_total", kind="commit") == 1
        assert value(s, "keystone_artifact_cache_bytes") == 4096
        assert value(s, "keystone_clock_trusted") == 0
        assert value(s, "keystone_reconcile_total", result="ok") == 3
        # Labelled by component as in Go (its RepeatedlyRepaired alert names $labels.component).
        assert value(s, "keystone_reconcile_repairs_total", component="db") == 2
        assert value(s, "keystone_reconcile_repairs_total", component="api") == 1
        assert (value(s, "keystone_reconcile_last_timestamp_seconds") or 0) > 0

    def test_revision_info_replaces_the_previous(self) -> None:
        """keystone_revision_info has one series: the applied revision and its source."""
        m = Metrics()
        m.set_revision("a" * 40, "git")
        m.set_revision("b" * 40, "bundle")
        infos = [s for s in scrape(m) if s.name == "keystone_revision_info"]
        assert [(s.labels, s.value) for s in infos] == [
            ({"revision": "b" * 40, "source": "bundle"}, 1.0)
        ]
