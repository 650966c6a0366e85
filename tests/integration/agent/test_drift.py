"""Drift of installed files with a real agent: a component installed from an unpacked tarball,
its files changed, added and removed behind the agent's back; reported (status, components,
history, metric), and repaired where the recipe says ``drift = "repair"``."""

from __future__ import annotations

import hashlib
import io
import json
import sys
import tarfile
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import wait_until
from tests.integration.agent.conftest import AgentProc

pytestmark = pytest.mark.integration

FILES = {
    "app/run.py": b"import time\nwhile True:\n    time.sleep(3600)\n",
    "app/data.txt": b"original data\n",
    "app/conf/settings.txt": b"level = 1\n",
}


def _tarball(path: Path) -> str:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in FILES.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    path.write_bytes(buf.getvalue())
    return hashlib.sha256(buf.getvalue()).hexdigest()


def _fleet(tmp_path: Path) -> Path:
    """A plan of two components from the same tarball: ``rep`` reports, ``fix`` repairs."""
    tar = tmp_path / "app.tar.gz"
    sha = _tarball(tar)
    for name, policy in (("rep", "report"), ("fix", "repair")):
        (tmp_path / f"{name}.recipe.toml").write_text(
            f'drift = "{policy}"\n'
            f'[metadata]\nname = "{name}"\nversion = "1.0.0"\n'
            f'\n[[artifacts]]\nuri = "file://{tar}"\nsha256 = "{sha}"\nunpack = true\n'
            '\n[lifecycle.run]\nstop_timeout = "2s"\n'
            f"\n[lifecycle.run.exec]\ncommand = {json.dumps(sys.executable)}\n"
            'args = ["app/run.py"]\n'
        )
    plan = tmp_path / "plan.toml"
    plan.write_text(
        "".join(
            f'[[components]]\nname = "{n}"\nrecipe = "{n}.recipe.toml"\n\n' for n in ("rep", "fix")
        )
    )
    return plan


def _workdir(agent: AgentProc, name: str) -> Path:
    return agent.runtime / "components" / name / "1.0.0"


def _tamper(workdir: Path) -> None:
    (workdir / "app/data.txt").write_text("tampered\n")
    (workdir / "app/conf/new.txt").write_text("planted\n")
    (workdir / "app/conf/settings.txt").unlink()


def _history(agent: AgentProc, kind: str, component: str) -> list[dict[str, Any]]:
    status, body = agent.api("GET", "/v1/history?limit=100")
    assert status == 200, body
    return [h for h in body if h.get("kind") == kind and h.get("component") == component]


def _metric(agent: AgentProc, line_start: str) -> float | None:
    req = urllib.request.Request(
        agent.addr + "/metrics", headers={"Authorization": f"Bearer {agent.token()}"}
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        text = r.read().decode()
    for line in text.splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    return None


def _start(make_agent: Any, tmp_path: Path, interval: str = "0") -> AgentProc:
    agent: AgentProc = make_agent(
        "--apply", str(_fleet(tmp_path)), env={"KEYSTONE_DRIFT_INTERVAL": interval}
    ).start()
    agent.wait_states({"rep": "healthy", "fix": "healthy"})
    return agent


class TestDrift:
    def test_changed_added_removed_reported(self, make_agent: Any, tmp_path: Path) -> None:
        """verify --installed: clean after install; then one file changed, one added, one
        removed, seen in its output, /v1/components, status, history and the metric."""
        agent = _start(make_agent, tmp_path)
        manifest = json.loads((agent.runtime / "components/rep/1.0.0.files.json").read_text())
        assert set(manifest["files"]) == set(FILES)
        assert (
            manifest["files"]["app/data.txt"]["sha256"]
            == hashlib.sha256(FILES["app/data.txt"]).hexdigest()
        )
        clean = agent.cli("verify", "--installed")
        assert clean.returncode == 0, clean.stdout + clean.stderr
        assert "rep: clean (drift = report)" in clean.stdout

        _tamper(_workdir(agent, "rep"))
        r = agent.cli("verify", "--installed", "--json")
        assert r.returncode == 3, r.stdout + r.stderr
        data = json.loads(r.stdout)
        assert "rep" in data["drifted"]
        rep = next(c for c in data["components"] if c["name"] == "rep")
        assert rep["drift"]["files"] == {
            "changed": ["app/data.txt"],
            "added": ["app/conf/new.txt"],
            "removed": ["app/conf/settings.txt"],
        }
        assert agent.components()["rep"]["drift"]["changed"] == 1
        status = agent.cli("status")
        assert "drift: " in status.stdout and "rep 1 changed, 1 added, 1 removed" in status.stdout
        entries = _history(agent, "drift", "rep")
        assert entries and entries[0]["result"] == "drifted" and entries[0]["removed"] == 1
        for kind in ("changed", "added", "removed"):
            assert _metric(agent, f'keystone_drift_files{{kind="{kind}",name="rep"}}') == 1.0
        # a report-only component is left as it is
        assert (_workdir(agent, "rep") / "app/data.txt").read_text() == "tampered\n"

    def test_repair_reinstalls_and_restarts(self, make_agent: Any, tmp_path: Path) -> None:
        """drift = "repair": the check queues a repair; the files are put back, the planted one
        removed, and the component runs again in a new process."""
        agent = _start(make_agent, tmp_path)
        work = _workdir(agent, "fix")
        pid = agent.components()["fix"]["pid"]
        _tamper(work)
        status, body = agent.api("POST", "/v1/drift:check")
        assert status == 200, body
        assert "fix" in body["drifted"]
        done = wait_until(
            lambda: _history(agent, "drift-repair", "fix"), timeout=60, what="drift repair"
        )
        assert done[0]["result"] == "ok", done
        assert (work / "app/data.txt").read_bytes() == FILES["app/data.txt"]
        assert (work / "app/conf/settings.txt").read_bytes() == FILES["app/conf/settings.txt"]
        assert not (work / "app/conf/new.txt").exists()
        comps = agent.wait_states({"fix": "healthy"})
        assert comps["fix"]["pid"] not in (None, pid)
        assert comps["fix"]["drift"]["drifted"] is False
        assert _metric(agent, 'keystone_drift_repairs_total{name="fix",result="ok"}') == 1.0
        again = agent.cli("verify", "--installed", "--json")
        fix = next(c for c in json.loads(again.stdout)["components"] if c["name"] == "fix")
        assert fix["drift"]["drifted"] is False

    def test_scheduled_check_finds_drift(self, make_agent: Any, tmp_path: Path) -> None:
        """With KEYSTONE_DRIFT_INTERVAL, the agent checks by itself: the drift shows up in
        GET /v1/drift without anyone asking for a check."""
        agent = _start(make_agent, tmp_path, interval="200ms")
        (_workdir(agent, "rep") / "app/data.txt").write_text("tampered\n")

        def drifted() -> dict[str, Any] | None:
            status, body = agent.api("GET", "/v1/drift")
            assert status == 200, body
            return body if "rep" in body["drifted"] else None

        body = wait_until(drifted, timeout=30, what="scheduled drift check")
        assert body["checks"] >= 1
        assert _history(agent, "drift", "rep")
