"""Container components in a real agent with real podman: order, health, restarts, upgrades,
rollback, adoption after SIGKILL, refusals before anything stops."""

from __future__ import annotations

import json
import signal
import socket
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

    def test_cmd_probe_runs_inside_the_container(
        self, container_agent: Any, images: Images, tmp_path: Path
    ) -> None:
        """A cmd: health check runs in the container: /www exists there, not on the host."""
        port = free_port()
        recipe = container_recipe(
            images, "web", "1.0.0", port, health="cmd:test -f /www/index.html"
        )
        plan = write_plan(tmp_path, {"web": recipe})
        assert not Path("/www/index.html").exists()
        agent = container_agent("--apply", str(plan)).start()
        comps = agent.wait_states({"web": "healthy"}, timeout=60)
        assert comps["web"]["health_detail"].startswith("exit 0")


class TestRestarts:
    def test_crash_restarts_with_backoff_then_gives_up(
        self, container_agent: Any, images: Images, tmp_path: Path
    ) -> None:
        """A container that exits 3 is restarted max_retries times with backoff, then failed."""
        recipe = container_recipe(
            images,
            "crashy",
            "1.0.0",
            free_port(),
            command=["/bin/sh", "-c", "echo boom; sleep 1.5; exit 3"],
            health=None,
            extra_run='restart_policy = "on-failure"\nmax_retries = 2',
        )
        plan = write_plan(tmp_path, {"crashy": recipe})
        agent = container_agent("--apply", str(plan)).start()
        comps = agent.wait_states({"crashy": "failed"}, timeout=60)
        assert comps["crashy"]["restarts"] == 2
        assert "crash loop" in comps["crashy"]["error"]
        assert "exited with status 3" in comps["crashy"]["error"]
        out = (agent.runtime / "logs" / "crashy" / "stdout.log").read_text()
        assert out.count("boom") == 3
        log = agent.output()
        assert "restart 1/2 in" in log and "restart 2/2 in" in log
        wait_until(
            lambda: images.podman.containers("keystone.component=crashy", all=True) == [],
            what="exited containers removed",
        )

    def test_container_that_exits_at_once_is_rolled_back_and_removed(
        self, container_agent: Any, images: Images, tmp_path: Path
    ) -> None:
        """Its port is taken, so the container exits before the agent reads its pid: the first
        plan fails on that exit and rolls back, and no exited container is left behind."""
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            recipe = container_recipe(
                images, "web", "1.0.0", port, health="cmd:test -f /www/index.html"
            )
            plan = write_plan(tmp_path, {"web": recipe})
            agent = container_agent("--apply", str(plan)).start()
            wait_until(lambda: "initial plan failed" in agent.output(), what="the plan failed")
            assert "web: backoff: exited with status 0: httpd: bind: Address" in agent.output()
            wait_until(
                lambda: images.podman.containers(all=True) == [], what="the container removed"
            )
            assert agent.api("GET", "/v1/components")[1] == []


class TestUpgrade:
    def test_upgrade_then_failed_upgrade_rolls_back_to_previous_container(
        self, container_agent: Any, images: Images, tmp_path: Path
    ) -> None:
        """v1 -> v2 (another image) replaces the container; a v3 that never gets healthy is
        rolled back to a v2 container; one container at every step."""
        port = free_port()
        write_plan(tmp_path, {"web": container_recipe(images, "web", "1.0.0", port)})
        agent = container_agent("--apply", "plan.toml").start()
        first = agent.wait_states({"web": "healthy"}, timeout=60)["web"]

        write_plan(
            tmp_path,
            {"web": container_recipe(images, "web", "2.0.0", port, image=images.v2)},
            "plan2.toml",
        )
        done = agent.cli("apply", "plan2.toml")
        assert done.returncode == 0, done.stdout + done.stderr
        second = agent.wait_states({"web": "healthy"}, timeout=60)["web"]
        assert second["version"] == "2.0.0" and second["container_id"] != first["container_id"]
        running = images.podman.containers("keystone.component=web", all=True)
        assert [(c["Id"], c["Labels"]["keystone.version"]) for c in running] == [
            (second["container_id"], "2.0.0")
        ]
        assert "serving image 2" in (agent.runtime / "logs" / "web" / "stdout.log").read_text()

        bad = container_recipe(
            images,
            "web",
            "3.0.0",
            port,
            command=["/bin/sleep", "3600"],
            start_timeout="2s",
            extra_run='restart_policy = "never"',
        )
        write_plan(tmp_path, {"web": bad}, "plan3.toml")
        done = agent.cli("apply", "plan3.toml")
        assert done.returncode != 0
        assert "rolled-back" in done.stdout + done.stderr
        after = agent.wait_states({"web": "healthy"}, timeout=60)["web"]
        assert after["version"] == "2.0.0"
        running = images.podman.containers("keystone.component=web", all=True)
        assert [(c["Id"], c["Labels"]["keystone.version"]) for c in running] == [
            (after["container_id"], "2.0.0")
        ]


class TestAdoption:
    def test_sigkill_then_restart_adopts_and_sweeps_stale(
        self, container_agent: Any, images: Images, tmp_path: Path
    ) -> None:
        """After a SIGKILL of the agent its container keeps running; the next agent adopts it
        (same id, no restart, no duplicate) and removes a stale container of its own."""
        port = free_port()
        write_plan(tmp_path, {"web": container_recipe(images, "web", "1.0.0", port)})
        first = container_agent("--apply", "plan.toml").start()
        before = first.wait_states({"web": "healthy"}, timeout=60)["web"]
        wait_until(
            lambda: first.api("GET", "/v1/plan/status")[1].get("status") == "running",
            what="plan running",
        )
        first.stop(signal.SIGKILL)
        assert [c["Id"] for c in images.podman.containers("keystone.component=web")] == [
            before["container_id"]
        ]
        # A container of this agent that no snapshot names (e.g. created just before a crash).
        owner = owner_label(first.runtime)
        images.podman.run(
            "run", "-d", "--network=host", "--name", f"ghost-{images.podman.token}",
            "--label", "keystone.managed=true", "--label", "keystone.component=ghost",
            "--label", f"keystone.owner={owner}",
            "--label", f"keystone.test={images.podman.token}",
            images.v1, "/bin/sleep", "3600",
        )  # fmt: skip
        second = container_agent(runtime=first.runtime).start()
        after = second.wait_states({"web": "healthy"}, timeout=60)["web"]
        assert after["container_id"] == before["container_id"]
        assert after["restarts"] == 0
        assert "adopted web" in second.output()
        wait_until(
            lambda: (
                [c["Id"] for c in images.podman.containers(all=True)] == [before["container_id"]]
            ),
            what="only the adopted container left",
        )
        # The adopted container is watched: its exit is seen and it is restarted.
        images.podman.run("kill", before["container_id"])
        wait_until(
            lambda: (
                second.components()["web"].get("container_id") not in (None, before["container_id"])
                and second.components()["web"]["phase"] == "healthy"
            ),
            timeout=60,
            what="web restarted after its adopted container died",
        )


class TestRefusals:
    def test_pull_never_missing_image_refused_before_anything_stops(
        self, container_agent: Any, images: Images, tmp_path: Path
    ) -> None:
        """pull_policy = never with an image the engine lacks: refused, v1 keeps running."""
        port = free_port()
        write_plan(tmp_path, {"web": container_recipe(images, "web", "1.0.0", port)})
        agent = container_agent("--apply", "plan.toml").start()
        before = agent.wait_states({"web": "healthy"}, timeout=60)["web"]
        missing = f"localhost/keystone-test-missing-{images.podman.token}:9"
        write_plan(
            tmp_path,
            {"web": container_recipe(images, "web", "2.0.0", port, image=missing)},
            "plan2.toml",
        )
        done = agent.cli("apply", "plan2.toml")
        assert done.returncode != 0
        out = done.stdout + done.stderr
        assert missing in out and 'pull_policy = "never"' in out
        now = agent.components()["web"]
        assert (now["container_id"], now["version"], now["phase"]) == (
            before["container_id"],
            "1.0.0",
            "healthy",
        )
        assert "healthy -> stopping" not in agent.output()

    def test_pinned_digest_mismatch_refused_and_match_runs(
        self, container_agent: Any, images: Images, tmp_path: Path
    ) -> None:
        """image@sha256 of another image is refused before anything stops; the right one runs."""
        port = free_port()
        write_plan(tmp_path, {"web": container_recipe(images, "web", "1.0.0", port)})
        agent = container_agent("--apply", "plan.toml").start()
        before = agent.wait_states({"web": "healthy"}, timeout=60)["web"]
        wrong = images.podman.image_id(images.v2)
        pinned = f"{images.v1}@sha256:{wrong.removeprefix('sha256:')}"
        write_plan(
            tmp_path,
            {"web": container_recipe(images, "web", "2.0.0", port, image=pinned)},
            "plan2.toml",
        )
        done = agent.cli("apply", "plan2.toml")
        assert done.returncode != 0
        assert "does not match its pinned digest" in done.stdout + done.stderr
        assert agent.components()["web"]["container_id"] == before["container_id"]

        right = images.podman.image_id(images.v1)
        pinned = f"{images.v1}@sha256:{right.removeprefix('sha256:')}"
        write_plan(
            tmp_path,
            {"web": container_recipe(images, "web", "2.0.0", port, image=pinned)},
            "plan3.toml",
        )
        done = agent.cli("apply", "plan3.toml")
        assert done.returncode == 0, done.stdout + done.stderr
        assert agent.wait_states({"web": "healthy"}, timeout=60)["web"]["version"] == "2.0.0"

    def test_no_engine_refused_before_anything_stops(
        self, container_agent: Any, images: Images, tmp_path: Path
    ) -> None:
        """The engine configured is not installed: a plan with a container is refused naming
        it, and the process already running is not touched."""
        sleeper = (
            '[metadata]\nname = "worker"\nversion = "1.0.0"\n'
            '[lifecycle.run.exec]\ncommand = "/bin/sleep"\nargs = ["3600"]\n'
        )
        write_plan(tmp_path, {"worker": sleeper})
        agent = container_agent("--apply", "plan.toml")
        agent.env["KEYSTONE_CONTAINER_ENGINE"] = str(tmp_path / "no-such" / "podman")
        agent.start()
        before = agent.wait_states({"worker": "healthy"})["worker"]
        changed = sleeper.replace('"3600"', '"3601"').replace("1.0.0", "1.0.1")
        web = container_recipe(images, "web", "1.0.0", free_port())
        write_plan(tmp_path, {"worker": changed, "web": web}, "plan2.toml")
        done = agent.cli("apply", "plan2.toml")
        assert done.returncode != 0
        assert f"container engine {tmp_path}/no-such/podman is not installed" in (
            done.stdout + done.stderr
        )
        now = agent.components()
        assert now["worker"]["pid"] == before["pid"] and "web" not in now
