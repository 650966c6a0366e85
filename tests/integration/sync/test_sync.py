"""GitOps end to end: real git, real SSH signatures, smart HTTP, a real agent and components."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import free_port, wait_until
from tests.integration.sources.gitserver import serve_git
from tests.tlscert import server_context

from .conftest import SignedFleet

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[3]


def sync(agent: Any, *args: str) -> tuple[int, dict[str, Any]]:
    r = agent.cli("sync", "--once", "--json", *args)
    try:
        return r.returncode, json.loads(r.stdout)
    except json.JSONDecodeError:
        raise AssertionError(
            f"sync printed no JSON (exit {r.returncode}): {r.stdout}\n{r.stderr}"
        ) from None


def revision(agent: Any) -> dict[str, Any]:
    r = agent.cli("status", "--revision", "--json")
    assert r.returncode == 0, r.stderr
    data: dict[str, Any] = json.loads(r.stdout)
    return data


def pids(agent: Any) -> dict[str, int]:
    return {n: c["pid"] for n, c in agent.components().items()}


def base_fleet(f: SignedFleet) -> str:
    return f.commit(
        {
            "recipes/db.recipe.toml": f.recipe("db"),
            "recipes/api.recipe.toml": f.recipe("api", deps=[("db", "hard")]),
            "recipes/tool.recipe.toml": f.recipe("tool"),
            "plans/default.toml": f.plan("db", "api", "tool"),
        },
        "initial fleet",
    )


@pytest.fixture
def synced(
    signed_fleet: SignedFleet, make_agent: Any, tmp_path: Path
) -> tuple[SignedFleet, Any, str]:
    """A fleet with db -> api and tool, applied by a fresh agent."""
    rev = base_fleet(signed_fleet)
    agent = make_agent("--config", str(signed_fleet.agent_config(tmp_path / "agent.toml"))).start()
    code, out = sync(agent)
    assert code == 0 and out["result"] == "applied", out
    agent.wait_states({"db": "healthy", "api": "healthy", "tool": "healthy"})
    return signed_fleet, agent, rev


class TestApply:
    def test_first_sync_applies_and_status_shows_it(
        self, synced: tuple[SignedFleet, Any, str]
    ) -> None:
        """The first sync deploys the plan; status --revision names the commit and signer."""
        _f, agent, rev = synced
        info = revision(agent)
        assert info["applied"] == rev
        assert info["signer"] == "ops@example.com"
        assert info["source"].endswith("/fleet.git")
        assert info["last_sync"]["result"] == "applied"
        wait_until(lambda: revision(agent)["last_known_good"] == rev, what="soak to finish")
        code, out = sync(agent)
        assert code == 0 and out["result"] == "up-to-date"
        assert agent.healthz()["revision"] == rev

    def test_recipe_change_restarts_only_it_and_dependents(
        self, synced: tuple[SignedFleet, Any, str]
    ) -> None:
        """Changing db restarts db and api (hard dependent), never tool."""
        f, agent, _ = synced
        before = pids(agent)
        rev = f.commit({"recipes/db.recipe.toml": f.recipe("db", version="1.1.0")}, "db 1.1")
        code, out = sync(agent)
        assert code == 0, out
        assert out["changes"]["changed"] == ["db"] and out["changes"]["restarted"] == ["api"]
        assert out["signer"] == "ops@example.com" and out["revision"] == rev
        after = pids(agent)
        assert after["tool"] == before["tool"]
        assert after["db"] != before["db"] and after["api"] != before["api"]

    def test_removing_a_component_stops_it(self, synced: tuple[SignedFleet, Any, str]) -> None:
        """A component dropped from the plan is stopped; its process group is gone."""
        f, agent, _ = synced
        tool_pid = pids(agent)["tool"]
        f.commit({"plans/default.toml": f.plan("db", "api")}, "drop tool")
        code, out = sync(agent)
        assert code == 0 and out["changes"]["removed"] == ["tool"], out
        assert "tool" not in agent.components()
        wait_until(lambda: not Path(f"/proc/{tool_pid}").exists(), what="tool process to exit")


class TestRefusals:
    @pytest.mark.parametrize("case", ["unsigned", "unknown-key", "expired-signer"])
    def test_bad_signature_is_refused_and_nothing_changes(
        self, synced: tuple[SignedFleet, Any, str], case: str
    ) -> None:
        """An unsigned tip, a stranger's signature or an expired signer: refused, reason shown."""
        f, agent, good = synced
        before = pids(agent)
        if case == "expired-signer":
            pub = (f.tmp / "ops_key.pub").read_text().split()
            f.allowed.write_text(
                f'ops@example.com namespaces="git",valid-before="20200101" {pub[0]} {pub[1]}\n'
            )
        sign = {"unsigned": None, "unknown-key": "other", "expired-signer": "key"}[case]
        bad = f.commit(
            {"recipes/tool.recipe.toml": f.recipe("tool", version="9.9.9")},
            f"bad: {case}",
            sign=sign,
        )
        code, out = sync(agent)
        assert code == 3 and out["result"] == "refused", out
        assert bad[:12] in out["error"] or out["revision"] == bad
        info = revision(agent)
        assert info["applied"] == good
        assert info["last_sync"]["result"] == "refused" and info["last_sync"]["error"]
        syncs = [
            h for h in json.loads(agent.cli("history", "--json").stdout) if h["kind"] == "sync"
        ]
        assert syncs[0]["result"] == "refused" and syncs[0]["revision"] == bad
        assert pids(agent) == before

    def test_force_push_to_older_commit_is_refused(
        self, synced: tuple[SignedFleet, Any, str]
    ) -> None:
        """A force-push back to an ancestor is a rollback: refused unless --allow-rollback."""
        f, agent, first = synced
        second = f.commit({"recipes/tool.recipe.toml": f.recipe("tool", version="2.0.0")}, "tool 2")
        assert sync(agent)[0] == 0
        f.reset_hard(first)
        f.push(force=True)
        code, out = sync(agent)
        assert code == 3 and out["result"] == "refused" and "does not descend" in out["error"], out
        assert revision(agent)["applied"] == second
        code, out = sync(agent, "--allow-rollback")
        assert code == 0 and out["result"] == "applied", out
        assert revision(agent)["applied"] == first

    def test_broken_plan_is_refused_while_old_plan_runs(
        self, synced: tuple[SignedFleet, Any, str]
    ) -> None:
        """A signed commit whose plan does not validate is refused; the running plan stays."""
        f, agent, good = synced
        before = pids(agent)
        f.commit(
            {
                "recipes/api.recipe.toml": f.recipe(
                    "api", deps=[("db", "hard"), ("missing", "hard")]
                )
            },
            "broken",
        )
        code, out = sync(agent)
        assert code == 3 and "missing" in out["error"], out
        assert pids(agent) == before and revision(agent)["applied"] == good


class TestRollback:
    def test_unhealthy_commit_rolls_back_and_is_not_retried(
        self, synced: tuple[SignedFleet, Any, str]
    ) -> None:
        """A component that never turns healthy rolls back to last known-good; not retried."""
        f, agent, good = synced
        before = pids(agent)
        bad = f.commit(
            {
                "recipes/tool.recipe.toml": f.recipe(
                    "tool", version="2.0.0", args=["--unhealthy"], start_timeout="1s"
                )
            },
            "unhealthy tool",
        )
        code, out = sync(agent)
        assert code == 4 and out["result"] == "rolled-back" and out["failed_component"] == "tool", (
            out
        )
        info = revision(agent)
        assert info["applied"] == good and bad in info["failed"]
        comps = agent.wait_states({"tool": "healthy"})
        assert comps["tool"]["version"] == "1.0.0" and pids(agent)["db"] == before["db"]
        starts = len(f.started())
        code, out = sync(agent)
        assert code == 3 and out["result"] == "known-bad", out
        assert len(f.started()) == starts

    def test_crash_during_soak_rolls_back(
        self, signed_fleet: SignedFleet, make_agent: Any, tmp_path: Path
    ) -> None:
        """A component that crashes seconds after turning healthy rolls the revision back."""
        f = signed_fleet
        good = base_fleet(f)
        agent = make_agent(
            "--config", str(f.agent_config(tmp_path / "agent.toml", soak="6s"))
        ).start()
        assert sync(agent)[0] == 0
        wait_until(
            lambda: revision(agent)["last_known_good"] == good, timeout=30, what="first soak"
        )
        bad = f.commit(
            {
                "recipes/tool.recipe.toml": f.recipe(
                    "tool", version="3.0.0", args=["--exit-after", "2"]
                )
            },
            "crashy",
        )
        code, out = sync(agent)
        assert code == 0 and out["result"] == "applied", out
        wait_until(lambda: revision(agent)["applied"] == good, timeout=30, what="soak rollback")
        info = revision(agent)
        assert bad in info["failed"] and info["last_known_good"] == good
        agent.wait_states({"tool": "healthy"})
        assert agent.components()["tool"]["version"] == "1.0.0"


class TestHttps:
    def test_a_fleet_over_https_syncs_and_the_agent_itself_sees_no_change(
        self, signed_fleet: SignedFleet, make_agent: Any, tmp_path: Path
    ) -> None:
        """An https:// fleet (a self-signed certificate in SSL_CERT_FILE): the worker fetches
        and applies it, and a no-change poll is the agent's own one TLS request on its loop,
        the worker not started (its dulwich would say so in the User-Agent)."""
        f = signed_fleet
        rev = base_fleet(f)
        ctx, cert = server_context(tmp_path)
        agents: list[str] = []
        with serve_git(f.tmp / "srv", tls=ctx, user_agents=agents) as base:
            assert base.startswith("https://")
            cfg = f.agent_config(tmp_path / "agent.toml", url=f"{base}/fleet.git")
            agent = make_agent("--config", str(cfg), env={"SSL_CERT_FILE": str(cert)}).start()
            code, out = sync(agent)
            assert code == 0 and out["result"] == "applied" and out["revision"] == rev, out
            assert any("dulwich" in ua for ua in agents), agents
            agents.clear()
            code, out = sync(agent)
            assert code == 0 and out["result"] == "up-to-date", out
            assert agents == ["git/keystone"], agents

    def test_an_untrusted_certificate_is_refused_by_the_peek_and_the_worker(
        self, signed_fleet: SignedFleet, make_agent: Any, tmp_path: Path
    ) -> None:
        """Without the certificate in the trust store the sync fails, saying why, and applies
        nothing."""
        f = signed_fleet
        base_fleet(f)
        ctx, _ = server_context(tmp_path)
        with serve_git(f.tmp / "srv", tls=ctx) as base:
            cfg = f.agent_config(tmp_path / "agent.toml", url=f"{base}/fleet.git")
            agent = make_agent("--config", str(cfg)).start()
            code, out = sync(agent)
        assert code == 1 and out["result"] == "unreachable", out
        assert "certificate verify failed" in out["error"], out
        assert agent.components() == {}


class TestResilience:
    def test_killed_mid_deployment_converges(self, synced: tuple[SignedFleet, Any, str]) -> None:
        """An agent SIGKILLed during a deployment comes back on one consistent plan, no duplicates."""
        f, agent, good = synced
        f.commit(
            {
                "recipes/db.recipe.toml": f.recipe("db", version="1.5.0"),
                "recipes/api.recipe.toml": f.recipe(
                    "api",
                    version="1.5.0",
                    deps=[("db", "hard")],
                    args=["--unhealthy"],
                    start_timeout="20s",
                ),
            },
            "slow api",
        )
        proc = subprocess.Popen(
            [sys.executable, "-m", "keystone", "sync", "--once", "--json"],
            cwd=agent.cwd,
            env={**os.environ, "KEYSTONE_ADDR": agent.addr, "KEYSTONE_RUNTIME": str(agent.runtime)},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_until(
            lambda: any(s["name"] == "api" and s["tag"] == "1.5.0" for s in f.started()),
            what="new api to start",
        )
        agent.stop(signal.SIGKILL)
        proc.wait(30)
        agent.start()
        comps = agent.wait_states({"db": "healthy", "api": "healthy", "tool": "healthy"})
        versions = {n: c["version"] for n, c in comps.items()}
        assert versions in (
            {"db": "1.0.0", "api": "1.0.0", "tool": "1.0.0"},
            {"db": "1.5.0", "api": "1.5.0", "tool": "1.0.0"},
        )
        for name, port in f.ports.items():
            running = [
                p for p in os.listdir("/proc") if p.isdigit() and f"--port {port} " in _cmd(p)
            ]
            assert len(running) == (1 if name in comps else 0), (name, running)
        assert revision(agent)["applied"] == good

    def test_server_gone_keeps_running_and_recovers(
        self, signed_fleet: SignedFleet, make_agent: Any, tmp_path: Path
    ) -> None:
        """With the git server down, sync says unreachable and nothing stops; it syncs when back."""
        f = signed_fleet
        base_fleet(f)
        port = free_port()
        srv = _serve(f.tmp / "srv", port)
        try:
            cfg = f.agent_config(tmp_path / "agent.toml", url=f"http://127.0.0.1:{port}/fleet.git")
            agent = make_agent("--config", str(cfg)).start()
            assert sync(agent)[0] == 0
            before = pids(agent)
            srv.terminate()
            srv.wait(10)
            new = f.commit(
                {"recipes/tool.recipe.toml": f.recipe("tool", version="1.2.0")}, "tool 1.2"
            )
            code, out = sync(agent)
            assert code == 1 and out["result"] == "unreachable", out
            assert pids(agent) == before
            srv = _serve(f.tmp / "srv", port)
            code, out = sync(agent)
            assert code == 0 and out["revision"] == new, out
        finally:
            srv.terminate()
            srv.wait(10)


def _cmd(pid: str) -> str:
    try:
        return (
            Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            + " "
        )
    except OSError:
        return ""


def _serve(root: Path, port: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "scripts" / "serve-git"), str(root), "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    import urllib.request

    def up() -> bool:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1).close()
            return True
        except OSError:
            return False

    wait_until(up, what="git server")
    return proc


class TestOperatorCommands:
    def test_rollback_to_an_older_revision_and_back(
        self, synced: tuple[SignedFleet, Any, str]
    ) -> None:
        """rollback --to REV deploys that older revision, verified like any other, despite anti-rollback."""
        f, agent, first = synced
        wait_until(lambda: revision(agent)["last_known_good"] == first, what="first soak")
        f.commit({"recipes/tool.recipe.toml": f.recipe("tool", version="2.0.0")}, "tool 2")
        assert sync(agent)[0] == 0
        r = agent.cli("rollback", "--to", first, "--json")
        assert r.returncode == 0, r.stdout + r.stderr
        assert json.loads(r.stdout)["result"] == "applied"
        assert revision(agent)["applied"] == first
        assert agent.wait_states({"tool": "healthy"})["tool"]["version"] == "1.0.0"

    def test_suspend_and_resume_show_in_status(self, synced: tuple[SignedFleet, Any, str]) -> None:
        """suspend stops polling (status says so) and leaves components alone; resume restarts it."""
        _, agent, _ = synced
        before = pids(agent)
        assert agent.cli("suspend").returncode == 0
        assert revision(agent)["suspended"] is True
        assert "SUSPENDED" in agent.cli("status", "--revision").stdout
        assert pids(agent) == before
        assert agent.cli("resume").returncode == 0
        assert revision(agent)["suspended"] is False
