"""Datasets imported from a bundle directory, and refreshes driven by a fake clock."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from keystone.datasets import DatasetManager, DatasetSpec, DatasetStore, Resolver
from keystone.datasets.bundle import read_bundle_datasets
from keystone.datasets.manager import FAILED, UPDATED
from keystone.datasets.refresh import trusted_clock_hooks
from keystone.datasets.schedule import DatasetScheduler
from keystone.errors import BundleError
from keystone.runtime.clock import STRICT, TrustedClock
from tests.integration.artifacts.conftest import Pki
from tests.integration.datasets.conftest import BASE, Hub, Publisher, Wall, make_manager

pytestmark = pytest.mark.integration


def bundle_dir(root: Path, publisher: Publisher, day: int, *, tamper: bool = False) -> Path:
    """A bundle tree carrying one publication of ``cve``, as a bundle tool lays it out."""
    m = publisher.publish(day)
    d = root / "datasets" / "cve"
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    mpath = d / "cve.manifest.toml"
    mpath.write_bytes(publisher.hub.files[publisher.manifest_path])
    (d / "cve.manifest.toml.sig").write_bytes(publisher.hub.files[publisher.manifest_path + ".sig"])
    (d / "cve.manifest.toml.crt").write_bytes(publisher.pki.cert("signer").read_bytes())
    payload = publisher.work / f"cve-{day}.tar"
    name = m.artifact.uri.rsplit("/", 1)[-1]
    data = payload.read_bytes()
    (d / name).write_bytes(data + b"x" if tamper else data)
    return root


class TestBundle:
    """A bundle's dataset goes through the same verification as a refresh."""

    def test_import_verifies_and_activates(
        self, tmp_path: Path, pki: Pki, publisher: Publisher, hub: Hub
    ) -> None:
        """Manifest, signature and certificate from the bundle; payload read from the bundle."""
        root = bundle_dir(tmp_path / "bundle", publisher, 0)
        hub.files.clear()  # nothing comes from the network
        mgr = make_manager(tmp_path, pki)
        mgr.bind("scanner", [publisher.spec()])
        [result] = asyncio.run(mgr.import_entries(read_bundle_datasets(root)))
        assert result.result == UPDATED
        assert (tmp_path / "datasets" / "cve" / "current" / "data.txt").read_text() == (
            "feed of day 0\n"
        )
        # The same bundle again is unchanged; an older one afterwards is a replay.
        [again] = asyncio.run(mgr.import_entries(read_bundle_datasets(root)))
        assert again.result == "unchanged"

    def test_tampered_payload_is_refused(
        self, tmp_path: Path, pki: Pki, publisher: Publisher
    ) -> None:
        """A payload in the bundle that does not match its manifest's digest is refused."""
        root = bundle_dir(tmp_path / "bundle", publisher, 0, tamper=True)
        mgr = make_manager(tmp_path, pki)
        mgr.bind("scanner", [publisher.spec()])
        [result] = asyncio.run(mgr.import_entries(read_bundle_datasets(root)))
        assert result.result == FAILED and "sha256 mismatch" in result.reason
        assert mgr.store.active("cve") == ""

    def test_unsigned_bundle_manifest_is_refused(
        self, tmp_path: Path, pki: Pki, publisher: Publisher
    ) -> None:
        """A bundle without the manifest's signature is refused like an unsigned refresh."""
        root = bundle_dir(tmp_path / "bundle", publisher, 0)
        (root / "datasets" / "cve" / "cve.manifest.toml.sig").unlink()
        mgr = make_manager(tmp_path, pki)
        mgr.bind("scanner", [publisher.spec()])
        [result] = asyncio.run(mgr.import_entries(read_bundle_datasets(root)))
        assert result.result == FAILED and "unsigned" in result.reason

    def test_missing_payload_is_a_bundle_error(self, tmp_path: Path, publisher: Publisher) -> None:
        """A manifest whose payload is not in the bundle is reported as a damaged bundle."""
        root = bundle_dir(tmp_path / "bundle", publisher, 0)
        for p in (root / "datasets" / "cve").glob("*.tar"):
            p.unlink()
        with pytest.raises(BundleError, match="not in the bundle"):
            list(read_bundle_datasets(root))


class FakeClock:
    """Monotonic and wall time that move only when the test advances them."""

    def __init__(self, wall: Wall) -> None:
        self.mono = 1000.0
        self.wall = wall
        self._sleepers: list[tuple[float, asyncio.Future[None]]] = []

    def monotonic(self) -> float:
        return self.mono

    def time(self) -> float:
        return self.wall.now

    async def sleep(self, seconds: float) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._sleepers.append((self.mono + seconds, fut))
        await fut

    def asleep(self) -> bool:
        """Whether something waits on this clock (so :meth:`advance` reaches it)."""
        return any(not fut.done() for _, fut in self._sleepers)

    def advance(self, seconds: float) -> None:
        self.mono += seconds
        self.wall.now += seconds
        for at, fut in list(self._sleepers):
            if at <= self.mono and not fut.done():
                fut.set_result(None)
                self._sleepers.remove((at, fut))


async def settle(cond: Callable[[], bool], what: str) -> None:
    """Let the scheduler's task run (and its refresh thread finish) until ``cond`` holds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 20
    while not cond():
        if loop.time() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


class TestScheduler:
    """The loop refreshes each dataset when its interval (on the driven clock) has passed."""

    def test_driven_refreshes(self, tmp_path: Path, pki: Pki, publisher: Publisher) -> None:
        """Due at once on first start, then only after refresh has elapsed on the fake clock."""
        wall = Wall((BASE + timedelta(hours=1)).timestamp())
        clock = FakeClock(wall)
        mgr = make_manager(tmp_path, pki, wall=wall)
        mgr.bind("scanner", [publisher.spec(refresh=3600.0)])
        publisher.publish(0)
        results: list[str] = []

        async def main() -> None:
            sched = DatasetScheduler(
                mgr, clock, device_id="gw-1", on_result=lambda r: results.append(r.result)
            )
            task = asyncio.create_task(sched.run())
            # The refresh is reported before the loop goes back to sleep: advancing the
            # clock before it sleeps would move its wake-up along with it.
            await settle(lambda: results == ["updated"] and clock.asleep(), "the first refresh")
            publisher.publish(1)
            clock.advance(1800)  # half an interval: nothing is due
            await asyncio.sleep(0.05)
            assert results == ["updated"]
            assert clock.asleep()
            clock.advance(1800)
            await settle(lambda: len(results) == 2, "the second refresh")
            assert results == ["updated", "updated"]
            assert mgr.store.active("cve") == "2026-08-15"
            sched.refresh_now()
            await settle(lambda: len(results) == 3, "the refresh asked for now")
            assert results[-1] == "unchanged"
            sched.stop()
            await asyncio.wait_for(task, 10)

        asyncio.run(main())

    def test_restart_waits_out_the_interval_and_failures_retry_sooner(
        self, tmp_path: Path, pki: Pki, publisher: Publisher, hub: Hub
    ) -> None:
        """After a restart a recent refresh is not repeated; a failure retries after a minute."""
        wall = Wall((BASE + timedelta(hours=1)).timestamp())
        clock = FakeClock(wall)
        publisher.publish(0)
        mgr = make_manager(tmp_path, pki, wall=wall)
        mgr.bind("scanner", [publisher.spec(refresh=3600.0)])
        asyncio.run(mgr.refresh("cve"))
        clock.advance(600)
        restarted = make_manager(tmp_path, pki, wall=wall)
        restarted.bind("scanner", [publisher.spec(refresh=3600.0)])
        sched = DatasetScheduler(restarted, clock, device_id="gw-1")
        sched.sync_bindings()
        wait = sched.next_due["cve"] - clock.monotonic()
        assert 3000 <= wait <= 3000 + 360  # the rest of the interval plus this device's offset
        assert sched.next_due["cve"] == DatasetScheduler(
            restarted, clock, device_id="gw-1"
        )._first_due("cve")  # the same slot every time
        hub.files.clear()
        clock.advance(wait)
        [result] = asyncio.run(sched.run_due())
        assert result.result == FAILED
        assert sched.next_due["cve"] - clock.monotonic() == 60.0


class TestLocalAndClock:
    """Manifests read from local paths (air-gapped), and the trusted clock's part."""

    def test_local_path_manifest(self, tmp_path: Path, pki: Pki, publisher: Publisher) -> None:
        """manifest, signature and payload as local files: the same signature and digest rules."""
        media = tmp_path / "media"
        media.mkdir()
        publisher.publish(0)
        hubfiles = publisher.hub.files
        (media / "cve.manifest.toml").write_bytes(hubfiles[publisher.manifest_path])
        (media / "cve.manifest.toml.sig").write_bytes(hubfiles[publisher.manifest_path + ".sig"])
        (media / "signer.pem").write_bytes(pki.cert("signer").read_bytes())
        mgr = make_manager(tmp_path, pki)
        spec = DatasetSpec(
            name="cve",
            manifest=str(media / "cve.manifest.toml"),
            sig_uri=str(media / "cve.manifest.toml.sig"),
            cert_uri=f"file://{media / 'signer.pem'}",
        )
        mgr.bind("scanner", [spec])
        # The manifest names an http uri; the payload still comes from the hub, verified.
        assert asyncio.run(mgr.refresh("cve")).result == UPDATED

    def test_trusted_clock_hooks(self, tmp_path: Path, pki: Pki, publisher: Publisher) -> None:
        """An accepted publication raises the high-water mark; strict mode behind it refuses."""
        publisher.publish(0, published=BASE.replace(year=2027))
        wall = Wall(BASE.timestamp())
        clock = TrustedClock(tmp_path / "state", wall=wall, build=0.0)
        verification_time, observe, trusted = trusted_clock_hooks(clock)
        store = DatasetStore(tmp_path / "datasets")
        resolver = Resolver(
            store,
            trust_bundle=pki.cert("ca"),
            verification_time=lambda: datetime.now(UTC),
            observe_published=observe,
            environ={},
        )
        mgr = DatasetManager(store, resolver, wall=wall, clock_trusted=trusted)
        mgr.bind("scanner", [publisher.spec()])
        assert asyncio.run(mgr.refresh("cve")).result == UPDATED
        assert clock.mark() == BASE.replace(year=2027).timestamp()
        assert not trusted()  # the wall clock is now behind a signed time the device has seen
        assert mgr.age("cve") is None
        strict = TrustedClock(tmp_path / "state", STRICT, wall=wall, build=0.0)
        resolver.verification_time = trusted_clock_hooks(strict)[0]
        publisher.publish(1, published=BASE.replace(year=2028))
        result = asyncio.run(mgr.refresh("cve"))
        assert result.result == FAILED and "cannot be judged" in result.reason
        assert verification_time() >= BASE.replace(year=2027)


class TestDelta:
    """A manifest with [delta] rebuilds the new tar from the active one; any failure downloads."""

    def _two_days(
        self, tmp_path: Path, pki: Pki, publisher: Publisher, hub: Hub, patch: bytes | None
    ) -> tuple[DatasetManager, list[str]]:
        # Large enough and similar enough that a patch is much smaller than the tar.
        common = "".join(f"{i:08d} vendor-{i % 97}\n" for i in range(20000))
        m0 = publisher.publish(0, text=common)
        mgr = make_manager(tmp_path, pki)
        mgr.bind("scanner", [publisher.spec()])
        assert asyncio.run(mgr.refresh("cve")).result == UPDATED
        m1 = publisher.publish(1, text=common + "00020000 new vendor\n", delta_server=hub.url(""))
        route = f"delta/{m0.artifact.sha256}/{m1.artifact.sha256}"
        if patch is not None:
            hub.files[route] = patch
        else:
            from keystone.delta import make_patch

            out = tmp_path / "p.zst"
            make_patch(publisher.work / "cve-0.tar", publisher.work / "cve-1.tar", out)
            hub.files[route] = out.read_bytes()
        hub.seen.clear()
        assert asyncio.run(mgr.refresh("cve")).result == UPDATED
        text = (tmp_path / "datasets" / "cve" / "current" / "data.txt").read_text()
        assert text.endswith("00020000 new vendor\n")
        return mgr, hub.seen

    def test_patch_applied(self, tmp_path: Path, pki: Pki, publisher: Publisher, hub: Hub) -> None:
        """The payload is never downloaded: the patch is, and the result passes the digest."""
        _mgr, seen = self._two_days(tmp_path, pki, publisher, hub, None)
        assert any(p.startswith("/delta/") for p in seen)
        assert not any(p.endswith(".tar") for p in seen)

    def test_corrupt_patch_falls_back(
        self, tmp_path: Path, pki: Pki, publisher: Publisher, hub: Hub
    ) -> None:
        """A patch that does not apply is ignored and the whole payload downloaded."""
        _mgr, seen = self._two_days(tmp_path, pki, publisher, hub, b"not a patch")
        assert any(p.endswith("-2026-08-15.tar") for p in seen)
