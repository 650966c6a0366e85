"""Air-gapped updates end to end: bundles made by keystone and by git, imported by real agents."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import free_port, wait_until

from .conftest import (
    CONFIG_PATH,
    PAYLOAD_PATH,
    BundleFleet,
    as_json,
    cache_blobs,
    device_config,
    history,
    keystone,
    revision,
    sha256,
)

pytestmark = pytest.mark.integration


def imported(agent: Any, bundle: Path) -> tuple[int, dict[str, Any]]:
    """``keystone bundle import BUNDLE --json`` through the running agent."""
    r = agent.cli("bundle", "import", str(bundle), "--json")
    return r.returncode, as_json(r)


def workdir(agent: Any, name: str, version: str) -> Path:
    return Path(agent.runtime) / "components" / name / version


class TestAirGappedFlow:
    def test_bundle_from_a_workstation_matches_a_git_synced_agent(
        self, bfleet: BundleFleet, make_agent: Any, tmp_path: Path
    ) -> None:
        """A bundle made on a workstation deploys on an offline agent the same commit, signer and
        artifacts that a git-synced agent gets."""
        rev = bfleet.commit_app("1.0.0")
        online = make_agent(
            "--config",
            str(bfleet.fleet.agent_config(tmp_path / "online.toml")),
            runtime=tmp_path / "online",
        ).start()
        r = online.cli("sync", "--once", "--json")
        assert r.returncode == 0, r.stdout + r.stderr
        online.wait_states({"app": "healthy"})
        git_synced = revision(online)
        online.stop()  # both devices run app on the same port

        # The workstation: its own clone, no agent; the bundle is all that travels.
        station = tmp_path / "workstation"
        shutil.copytree(bfleet.work, station)
        out = tmp_path / "stick" / "fleet.ksb"
        made = keystone(
            "bundle",
            "create",
            str(out),
            "--repo",
            str(station),
            "--all-labels",
            "--json",
            cwd=station,
        )
        assert made.returncode == 0, made.stderr
        assert as_json(made)["revision"] == rev
        bfleet.files.close()  # from here on, no network for artifacts either

        offline = make_agent(
            "--config",
            str(device_config(tmp_path / "offline.toml", bfleet)),
            runtime=tmp_path / "off",
        ).start()
        code, out_json = imported(offline, out)
        assert code == 0 and out_json["result"] == "applied", out_json
        offline.wait_states({"app": "healthy"})

        a, b = git_synced, revision(offline)
        assert b["applied"] == a["applied"] == rev
        assert b["signer"] == a["signer"] == "ops@example.com"
        assert b["fingerprint"] == a["fingerprint"]
        payload = bfleet.payloads[PAYLOAD_PATH.format(version="1.0.0")]
        assert sha256(payload) in cache_blobs(offline.runtime)
        wd = workdir(offline, "app", "1.0.0")
        assert (wd / "payload.bin").read_bytes() == payload
        assert (wd / "config.txt").read_bytes() == (bfleet.work / CONFIG_PATH).read_bytes()
        syncs = [h for h in history(offline) if h["kind"] == "sync"]
        assert syncs[0]["result"] == "applied" and syncs[0]["trigger"] == "bundle"
        assert not list((offline.runtime / "bundles" / "incoming").glob("*"))


class TestGitMadeBundles:
    def test_full_and_incremental_bundles_import_and_a_missing_base_is_named(
        self, bfleet: BundleFleet, make_agent: Any, tmp_path: Path
    ) -> None:
        """Bundles made by `git bundle create` (full, then OLD..main) and an incremental
        `keystone bundle create --since` import in turn; an incremental bundle offered before
        its base is refused naming the commit it needs."""
        old = bfleet.commit_app("1.0.0")
        bfleet.fleet.git("branch", "-f", "base", old)
        full = bfleet.git_bundle(tmp_path / "full.bundle", "base")
        new = bfleet.commit_app("1.1.0")
        inc = bfleet.git_bundle(tmp_path / "inc.bundle", f"{old}..main")
        agent = make_agent("--config", str(device_config(tmp_path / "agent.toml", bfleet))).start()

        code, out = imported(agent, inc)
        assert code == 3 and out["result"] == "refused", out
        assert f"needs commit {old}" in out["error"]
        assert revision(agent)["applied"] is None and not agent.components()

        code, out = imported(agent, full)
        assert code == 0 and out["result"] == "applied" and out["revision"] == old, out
        agent.wait_states({"app": "healthy"})
        code, out = imported(agent, inc)
        assert code == 0 and out["result"] == "applied" and out["revision"] == new, out
        assert out["changes"]["changed"] == ["app"]
        comps = agent.wait_states({"app": "healthy"})
        assert comps["app"]["version"] == "1.1.0"
        # Plain git bundles carry no artifacts: they came from their URIs and the commit.
        assert (workdir(agent, "app", "1.1.0") / "payload.bin").read_bytes() == bfleet.payloads[
            PAYLOAD_PATH.format(version="1.1.0")
        ]

        newest = bfleet.commit_app("1.2.0")
        delta = bfleet.bundle(tmp_path / "delta.ksb", "--since", new)
        code, out = imported(agent, delta)
        assert code == 0 and out["result"] == "applied" and out["revision"] == newest, out
        assert revision(agent)["applied"] == newest


class TestWithoutARunningAgent:
    def test_bundle_is_staged_and_applied_when_the_agent_starts(
        self, bfleet: BundleFleet, make_agent: Any, tmp_path: Path
    ) -> None:
        """With no agent answering, `bundle import` stages the file; the agent applies it at its
        next start and removes it from the staging area."""
        rev = bfleet.commit_app("1.0.0")
        bundle = bfleet.bundle(tmp_path / "fleet.ksb")
        runtime = tmp_path / "runtime"
        r = keystone(
            "bundle",
            "import",
            str(bundle),
            "--json",
            cwd=tmp_path,
            env={
                "KEYSTONE_ADDR": f"http://127.0.0.1:{free_port()}",
                "KEYSTONE_RUNTIME": str(runtime),
            },
        )
        assert r.returncode == 0 and as_json(r)["result"] == "staged", r.stdout + r.stderr
        assert len(list((runtime / "bundles" / "staged").glob("*.bundle"))) == 1

        agent = make_agent(
            "--config", str(device_config(tmp_path / "agent.toml", bfleet)), runtime=runtime
        ).start()
        wait_until(lambda: revision(agent)["applied"] == rev, what="the staged bundle")
        agent.wait_states({"app": "healthy"})
        assert not list((runtime / "bundles" / "staged").glob("*"))
        syncs = [h for h in history(agent) if h["kind"] == "sync"]
        assert [(h["result"], h["trigger"]) for h in syncs] == [("applied", "bundle")]


class TestWatchedDirectory:
    def test_plugged_in_stick_updates_the_device_once(
        self, bfleet: BundleFleet, make_agent: Any, tmp_path: Path
    ) -> None:
        """A bundle appearing under a watched mount pattern is imported and shows in history; the
        same bundle on a second stick is not imported again, and an oversized file is refused."""
        rev = bfleet.commit_app("1.0.0")
        bundle = bfleet.bundle(tmp_path / "fleet.ksb")
        media = tmp_path / "media"
        cfg = device_config(tmp_path / "agent.toml", bfleet, watch=[str(media / "*" / "keystone")])
        agent = make_agent("--config", str(cfg), env={"KEYSTONE_MAX_BUNDLE_BYTES": str(1 << 20)})
        agent.start()

        def plug(stick: str, files: dict[str, bytes]) -> None:
            d = media / stick / "keystone"
            d.mkdir(parents=True)
            for name, data in files.items():
                (d / f"{name}.part").write_bytes(data)
                (d / f"{name}.part").rename(d / name)

        plug("usb0", {"fleet.ksb": bundle.read_bytes()})
        plug("usb1", {"a-copy.ksb": bundle.read_bytes(), "z-big.ksb": b"\0" * (2 << 20)})

        def refused_big() -> list[dict[str, Any]]:
            return [h for h in history(agent) if "z-big.ksb" in (h.get("error") or "")]

        big = wait_until(refused_big, timeout=30, what="the oversized bundle's refusal")
        assert big[0]["result"] == "refused" and "over the limit of 1048576" in big[0]["error"]
        syncs = [h for h in history(agent) if h["kind"] == "sync"]
        applied = [h for h in syncs if h["result"] == "applied"]
        assert len(applied) == 1 and applied[0]["revision"] == rev, syncs
        assert applied[0]["source"] == "bundle:fleet.ksb" and applied[0]["trigger"] == "bundle"
        assert revision(agent)["applied"] == rev
        agent.wait_states({"app": "healthy"})
