"""``keystone.drift.DriftMonitor`` on tiny fakes: history only when a drift changes, the metric,
a repair through the slot's job, and components that left the plan forgotten."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from keystone.drift import DriftMonitor
from keystone.metrics import Metrics
from keystone.runtime import drift
from keystone.slot import Job

ORIGINAL = {"app/a.txt": "a\n", "app/b.txt": "b\n"}


def _install(workdir: Path) -> None:
    for rel, text in ORIGINAL.items():
        (workdir / rel).parent.mkdir(parents=True, exist_ok=True)
        (workdir / rel).write_text(text)
    drift.record(workdir, list(ORIGINAL), ["app"])


class FakePreparer:
    def __init__(self) -> None:
        self.installs: list[str] = []

    async def install(self, component: Any, workdir: Path, **_: Any) -> None:
        self.installs.append(component.name)
        _install(workdir)


class FakeDeployer:
    """Supervisors with a work dir and a policy; a restart bumps the pid."""

    def __init__(self, root: Path, policies: dict[str, str]) -> None:
        self.preparer = FakePreparer()
        self.supervisors: dict[str, Any] = {}
        for name, policy in policies.items():
            workdir = root / name / "1.0.0"
            workdir.mkdir(parents=True)
            _install(workdir)
            self.supervisors[name] = SimpleNamespace(
                name=name,
                version="1.0.0",
                pid=100,
                wanted=True,
                paths=SimpleNamespace(workdir=workdir),
                component=SimpleNamespace(name=name, recipe=SimpleNamespace(drift=policy)),
            )

    async def restart_component(
        self, name: str, *, reinstall: Callable[[Any], Awaitable[None]] | None = None
    ) -> tuple[int | None, list[str]]:
        sup = self.supervisors[name]
        if reinstall is not None:
            await reinstall(sup)
        sup.pid += 1
        return sup.pid, []


def _gauge(monitor: DriftMonitor, name: str, kind: str) -> float | None:
    assert monitor.metrics is not None
    body, _ = monitor.metrics.render()
    want = f'keystone_drift_files{{kind="{kind}",name="{name}"}} '
    for line in body.decode().splitlines():
        if line.startswith(want):
            return float(line.split()[-1])
    return None


def _monitor(
    tmp_path: Path, policies: dict[str, str]
) -> tuple[DriftMonitor, Any, list[dict[str, Any]], list[Job]]:
    deployer = FakeDeployer(tmp_path, policies)
    history: list[dict[str, Any]] = []
    jobs: list[Job] = []

    def submit(job: Job) -> Any:
        jobs.append(job)
        return SimpleNamespace(id=f"op-{len(jobs)}")

    monitor = DriftMonitor(
        deployer,  # a fake with what the monitor reads
        emit=history.append,
        metrics=Metrics(),
        submit=submit,
    )
    return monitor, deployer, history, jobs


class TestReport:
    def test_history_only_when_the_drift_changes(self, tmp_path: Path) -> None:
        """Clean: no entry. Drifted: one entry, not repeated by the next check. Back as it was:
        one ``clean`` entry. The gauge follows every check."""
        monitor, deployer, history, jobs = _monitor(tmp_path, {"x": "report"})
        work = deployer.supervisors["x"].paths.workdir

        async def main() -> None:
            await monitor.check()
            assert history == [] and _gauge(monitor, "x", "changed") == 0.0
            (work / "app/a.txt").write_text("tampered\n")
            await monitor.check()
            await monitor.check()
            assert [(h["kind"], h["result"]) for h in history] == [("drift", "drifted")]
            assert history[0]["files"]["changed"] == ["app/a.txt"]
            assert _gauge(monitor, "x", "changed") == 1.0
            (work / "app/a.txt").write_text("a\n")
            status = await monitor.check()
            assert [h["result"] for h in history] == ["drifted", "clean"]
            assert status["drifted"] == [] and status["checks"] == 4
            assert jobs == []

        asyncio.run(main())

    def test_a_component_that_left_is_forgotten(self, tmp_path: Path) -> None:
        monitor, deployer, _, _ = _monitor(tmp_path, {"x": "report"})

        async def main() -> None:
            await monitor.check()
            assert monitor.of(deployer.supervisors["x"]) is not None
            del deployer.supervisors["x"]
            await monitor.check()
            assert monitor.state == {} and _gauge(monitor, "x", "changed") is None

        asyncio.run(main())


class TestRepair:
    def test_repair_job_restores_and_restarts(self, tmp_path: Path) -> None:
        """A drifted ``repair`` component gets one job (a second check joins by key); running
        it removes the planted file, reinstalls, restarts, and records ``drift-repair``."""
        monitor, deployer, history, jobs = _monitor(tmp_path, {"x": "repair", "y": "report"})
        work = deployer.supervisors["x"].paths.workdir
        (work / "app/a.txt").write_text("tampered\n")
        (work / "app/planted").write_text("x\n")
        (deployer.supervisors["y"].paths.workdir / "app/b.txt").unlink()

        async def main() -> None:
            await monitor.check()
            assert [(j.kind, j.key) for j in jobs] == [("drift-repair", ("drift-repair", "x"))]
            result = await jobs[0].run("op-1")
            assert result["result"] == "ok" and result["pid"] == 101
            assert result["drift"]["drifted"] is False
            assert (work / "app/a.txt").read_text() == "a\n"
            assert not (work / "app/planted").exists()
            assert deployer.preparer.installs == ["x"]
            kinds = [(h["kind"], h.get("component"), h["result"]) for h in history]
            assert kinds == [
                ("drift", "x", "drifted"),
                ("drift", "y", "drifted"),
                ("drift", "x", "clean"),
                ("drift-repair", "x", "ok"),
            ]

        asyncio.run(main())

    def test_a_failed_reinstall_is_reported_and_the_component_still_starts(
        self, tmp_path: Path
    ) -> None:
        monitor, deployer, history, jobs = _monitor(tmp_path, {"x": "repair"})

        async def broken(component: Any, workdir: Path, **_: Any) -> None:
            raise OSError("disk full")

        deployer.preparer.install = broken
        (deployer.supervisors["x"].paths.workdir / "app/a.txt").write_text("tampered\n")

        async def main() -> None:
            await monitor.check()
            result = await jobs[0].run("op-1")
            assert result["result"] == "failed" and "disk full" in result["error"]
            assert result["pid"] == 101
            assert history[-1]["kind"] == "drift-repair" and history[-1]["result"] == "failed"

        asyncio.run(main())

    def test_nothing_to_repair_by_the_time_it_runs(self, tmp_path: Path) -> None:
        """Put right before the queued job runs (a deployment, a person): no restart."""
        monitor, deployer, _history, jobs = _monitor(tmp_path, {"x": "repair"})
        work = deployer.supervisors["x"].paths.workdir
        (work / "app/a.txt").write_text("tampered\n")

        async def main() -> None:
            await monitor.check()
            (work / "app/a.txt").write_text("a\n")
            result = await jobs[0].run("op-1")
            assert result == {"component": "x", "result": "clean"}
            assert deployer.supervisors["x"].pid == 100 and deployer.preparer.installs == []

        asyncio.run(main())

    def test_a_stopped_component_gets_its_files_back_and_stays_stopped(
        self, tmp_path: Path
    ) -> None:
        monitor, deployer, _history, jobs = _monitor(tmp_path, {"x": "repair"})
        sup = deployer.supervisors["x"]
        sup.wanted, sup.pid = False, None
        (sup.paths.workdir / "app/b.txt").unlink()

        async def main() -> None:
            await monitor.check()
            result = await jobs[0].run("op-1")
            assert result["result"] == "ok" and result["pid"] is None
            assert (sup.paths.workdir / "app/b.txt").read_text() == "b\n"

        asyncio.run(main())
