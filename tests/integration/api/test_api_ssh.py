"""keystonectl --ssh against a running agent, through an ``ssh`` stand-in that does what
``ssh -W host:port`` does (splice stdio to host:port as seen from the far side)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.api.conftest import DEMO, AgentProc, pids
from tests.unit.test_client import FAKE_SSH

pytestmark = pytest.mark.integration


@pytest.fixture
def ssh_env(tmp_path: Path) -> dict[str, str]:
    """PATH with the stand-in ``ssh`` first; its argv is logged to ssh.log."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    exe = bindir / "ssh"
    exe.write_text(FAKE_SSH.replace("{python}", sys.executable))
    exe.chmod(0o755)
    base = {k: v for k, v in os.environ.items() if not k.startswith("KEYSTONE_")}
    return {
        **base,
        "PATH": f"{bindir}:{os.environ['PATH']}",
        "FAKE_SSH_LOG": str(tmp_path / "ssh.log"),
    }


def keystone(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "keystone", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


class TestSsh:
    def test_commands_through_the_tunnel(
        self, demo_agent: AgentProc, ssh_env: dict[str, str], tmp_path: Path
    ) -> None:
        """status, components and restart-dry work over --ssh with the agent's token; the token
        file on this side is never used for a remote agent; --addr is resolved on the far side."""
        env = {**ssh_env, "KEYSTONE_ADDR": demo_agent.addr, "KEYSTONE_SSH": "ops@edge:2222"}
        r = keystone("components", "--json", env=env, cwd=tmp_path)
        assert r.returncode == 2 and "--token" in r.stderr  # no token for a remote agent
        env["KEYSTONE_API_TOKEN"] = demo_agent.token()
        r = keystone("components", "--json", env=env, cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        assert {c["name"]: c["pid"] for c in json.loads(r.stdout)} == pids(demo_agent)
        r = keystone("status", env=env, cwd=tmp_path)
        assert r.returncode == 0 and r.stdout.startswith("agent ok")
        r = keystone("restart-dry", "cache", "--ssh", "other-host", env=env, cwd=tmp_path)
        assert r.stdout == "stop:  api\nstart: cache -> api\n"
        calls = [json.loads(x) for x in Path(ssh_env["FAKE_SSH_LOG"]).read_text().splitlines()]
        target = f"127.0.0.1:{demo_agent.port}"
        assert calls[-1] == ["-o", "LogLevel=ERROR", "other-host", "-W", target]
        assert ["-o", "LogLevel=ERROR", "-p", "2222", "ops@edge", "-W", target] in calls
        assert sorted(pids(demo_agent)) == sorted(DEMO)
