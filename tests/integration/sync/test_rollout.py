"""Staged rollouts end to end: real git, real SSH-signed commits, a real agent and components.

Waits are short waves (seconds) waited on with deadlines; the agent applies on time by itself
(its poll interval is an hour), without a new commit.
"""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from keystone.rollout import assign, parse_rollout
from tests.conftest import wait_until

from .conftest import SignedFleet
from .test_sync import revision, sync

pytestmark = pytest.mark.integration

ALMOST_NOBODY_FIRST = 'waves = ["0.0001%", "100%"]\n'  # dev-1 is in wave 2 (1 - 1e-6)


def metrics(agent: Any) -> str:
    req = urllib.request.Request(
        agent.addr + "/metrics", headers={"Authorization": f"Bearer {agent.token()}"}
    )
    with urllib.request.urlopen(req, timeout=5) as r:
        text: str = r.read().decode()
    return text


def history(agent: Any) -> list[dict[str, Any]]:
    r = agent.cli("history", "--json", "--limit", "50")
    assert r.returncode == 0, r.stderr
    rows: list[dict[str, Any]] = json.loads(r.stdout)
    return rows


def wave_of(rollout: str, rev: str) -> int:
    spec = parse_rollout(rollout)
    return assign(spec, device_id="dev-1", labels=[], revision=rev, commit_time=0).wave


def start(
    f: SignedFleet, make_agent: Any, tmp_path: Path, recipe_extra: str = ""
) -> tuple[Any, str]:
    base = f.commit(
        {
            "recipes/tool.recipe.toml": f.recipe("tool") + recipe_extra,
            "plans/default.toml": f.plan("tool"),
        },
        "initial fleet",
    )
    agent = make_agent("--config", str(f.agent_config(tmp_path / "agent.toml"))).start()
    code, out = sync(agent)
    assert code == 0 and out["result"] == "applied", out
    agent.wait_states({"tool": "healthy"})
    return agent, base


class TestWaves:
    def test_a_later_wave_waits_then_applies_on_time_by_itself(
        self, signed_fleet: SignedFleet, make_agent: Any, tmp_path: Path
    ) -> None:
        f = signed_fleet
        agent, base = start(f, make_agent, tmp_path)
        rollout = ALMOST_NOBODY_FIRST + 'wait = "8s"\n'
        rev = f.commit(
            {
                "rollout.toml": rollout,
                "recipes/tool.recipe.toml": f.recipe("tool", version="2.0.0"),
            },
            "tool 2.0.0 in two waves",
        )
        assert wave_of(rollout, rev) == 2
        committed = int(f.git("log", "-1", "--format=%ct").strip())

        code, out = sync(agent)
        assert code == 0 and out["result"] == "waiting", out
        opens = committed + 8
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(opens))
        assert out["error"] == f"waiting for wave 2 at {stamp}"
        assert out["rollout"]["wave"] == 2 and out["rollout"]["at"] == opens
        info = revision(agent)
        assert info["applied"] == base and info["rollout"]["state"] == "waiting"
        health = agent.healthz()
        assert health is not None and health["rollout"]["message"] == out["error"]
        assert f"rollout: waiting for wave 2 at {stamp}" in agent.cli("status").stdout
        assert (
            f"rollout:          waiting for wave 2 at {stamp}"
            in agent.cli("status", "--revision").stdout
        )
        text = metrics(agent)
        assert "keystone_rollout_wave 2.0" in text
        assert (
            f'keystone_rollout_outcome{{canary="false",outcome="waiting",revision="{rev}",wave="2"}} 1.0'
            in text
        )
        assert "keystone_rollout_wait_seconds 0.0" not in text

        # No new commit, no manual sync: the agent applies when the wave opens.
        wait_until(lambda: revision(agent)["applied"] == rev, timeout=30, what="wave 2 to apply")
        assert time.time() >= opens
        rows = history(agent)
        waiting = [r for r in rows if r["kind"] == "rollout"]
        assert len(waiting) == 1 and waiting[0]["result"] == "waiting"
        applied = [r for r in rows if r["kind"] == "sync" and r["result"] == "applied"]
        assert applied[0]["trigger"] == "rollout" and applied[0]["revision"] == rev
        assert agent.components()["tool"]["version"] == "2.0.0"
        wait_until(
            lambda: f'outcome="healthy",revision="{rev}"' in metrics(agent),
            timeout=30,
            what="the soak to report healthy",
        )


class TestHalt:
    def test_a_halt_commit_stops_the_rollout_and_a_resume_applies(
        self, signed_fleet: SignedFleet, make_agent: Any, tmp_path: Path
    ) -> None:
        f = signed_fleet
        agent, base = start(f, make_agent, tmp_path)
        rollout = ALMOST_NOBODY_FIRST + 'wait = "1h"\n'
        rev = f.commit(
            {
                "rollout.toml": rollout,
                "recipes/tool.recipe.toml": f.recipe("tool", version="2.0.0"),
            },
            "tool 2.0.0",
        )
        assert wave_of(rollout, rev) == 2
        assert sync(agent)[1]["result"] == "waiting"

        rendered = agent.cli(
            "plan", "render", "--repo", str(f.work), "--device", "dev-1", "--rev", rev
        )
        assert rendered.returncode == 0, rendered.stderr
        assert "rollout: waves 0.0001%, 100% (at commit, +1h" in rendered.stdout
        assert "  wave 2 of 2 at " in rendered.stdout

        halt = f.commit({"rollout.toml": rollout + "halted = true\n"}, "halt tool 2.0.0")
        code, out = sync(agent)
        assert code == 0 and out["result"] == "halted" and out["error"] == "rollout halted", out
        info = revision(agent)
        assert info["applied"] == base and info["rollout"]["revision"] == halt
        assert "rollout:          rollout halted" in agent.cli("status", "--revision").stdout
        assert "keystone_rollout_halted 1.0" in metrics(agent)
        assert agent.components()["tool"]["version"] == "1.0.0"
        rendered = agent.cli("plan", "render", "--repo", str(f.work), "--device", "dev-1")
        assert "HALTED" in rendered.stdout

        f.commit({"rollout.toml": 'waves = ["100%"]\n'}, "resume: everyone now")
        code, out = sync(agent)
        assert code == 0 and out["result"] == "applied", out
        assert agent.components()["tool"]["version"] == "2.0.0"
        assert "keystone_rollout_halted 0.0" in metrics(agent)

    def test_a_bad_rollout_toml_refuses_the_revision_naming_the_line(
        self, signed_fleet: SignedFleet, make_agent: Any, tmp_path: Path
    ) -> None:
        f = signed_fleet
        agent, base = start(f, make_agent, tmp_path)
        rev = f.commit(
            {
                "rollout.toml": 'waves = ["1%", "100%"]\nwait = "1h"\nhalt = true\n',
                "recipes/tool.recipe.toml": f.recipe("tool", version="2.0.0"),
            },
            "typo",
        )
        code, out = sync(agent)
        assert code == 3 and out["result"] == "refused", out
        assert f"rollout.toml@{rev[:12]}:3: unknown field halt" in out["error"]
        assert revision(agent)["applied"] == base
        assert agent.components()["tool"]["version"] == "1.0.0"


class TestDeferral:
    def test_a_component_defers_within_its_bound(
        self, signed_fleet: SignedFleet, make_agent: Any, tmp_path: Path
    ) -> None:
        """tool asks for 2 s each time; its bound is 3 s: 2 s, then 1 s, then the update."""
        f = signed_fleet
        # It runs in the component's work dir, with the component's environment.
        check = (
            '[ "$KEYSTONE_COMPONENT" = tool ] && [ "$PWD" = "$KEYSTONE_WORKDIR" ] && echo defer 2s'
        )
        defer = f"\n[lifecycle.defer]\ncheck = 'cmd:{check}'\nmax = \"3s\"\n"
        agent, _base = start(f, make_agent, tmp_path, recipe_extra=defer)
        pid = agent.components()["tool"]["pid"]
        rev = f.commit(
            {"recipes/tool.recipe.toml": f.recipe("tool", version="2.0.0") + defer}, "tool 2.0.0"
        )
        began = time.time()
        code, out = sync(agent)
        assert code == 0 and out["result"] == "waiting", out
        assert out["rollout"]["reason"] == "defer" and out["rollout"]["component"] == "tool"
        assert out["error"].startswith("component tool deferred the update until ")
        assert agent.components()["tool"]["pid"] == pid  # still running, untouched
        wait_until(lambda: revision(agent)["applied"] == rev, timeout=30, what="the update")
        assert time.time() - began >= 3.0
        deferred = [r["error"] for r in history(agent) if r["kind"] == "rollout"]
        assert len(deferred) == 2
        assert "(3s of at most 3s)" in deferred[0] and "(2s of at most 3s)" in deferred[1]
        assert agent.components()["tool"]["version"] == "2.0.0"


class TestWindow:
    def test_outside_the_agents_window_a_revision_is_verified_but_not_deployed(
        self, signed_fleet: SignedFleet, make_agent: Any, tmp_path: Path
    ) -> None:
        """agent.toml's [maintenance] window opens in three hours: the sync waits for it."""
        from datetime import UTC, datetime, timedelta

        f = signed_fleet
        now = datetime.now(UTC)
        start_at = (now + timedelta(hours=3)).replace(minute=0, second=0, microsecond=0)
        window = f"{start_at.hour:02d}:00-{(start_at.hour + 1) % 24:02d}:00"
        f.commit(
            {"recipes/tool.recipe.toml": f.recipe("tool"), "plans/default.toml": f.plan("tool")},
            "initial fleet",
        )
        cfg = f.agent_config(
            tmp_path / "agent.toml",
            extra=f'\n[maintenance]\nwindows = ["{window}"]\ntimezone = "UTC"\n',
        )
        agent = make_agent("--config", str(cfg)).start()
        code, out = sync(agent)
        assert code == 0 and out["result"] == "waiting", out
        stamp = start_at.strftime("%Y-%m-%dT%H:%M:%SZ")
        assert out["error"] == f"waiting for maintenance window at {stamp} (agent.toml: {window!r})"
        assert out["rollout"]["reason"] == "window"
        assert out["signer"] == "ops@example.com"  # fetched and verified, only not deployed
        assert revision(agent)["applied"] is None and agent.components() == {}
        assert "keystone_rollout_wait_seconds 0.0" not in metrics(agent)

    def test_a_plan_declared_window_holds_a_verified_revision(
        self, signed_fleet: SignedFleet, make_agent: Any, tmp_path: Path
    ) -> None:
        """The device's plan file declares [maintenance] opening in three hours: tool 2.0.0
        is fetched and verified but not deployed; a commit dropping the window deploys it."""
        from datetime import UTC, datetime, timedelta

        f = signed_fleet
        agent, base = start(f, make_agent, tmp_path)
        pid = agent.components()["tool"]["pid"]
        start_at = (datetime.now(UTC) + timedelta(hours=3)).replace(
            minute=0, second=0, microsecond=0
        )
        window = f"{start_at.hour:02d}:00-{(start_at.hour + 1) % 24:02d}:00"
        rev = f.commit(
            {
                "recipes/tool.recipe.toml": f.recipe("tool", version="2.0.0"),
                "devices/dev-1/plan.toml": (
                    f'[maintenance]\nwindows = ["{window}"]\ntimezone = "UTC"\n'
                ),
            },
            "tool 2.0.0, in the device's window",
        )
        code, out = sync(agent)
        assert code == 0 and out["result"] == "waiting", out
        stamp = start_at.strftime("%Y-%m-%dT%H:%M:%SZ")
        assert out["error"] == (
            f"waiting for maintenance window at {stamp} (devices/dev-1/plan.toml: {window!r})"
        )
        assert out["rollout"]["reason"] == "window"
        assert out["rollout"]["windows"] == ["devices/dev-1/plan.toml"]
        assert out["rollout"]["revision"] == rev
        assert out["signer"] == "ops@example.com"  # fetched and verified, only not deployed
        assert revision(agent)["applied"] == base
        assert agent.components()["tool"]["version"] == "1.0.0"
        assert agent.components()["tool"]["pid"] == pid
        waits = [r for r in history(agent) if r["kind"] == "rollout"]
        assert waits and "devices/dev-1/plan.toml" in waits[-1]["error"]

        after = f.commit({"devices/dev-1/plan.toml": None}, "no window for dev-1")
        code, out = sync(agent)
        assert code == 0 and out["result"] == "applied", out
        assert revision(agent)["applied"] == after
        agent.wait_states({"tool": "healthy"})
        assert agent.components()["tool"]["version"] == "2.0.0"
