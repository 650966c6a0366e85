"""Dataset refreshes against a real loopback hub with openssl-made certificates.

Each refusal leaves the old dataset active; an activation switches ``current`` and reloads a real
child process by signal (same pid); a component turning unhealthy rolls the dataset back.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pytest

from keystone.datasets import (
    DatasetStore,
    ProcessNotifier,
    ReloadPlan,
    Resolver,
)
from keystone.datasets.manager import FAILED, UNCHANGED, UPDATED, DatasetManager
from keystone.datasets.status import dataset_detail, datasets_json, metric_samples
from tests.conftest import wait_until
from tests.integration.artifacts.conftest import Pki
from tests.integration.datasets.conftest import BASE, Hub, Publisher, Wall, make_manager

pytestmark = pytest.mark.integration


def read_current(root: Path, name: str = "cve") -> str:
    return (root / "datasets" / name / "current" / "data.txt").read_text()


def refresh(mgr: DatasetManager, name: str = "cve", **kw: object) -> object:
    return asyncio.run(mgr.refresh(name, **kw))  # type: ignore[arg-type]


class FakeHealth:
    """A HealthObserver that answers what the test scripted, recording what it was asked."""

    def __init__(self, *verdicts: str | None) -> None:
        self.verdicts = list(verdicts)
        self.asked: list[tuple[str, float]] = []

    async def watch(self, component: str, grace: float) -> str | None:
        self.asked.append((component, grace))
        return self.verdicts.pop(0) if self.verdicts else None


class TestActivation:
    """A new signed manifest is verified, staged and activated through the current link."""

    def test_first_refresh_activates_and_links_relatively(
        self, tmp_path: Path, pki: Pki, publisher: Publisher
    ) -> None:
        """The payload is unpacked into its version directory; current is a relative link."""
        publisher.publish(0)
        mgr = make_manager(tmp_path, pki)
        mgr.bind("scanner", [publisher.spec()])
        result = refresh(mgr)
        assert result.result == UPDATED and result.version == "2026-08-14"  # type: ignore[attr-defined]
        link = tmp_path / "datasets" / "cve" / "current"
        assert os.readlink(link) == "2026-08-14"
        assert read_current(tmp_path) == "feed of day 0\n"
        assert mgr.env_for("scanner") == {"KEYSTONE_DATASET_CVE": str(link)}
        assert os.path.isabs(mgr.env_for("scanner")["KEYSTONE_DATASET_CVE"])

    def test_openssl_signed_manifest_is_accepted(
        self, tmp_path: Path, pki: Pki, publisher: Publisher
    ) -> None:
        """A signature made by openssl (RSA, dgst -sha256 -sign) verifies like our own."""
        publisher.signer = "signer-rsa"
        publisher.publish(0, openssl_signer=True)
        mgr = make_manager(tmp_path, pki)
        mgr.bind("scanner", [publisher.spec()])
        assert refresh(mgr).result == UPDATED  # type: ignore[attr-defined]

    def test_same_manifest_again_is_unchanged(
        self, tmp_path: Path, pki: Pki, publisher: Publisher, hub: Hub
    ) -> None:
        """Fetching the active manifest again is "unchanged": no payload download, no replay."""
        publisher.publish(0)
        mgr = make_manager(tmp_path, pki)
        mgr.bind("scanner", [publisher.spec()])
        refresh(mgr)
        hub.seen.clear()
        result = refresh(mgr)
        assert result.result == UNCHANGED  # type: ignore[attr-defined]
        assert not any(p.endswith(".tar") for p in hub.seen)

    def test_reload_signal_reaches_the_same_process(
        self, tmp_path: Path, pki: Pki, publisher: Publisher
    ) -> None:
        """A real child with a SIGHUP handler rereads current on the signal and keeps its pid."""
        publisher.publish(0)
        mgr = make_manager(tmp_path, pki)
        link = tmp_path / "datasets" / "cve" / "current"
        out = tmp_path / "child.out"
        child_code = textwrap.dedent(
            f"""
            import os, signal, sys, time
            def reread(*_):
                data = open({str(link / "data.txt")!r}).read().strip()
                with open({str(out)!r}, "a") as fh:
                    fh.write(f"{{os.getpid()}} {{data}}\\n")
            signal.signal(signal.SIGHUP, reread)
            reread()
            while True:
                time.sleep(3600)
            """
        )
        pids: dict[str, int] = {}
        notifier = ProcessNotifier(lambda c: pids.get(c))
        mgr.bind(
            "scanner", [publisher.spec()], reload=ReloadPlan(signal="SIGHUP"), notifier=notifier
        )
        assert refresh(mgr, notify=False).result == UPDATED  # type: ignore[attr-defined]
        child = subprocess.Popen([sys.executable, "-c", child_code])
        try:
            pids["scanner"] = child.pid
            wait_until(lambda: out.exists() and "day 0" in out.read_text(), what="child start")
            publisher.publish(1)
            result = refresh(mgr)
            assert result.result == UPDATED  # type: ignore[attr-defined]
            lines = wait_until(
                lambda: [ln for ln in out.read_text().splitlines() if "day 1" in ln],
                what="the reload signal",
            )
            assert lines == [f"{child.pid} feed of day 1"]
            assert child.poll() is None  # not restarted, not killed
        finally:
            child.send_signal(signal.SIGTERM)
            child.wait(10)


class TestRefusals:
    """Every refused refresh leaves the old dataset active and says why."""

    def _active(self, tmp_path: Path, pki: Pki, publisher: Publisher) -> DatasetManager:
        publisher.publish(0)
        mgr = make_manager(tmp_path, pki)
        mgr.bind("scanner", [publisher.spec()])
        assert refresh(mgr).result == UPDATED  # type: ignore[attr-defined]
        return mgr

    def _still_old(self, tmp_path: Path, mgr: DatasetManager, result: object, want: str) -> None:
        assert result.result == FAILED, result  # type: ignore[attr-defined]
        assert want in result.reason  # type: ignore[attr-defined]
        assert mgr.store.active("cve") == "2026-08-14"
        assert read_current(tmp_path) == "feed of day 0\n"
        assert mgr.store.load_state("cve").last_result.startswith("dataset cve")

    def test_payload_failing_its_digest(
        self, tmp_path: Path, pki: Pki, publisher: Publisher
    ) -> None:
        """A payload whose bytes do not hash to the manifest's sha256 is refused."""
        mgr = self._active(tmp_path, pki, publisher)
        publisher.publish(1, tamper_payload=True)
        self._still_old(tmp_path, mgr, refresh(mgr), "sha256 mismatch")
        assert not (tmp_path / "datasets" / "cve" / "2026-08-15").exists()

    def test_unsigned_manifest(self, tmp_path: Path, pki: Pki, publisher: Publisher) -> None:
        """A manifest without a signature is refused (fail-closed)."""
        mgr = self._active(tmp_path, pki, publisher)
        publisher.publish(1, sign=False)
        self._still_old(tmp_path, mgr, refresh(mgr), "unsigned")

    def test_manifest_signed_by_an_untrusted_ca(
        self, tmp_path: Path, pki: Pki, publisher: Publisher
    ) -> None:
        """A valid signature from a certificate outside the trust bundle is refused."""
        mgr = self._active(tmp_path, pki, publisher)
        publisher.signer = "signer-rogue"
        publisher.publish(1)
        self._still_old(tmp_path, mgr, refresh(mgr), "does not verify")

    def test_manifest_edited_after_signing(
        self, tmp_path: Path, pki: Pki, publisher: Publisher, hub: Hub
    ) -> None:
        """Changing one byte of a signed manifest breaks its signature."""
        mgr = self._active(tmp_path, pki, publisher)
        publisher.publish(1)
        path = publisher.manifest_path
        hub.files[path] = hub.files[path].replace(b"2026-08-15", b"2026-08-16", 1)
        self._still_old(tmp_path, mgr, refresh(mgr), "does not verify")

    def test_replayed_older_manifest(self, tmp_path: Path, pki: Pki, publisher: Publisher) -> None:
        """A validly signed manifest older than the active one is refused as a replay."""
        publisher.publish(-30)  # last month's, kept by an attacker
        old_manifest = dict(publisher.hub.files)
        mgr = self._active(tmp_path, pki, publisher)
        publisher.hub.files.update(old_manifest)
        self._still_old(tmp_path, mgr, refresh(mgr), "replay")

    def test_same_published_other_content(
        self, tmp_path: Path, pki: Pki, publisher: Publisher
    ) -> None:
        """A manifest with the accepted published time but other bytes is refused too."""
        mgr = self._active(tmp_path, pki, publisher)
        publisher.publish(1, published=BASE, text="other data, same time\n")
        self._still_old(tmp_path, mgr, refresh(mgr), "replay")

    def test_expired_signing_certificate(
        self, tmp_path: Path, pki: Pki, publisher: Publisher
    ) -> None:
        """A manifest signed with a certificate that expired in 2020 is refused."""
        mgr = self._active(tmp_path, pki, publisher)
        publisher.signer = "signer-expired"
        publisher.publish(1)
        result = refresh(mgr)
        self._still_old(tmp_path, mgr, result, "expired")

    def test_certificate_expired_by_the_judged_time(
        self, tmp_path: Path, pki: Pki, publisher: Publisher
    ) -> None:
        """Validity is judged at the resolver's verification time (the trusted clock's)."""
        publisher.publish(0)
        mgr = make_manager(tmp_path, pki, at=BASE.replace(year=2031))
        mgr.bind("scanner", [publisher.spec()])
        result = refresh(mgr)
        assert result.result == FAILED and "expired" in result.reason  # type: ignore[attr-defined]
        assert mgr.store.active("cve") == ""

    def test_no_trust_bundle(self, tmp_path: Path, publisher: Publisher) -> None:
        """Without a trust bundle nothing is accepted."""
        publisher.publish(0)
        store = DatasetStore(tmp_path / "datasets")
        mgr = DatasetManager(store, Resolver(store, trust_bundle=None, environ={}))
        mgr.bind("scanner", [publisher.spec()])
        result = refresh(mgr)
        assert result.result == FAILED and "no trust bundle" in result.reason  # type: ignore[attr-defined]

    def test_hub_down_is_retryable_and_recorded(
        self, tmp_path: Path, pki: Pki, publisher: Publisher, hub: Hub
    ) -> None:
        """A 404 on the manifest fails the refresh; the old version stays; the reason is kept."""
        mgr = self._active(tmp_path, pki, publisher)
        hub.files.clear()
        self._still_old(tmp_path, mgr, refresh(mgr), "is not there")


class TestRollback:
    """A dataset that makes the component unhealthy is rolled back and never retried."""

    def test_unhealthy_component_rolls_back(
        self, tmp_path: Path, pki: Pki, publisher: Publisher
    ) -> None:
        """The previous version is re-activated, the reload sent again, the manifest marked bad."""
        publisher.publish(0)
        mgr = make_manager(tmp_path, pki)
        reloads: list[str] = []

        class Recorder:
            async def reload(self, component: str, plan: ReloadPlan) -> None:
                reloads.append(os.readlink(tmp_path / "datasets" / "cve" / "current"))

        health = FakeHealth("the component turned unhealthy (3 failed health checks)")
        mgr.bind(
            "scanner",
            [publisher.spec()],
            reload=ReloadPlan(signal="SIGHUP", grace=7.0),
            notifier=Recorder(),
            health=health,
        )
        assert refresh(mgr, notify=False).result == UPDATED  # type: ignore[attr-defined]
        publisher.publish(1, text="malformed feed\n")
        result = refresh(mgr)
        assert result.result == FAILED and result.rolled_back  # type: ignore[attr-defined]
        assert "unhealthy" in result.reason  # type: ignore[attr-defined]
        assert health.asked == [("scanner", 7.0)]
        assert reloads == ["2026-08-15", "2026-08-14"]  # told of the new one, then of the old
        assert read_current(tmp_path) == "feed of day 0\n"
        state = mgr.store.load_state("cve")
        assert [b.version for b in state.bad] == ["2026-08-15"]
        assert mgr.activations[("cve", "rolled-back")] == 1
        # The same bad manifest is not activated again; an older one is a replay.
        again = refresh(mgr)
        assert again.result == FAILED and "rolled back" in again.reason  # type: ignore[attr-defined]
        assert read_current(tmp_path) == "feed of day 0\n"
        # A fixed, newer publication is accepted.
        publisher.publish(2)
        assert refresh(mgr).result == UPDATED  # type: ignore[attr-defined]
        assert read_current(tmp_path) == "feed of day 2\n"

    def test_failed_reload_script_rolls_back(
        self, tmp_path: Path, pki: Pki, publisher: Publisher
    ) -> None:
        """A reload script that exits non-zero counts as a failure to take the new data."""
        publisher.publish(0)
        mgr = make_manager(tmp_path, pki)
        notifier = ProcessNotifier(lambda _c: None, cwd_of=lambda _c: tmp_path)
        mgr.bind(
            "scanner",
            [publisher.spec()],
            reload=ReloadPlan(script="echo cannot parse; exit 3"),
            notifier=notifier,
        )
        refresh(mgr, notify=False)
        publisher.publish(1)
        result = refresh(mgr)
        assert result.rolled_back and "exited 3" in result.reason  # type: ignore[attr-defined]
        assert read_current(tmp_path) == "feed of day 0\n"


class TestRetention:
    """keep versions are retained; older ones and their cached payloads are collected."""

    def test_keep_two(self, tmp_path: Path, pki: Pki, publisher: Publisher) -> None:
        """After four publications two version directories and two cached payloads remain."""
        mgr = make_manager(tmp_path, pki)
        mgr.bind("scanner", [publisher.spec(keep=2)])
        for day in range(4):
            publisher.publish(day)
            assert refresh(mgr).result == UPDATED  # type: ignore[attr-defined]
        assert mgr.store.versions("cve") == ["2026-08-16", "2026-08-17"]
        assert mgr.store.active("cve") == "2026-08-17"
        blobs = os.listdir(tmp_path / "datasets" / "cve" / ".cache" / "sha256")
        assert len(blobs) == 2
        assert set(mgr.store.load_state("cve").versions) == {"2026-08-16", "2026-08-17"}


class TestRestart:
    """State survives a restart: the active version, the replay anchor, the bad marks."""

    def test_new_manager_over_the_same_tree(
        self, tmp_path: Path, pki: Pki, publisher: Publisher, hub: Hub
    ) -> None:
        """A fresh manager sees the version, refuses the old manifest and accepts a newer one."""
        old = publisher.publish(0)
        old_files = dict(hub.files)
        first = make_manager(tmp_path, pki)
        first.bind("scanner", [publisher.spec()])
        refresh(first)
        publisher.publish(1)
        refresh(first)
        # An interrupted activation left a staging directory behind.
        stray = tmp_path / "datasets" / "cve" / ".staging-2026-08-16-abc"
        stray.mkdir()

        second = make_manager(tmp_path, pki)
        second.bind("scanner", [publisher.spec()])
        assert not stray.exists()
        assert second.store.active("cve") == "2026-08-15"
        assert refresh(second).result == UNCHANGED  # type: ignore[attr-defined]
        hub.files.update(old_files)
        result = refresh(second)
        assert result.result == FAILED and "replay" in result.reason  # type: ignore[attr-defined]
        assert old.version == "2026-08-14"
        assert read_current(tmp_path) == "feed of day 1\n"

    def test_crash_between_switch_and_record(
        self, tmp_path: Path, pki: Pki, publisher: Publisher
    ) -> None:
        """current already points at the new version but the anchor was not written: unchanged."""
        publisher.publish(0)
        mgr = make_manager(tmp_path, pki)
        mgr.bind("scanner", [publisher.spec()])
        refresh(mgr)
        state = mgr.store.load_state("cve")
        mgr.store.save_state(replace(state, accepted_published=None, accepted_sha256=""))
        assert refresh(mgr).result == UNCHANGED  # type: ignore[attr-defined]
        assert mgr.store.load_state("cve").accepted_published == BASE


class TestGating:
    """A required dataset missing or past max_age blocks the start; an optional one does not."""

    def test_required_and_optional(self, tmp_path: Path, pki: Pki, publisher: Publisher) -> None:
        """Missing, fresh, then stale as the driven wall clock moves past max_age."""
        wall = Wall((BASE + timedelta(hours=1)).timestamp())
        mgr = make_manager(tmp_path, pki, wall=wall)
        mgr.bind(
            "scanner",
            [
                publisher.spec(max_age=86400.0),
                publisher.spec(name="oui", manifest=publisher.hub.url("none.toml"), required=False),
            ],
        )
        ok, why = mgr.ready_for_start("scanner")
        assert not ok and "dataset cve is missing" in why
        publisher.publish(0)
        ok, why = asyncio.run(mgr.prepare_for_start("scanner"))
        assert ok and "optional dataset oui is missing" in why
        wall.now += 2 * 86400
        ok, why = mgr.ready_for_start("scanner")
        assert not ok and "past its max_age" in why
        # The optional one past its age, or an untrusted clock, never blocks.
        mgr.clock_trusted = lambda: False
        assert mgr.ready_for_start("scanner")[0]


class TestStatus:
    """GET /v1/datasets and the metrics in the Go Keystone's shapes and names."""

    def test_shapes(self, tmp_path: Path, pki: Pki, publisher: Publisher) -> None:
        """camelCase keys, Go durations, ageSeconds and stale; counters by result."""
        publisher.publish(0)
        wall = Wall((BASE + timedelta(seconds=251)).timestamp())
        mgr = make_manager(tmp_path, pki, wall=wall)
        mgr.bind("scanner", [publisher.spec(refresh=86400.0, max_age=3 * 86400.0)])
        refresh(mgr)
        refresh(mgr)
        [info] = datasets_json(mgr)
        assert info == {
            "name": "cve",
            "version": "2026-08-14",
            "published": "2026-08-14T03:00:00Z",
            "manifestUri": publisher.spec().manifest,
            "path": str(tmp_path / "datasets" / "cve" / "current"),
            "lastRefresh": "2026-08-14T03:04:11Z",
            "lastResult": "unchanged",
            "refresh": "24h0m0s",
            "maxAge": "72h0m0s",
            "ageSeconds": 251,
            "stale": False,
        }
        detail = dataset_detail(mgr, "cve")
        assert detail["versions"][0]["active"] and detail["component"] == "scanner"
        samples = {(s.name, s.labels): s.value for s in metric_samples(mgr)}
        assert samples[("keystone_dataset_age_seconds", (("name", "cve"),))] == 251
        assert samples[("keystone_dataset_stale", (("name", "cve"),))] == 0
        assert (
            samples[
                ("keystone_dataset_refreshes_total", (("name", "cve"), ("result", "unchanged")))
            ]
            == 1
        )
        assert (
            samples[("keystone_dataset_activations_total", (("name", "cve"), ("result", "ok")))]
            == 1
        )
        assert samples[("keystone_dataset_last_timestamp_seconds", (("name", "cve"),))] == wall.now
        mgr.clock_trusted = lambda: False
        [info] = datasets_json(mgr)
        assert info["ageUnknown"] is True and "ageSeconds" not in info
        assert not any(s.name == "keystone_dataset_age_seconds" for s in metric_samples(mgr))
