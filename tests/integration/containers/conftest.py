"""Real podman for the container tests: a tiny busybox image built here, agents that use it.

Podman runs as root on these machines with the runc runtime, no default ulimits and host
networking (no registry, no bridge). The image is made by ``podman import`` of a static busybox
rootfs, once for all container tests. Every container a test makes carries the label ``keystone.test=<token>``
and is removed at the end, whatever happened.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import free_port
from tests.integration.agent.conftest import AgentProc, stop_agents

BUSYBOX_APPLETS = ("sh", "httpd", "sleep", "echo", "cat", "test", "kill", "mkdir", "true", "ls")


@dataclass
class Podman:
    """The podman command line with the settings this machine needs."""

    env: dict[str, str]
    runtime: str
    token: str

    def argv(self, *args: str) -> list[str]:
        return ["podman", "--runtime", self.runtime, *args]

    def run(self, *args: str, check: bool = True, timeout: float = 120) -> str:
        done = subprocess.run(
            self.argv(*args),
            env={**os.environ, **self.env},
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and done.returncode != 0:
            raise AssertionError(f"podman {' '.join(args)}: {done.stderr.strip()}")
        return done.stdout.strip()

    def containers(self, *labels: str, all: bool = False) -> list[dict[str, Any]]:
        """Containers of this test run (running ones unless ``all``), with their labels."""
        args = ["ps", "--format", "json", "--filter", f"label=keystone.test={self.token}"]
        if all:
            args.insert(1, "-a")
        for label in labels:
            args += ["--filter", f"label={label}"]
        out = self.run(*args)
        return list(json.loads(out or "[]"))

    def image_id(self, ref: str) -> str:
        return self.run("image", "inspect", "--format", "{{.Id}}", ref)


@dataclass
class Images:
    """Two tags of the test image (they differ only in a marker file) and podman."""

    podman: Podman
    v1: str
    v2: str
    conf: Path


def _build_rootfs(root: Path, marker: str) -> Path:
    rootfs = root / f"rootfs-{marker}"
    (rootfs / "bin").mkdir(parents=True)
    (rootfs / "www").mkdir()
    (rootfs / "tmp").mkdir()
    busybox = shutil.which("busybox") or "/bin/busybox"
    shutil.copy2(busybox, rootfs / "bin" / "busybox")
    for applet in BUSYBOX_APPLETS:
        (rootfs / "bin" / applet).symlink_to("busybox")
    (rootfs / "www" / "index.html").write_text(f"image {marker}\n")
    tar = root / f"rootfs-{marker}.tar"
    subprocess.run(["tar", "-C", str(rootfs), "-cf", str(tar), "."], check=True)
    return tar


@pytest.fixture(scope="package")
def images(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Images]:
    """Build the test image (two tags) or skip with the reason podman cannot run here."""
    if shutil.which("podman") is None:
        pytest.skip("podman is not installed (scripts/setup-test-deps installs it)")
    if shutil.which("busybox") is None:
        pytest.skip("busybox-static is not installed (scripts/setup-test-deps installs it)")
    root = tmp_path_factory.mktemp("images")
    conf = root / "containers.conf"
    conf.write_text("[containers]\ndefault_ulimits = []\n")
    runtime = "runc" if shutil.which("runc") else "crun"
    token = secrets.token_hex(4)
    podman = Podman({"CONTAINERS_CONF": str(conf)}, runtime, token)
    tags = []
    # The image's own command serves /www on $PORT after saying which image it is.
    # It exits 0 on SIGTERM (a shell as pid 1 only dies of the signals it traps).
    script = (
        "echo serving $(cat /www/index.html); httpd -f -h /www -p 127.0.0.1:$PORT & "
        "trap 'kill $!; exit 0' TERM; wait"
    )
    cmd = json.dumps(["/bin/sh", "-c", script])
    for marker in ("1", "2"):
        tar = _build_rootfs(root, marker)
        tag = f"localhost/keystone-test-{token}:{marker}"
        podman.run("import", "--change", f"CMD {cmd}", str(tar), tag)
        tags.append(tag)
    probe = subprocess.run(
        podman.argv("run", "--rm", "--network=host", tags[0], "/bin/true"),
        env={**os.environ, **podman.env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    if probe.returncode != 0:
        for tag in tags:
            podman.run("rmi", "-f", tag, check=False)
        pytest.skip(f"podman cannot run containers here: {probe.stderr.strip()[-300:]}")
    yield Images(podman, tags[0], tags[1], conf)
    ids = podman.run("ps", "-aq", "--filter", f"label=keystone.test={token}", check=False)
    if ids:
        podman.run("rm", "-f", "-t", "0", *ids.split(), check=False)
    for tag in tags:
        podman.run("rmi", "-f", tag, check=False)


def container_recipe(
    images: Images,
    name: str,
    version: str,
    port: int,
    *,
    image: str | None = None,
    command: list[str] | None = None,
    health: str | None = "http",
    extra_run: str = "",
    extra: str = "",
    pull_policy: str = "never",
    start_timeout: str = "20s",
) -> str:
    """A container recipe for the test image on ``port`` (host network)."""
    lines = [
        "[metadata]",
        f'name = "{name}"',
        f'version = "{version}"',
        'type = "container"',
        extra,
        "[lifecycle.run]",
        'type = "container"',
        'stop_timeout = "2s"',
        extra_run,
        "[lifecycle.run.container]",
        f'image = "{image or images.v1}"',
        f'pull_policy = "{pull_policy}"',
        'network_mode = "host"',
        "[lifecycle.run.container.env]",
        f'PORT = "{port}"',
        "[lifecycle.run.container.labels]",
        f'"keystone.test" = "{images.podman.token}"',
    ]
    if command is not None:
        lines += ["[lifecycle.run.exec]", f"command = {json.dumps(command[0])}"]
        lines += [f"args = {json.dumps(command[1:])}"]
    if health == "http":
        lines += [
            "[lifecycle.run.health]",
            f'check = "http://127.0.0.1:{port}/index.html"',
            'interval = "1s"',
            f'start_timeout = "{start_timeout}"',
        ]
    elif health:
        lines += [
            "[lifecycle.run.health]",
            f'check = "{health}"',
            'interval = "1s"',
            f'start_timeout = "{start_timeout}"',
        ]
    return "\n".join(lines) + "\n"


def write_plan(directory: Path, recipes: dict[str, str], plan_name: str = "plan.toml") -> Path:
    """Write ``<name>.recipe.toml`` for each recipe and a plan naming them (in that order)."""
    parts = []
    for name, text in recipes.items():
        (directory / f"{name}.recipe.toml").write_text(text)
        parts.append(f'[[components]]\nname = "{name}"\nrecipe = "{name}.recipe.toml"\n')
    plan = directory / plan_name
    plan.write_text("\n".join(parts))
    return plan


@pytest.fixture
def container_agent(tmp_path: Path, images: Images) -> Iterator[Any]:
    """Factory for agents set up for podman on this machine; all stopped at teardown."""
    agents: list[AgentProc] = []

    def make(*args: str, runtime: Path | None = None, port: int | None = None) -> AgentProc:
        env = {
            "CONTAINERS_CONF": str(images.conf),
            "KEYSTONE_CONTAINER_ENGINE": "podman",
            "KEYSTONE_CONTAINER_RUNTIME": images.podman.runtime,
        }
        a = AgentProc(
            tmp_path, runtime or tmp_path / "runtime", port or free_port(), list(args), env
        )
        agents.append(a)
        return a

    yield make
    stop_agents(agents)
