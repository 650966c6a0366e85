"""Go's runtime layout: a Go demo recipe whose install script copies its artifact from
``../../../artifacts/<name>/<version>/<file>`` runs unchanged, served over real HTTP."""

from __future__ import annotations

import hashlib
import http.server
import os
import stat
import threading
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import wait_until

pytestmark = pytest.mark.integration

APP = b"#!/bin/sh\necho producer v$1 up\nexec sleep 3600\n"

# The Go demo's com.demo.producer recipe (demo/recipes/v1/*.tmpl), with its health check left
# out and the URL and digest filled in as its build script does.
RECIPE = """\
[metadata]
name = "com.demo.producer"
version = "{version}"
description = "Demo data-producer v{version}"
publisher = "keystone-demo"

[[artifacts]]
uri = "{url}/data-producer-v{version}"
sha256 = "{sha}"

[lifecycle.install]
script = \"\"\"
cp ../../../artifacts/com.demo.producer/{version}/data-producer-v{version} ./app
chmod +x ./app
\"\"\"

[lifecycle.run]
restart_policy = "on-failure"
max_retries = 3

[lifecycle.run.exec]
command = "./app"
args = ["{version}"]
"""

PLAN = '[[components]]\nname = "producer"\nrecipe = "recipes/producer-{version}.recipe.toml"\n'


@pytest.fixture
def artifact_server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A real HTTP server on 127.0.0.1 serving ``tmp_path/www``."""
    www = tmp_path / "www"
    www.mkdir()
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(www))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", www
    finally:
        server.shutdown()
        server.server_close()


def _publish(root: Path, www: Path, url: str, version: str) -> Path:
    data = APP.replace(b"$1", version.encode())
    (www / f"data-producer-v{version}").write_bytes(data)
    sha = hashlib.sha256(data).hexdigest()
    (root / "recipes").mkdir(exist_ok=True)
    (root / "recipes" / f"producer-{version}.recipe.toml").write_text(
        RECIPE.format(version=version, url=url, sha=sha)
    )
    plan = root / f"plan-{version}.toml"
    plan.write_text(PLAN.format(version=version))
    return plan


def test_go_demo_install_script_copies_from_the_go_layout(
    make_agent: Any, tmp_path: Path, artifact_server: tuple[str, Path]
) -> None:
    """v1 installs by copying ``../../../artifacts/com.demo.producer/1.0.0/...`` and runs; the
    link is read-only and points into the content-addressed cache; v2 does the same, and the
    v1 link stays beside it."""
    url, www = artifact_server
    plan_v1 = _publish(tmp_path, www, url, "1.0.0")
    agent = make_agent("--apply", str(plan_v1)).start()
    comps = agent.wait_states({"producer": "healthy"})
    assert comps["producer"]["state"] == "running" and comps["producer"]["pid"] > 0

    link = agent.runtime / "artifacts" / "com.demo.producer" / "1.0.0" / "data-producer-v1.0.0"
    assert link.is_symlink()
    blob = link.resolve()
    assert blob.parent == (agent.runtime / "artifacts" / "sha256").resolve()
    assert blob.name == hashlib.sha256(link.read_bytes()).hexdigest()
    assert not os.access(link, os.W_OK) or os.geteuid() == 0
    assert stat.S_IMODE(blob.stat().st_mode) == 0o444

    workdir = agent.runtime / "components" / "producer" / "1.0.0"
    app = workdir / "app"
    assert app.read_bytes() == link.read_bytes() and os.access(app, os.X_OK)
    assert "producer v1.0.0 up" in (agent.runtime / "logs" / "producer" / "stdout.log").read_text()

    plan_v2 = _publish(tmp_path, www, url, "2.0.0")
    status, body = agent.api("POST", "/v1/plan/apply", plan_v2.read_bytes())
    assert status == 202, body
    wait_until(
        lambda: (
            agent.components()["producer"].get("version") == "2.0.0"
            and agent.components()["producer"]["phase"] == "healthy"
        ),
        timeout=30,
        what="producer 2.0.0",
    )
    v2 = agent.runtime / "artifacts" / "com.demo.producer" / "2.0.0" / "data-producer-v2.0.0"
    assert v2.is_symlink() and link.is_symlink()
    assert (agent.runtime / "components" / "producer" / "2.0.0" / "app").read_bytes() == (
        v2.read_bytes()
    )
