"""Processes the agent started are found again after a crash: adopted or stopped, never left
running unmanaged; what is not the agent's is never touched."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import wait_until

from .campaign import COMPONENTS, component_processes, status_revision, sync_once

pytestmark = pytest.mark.integration


def start_ticks(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def test_killed_during_a_long_graceful_stop_the_old_process_is_finished_off(
    signed_fleet: Any, make_agent: Any, tmp_path: Path
) -> None:
    """SIGKILL while an old api takes long to stop: the restarted agent stops it before its
    successor starts, so the successor gets its port and the good revision is not rolled back."""
    f = signed_fleet

    def recipe(name: str, version: str, **kw: Any) -> str:
        text = f.recipe(name, version=version, **kw)
        return text.replace('stop_timeout = "2s"', 'stop_timeout = "4s"')

    f.commit(
        {
            "recipes/db.recipe.toml": recipe("db", "1.0.0"),
            "recipes/api.recipe.toml": recipe(
                "api", "1.0.0", deps=[("db", "hard")], args=["--ignore-term"]
            ),
            "plans/default.toml": f.plan("db", "api"),
        },
        "slow to stop api",
    )
    agent = make_agent("--config", str(f.agent_config(tmp_path / "agent.toml"))).start()
    assert sync_once(agent)["result"] == "applied"
    agent.wait_states({"db": "healthy", "api": "healthy"})
    old_api = agent.components()["api"]["pid"]
    good = f.commit(
        {"recipes/api.recipe.toml": recipe("api", "1.1.0", deps=[("db", "hard")])}, "api 1.1.0"
    )
    sync = subprocess.Popen(
        [sys.executable, "-m", "keystone", "sync", "--once", "--json"],
        cwd=agent.cwd,
        env={**os.environ, "KEYSTONE_ADDR": agent.addr, "KEYSTONE_RUNTIME": str(agent.runtime)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_until(lambda: "api 1.0.0: healthy -> stopping" in agent.output(), what="api stopping")
    agent.stop(signal.SIGKILL)
    sync.wait(60)
    assert alive(old_api)  # it ignores SIGTERM: still running, now nobody's
    agent.start()
    out = sync_once(agent)
    assert out["result"] in ("applied", "up-to-date"), out
    agent.wait_states({"db": "healthy", "api": "healthy"}, timeout=40)
    assert not alive(old_api)
    info = status_revision(agent)
    assert info["applied"] == good and good not in info["failed"], info
    procs = component_processes(agent.runtime)
    assert {c: [v for _, v in procs[c]] for c in COMPONENTS} == {
        "db": ["1.0.0"],
        "api": ["1.1.0"],
    }, procs
    log = agent.output()
    assert (
        "Address already in use" not in (agent.runtime / "logs" / "api" / "stderr.log").read_text()
    )
    assert "stopping api" in log, log


def test_a_process_of_a_previous_agent_without_any_record_is_stopped(
    make_agent: Any, tmp_path: Path
) -> None:
    """A component process no snapshot or marker knows (killed between spawn and its marker)
    is found by its environment and stopped; a look-alike outside the runtime is left alone."""
    runtime = tmp_path / "runtime"
    work = runtime / "components" / "db" / "9.9.9"
    work.mkdir(parents=True)
    elsewhere = tmp_path / "other" / "components" / "db" / "9.9.9"
    elsewhere.mkdir(parents=True)
    sleeper = [sys.executable, "-c", "import time; time.sleep(600)"]

    def spawn(workdir: Path) -> subprocess.Popen[bytes]:
        env = {
            "PATH": os.environ.get("PATH", ""),
            "KEYSTONE_COMPONENT": "db",
            "KEYSTONE_VERSION": "9.9.9",
            "KEYSTONE_INSTANCE": "0123456789abcdef",
            "KEYSTONE_WORKDIR": str(workdir),
        }
        return subprocess.Popen(sleeper, cwd=workdir, env=env, start_new_session=True)

    ours, theirs = spawn(work), spawn(elsewhere)
    try:
        agent = make_agent(runtime=runtime).start()
        wait_until(lambda: ours.poll() is not None, timeout=30, what="the orphan stopped")
        assert theirs.poll() is None
        assert "started by the previous agent, no marker" in agent.output()
    finally:
        for p in (ours, theirs):
            if p.poll() is None:
                p.kill()
            p.wait()


def test_a_snapshot_record_of_a_process_that_is_not_ours_is_left_alone(
    make_agent: Any, tmp_path: Path
) -> None:
    """A snapshot naming a live pid (with its true start time) of some other program never
    gets that program killed: only processes this runtime started are stopped."""
    other = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True
    )
    try:
        runtime = tmp_path / "runtime"
        (runtime / "state").mkdir(parents=True)
        record = {
            "runner": "process",
            "pid": other.pid,
            "pgid": other.pid,
            "start_ticks": start_ticks(other.pid),
            "cgroup": None,
            "version": "1.0.0",
            "hash": "not-in-any-plan",
        }
        (runtime / "state" / "agent.json").write_text(
            json.dumps({"version": 1, "plan": None, "processes": {"db": record}, "sync": {}})
        )
        agent = make_agent(runtime=runtime).start()
        wait_until(lambda: "agent ready" in agent.output(), what="agent ready")
        assert other.poll() is None
        assert "not this agent's; left alone" in agent.output()
    finally:
        other.kill()
        other.wait()
