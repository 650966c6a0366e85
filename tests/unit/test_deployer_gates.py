"""The deployer's dataset seams on fakes: a start gate that refuses, extra component environment."""

from __future__ import annotations

import asyncio
from pathlib import Path

from keystone.plan import Component, DesiredPlan, PlanEntry, resolve_entries
from keystone.runtime.deployer import Deployer
from keystone.runtime.supervisor import State as S
from keystone.runtime.timing import FakeClock

from .fake_runner import FakeRunner
from .test_supervisor_table import TUNING, recipe_text


def plan_of(*names: str) -> DesiredPlan:
    texts = {n: recipe_text(n) for n in names}
    return resolve_entries(
        [PlanEntry(n, n, True, "plan.toml", None) for n in names],
        lambda e: (texts[e.name], f"{e.name}.recipe.toml"),
        environ={},
    )


def test_gate_refuses_one_start_with_its_reason(tmp_path: Path) -> None:
    """A refused component is FAILED with the gate's reason; the deployment rolls back."""

    async def t() -> None:
        clock = FakeClock()
        asked: list[str] = []

        async def gate(c: Component) -> str | None:
            asked.append(c.name)
            return "b cannot start: dataset x is missing" if c.name == "b" else None

        deployer = Deployer(
            FakeRunner(),
            tmp_path,
            tuning=TUNING,
            clock=clock,
            start_gate=gate,
            component_env=lambda c: {"KEYSTONE_DATASET_X": f"/data/{c.name}"},
        )
        task = asyncio.ensure_future(deployer.deploy(plan_of("a", "b")))
        await clock.settle()
        await clock.advance(TUNING.settle)
        result = await task
        assert sorted(asked) == ["a", "b"]
        assert not result.ok and result.failed == "b"
        assert "dataset x is missing" in (result.reason or "")
        assert result.rolled_back

    asyncio.run(t())


def test_component_env_reaches_the_process(tmp_path: Path) -> None:
    async def t() -> None:
        clock = FakeClock()
        runner = FakeRunner()
        deployer = Deployer(
            runner,
            tmp_path,
            tuning=TUNING,
            clock=clock,
            component_env=lambda c: {"KEYSTONE_DATASET_X": f"/data/{c.name}"},
        )
        task = asyncio.ensure_future(deployer.deploy(plan_of("a")))
        await clock.settle()
        await clock.advance(TUNING.settle)
        assert (await task).ok
        sup = deployer.supervisors["a"]
        assert sup.state is S.HEALTHY and sup.env["KEYSTONE_DATASET_X"] == "/data/a"
        await deployer.stop_all()

    asyncio.run(t())


def test_refuse_start_from_stopped_leaves_it_failed_and_wanted(tmp_path: Path) -> None:
    async def t() -> None:
        deployer = Deployer(FakeRunner(), tmp_path, tuning=TUNING, clock=FakeClock())
        sup = deployer.make_supervisor(plan_of("a").components["a"])
        await sup.stop(reason="test")
        sup.refuse_start("not yet")
        assert sup.state is S.FAILED and sup.error == "not yet" and sup.wanted

    asyncio.run(t())
