"""The deployer and supervisor with real processes: order, restarts, rollback, cascades."""

from __future__ import annotations

import asyncio
import itertools
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import pytest

from keystone.plan import DesiredPlan, load_desired
from keystone.runtime.deployer import Deployer
from keystone.runtime.process import ProcessRunner, pgid_members
from keystone.runtime.supervisor import RestartTuning, State

from .conftest import Fleet

pytestmark = pytest.mark.integration
T = TypeVar("T")
FAST = RestartTuning(
    initial=0.2, maximum=2.0, factor=2.0, jitter=0.0, stable_after=30.0, settle=0.3
)


def run(body: Callable[[Deployer], Awaitable[T]], runtime: Path, tuning: RestartTuning = FAST) -> T:
    """Run ``body`` with a fresh deployer and stop everything afterwards, whatever happens."""

    async def main() -> T:
        deployer = Deployer(ProcessRunner(), runtime, tuning=tuning)
        try:
            return await body(deployer)
        finally:
            await deployer.stop_all(reason="test teardown")
            for sup in deployer.supervisors.values():
                await sup.close()

    return asyncio.run(main())


def desired(fleet: Fleet, names: list[str]) -> DesiredPlan:
    return load_desired(fleet.plan(names), root=fleet.root, environ=dict(os.environ))


async def wait_state(
    deployer: Deployer, name: str, states: set[State], timeout: float = 20.0
) -> None:
    ok = await deployer.supervisors[name].wait_for(lambda s: s in states, timeout)
    assert ok, f"{name} never reached {states}; it is {deployer.supervisors[name].state}"


def _proc_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


class TestLayers:
    def test_layers_start_in_order(self, fleet: Fleet, tmp_path: Path) -> None:
        """db starts first, cache only after db is healthy, api last (from real start times)."""
        fleet.recipe("db")
        fleet.recipe("cache", deps=[("db", "hard")])
        fleet.recipe("api", deps=[("cache", "hard")])
        fleet.recipe("worker", deps=[("db", "hard")])
        plan = desired(fleet, ["api", "cache", "db", "worker"])

        async def body(d: Deployer) -> None:
            result = await d.deploy(plan)
            assert result.ok, result.reason
            assert {n: s.state for n, s in d.supervisors.items()} == dict.fromkeys(
                ["api", "cache", "db", "worker"], State.HEALTHY
            )

        run(body, tmp_path / "rt")
        t = {s["name"]: s["t"] for s in fleet.starts()}
        assert t["db"] < t["cache"] < t["api"]
        assert t["db"] < t["worker"]


class TestRestarts:
    def test_crash_is_restarted_with_growing_backoff(self, fleet: Fleet, tmp_path: Path) -> None:
        """A component that keeps crashing is restarted with growing delays, then failed."""
        fleet.recipe(
            "crashy", health=False, extra_args=["--exit-after", "0.5", "--code", "3"], max_retries=3
        )
        plan = desired(fleet, ["crashy"])

        async def body(d: Deployer) -> None:
            await d.deploy(plan)
            await wait_state(d, "crashy", {State.FAILED}, timeout=30)
            sup = d.supervisors["crashy"]
            assert "crash loop" in (sup.error or "")
            assert "exited with status 3" in (sup.error or "")
            assert sup.restarts == 3

        run(body, tmp_path / "rt")
        times = [s["t"] for s in fleet.starts()]
        assert len(times) == 4
        gaps = [b - a for a, b in itertools.pairwise(times)]
        # Each gap is run time (0.5s) plus a backoff of 0.2, 0.4, 0.8s: strictly growing.
        assert gaps[0] < gaps[1] < gaps[2], gaps

    def test_never_policy_leaves_it_failed(self, fleet: Fleet, tmp_path: Path) -> None:
        """restart_policy = never: a crash is final and the reason says why."""
        fleet.recipe(
            "once", health=False, extra_args=["--exit-after", "0.6", "--code", "2"], policy="never"
        )
        plan = desired(fleet, ["once"])

        async def body(d: Deployer) -> None:
            await d.deploy(plan)
            await wait_state(d, "once", {State.FAILED})
            assert d.supervisors["once"].error is not None
            assert "exited with status 2" in d.supervisors["once"].error

        run(body, tmp_path / "rt")
        assert len(fleet.starts()) == 1

    def test_sigterm_ignoring_process_tree_is_killed(self, fleet: Fleet, tmp_path: Path) -> None:
        """A component that ignores SIGTERM and forks a grandchild is killed whole on stop."""
        script = tmp_path / "stubborn.sh"
        script.write_text("#!/bin/sh\ntrap '' TERM\nsleep 300 &\nwhile true; do sleep 1; done\n")
        script.chmod(0o755)
        (fleet.root / "stubborn.recipe.toml").write_text(
            '[metadata]\nname = "stubborn"\nversion = "1"\n[lifecycle.run]\nstop_timeout = "500ms"\n'
            f'[lifecycle.run.exec]\ncommand = "{script}"\n'
        )
        plan = desired(fleet, ["stubborn"])

        async def body(d: Deployer) -> None:
            await d.deploy(plan)
            sup = d.supervisors["stubborn"]
            assert sup.handle is not None
            pgid = sup.handle.pgid
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 10
            while len(pgid_members(pgid)) < 2 and loop.time() < deadline:
                await asyncio.sleep(0.05)
            assert len(pgid_members(pgid)) >= 2
            await sup.stop(reason="test")
            assert pgid_members(pgid) == []
            assert sup.state is State.STOPPED

        run(body, tmp_path / "rt")


class TestChangesAndRollback:
    def test_change_restarts_only_changed_and_dependents(
        self, fleet: Fleet, tmp_path: Path
    ) -> None:
        """Changing cache restarts cache and api (hard), not db nor ui (ordering)."""
        fleet.recipe("db")
        fleet.recipe("cache", deps=[("db", "hard")])
        fleet.recipe("api", deps=[("cache", "hard")])
        fleet.recipe("ui", deps=[("cache", "ordering")])
        v1 = desired(fleet, ["db", "cache", "api", "ui"])
        fleet.recipe("cache", version="1.1.0", deps=[("db", "hard")])
        v2 = desired(fleet, ["db", "cache", "api", "ui"])

        async def body(d: Deployer) -> None:
            assert (await d.deploy(v1)).ok
            pids = {n: s.pid for n, s in d.supervisors.items()}
            result = await d.deploy(v2)
            assert result.ok, result.reason
            assert result.changes.changed == ("cache",)
            assert result.changes.restarted == ("api",)
            after = {n: s.pid for n, s in d.supervisors.items()}
            assert after["db"] == pids["db"]
            assert after["ui"] == pids["ui"]
            assert after["cache"] != pids["cache"]
            assert after["api"] != pids["api"]
            assert d.supervisors["cache"].version == "1.1.0"

        run(body, tmp_path / "rt")

    def test_failing_health_rolls_back_to_previous_version(
        self, fleet: Fleet, tmp_path: Path
    ) -> None:
        """A new version that never turns healthy is rolled back; the old version serves again."""
        fleet.recipe("db")
        fleet.recipe("api", deps=[("db", "hard")])
        v1 = desired(fleet, ["db", "api"])
        fleet.recipe(
            "api",
            version="2.0.0",
            deps=[("db", "hard")],
            extra_args=["--unhealthy"],
            start_timeout="1500ms",
        )
        v2 = desired(fleet, ["db", "api"])

        async def body(d: Deployer) -> None:
            assert (await d.deploy(v1)).ok
            db_pid = d.supervisors["db"].pid
            result = await d.deploy(v2)
            assert not result.ok
            assert result.rolled_back
            assert result.failed == "api"
            assert "not healthy within" in (result.reason or "")
            assert result.rollback_errors == []
            assert d.applied is v1
            api = d.supervisors["api"]
            assert api.version == "1.0.0" and api.state is State.HEALTHY
            assert d.supervisors["db"].pid == db_pid
            assert (tmp_path / "rt/components/api/1.0.0").is_dir()

        run(body, tmp_path / "rt")
        # The old version runs again after the rollback (its start is the last one recorded).
        assert [s["tag"] for s in fleet.starts() if s["name"] == "api"] == [
            "1.0.0",
            "2.0.0",
            "1.0.0",
        ]

    def test_rollback_waits_for_the_kill_of_a_stubborn_unhealthy_version(
        self, fleet: Fleet, tmp_path: Path
    ) -> None:
        """A new version that never turns healthy and ignores SIGTERM is killed, not left behind.

        The health check's own restart kill was cut short by the rollback's stop, so the new
        version kept running (holding the old version's port) after it was reported stopped.
        """
        fleet.recipe("api")
        v1 = desired(fleet, ["api"])
        fleet.recipe(
            "api", version="2.0.0", extra_args=["--unhealthy", "--ignore-term"], start_timeout="1s"
        )
        v2 = desired(fleet, ["api"])

        async def body(d: Deployer) -> None:
            assert (await d.deploy(v1)).ok
            result = await d.deploy(v2)
            assert result.rolled_back, result.reason
            assert result.rollback_errors == []
            api = d.supervisors["api"]
            assert api.version == "1.0.0" and api.state is State.HEALTHY

        run(body, tmp_path / "rt")
        v2_pids = [s["pid"] for s in fleet.starts() if s["tag"] == "2.0.0"]
        assert v2_pids
        for pid in v2_pids:
            assert not Path(f"/proc/{pid}").exists() or "Z" in _proc_state(pid)

    def test_removed_component_is_stopped(self, fleet: Fleet, tmp_path: Path) -> None:
        """A component removed from the plan is stopped and forgotten."""
        fleet.recipe("a", health=False)
        fleet.recipe("b", health=False)
        both = desired(fleet, ["a", "b"])
        only_a = desired(fleet, ["a"])

        async def body(d: Deployer) -> None:
            assert (await d.deploy(both)).ok
            b = d.supervisors["b"]
            assert b.handle is not None
            pgid = b.handle.pgid
            result = await d.deploy(only_a)
            assert result.ok and result.changes.removed == ("b",)
            assert "b" not in d.supervisors
            assert pgid_members(pgid) == []

        run(body, tmp_path / "rt")

    def test_dry_run_does_nothing(self, fleet: Fleet, tmp_path: Path) -> None:
        """A dry run returns ordered actions and starts nothing."""
        fleet.recipe("db")
        fleet.recipe("api", deps=[("db", "hard")])
        plan = desired(fleet, ["db", "api"])

        async def body(d: Deployer) -> None:
            _changes, actions = d.dry_run(plan)
            assert [(a.action, a.component, a.layer) for a in actions] == [
                ("start", "db", 0),
                ("start", "api", 1),
            ]
            assert d.supervisors == {}

        run(body, tmp_path / "rt")
        assert fleet.starts() == []
        assert not (tmp_path / "rt/components").exists()


class TestBadComponents:
    def test_command_not_found(self, fleet: Fleet, tmp_path: Path) -> None:
        """A missing command fails the deployment with the command named; nothing else changes."""
        (fleet.root / "ghost.recipe.toml").write_text(
            '[metadata]\nname = "ghost"\nversion = "1"\n[lifecycle.run.exec]\ncommand = "./no-such-binary"\n'
        )
        plan = desired(fleet, ["ghost"])

        async def body(d: Deployer) -> None:
            result = await d.deploy(plan)
            assert not result.ok and result.failed == "ghost"
            assert "no-such-binary" in (result.reason or "")

        run(body, tmp_path / "rt")

    @pytest.mark.parametrize(
        ("script", "timeout", "needle"),
        [
            ("echo broken >&2; exit 7", "5s", "exit status 7: broken"),
            ("sleep 30", "500ms", "timed out after 0.5s"),
        ],
    )
    def test_install_script_failure(
        self, fleet: Fleet, tmp_path: Path, script: str, timeout: str, needle: str
    ) -> None:
        """A failing or hanging install script fails the deployment with the reason."""
        fleet.recipe("db")
        path = fleet.recipe("app", health=False, install=script)
        path.write_text(
            path.read_text().replace(
                "[lifecycle.install]", f'[lifecycle.install]\ntimeout = "{timeout}"', 1
            )
        )
        v1 = desired(fleet, ["db"])
        v2 = desired(fleet, ["db", "app"])

        async def body(d: Deployer) -> None:
            assert (await d.deploy(v1)).ok
            db_pid = d.supervisors["db"].pid
            result = await d.deploy(v2)
            assert not result.ok and result.failed == "app"
            assert needle in (result.reason or "")
            assert d.supervisors["db"].pid == db_pid and "app" not in d.supervisors

        run(body, tmp_path / "rt")

    def test_port_in_use(self, fleet: Fleet, tmp_path: Path) -> None:
        """A component whose port is taken fails with its own error message, and is rolled back."""
        import socket

        fleet.recipe("web", policy="never")
        blocker = socket.socket()
        blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        blocker.bind(("127.0.0.1", fleet.port("web")))
        blocker.listen()
        try:
            plan = desired(fleet, ["web"])

            async def body(d: Deployer) -> None:
                result = await d.deploy(plan)
                assert not result.ok and result.failed == "web"
                # Health may answer from the blocker socket or the process exits: either way the
                # component's own stderr names the port.
                assert "port" in (result.reason or "") or "not healthy" in (result.reason or "")

            run(body, tmp_path / "rt")
        finally:
            blocker.close()
