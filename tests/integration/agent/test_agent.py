"""The agent process end to end: demo stack, bad plans, shutdown, restart after SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from keystone.runtime.process import pgid_members, read_start_ticks
from tests.conftest import free_port, wait_until

pytestmark = pytest.mark.integration


def demo_env() -> dict[str, str]:
    return {
        "DEMO_DB_PORT": str(free_port()),
        "DEMO_CACHE_PORT": str(free_port()),
        "DEMO_API_PORT": str(free_port()),
    }


def all_pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def cmdline(pid: int) -> str:
    try:
        return (
            Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        )
    except OSError:
        return ""


def ticks(pid: int | None) -> int:
    assert pid is not None
    t = read_start_ticks(pid)
    assert t is not None
    return t


class TestDemo:
    def test_demo_stack_starts_layer_by_layer_and_stops_in_reverse(self, make_agent: Any) -> None:
        """--demo starts db, cache, api in order; SIGTERM stops them all and exits 0."""
        agent = make_agent("--demo", env=demo_env()).start()
        comps = agent.wait_states({"db": "healthy", "cache": "healthy", "api": "healthy"})
        assert (
            ticks(comps["db"]["pid"]) <= ticks(comps["cache"]["pid"]) <= ticks(comps["api"]["pid"])
        )
        health = agent.healthz()
        assert health is not None and health["status"] == "ok" and health["uptime_seconds"] >= 0
        pgids = [os.getpgid(c["pid"]) for c in comps.values()]
        assert agent.stop(signal.SIGTERM) == 0
        assert all(pgid_members(g) == [] for g in pgids)
        out = agent.output()
        assert (
            out.index("api 1.0.0: healthy -> stopping")
            < out.index("cache 1.0.0: healthy -> stopping")
            < out.index("db 1.0.0: healthy -> stopping")
        )

    def test_sigkill_and_restart_adopts_without_duplicates(
        self, make_agent: Any, tmp_path: Path
    ) -> None:
        """An agent killed with SIGKILL leaves its components; the next one adopts them, no duplicates."""
        env = demo_env()
        first = make_agent("--demo", env=env).start()
        before = first.wait_states({"db": "healthy", "cache": "healthy", "api": "healthy"})
        # The deployment is complete (and on disk) once the plan says running, not when the
        # last component turns healthy a moment before.
        wait_until(
            lambda: first.api("GET", "/v1/plan/status")[1].get("status") == "running",
            timeout=30,
            what="the demo plan to be running",
        )
        first.stop(signal.SIGKILL)
        pids = {n: c["pid"] for n, c in before.items()}
        assert all(pgid_members(os.getpgid(p)) for p in pids.values()), (
            "components died with the agent"
        )
        second = make_agent(runtime=first.runtime, env=env, port=first.port).start()
        after = second.wait_states({"db": "healthy", "cache": "healthy", "api": "healthy"})
        assert {n: c["pid"] for n, c in after.items()} == pids
        ports = {
            "db": env["DEMO_DB_PORT"],
            "cache": env["DEMO_CACHE_PORT"],
            "api": env["DEMO_API_PORT"],
        }
        for name, port in ports.items():
            running = [pid for pid in all_pids() if f"--name {name} --port {port}" in cmdline(pid)]
            assert running == [pids[name]], f"{name}: {running}"
        assert second.stop() == 0


class TestBadPlans:
    def test_cycle_refused_before_anything_starts(self, make_agent: Any, tmp_path: Path) -> None:
        """--apply with a dependency cycle exits 3 with the cycle, and starts nothing."""
        for name, dep in (("a", "b"), ("b", "a")):
            (tmp_path / f"{name}.recipe.toml").write_text(
                f'[metadata]\nname = "{name}"\nversion = "1"\n[[dependencies]]\nname = "{dep}"\n'
                f'[lifecycle.run.exec]\ncommand = "sleep"\nargs = ["300"]\n'
            )
        plan = tmp_path / "plan.toml"
        plan.write_text(
            '[[components]]\nname = "a"\nrecipe = "a.recipe.toml"\n[[components]]\nname = "b"\nrecipe = "b.recipe.toml"\n'
        )
        agent = make_agent("--apply", str(plan)).start(wait=False)
        assert agent.proc.wait(30) == 3
        assert "dependency cycle: a -> b -> a" in agent.output()
        assert not (agent.runtime / "components" / "a").exists()

    def test_bad_plan_via_api_keeps_running_plan(self, make_agent: Any) -> None:
        """A plan that does not validate is refused by the API; the running components are untouched."""
        agent = make_agent("--demo", env=demo_env()).start()
        before = agent.wait_states({"api": "healthy"})
        status, body = agent.api(
            "POST", "/v1/plan/apply", b'[[components]]\nname = "x"\nrecipe = "nope:1"\n'
        )
        assert status in (400, 422), body
        assert "not in the recipe store" in json.dumps(body)
        assert {n: c["pid"] for n, c in agent.components().items()} == {
            n: c["pid"] for n, c in before.items()
        }


class TestOfflineDryRun:
    def test_apply_dry_offline(self, tmp_path: Path) -> None:
        """apply --dry validates and prints layers and actions when no agent answers."""
        (tmp_path / "db.recipe.toml").write_text(
            '[metadata]\nname = "db"\nversion = "1"\n[lifecycle.run.exec]\ncommand = "true"\n'
        )
        (tmp_path / "api.recipe.toml").write_text(
            '[metadata]\nname = "api"\nversion = "1"\n[[dependencies]]\nname = "db"\n[lifecycle.run.exec]\ncommand = "true"\n'
        )
        (tmp_path / "plan.toml").write_text(
            '[[components]]\nname = "api"\nrecipe = "api.recipe.toml"\n[[components]]\nname = "db"\nrecipe = "db.recipe.toml"\n'
        )
        env = {
            **os.environ,
            "KEYSTONE_ADDR": f"http://127.0.0.1:{free_port()}",
            "KEYSTONE_RUNTIME": str(tmp_path / "rt"),
        }
        for flag in ("--dry", "--dry-run"):
            r = subprocess.run(
                [sys.executable, "-m", "keystone", "apply", "plan.toml", flag, "--json"],
                cwd=tmp_path,
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert r.returncode == 0, r.stderr
            data = json.loads(r.stdout)
            assert data["layers"] == [["db"], ["api"]]
            assert [(a["action"], a["component"]) for a in data["actions"]] == [
                ("start", "db"),
                ("start", "api"),
            ]
