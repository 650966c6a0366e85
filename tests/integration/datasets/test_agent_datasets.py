"""Datasets in a real agent: a component reading a signed dataset served over HTTP on 127.0.0.1.

The first version is activated before the component starts and reaches it through
``KEYSTONE_DATASET_CVE``; a new manifest is activated without a restart (same pid, SIGHUP seen);
a tampered or unsigned one is refused with the old version still active; ``GET /v1/datasets``
answers Go's shape; a required dataset that cannot be fetched keeps its component from starting.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import time
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from keystone import sign
from tests.conftest import wait_until
from tests.integration.agent.conftest import make_agent  # noqa: F401 - the fixture

from .conftest import Hub, Publisher

pytestmark = pytest.mark.integration

READER = """
import os, signal, sys, time
log = sys.argv[1]
def read(kind):
    path = os.path.join(os.environ["KEYSTONE_DATASET_CVE"], "data.txt")
    with open(path) as f:
        text = f.read().strip()
    with open(log, "a") as out:
        out.write(f"{kind} {os.getpid()} {text}\\n")
signal.signal(signal.SIGHUP, lambda *_: read("hup"))
read("start")
while True:
    time.sleep(3600)
"""


def recipe(tmp_path: Path, hub: Hub, publisher: Publisher, *, required: bool = True) -> Path:
    script = tmp_path / "reader.py"
    script.write_text(READER)
    text = f"""[metadata]
name = "app"
version = "1.0.0"

[[datasets]]
name = "cve"
manifest = "{hub.url(publisher.manifest_path)}"
cert_uri = "{hub.url("signer.pem")}"
refresh = "1h"
required = {str(required).lower()}

[lifecycle.run.exec]
command = "{sys.executable}"
args = ["{script}", "{tmp_path / "reads.log"}"]

[lifecycle.reload]
signal = "SIGHUP"
grace = "1s"
"""
    path = tmp_path / "app.recipe.toml"
    path.write_text(text)
    return path


def sign_recipe(path: Path, publisher: Publisher) -> None:
    """The recipe file carries its .sig (a trust bundle is configured, so the agent asks)."""
    pki = publisher.pki
    signature = sign.sign_file(path, pki.key("signer"), pki.cert("signer"))
    sign.write_signature(sign.sig_path_for(path), signature)
    shutil.copy(pki.cert("signer"), path.with_name(path.name + ".crt"))


def reads(tmp_path: Path) -> list[tuple[str, int, str]]:
    log = tmp_path / "reads.log"
    if not log.exists():
        return []
    out = []
    for line in log.read_text().splitlines():
        kind, pid, text = line.split(" ", 2)
        out.append((kind, int(pid), text))
    return out


def metrics(agent: Any) -> str:
    req = urllib.request.Request(
        agent.addr + "/metrics", headers={"Authorization": f"Bearer {agent.token()}"}
    )
    with urllib.request.urlopen(req, timeout=5) as r:
        return str(r.read().decode())


def test_dataset_lifecycle_in_a_real_agent(
    make_agent: Any,  # noqa: F811
    tmp_path: Path,
    hub: Hub,
    publisher: Publisher,
) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    publisher.publish(1, text="feed one", published=now - timedelta(hours=2))
    path = recipe(tmp_path, hub, publisher)
    sign_recipe(path, publisher)
    plan = tmp_path / "plan.toml"
    plan.write_text('[[components]]\nname = "app"\nrecipe = "app.recipe.toml"\n')
    env = {"KEYSTONE_TRUST_BUNDLE": str(publisher.pki.cert("ca"))}

    agent = make_agent("--apply", str(plan), env=env).start()
    agent.wait_states({"app": "healthy"}, timeout=60)
    # Activated before the start: the component read it at its first line.
    first = wait_until(lambda: reads(tmp_path), timeout=20, what="the first read")
    assert first[0][0] == "start" and first[0][2] == "feed one"
    pid = first[0][1]
    assert agent.components()["app"]["pid"] == pid

    status, listed = agent.api("GET", "/v1/datasets")
    assert status == 200 and len(listed) == 1
    entry = listed[0]
    assert entry["name"] == "cve" and entry["version"] == "2026-08-15"
    assert entry["stale"] is False and entry["refresh"] == "1h0m0s" and entry["maxAge"] == "3h0m0s"
    assert entry["lastResult"] == "ok" and entry["manifestUri"].endswith("cve.manifest.toml")
    assert entry["path"].endswith("datasets/cve/current") and "published" in entry
    assert 7000 <= entry["ageSeconds"] <= 7300

    # A new manifest: activated in place, the same process told by SIGHUP.
    publisher.publish(2, text="feed two", published=now - timedelta(hours=1))
    t0 = time.monotonic()
    status, refreshed = agent.api("POST", "/v1/datasets:refresh")
    took = time.monotonic() - t0
    assert status == 200 and refreshed[0]["version"] == "2026-08-16", refreshed
    got = wait_until(
        lambda: [r for r in reads(tmp_path) if r[0] == "hup"], timeout=20, what="the SIGHUP read"
    )
    assert got[-1] == ("hup", pid, "feed two")
    assert agent.components()["app"]["pid"] == pid
    activated = [float(m) for m in re.findall(r"activated in ([0-9.]+)s", agent.output())]
    print(
        f"\ndataset activation (link switch) {activated[-1] * 1000:.1f} ms; refresh call "
        f"(fetch, verify, stage, activate, SIGHUP, 1s grace) {took:.2f}s"
    )

    # Refused: a payload failing its digest, then an unsigned manifest; version 2 stays.
    publisher.publish(3, text="feed three", published=now, tamper_payload=True)
    status, after = agent.api("POST", "/v1/datasets:refresh")
    assert after[0]["version"] == "2026-08-16"
    assert "sha256" in after[0]["lastResult"] or "digest" in after[0]["lastResult"]
    publisher.publish(4, text="feed four", published=now, sign=False)
    status, after = agent.api("POST", "/v1/datasets:refresh")
    assert after[0]["version"] == "2026-08-16"
    assert "unsigned" in after[0]["lastResult"]
    assert reads(tmp_path)[-1] == ("hup", pid, "feed two")
    assert (agent.runtime / "datasets" / "cve" / "current" / "data.txt").read_text().strip() == (
        "feed two"
    )

    status, detail = agent.api("GET", "/v1/datasets/cve")
    assert (
        status == 200 and detail["component"] == "app" and detail["env"] == ("KEYSTONE_DATASET_CVE")
    )
    assert [v["version"] for v in detail["versions"] if v["active"]] == ["2026-08-16"]
    assert agent.api("GET", "/v1/datasets/nope")[0] == 404

    text = metrics(agent)
    assert 'keystone_dataset_activations_total{name="cve",result="ok"} 2.0' in text
    assert 'keystone_dataset_refreshes_total{name="cve",result="failed"} 2.0' in text
    assert 'keystone_dataset_stale{name="cve"} 0.0' in text
    assert re.search(r'^keystone_dataset_age_seconds\{name="cve"\} [0-9.e+]+$', text, re.M)


def test_required_dataset_missing_blocks_the_start(
    make_agent: Any,  # noqa: F811
    tmp_path: Path,
    hub: Hub,
    publisher: Publisher,
) -> None:
    """Nothing published: the component does not start, and the plan status says why."""
    recipe(tmp_path, hub, publisher)
    plan = tmp_path / "plan.toml"
    plan.write_text('[[components]]\nname = "app"\nrecipe = "app.recipe.toml"\n')
    agent = make_agent("--apply", str(plan)).start()

    def settled() -> Any:
        status, body = agent.api("GET", "/v1/plan/status")
        return body if status == 200 and body["status"] != "applying" else None

    body = wait_until(settled, timeout=60, what="the initial plan to settle")
    blob = json.dumps(body)
    assert "app cannot start: dataset cve is missing" in blob, blob
    assert not reads(tmp_path)


def test_optional_dataset_missing_is_reported_and_skipped(
    make_agent: Any,  # noqa: F811
    tmp_path: Path,
    hub: Hub,
    publisher: Publisher,
) -> None:
    """Optional and not published: the component starts without it; the list says why."""
    recipe(tmp_path, hub, publisher, required=False)
    (tmp_path / "reader.py").write_text(READER.replace('read("start")', "pass"))
    plan = tmp_path / "plan.toml"
    plan.write_text('[[components]]\nname = "app"\nrecipe = "app.recipe.toml"\n')
    agent = make_agent("--apply", str(plan)).start()
    agent.wait_states({"app": "healthy"}, timeout=60)
    status, listed = agent.api("GET", "/v1/datasets")
    assert status == 200 and "version" not in listed[0]
    assert "not there" in listed[0]["lastResult"]
    assert "optional dataset cve is missing" in agent.output()
