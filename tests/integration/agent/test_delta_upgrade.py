"""A real agent upgrading a component v1 -> v2 through ``keystone serve-artifacts --deltas``.

v1 is installed whole (nothing to patch from); v2's recipe declares ``[artifacts.delta]`` and comes
from a patch of v1's tar, a small part of the archive on the wire (``/metrics`` says so); with the
delta server down, v3 still comes, downloaded whole.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import random
import re
import subprocess
import sys
import tarfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import free_port, wait_until

pytestmark = pytest.mark.integration


def tar_of(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, body in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(body), 0o644, 1_700_000_000
            tf.addfile(info, io.BytesIO(body))
    return buf.getvalue()


def versions() -> list[bytes]:
    """Three tars: a 4 MiB incompressible payload, about 64 KiB of it new in each version."""
    rng = random.Random(3)
    payload = bytearray(rng.randbytes(4 << 20))
    out = []
    for v in (1, 2, 3):
        if v > 1:
            for i in range(0, len(payload), 256 << 10):
                payload[i : i + 4096] = rng.randbytes(4096)
        out.append(tar_of({"data.bin": bytes(payload), "VERSION": f"{v}\n".encode()}))
    return out


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


@pytest.fixture
def delta_server(tmp_path: Path) -> Iterator[tuple[str, Path, subprocess.Popen[bytes]]]:
    """``keystone serve-artifacts --deltas`` in its own process, on 127.0.0.1."""
    root = tmp_path / "served"
    root.mkdir()
    port = free_port()
    log = (tmp_path / "serve.log").open("wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "keystone",
            "serve-artifacts",
            "--root",
            str(root),
            "--addr",
            f"127.0.0.1:{port}",
            "--deltas",
            "--deltas-cache",
            str(tmp_path / "delta-cache"),
            "--delta-generate-wait",
            "60",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            with urllib.request.urlopen(url + "/", timeout=2):
                return True
        except urllib.error.HTTPError:
            return True
        except OSError:
            return False

    wait_until(up, timeout=30, what="serve-artifacts")
    yield url, root, proc
    if proc.poll() is None:
        proc.terminate()
        proc.wait(10)
    log.close()


def write_recipe(path: Path, version: str, url: str, gz: bytes, tar: bytes, server: str) -> None:
    path.write_text(
        f'[metadata]\nname = "app"\nversion = "{version}"\n'
        f'\n[[artifacts]]\nuri = "{url}/app-{version}.tar.gz"\nsha256 = "{sha(gz)}"\nunpack = true\n'
        f'[artifacts.delta]\nserver = "{server}"\nsha256 = "{sha(tar)}"\n'
        f"\n[lifecycle.run.exec]\ncommand = {json.dumps(sys.executable)}\n"
        'args = ["-c", "import time; time.sleep(3600)"]\n'
    )


def metric(agent: Any, name: str) -> float:
    req = urllib.request.Request(
        agent.addr + "/metrics", headers={"Authorization": f"Bearer {agent.token()}"}
    )
    with urllib.request.urlopen(req, timeout=5) as r:
        text = r.read().decode()
    m = re.search(rf"^{re.escape(name)} ([0-9.e+]+)$", text, re.M)
    assert m, f"{name} not in /metrics"
    return float(m.group(1))


def test_agent_upgrades_through_a_delta_and_falls_back(
    make_agent: Any, tmp_path: Path, delta_server: tuple[str, Path, subprocess.Popen[bytes]]
) -> None:
    url, served, proc = delta_server
    tars = versions()
    gzs = [gzip.compress(t, mtime=0) for t in tars]
    for i, gz in enumerate(gzs, 1):
        (served / f"app-{i}.0.0.tar.gz").write_bytes(gz)
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    plan = tmp_path / "plan.toml"
    plan.write_text('[[components]]\nname = "app"\nrecipe = "recipes/app.recipe.toml"\n')
    write_recipe(recipes / "app.recipe.toml", "1.0.0", url, gzs[0], tars[0], url)

    agent = make_agent("--apply", str(plan)).start()
    agent.wait_states({"app": "healthy"}, timeout=60)
    work = agent.runtime / "components" / "app"
    assert (work / "1.0.0" / "VERSION").read_text() == "1\n"
    assert metric(agent, 'keystone_artifact_fetches_total{path="full"}') == 1

    write_recipe(recipes / "app.recipe.toml", "2.0.0", url, gzs[1], tars[1], url)
    t0 = time.monotonic()
    done = agent.cli("apply", str(plan))
    assert done.returncode == 0, done.stdout + done.stderr
    wait_until(
        lambda: (
            agent.components()["app"].get("version") == "2.0.0"
            and agent.components()["app"]["phase"] == "healthy"
        ),
        timeout=120,
        what="app 2.0.0 healthy",
    )
    took = time.monotonic() - t0
    assert (work / "2.0.0" / "VERSION").read_text() == "2\n"
    with tarfile.open(fileobj=io.BytesIO(tars[1])) as tf:
        member = tf.extractfile("data.bin")
        assert member is not None
        assert (work / "2.0.0" / "data.bin").read_bytes() == member.read()
    assert metric(agent, 'keystone_artifact_fetches_total{path="delta"}') == 1
    on_wire = metric(agent, 'keystone_artifact_delta_bytes_total{kind="downloaded"}')
    assert 0 < on_wire < len(gzs[1]) / 10
    assert metric(agent, 'keystone_artifact_delta_bytes_total{kind="saved"}') > len(gzs[1]) / 2
    assert "installed from a delta patch" in agent.output()
    print(f"\nfull v2 {len(gzs[1])} B; delta on the wire {on_wire:.0f} B; upgrade took {took:.1f}s")

    # The delta server goes away; the artifacts stay reachable from a plain file server.
    proc.terminate()
    proc.wait(10)
    plain_port = free_port()
    plain = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(plain_port), "--bind", "127.0.0.1"],
        cwd=served,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        plain_url = f"http://127.0.0.1:{plain_port}"
        wait_until(lambda: _reachable(plain_url), timeout=30, what="plain file server")
        write_recipe(recipes / "app.recipe.toml", "3.0.0", plain_url, gzs[2], tars[2], url)
        done = agent.cli("apply", str(plan))
        assert done.returncode == 0, done.stdout + done.stderr
        wait_until(
            lambda: (
                agent.components()["app"].get("version") == "3.0.0"
                and agent.components()["app"]["phase"] == "healthy"
            ),
            timeout=120,
            what="app 3.0.0 healthy",
        )
        assert (work / "3.0.0" / "VERSION").read_text() == "3\n"
        assert metric(agent, 'keystone_artifact_fetches_total{path="full"}') == 2
        assert "delta unavailable (network" in agent.output()
    finally:
        plain.terminate()
        plain.wait(10)


def _reachable(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/", timeout=2):
            return True
    except OSError:
        return False
