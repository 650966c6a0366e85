"""Datasets with a real supervisor: reload by the recipe's signal, rollback on its health check.

The component is a real process under :class:`keystone.runtime.supervisor.Supervisor`; its health
check fails while the active dataset holds a file named ``poison``.
"""

from __future__ import annotations

import asyncio
import sys
import textwrap
from pathlib import Path

import pytest

from keystone.datasets import ProcessNotifier, SupervisorHealth, reload_plan
from keystone.datasets.manager import FAILED, UPDATED
from keystone.plan import Component
from keystone.recipe import parse_recipe
from keystone.runtime.process import ProcessRunner
from keystone.runtime.supervisor import RestartTuning, State, Supervisor, component_paths
from tests.integration.artifacts.conftest import Pki
from tests.integration.datasets.conftest import Publisher, make_manager

pytestmark = pytest.mark.integration

CHILD = textwrap.dedent(
    """
    import os, signal, sys, time
    out, link = sys.argv[1], os.environ["KEYSTONE_DATASET_CVE"]
    def reread(*_):
        with open(out, "a") as fh:
            fh.write(f"{os.getpid()} {open(link + '/data.txt').read().strip()}\\n")
    signal.signal(signal.SIGHUP, reread)
    reread()
    while True:
        time.sleep(3600)
    """
)


def recipe_text(tmp_path: Path, link: Path, out: Path) -> str:
    (tmp_path / "child.py").write_text(CHILD)
    return f"""
[metadata]
name = "scanner"
version = "1.0.0"

[lifecycle.run]
type = "process"
restart_policy = "never"

[lifecycle.run.exec]
command = "{sys.executable}"
args = ["{tmp_path / "child.py"}", "{out}"]

[lifecycle.run.health]
check = "cmd:test ! -e {link}/poison"
interval = "100ms"
failure_threshold = 2
start_timeout = "10s"

[lifecycle.reload]
signal = "SIGHUP"
grace = "1500ms"
"""


def test_reload_then_rollback(tmp_path: Path, pki: Pki, publisher: Publisher) -> None:
    """A good version reaches the same pid by SIGHUP; a poisoned one is rolled back."""
    mgr = make_manager(tmp_path, pki)
    link = tmp_path / "datasets" / "cve" / "current"
    out = tmp_path / "child.out"
    recipe = parse_recipe(recipe_text(tmp_path, link, out), file="scanner.toml")
    assert recipe.reload is not None
    plan = reload_plan(recipe.reload.signal, recipe.reload.script, recipe.reload.grace)

    async def main() -> None:
        runner = ProcessRunner()
        sups: dict[str, Supervisor] = {}

        def pid_of(name: str) -> int | None:
            sup = sups.get(name)
            return None if sup is None else sup.pid

        mgr.bind(
            "scanner",
            [publisher.spec()],
            reload=plan,
            notifier=ProcessNotifier(pid_of),
            health=SupervisorHealth(sups.get),
        )
        publisher.publish(0)
        ok, why = await mgr.prepare_for_start("scanner")
        assert ok, why
        sup = Supervisor(
            Component("scanner", recipe, "plan.toml", "scanner.toml"),
            runner,
            component_paths(tmp_path / "rt", "scanner", "1.0.0"),
            tuning=RestartTuning(settle=0.3),
            env_passthrough=mgr.env_for("scanner"),
        )
        sups["scanner"] = sup
        try:
            await sup.start()
            assert await sup.wait_for(lambda s: s is State.HEALTHY, 15), sup.state
            pid = sup.pid
            publisher.publish(1)
            result = await mgr.refresh("cve")
            assert result.result == UPDATED, result
            assert sup.pid == pid and sup.state is State.HEALTHY
            publisher.publish(2, text="malformed", extra=("poison",))
            result = await mgr.refresh("cve")
            assert result.result == FAILED and result.rolled_back, result
            assert "unhealthy" in result.reason
            assert (link / "data.txt").read_text() == "feed of day 1\n"
            assert await sup.wait_for(lambda s: s is State.HEALTHY, 15), sup.state
            assert sup.pid == pid
        finally:
            await sup.stop(reason="test teardown")
            await sup.close()
        lines = out.read_text().splitlines()
        assert lines[0] == f"{pid} feed of day 0"
        assert f"{pid} feed of day 1" in lines  # the reload, in the same process

    asyncio.run(main())
