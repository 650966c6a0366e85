"""Component cgroups are removed when their processes are gone, and the empty ones earlier
agents left behind are removed at start (on the real cgroup v2 filesystem; skipped without
a writable one)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from pathlib import Path

import pytest

from keystone.runtime.cgroups import remove_stale_cgroups
from keystone.runtime.process import ProcessRunner, cgroup_members

from .conftest import Bench, run, until

pytestmark = pytest.mark.integration


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


class TestCgroupRemoved:
    def test_after_the_process_exits_on_its_own(self, bench: Bench, cgroup_root: Path) -> None:
        """A component that exits by itself leaves no cgroup behind."""

        async def body() -> None:
            runner = ProcessRunner(cgroup_root=cgroup_root)
            handle = await bench.spawn(runner, bench.sh("exit 3"))
            assert handle.cgroup is not None
            assert await runner.exited(handle) == 3
            await until(lambda: not handle.cgroup.exists(), what="the cgroup to be removed")

        run(body())

    def test_after_exit_with_a_leftover_child(self, bench: Bench, cgroup_root: Path) -> None:
        """A component that exits leaving a child: the child is stopped, then the cgroup goes."""

        async def body() -> None:
            runner = ProcessRunner(cgroup_root=cgroup_root, orphan_grace=0.5)
            handle = await bench.spawn(runner, bench.sh("sleep 300 & exit 0"))
            assert handle.cgroup is not None
            await runner.exited(handle)
            await until(lambda: not handle.cgroup.exists(), what="the cgroup to be removed")

        run(body())

    def test_after_stop(self, bench: Bench, cgroup_root: Path) -> None:
        """A stopped component leaves no cgroup behind; many stops leave none either."""

        async def body() -> None:
            runner = ProcessRunner(cgroup_root=cgroup_root)
            for _ in range(5):
                handle = await bench.spawn(runner, bench.sh("sleep 300"))
                await runner.stop(handle, timeout=5)
            assert [p.name for p in cgroup_root.iterdir() if p.is_dir()] == []

        run(body())


class TestStaleCgroups:
    def test_empty_cgroups_of_gone_agents_are_removed(self, cgroup_root: Path) -> None:
        """At start, empty spawn cgroups of agents that are gone are removed; one with a live
        process (to adopt), one of a running agent, and foreign ones stay."""
        gone = dead_pid()
        stale = [cgroup_root / f"svc.{gone}.{i}" for i in range(3)]
        for c in stale:
            c.mkdir()
        (stale[0] / "inner").mkdir()  # a component's own sub-cgroup, empty
        live_owner = cgroup_root / f"svc.{os.getppid()}.1"
        live_owner.mkdir()
        foreign = cgroup_root / "not-a-spawn"
        foreign.mkdir()
        busy = cgroup_root / f"svc.{gone}.9"
        busy.mkdir()
        sleeper = subprocess.Popen(["sleep", "300"])
        try:
            (busy / "cgroup.procs").write_text(str(sleeper.pid))
            assert remove_stale_cgroups(cgroup_root) == 3
            assert not any(c.exists() for c in stale)
            assert live_owner.exists() and foreign.exists() and busy.exists()
            assert cgroup_members(busy) == [sleeper.pid]
        finally:
            sleeper.send_signal(signal.SIGKILL)
            sleeper.wait()
            for c in (live_owner, foreign):
                with contextlib.suppress(OSError):
                    c.rmdir()

    def test_the_runner_sweeps_at_start(self, cgroup_root: Path) -> None:
        """ProcessRunner.remove_stale_cgroups removes what a crashed agent left."""
        left = cgroup_root / f"api.{dead_pid()}.42"
        left.mkdir()
        assert ProcessRunner(cgroup_root=cgroup_root).remove_stale_cgroups() == 1
        assert not left.exists()
