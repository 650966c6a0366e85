"""Container components in a real agent with real podman: order, health, restarts, upgrades,
rollback, adoption after SIGKILL, refusals before anything stops."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path
from typing import Any

import pytest

from keystone.runtime.container import owner_label
from tests.conftest import free_port, wait_until
from tests.integration.containers.conftest import Images, container_recipe, write_plan

pytestmark = pytest.mark.integration


def client_recipe(port: int) -> str:
    """A process that needs the container's HTTP server the moment it starts (else it exits 1)."""
    script = (
        "import sys, time, urllib.request\n"
        f"body = urllib.request.urlopen('http://127.0.0.1:{port}/index.html', timeout=2).read()\n"
        "print('got', body.decode().strip(), flush=True)\n"
        "time.sleep(3600)\n"
    )
    return (
        '[metadata]\nname = "client"\nversion = "1.0.0"\n'
        '[[dependencies]]\nname = "web"\ntype = "hard"\n'
        '[lifecycle.run]\nrestart_policy = "never"\nstop_timeout = "2s"\n'
        f"[lifecycle.run.exec]\ncommand = {json.dumps(sys.executable)}\n"
        f"args = ['-c', {json.dumps(script)}]\n"
    )


def apply(agent: Any, plan: Path) -> Any:
    done = agent.cli("apply", plan.name)
    return done


class TestStart:
    def test_process_waits_for_healthy_container(
        self, container_agent: Any, images: Images, tmp_path: Path
    ) -> None:
        """A process depending on a container starts once the container is healthy; status
        says pid 0 and the container id; the container is named, labelled, logs to the files."""
        port = free_port()
        plan = write_plan(
            tmp_path,
            {
                "client": client_recipe(port),
                "web": container_recipe(images, "web", "1.0.0", port),
            },
        )
        agent = container_agent("--apply", str(plan)).start()
        comps = agent.wait_states({"web": "healthy", "client": "healthy"}, timeout=60)
        web, client = comps["web"], comps["client"]
        assert web["pid"] == 0 and client["restarts"] == 0
        running = images.podman.containers("keystone.component=web")
        assert [c["Id"] for c in running] == [web["container_id"]]
        labels = running[0]["Labels"]
        assert labels["keystone.version"] == "1.0.0"
        assert labels["keystone.owner"] == owner_label(agent.runtime)
        assert running[0]["Names"][0] == web["container"]
        logs = agent.runtime / "logs"
        wait_until(lambda: "got image 1" in (logs / "client" / "stdout.log").read_text())
        assert "serving image 1" in (logs / "web" / "stdout.log").read_text()
        assert agent.stop(signal.SIGTERM) == 0
        assert images.podman.containers("keystone.component=web", all=True) == []
