"""docs/containers.md's walkthrough, run as written, with real podman and a real agent.

The blocks are taken from the page itself, so the page cannot drift from what works. Only what
a shared test machine needs is changed: the web server's port (a free one instead of the page's
8081), the image's name (unique to this run) and one more label (for the cleanup).
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import free_port
from tests.integration.containers.conftest import Images

pytestmark = pytest.mark.integration

DOC = Path(__file__).parents[3] / "docs" / "containers.md"
PAGE_PORT = "127.0.0.1:8081"


def blocks(lang: str) -> list[str]:
    """The page's fenced blocks of ``lang``, in order."""
    return re.findall(rf"```{lang}\n(.*?)```", DOC.read_text(), flags=re.S)


def test_the_page_does_not_share_the_agents_port() -> None:
    """The agent's API listens on 127.0.0.1:8080 by default: the example must not."""
    walkthrough = DOC.read_text().split("## The recipe table")[0]
    assert "8080" not in walkthrough
    assert walkthrough.count(PAGE_PORT) == 3


def test_walkthrough(container_agent: Any, images: Images, tmp_path: Path) -> None:
    """Build the image, write the three files, start the agent with --apply: web (a container)
    turns healthy, then client (a process) reads it; status, podman ps and the log file say
    what the page says. Then a typo'd field and a missing image are named, nothing stops."""
    podman = images.podman
    port = f"127.0.0.1:{free_port()}"
    image = f"localhost/hello-web-{podman.token}"
    env = {**os.environ, **podman.env}
    build = blocks("sh")[0].replace(PAGE_PORT, port).replace("localhost/hello-web", image)
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", build],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    image_id = done.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"[0-9a-f]{64}", image_id), done.stdout
    agent = None
    try:
        web, client, plan = (b.replace(PAGE_PORT, port) for b in blocks("toml")[:3])
        web = web.replace("localhost/hello-web", image).replace("<the id printed above>", image_id)
        web = web.replace('"com.example.team" = "edge"', f'"keystone.test" = "{podman.token}"')
        (tmp_path / "web.recipe.toml").write_text(web)
        (tmp_path / "client.recipe.toml").write_text(client)
        (tmp_path / "plan.toml").write_text(plan)

        agent = container_agent("--apply", "plan.toml").start()
        comps = agent.wait_states({"web": "healthy", "client": "healthy"}, timeout=90)
        assert comps["web"]["pid"] == 0 and comps["web"]["container_id"]
        cid = comps["web"]["container_id"]
        status = agent.cli("status")
        assert status.returncode == 0, status.stderr
        assert f"ctr:{cid[:12]}" in status.stdout
        mine = [c["Id"] for c in podman.containers("keystone.component=web")]
        assert mine == [cid]
        assert cid in (agent.runtime / "logs" / "web" / "stdout.log").read_text()
        assert "hello" in (agent.runtime / "logs" / "client" / "stdout.log").read_text()

        # A typo'd field is named with the user's own file and line, not the agent's store.
        typo = web.replace("pull_policy", "pul_policy")
        (tmp_path / "typo.recipe.toml").write_text(typo)
        line = typo.splitlines().index(next(x for x in typo.splitlines() if "pul_policy" in x))
        (tmp_path / "typo.toml").write_text(
            '[[components]]\nname = "web"\nrecipe = "typo.recipe.toml"\n\n'
            '[[components]]\nname = "client"\nrecipe = "client.recipe.toml"\n'
        )
        done_typo = agent.cli("apply", "typo.toml")
        assert (
            f"typo.recipe.toml:{line + 1}: unknown field lifecycle.run.container.pul_policy"
            in done_typo.stdout
        ), (done_typo.stdout, done_typo.stderr)

        # A missing image with pull_policy = "never" is refused naming it; web keeps running.
        now = agent.wait_states({"web": "healthy"}, timeout=90)["web"]["container_id"]
        missing = web.replace(f"{image}:1@sha256:{image_id}", f"{image}:absent")
        missing = missing.replace('version = "1.0.0"', 'version = "2.0.0"')
        (tmp_path / "missing.recipe.toml").write_text(missing)
        (tmp_path / "missing.toml").write_text(
            '[[components]]\nname = "web"\nrecipe = "missing.recipe.toml"\n'
        )
        refused = agent.cli("apply", "missing.toml")
        assert refused.returncode == 3, (refused.stdout, refused.stderr)
        out = refused.stdout + refused.stderr
        assert f"image {image}:absent is not present" in out and 'pull_policy = "never"' in out
        assert agent.components()["web"]["container_id"] == now
    finally:
        if agent is not None:
            agent.stop()
        subprocess.run(
            ["podman", "rmi", "-f", f"{image}:1"], env=env, capture_output=True, timeout=120
        )
