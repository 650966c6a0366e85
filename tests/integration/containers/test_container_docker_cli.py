"""The docker code path: the docker CLI against podman's Docker-compatible API service.

No docker daemon runs on these machines; ``podman system service`` answers the same API, so the
agent's docker argv (create, start, inspect, logs -f, stop, rm) runs against a real engine.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import free_port, wait_until
from tests.integration.agent.conftest import AgentProc, stop_agents
from tests.integration.containers.conftest import Images, container_recipe, write_plan

pytestmark = pytest.mark.integration


@pytest.fixture
def docker_host(images: Images, tmp_path: Path) -> Iterator[str]:
    """``unix://`` address of a podman API service; skips without the docker CLI."""
    if shutil.which("docker") is None:
        pytest.skip("the docker CLI is not installed")
    sock = tmp_path / "podman.sock"
    service = subprocess.Popen(
        images.podman.argv("system", "service", "--time=0", f"unix://{sock}"),
        env={**os.environ, **images.podman.env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    host = f"unix://{sock}"
    try:
        wait_until(
            lambda: (
                subprocess.run(
                    ["docker", "-H", host, "version"], capture_output=True, timeout=10
                ).returncode
                == 0
            ),
            what="podman API service",
        )
        yield host
    finally:
        service.send_signal(signal.SIGTERM)
        try:
            service.wait(30)
        except subprocess.TimeoutExpired:
            service.kill()
            service.wait()


def followers(container_id: str) -> list[int]:
    """Pids of ``docker ... logs -f <container_id>`` processes."""
    out = []
    for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"logs" in argv and b"-f" in argv and container_id.encode() in argv:
            out.append(pid)
    return out


def test_docker_cli_runs_adopts_and_logs(images: Images, docker_host: str, tmp_path: Path) -> None:
    """Started through docker: healthy, its output in the log files (docker logs -f), adopted
    after a SIGKILL of the agent, stopped and removed at shutdown."""
    port = free_port()
    write_plan(tmp_path, {"web": container_recipe(images, "web", "1.0.0", port)})
    env = {"KEYSTONE_CONTAINER_ENGINE": "docker", "KEYSTONE_CONTAINER_ARGS": f"-H {docker_host}"}
    agents: list[AgentProc] = []

    def agent(*args: str) -> AgentProc:
        a = AgentProc(tmp_path, tmp_path / "runtime", free_port(), list(args), env)
        agents.append(a)
        return a.start()

    try:
        first = agent("--apply", "plan.toml")
        web = first.wait_states({"web": "healthy"}, timeout=60)["web"]
        assert web["pid"] == 0 and web["container_id"]
        assert "using docker" in first.output()
        logs = tmp_path / "runtime" / "logs" / "web" / "stdout.log"
        wait_until(lambda: "serving image 1" in logs.read_text(), what="log follower output")
        wait_until(
            lambda: first.api("GET", "/v1/plan/status")[1].get("status") == "running",
            what="plan running",
        )
        first.stop(signal.SIGKILL)
        second = agent()
        again = second.wait_states({"web": "healthy"}, timeout=60)["web"]
        assert again["container_id"] == web["container_id"] and again["restarts"] == 0
        running = images.podman.containers("keystone.component=web")
        assert [c["Id"] for c in running] == [web["container_id"]]
        assert len(followers(web["container_id"])) == 1  # the first agent's, kept
        assert second.stop(signal.SIGTERM) == 0
        assert images.podman.containers("keystone.component=web", all=True) == []
        assert followers(web["container_id"]) == []
    finally:
        stop_agents(agents)
