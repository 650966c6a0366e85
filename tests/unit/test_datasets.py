"""Datasets: the recipe table, reload rules, the store's layout and retention, the schedule."""

from __future__ import annotations

import asyncio
import os
from datetime import UTC, datetime
from pathlib import Path

import pytest

from keystone.datasets import schedule, spec
from keystone.datasets.notify import SupervisorHealth
from keystone.datasets.status import go_duration
from keystone.datasets.store import DatasetState, DatasetStore, VersionRecord
from keystone.errors import ValidationError
from keystone.runtime.archive import ArchiveLimits

M = 'manifest = "https://hub.plant.local/oui.manifest.toml"'


def parse(body: str) -> tuple[spec.DatasetSpec, ...]:
    return spec.parse_datasets_text(body, file="r.toml")


class TestSpec:
    """parse_datasets applies Go's defaults and refuses what Go refuses, with a location."""

    def test_defaults(self) -> None:
        """24h refresh, three missed refreshes of max_age, keep 2, required, <manifest>.sig."""
        [s] = parse(f'[[datasets]]\nname = "cve-bundle"\n{M}\n')
        assert (s.refresh, s.max_age, s.keep, s.required) == (86400.0, 3 * 86400.0, 2, True)
        assert s.sig_uri == "https://hub.plant.local/oui.manifest.toml.sig"
        assert s.env_name == "KEYSTONE_DATASET_CVE_BUNDLE"

    def test_every_field(self) -> None:
        """Each key of the table is read."""
        [s] = parse(
            '[[datasets]]\nname = "oui"\n'
            f"{M}\n"
            'sig_uri = "https://x/s"\ncert_uri = "https://x/c.pem"\nrefresh = "168h"\n'
            'max_age = "720h"\nkeep = 3\nrequired = false\ngithub_token = "s3cret"\n'
            '[datasets.headers]\nAuthorization = "Bearer x"\n'
        )
        assert (s.sig_uri, s.cert_uri, s.refresh, s.max_age, s.keep, s.required) == (
            "https://x/s",
            "https://x/c.pem",
            168 * 3600.0,
            720 * 3600.0,
            3,
            False,
        )
        assert s.headers == {"Authorization": "Bearer x"} and s.github_token == "s3cret"
        assert "s3cret" not in repr(s) and "Bearer" not in repr(s)

    @pytest.mark.parametrize(
        ("body", "field", "want"),
        [
            (f"{M}\n", "datasets[0].name", "no name"),
            ('name = "oui"\n', "datasets[0].manifest", "no manifest"),
            (f'name = "../../etc"\n{M}\n', "datasets[0].name", "[A-Za-z0-9._+-]"),
            (f'name = "a..b"\n{M}\n', "datasets[0].name", "'..'"),
            (f'name = "current"\n{M}\n', "datasets[0].name", "active-version link"),
            (f'name = ".cache"\n{M}\n', "datasets[0].name", "start with '.'"),
            (f'name = "oui"\n{M}\nrefresh = "5s"\n', "datasets[0].refresh", "not a poll loop"),
            (f'name = "oui"\n{M}\nrefresh = "daily"\n', "datasets[0].refresh", "is not a duration"),
            (f'name = "oui"\n{M}\nrefresh = "24h"\nmax_age = "1h"\n', "datasets[0].max_age", "shorter than its refresh"),
            (f'name = "oui"\n{M}\nkeep = 1\n', "datasets[0].keep", "nothing to roll back to"),
            (f'name = "oui"\n{M}\nrequired = "yes"\n', "datasets[0].required", "true or false"),
        ],
    )  # fmt: skip
    def test_rejections(self, body: str, field: str, want: str) -> None:
        """Each unusable entry is refused at its field, naming the file."""
        with pytest.raises(ValidationError) as info:
            parse("[[datasets]]\n" + body)
        assert want in str(info.value) and info.value.file == "r.toml"
        assert info.value.field == field

    def test_duplicates(self) -> None:
        """Two entries with one name would share a directory and a variable."""
        one = f'[[datasets]]\nname = "oui"\n{M}\n'
        with pytest.raises(ValidationError, match="duplicate dataset name"):
            parse(one + one)

    def test_unknown_keys_are_recorded(self) -> None:
        """An unknown key is reported like every other table's, not refused."""
        from keystone.tomlsrc import Reader

        r = Reader.from_text(f'[[datasets]]\nname = "oui"\n{M}\nmirror = "x"\n', file="r.toml")
        spec.parse_datasets(r)
        assert r.unknown_messages() == ["r.toml:4: unknown field datasets[0].mirror"]


class TestReload:
    """reload_plan follows Go's ParseReload rules."""

    def test_signal_allow_list(self) -> None:
        """HUP and the user signals, in any case, with or without SIG; nothing else."""
        for ok in ("SIGHUP", "hup", "SIGUSR1", "usr2"):
            spec.parse_signal(ok)
        for bad in ("SIGKILL", "SIGTERM", "KILL", "9", ""):
            with pytest.raises(ValueError):
                spec.parse_signal(bad)

    def test_rules(self) -> None:
        """Both at once, a signal for a container and a forbidden signal are refused."""
        assert spec.reload_plan("SIGHUP", None, None) == spec.ReloadPlan("SIGHUP", "", 30.0)
        assert not spec.reload_plan(None, None, None).declared
        with pytest.raises(ValidationError, match="pick one"):
            spec.reload_plan("SIGHUP", "true", None)
        with pytest.raises(ValidationError, match="container"):
            spec.reload_plan("SIGHUP", None, None, run_type="container")
        assert (
            spec.reload_plan(None, "docker kill -s HUP app", 120.0, run_type="container").grace
            == 120.0
        )
        with pytest.raises(ValidationError, match="not allowed"):
            spec.reload_plan("SIGTERM", None, None)

    @pytest.mark.parametrize(
        ("name", "want"),
        [("oui", "KEYSTONE_DATASET_OUI"), ("cve-bundle", "KEYSTONE_DATASET_CVE_BUNDLE"),
         ("vendor.list", "KEYSTONE_DATASET_VENDOR_LIST"), ("a1", "KEYSTONE_DATASET_A1")],
    )  # fmt: skip
    def test_env_name(self, name: str, want: str) -> None:
        """Go's EnvName."""
        assert spec.env_name(name) == want


def when(day: int) -> datetime:
    return datetime(2026, 8, day, 3, 0, tzinfo=UTC)


def place(store: DatasetStore, version: str, text: str, tmp: Path, day: int = 14) -> None:
    src = tmp / f"payload-{version}.csv"
    src.write_text(text)
    store.place("cve", version, src, file_name="data.csv", limits=ArchiveLimits())
    state = store.load_state("cve")
    state.versions[version] = VersionRecord(when(day), "0" * 64, len(text))
    store.save_state(state)


class TestStore:
    """Go's layout: version directories, a relative current link, retention that keeps the active."""

    def test_activate_switch_and_rollback(self, tmp_path: Path) -> None:
        """current is relative, switches by rename and goes back the same way."""
        store = DatasetStore(tmp_path / "ds")
        place(store, "2026-08-14", "yesterday", tmp_path, 14)
        store.activate("cve", "2026-08-14")
        assert os.readlink(store.path("cve")) == "2026-08-14"
        place(store, "2026-08-15", "today", tmp_path, 15)
        store.activate("cve", "2026-08-15")
        assert (store.path("cve") / "data.csv").read_text() == "today"
        store.activate("cve", "2026-08-14")
        assert (store.path("cve") / "data.csv").read_text() == "yesterday"
        assert not (store.dir("cve") / "current.tmp").exists()

    def test_missing_version_is_not_activated(self, tmp_path: Path) -> None:
        """A link to nothing would dangle."""
        with pytest.raises(ValidationError, match="missing"):
            DatasetStore(tmp_path).activate("cve", "2026-08-15")

    def test_place_replaces_a_leftover_and_refuses_the_active(self, tmp_path: Path) -> None:
        """A half-made directory of the same version is replaced; the active one is not touched."""
        store = DatasetStore(tmp_path)
        (store.dir("cve") / "2026-08-15").mkdir(parents=True)
        (store.dir("cve") / "2026-08-15" / "half.txt").write_text("truncated")
        place(store, "2026-08-15", "whole", tmp_path, 15)
        assert os.listdir(store.dir("cve") / "2026-08-15") == ["data.csv"]
        store.activate("cve", "2026-08-15")
        with pytest.raises(ValidationError, match="new version label"):
            place(store, "2026-08-15", "other", tmp_path, 15)

    def test_prune_keeps_newest_active_and_protected(self, tmp_path: Path) -> None:
        """After a rollback the active one is not the newest; it and the protected one stay.

        As in Go, the protected versions count towards keep, so the failed newest one goes too.
        """
        store = DatasetStore(tmp_path)
        for day in (11, 12, 13, 14, 15):
            place(store, f"2026-08-{day}", str(day), tmp_path, day)
        store.activate("cve", "2026-08-13")
        removed = store.prune("cve", 2, ("2026-08-12",))
        assert removed == ["2026-08-11", "2026-08-14", "2026-08-15"]
        assert store.versions("cve") == ["2026-08-12", "2026-08-13"]
        assert store.active("cve") == "2026-08-13"
        assert set(store.load_state("cve").versions) == set(store.versions("cve"))

    def test_versions_order_by_publication_not_label(self, tmp_path: Path) -> None:
        """Version labels are for humans: retention goes by the published time."""
        store = DatasetStore(tmp_path)
        place(store, "v10", "new", tmp_path, 20)
        place(store, "v9", "old", tmp_path, 10)
        assert store.versions("cve") == ["v9", "v10"]

    def test_recover_and_bad_version_labels(self, tmp_path: Path) -> None:
        """Staging leftovers are removed; a label that is no directory name is refused."""
        store = DatasetStore(tmp_path)
        (store.dir("cve") / ".staging-x-1").mkdir(parents=True)
        assert store.recover("cve") == [".staging-x-1"]
        for bad in ("../x", "current", ".hidden", "a/b"):
            with pytest.raises(ValidationError):
                store.version_dir("cve", bad)

    def test_state_round_trip_and_damage(self, tmp_path: Path) -> None:
        """The persisted state reads back; a damaged file yields an empty state."""
        store = DatasetStore(tmp_path)
        state = DatasetState(
            name="cve",
            accepted_published=when(15),
            accepted_sha256="a" * 64,
            last_refresh=123.0,
            last_result="ok",
            versions={"2026-08-15": VersionRecord(when(15), "a" * 64, 3)},
        )
        store.save_state(state)
        assert store.load_state("cve") == state
        (store.dir("cve") / ".state.json").write_text('{"accepted_published": 5}')
        assert store.load_state("cve") == DatasetState(name="cve")


class TestSchedule:
    """Pure parts of the schedule: offsets and retry delays."""

    def test_jitter_is_fixed_and_bounded(self) -> None:
        """The same device and dataset always get the same slot, within 10% (at most 15m)."""
        a = schedule.jitter("gw-1", "cve", 3600.0)
        assert a == schedule.jitter("gw-1", "cve", 3600.0) and 0 <= a < 360
        assert schedule.jitter("gw-2", "cve", 3600.0) != a
        assert schedule.jitter("gw-1", "cve", 7 * 86400.0) < 900

    @pytest.mark.parametrize(
        ("failures", "want"), [(1, 60.0), (2, 120.0), (3, 240.0), (10, 3600.0)]
    )
    def test_retry_delay(self, failures: int, want: float) -> None:
        """1, 2, 4 minutes... never more than the interval."""
        assert schedule.retry_delay(3600.0, failures) == want


@pytest.mark.parametrize(
    ("seconds", "want"),
    [(86400.0, "24h0m0s"), (259200.0, "72h0m0s"), (30.0, "30s"), (90.0, "1m30s"), (60.0, "1m0s"),
     (0.5, "500ms"), (0.0, "0s")],
)  # fmt: skip
def test_go_duration(seconds: float, want: str) -> None:
    """Durations print as Go's time.Duration.String, as the Go API returns them."""
    assert go_duration(seconds) == want


class FakeSupervisor:
    """A supervisor-like object: a state and wait_for over it."""

    def __init__(self, state: str, then: str | None = None) -> None:
        self.state = state
        self.then = then
        self.error = "3 failed health checks" if then else None

    async def wait_for(self, predicate: object, timeout: float | None) -> bool:
        if self.then is not None:
            self.state = self.then
        return bool(predicate(self.state))  # type: ignore[operator]


class TestSupervisorHealth:
    """SupervisorHealth turns a supervisor's states into a verdict for the grace period."""

    def test_verdicts(self) -> None:
        """Healthy throughout: None; turning unhealthy: the reason; no supervisor: a reason."""
        sups = {"ok": FakeSupervisor("healthy"), "bad": FakeSupervisor("healthy", "unhealthy")}
        health = SupervisorHealth(sups.get)
        assert asyncio.run(health.watch("ok", 1.0)) is None
        assert asyncio.run(health.watch("bad", 1.0)) == (
            "the component turned unhealthy (3 failed health checks)"
        )
        assert "not supervised" in str(asyncio.run(health.watch("none", 1.0)))
