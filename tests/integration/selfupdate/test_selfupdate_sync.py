"""Self-update through the GitOps path: the agent's wheel committed to a signed fleet repo."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import keystone
from tests.conftest import wait_until
from tests.integration.selfupdate.conftest import Wheel
from tests.integration.sync.conftest import SignedFleet

pytestmark = pytest.mark.integration


def test_a_revision_whose_agent_fails_its_health_is_marked_failed(
    signed_fleet: SignedFleet,
    make_agent: Any,
    tmp_path: Path,
    agent_wheels: Callable[[str], Wheel],
) -> None:
    """A signed commit pins the agent to a wheel in the repository (repo-relative, pinned)
    whose agent never answers /healthz: the handover is rolled back, the old agent serves,
    the component was never restarted, and the revision is failed with the reason."""
    f = signed_fleet
    wheel = agent_wheels("no-healthz")
    base = f.commit(
        {"recipes/tool.recipe.toml": f.recipe("tool"), "plans/default.toml": f.plan("tool")},
        "tool",
    )
    agent = make_agent(
        "--config",
        str(f.agent_config(tmp_path / "agent.toml")),
        env={"KEYSTONE_SELFUPDATE_SOAK": "1s", "KEYSTONE_SELFUPDATE_START_TIMEOUT": "20s"},
    ).start()
    wait_until(lambda: agent.components().get("tool", {}).get("phase") == "healthy", timeout=60)
    tool = agent.components()["tool"]["pid"]
    assert agent.proc is not None
    old_pid = agent.proc.pid

    (f.work / "artifacts").mkdir()
    shutil.copy(wheel.path, f.work / "artifacts" / wheel.path.name)
    f.git("add", "artifacts")
    rev = f.commit(
        {
            "recipes/keystone.recipe.toml": (
                f'[metadata]\nname = "keystone"\nversion = "{wheel.version}"\ntype = "agent"\n'
                f'[[artifacts]]\nuri = "artifacts/{wheel.path.name}"\nsha256 = "{wheel.sha256}"\n'
            ),
            "plans/default.toml": f.plan("tool", "keystone"),
        },
        "agent: pin the new version",
    )
    assert rev != base
    done = agent.cli("sync", "--once", "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads(done.stdout)["result"] == "applied"

    def failed() -> dict[str, Any] | None:
        r = agent.cli("status", "--revision", "--json")
        if r.returncode != 0:
            return None
        info: dict[str, Any] = json.loads(r.stdout)
        return info if rev in (info.get("failed") or {}) else None

    info = wait_until(failed, timeout=90, what="the revision marked failed")
    entry = info["failed"][rev]
    assert entry["kind"] == "self-update" and "/healthz did not answer" in entry["reason"]
    health = agent.healthz()
    assert health is not None and health["version"] == keystone.__version__
    assert agent.proc.poll() is None and agent.proc.pid == old_pid  # restarted in place
    assert agent.components()["tool"]["pid"] == tool
    # The failed revision is not applied again; the agent stays where it is.
    again = agent.cli("sync", "--once", "--json")
    assert json.loads(again.stdout)["result"] != "applied", again.stdout
    assert agent.output().count("new agent started") == 1
