"""``[maintenance]`` in plan files: parsed strictly, merged, carried to the rollout step.

Pure logic on given times and a driven clock (FakeClock): no real waits.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import pytest

from keystone.errors import ValidationError
from keystone.plan import parse_plan, plan_from_json, plan_to_json
from keystone.runtime.timing import FakeClock
from keystone.sync import pipeline as p
from keystone.sync.model import Outcome, SyncRequest, SyncResult
from keystone.sync.resolve import resolve
from keystone.sync.rollout import RolloutTracker, decide
from keystone.windows import Maintenance, parse_window
from tests.unit.test_rollout_step import RolloutMetrics
from tests.unit.test_sync_pipeline import RECIPE, REV, FakeHost, context, verified_answer

T0 = 1_800_000_000.0  # 2027-01-15T08:00:00Z
COMPONENT = '[[components]]\nname = "db"\nrecipe = "recipes/db.recipe.toml"\n'


def utc(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


class Tree:
    def __init__(self, files: dict[str, str]) -> None:
        self.files = files

    def read(self, path: str) -> bytes | None:
        text = self.files.get(path)
        return text.encode() if text is not None else None


def fleet(version: str, plans: dict[str, str]) -> dict[str, Any]:
    """The plan JSON the sync worker sends for a revision with these plan files."""
    files = {"recipes/db.recipe.toml": RECIPE.format(n="db", v=version), **plans}
    desired = resolve(Tree(files), device_id="dev-1", labels=["edge"], environ={})
    return plan_to_json(desired)


class TestParse:
    def test_a_plan_declares_windows(self) -> None:
        pf = parse_plan(
            COMPONENT + '\n[maintenance]\ntimezone = "Europe/Berlin"\n'
            'windows = ["mon-fri 02:00-04:00", { cron = "0 3 * * sun", duration = "90m" }]\n',
            file="plans/default.toml",
        )
        assert pf.maintenance is not None and pf.maintenance.timezone == "Europe/Berlin"
        assert pf.maintenance.windows[0] == parse_window("mon-fri 02:00-04:00")
        assert (pf.maintenance.windows[1].cron, pf.maintenance.windows[1].duration) == (
            "0 3 * * sun",
            5400.0,
        )
        assert [e.name for e in pf.entries] == ["db"]

    def test_a_plan_without_windows_has_none(self) -> None:
        assert parse_plan(COMPONENT, file="plan.toml").maintenance is None

    @pytest.mark.parametrize(
        ("text", "line", "field", "words"),
        [
            ('[maintenance]\nwindows = ["2am"]\n', 2, "maintenance.windows[0]", "HH:MM-HH:MM"),
            (
                '[maintenance]\nwindows = ["25:00-01:00"]\n',
                2,
                "maintenance.windows[0]",
                "25:00 is not a time of day",
            ),
            (
                '[maintenance]\nwindows = ["funday 01:00-02:00"]\n',
                2,
                "maintenance.windows[0]",
                "weekday",
            ),
            (
                '[maintenance]\nwindows = [{ cron = "61 * * * *", duration = "1h" }]\n',
                2,
                "maintenance.windows[0]",
                "cron expression",
            ),
            (
                '[maintenance]\nwindows = [{ cron = "0 3 * * *" }]\n',
                2,
                "maintenance.windows[0].duration",
                "required",
            ),
            (
                '[maintenance]\nwindows = [{ cron = "0 3 * * *", duration = "soon" }]\n',
                2,
                "maintenance.windows[0].duration",
                "",
            ),
            ("[maintenance]\nwindows = [3]\n", 2, "maintenance.windows[0]", "expected"),
            ("[maintenance]\nwindows = []\n", 2, "maintenance.windows", "at least one"),
            ('[maintenance]\nwindows = "02:00-03:00"\n', 2, "maintenance.windows", "a list"),
            ('[maintenance]\ntimezone = "UTC"\n', 1, "maintenance.windows", "required"),
            (
                '[maintenance]\nwindows = ["02:00-03:00"]\ntimezone = "Mars/Olympus"\n',
                3,
                "maintenance.timezone",
                "unknown time zone",
            ),
            ('maintenance = ["02:00-03:00"]\n', 1, "maintenance", "table"),
        ],
    )
    def test_bad_windows_are_located(self, text: str, line: int, field: str, words: str) -> None:
        """Each error names the plan file, the line and the field; nothing else is read."""
        with pytest.raises(ValidationError) as err:
            parse_plan(text + "\n" + COMPONENT, file="devices/dev-1/plan.toml")
        e = err.value
        assert (e.file, e.line, e.field) == ("devices/dev-1/plan.toml", line, field), str(e)
        assert words in str(e)
        assert str(e).startswith(f"devices/dev-1/plan.toml:{line}: {field}: ")

    def test_an_unknown_key_is_an_unknown_field(self) -> None:
        pf = parse_plan(
            '[maintenance]\nwindows = ["02:00-03:00"]\nwhen = 1\n', file="plans/default.toml"
        )
        assert pf.unknown_fields == ("plans/default.toml:3: unknown field maintenance.when",)

    def test_a_bad_window_refuses_the_revision_at_resolve(self) -> None:
        with pytest.raises(ValidationError) as err:
            fleet("1.0.0", {"labels/edge/plan.toml": '[maintenance]\nwindows = ["x"]\n'})
        assert str(err.value).startswith("labels/edge/plan.toml:2: maintenance.windows[0]: ")


class TestCarried:
    def test_every_plan_files_windows_in_merge_order_through_json(self) -> None:
        doc = fleet(
            "1.0.0",
            {
                "plans/default.toml": COMPONENT + '[maintenance]\nwindows = ["01:00-05:00"]\n',
                "devices/dev-1/plan.toml": (
                    '[maintenance]\ntimezone = "UTC"\n'
                    'windows = ["02:00-03:00", { cron = "0 3 * * sun", duration = "1h" }]\n'
                ),
            },
        )
        assert [m["file"] for m in doc["maintenance"]] == [
            "plans/default.toml",
            "devices/dev-1/plan.toml",
        ]
        back = plan_from_json(doc, environ={})
        assert [name for name, _ in back.maintenance] == [
            "plans/default.toml",
            "devices/dev-1/plan.toml",
        ]
        device = back.maintenance[1][1]
        assert device.timezone == "UTC" and device.windows[0] == parse_window("02:00-03:00")
        assert (device.windows[1].cron, device.windows[1].duration) == ("0 3 * * sun", 3600.0)
        assert plan_to_json(back) == doc

    def test_a_snapshot_without_windows_still_loads(self) -> None:
        """Snapshots written before plans had windows have no ``maintenance`` key."""
        doc = fleet("1.0.0", {"plans/default.toml": COMPONENT})
        assert "maintenance" not in doc
        assert plan_from_json(doc, environ={}).maintenance == ()

    @pytest.mark.parametrize(
        ("value", "field"),
        [
            ({}, "plan.maintenance"),
            ([3], "plan.maintenance[0]"),
            ([{"windows": ["01:00-02:00"]}], "plan.maintenance[0].file"),
            ([{"file": "p.toml", "windows": []}], "plan.maintenance[0].windows"),
            ([{"file": "p.toml", "windows": ["x"]}], "plan.maintenance[0].windows[0]"),
            (
                [{"file": "p.toml", "windows": ["01:00-02:00"], "timezone": 1}],
                "plan.maintenance[0].timezone",
            ),
        ],
    )
    def test_a_damaged_snapshot_is_named(self, value: object, field: str) -> None:
        doc = fleet("1.0.0", {"plans/default.toml": COMPONENT})
        doc["maintenance"] = value
        with pytest.raises(ValidationError) as err:
            plan_from_json(doc, environ={}, file="state.json")
        assert (err.value.file, err.value.field) == ("state.json", field)


class TestDecide:
    def hold(self, now: str, agent: Maintenance | None, *plans: tuple[str, Maintenance]) -> Any:
        _, hold = decide(
            None,
            device_id="d",
            labels=[],
            revision=REV,
            commit_time=0,
            now=utc(now),
            agent_windows=agent,
            plan_windows=plans,
        )
        return hold

    def test_a_plan_window_alone_holds(self) -> None:
        plan = ("plans/default.toml", Maintenance((parse_window("02:00-04:00"),), "UTC"))
        hold = self.hold("2026-12-02T01:00:00", None, plan)
        assert hold.reason == "window" and hold.at == utc("2026-12-02T02:00:00")
        assert hold.message == (
            "waiting for maintenance window at 2026-12-02T02:00:00Z "
            "(plans/default.toml: '02:00-04:00')"
        )
        assert hold.windows == ("plans/default.toml",)
        assert self.hold("2026-12-02T03:00:00", None, plan) is None

    def test_the_intersection_with_agent_toml(self) -> None:
        """agent.toml allows 01:00-03:00, the plan 02:00-04:00: both open from 02:00."""
        agent = Maintenance((parse_window("01:00-03:00"),), "UTC")
        plan = ("plans/default.toml", Maintenance((parse_window("02:00-04:00"),), "UTC"))
        hold = self.hold("2026-12-02T01:30:00", agent, plan)  # agent's open, the plan's not
        assert hold.at == utc("2026-12-02T02:00:00") and hold.windows == ("plans/default.toml",)
        hold = self.hold("2026-12-02T03:30:00", agent, plan)  # the plan's open, agent's not
        assert hold.at == utc("2026-12-03T02:00:00") and hold.windows == ("agent.toml",)
        assert hold.message.endswith("(agent.toml: '01:00-03:00')")
        hold = self.hold("2026-12-02T00:00:00", agent, plan)  # both closed: both named
        assert hold.windows == ("agent.toml", "plans/default.toml")
        assert self.hold("2026-12-02T02:30:00", agent, plan) is None

    def test_every_merged_plans_windows_must_be_open(self) -> None:
        default = ("plans/default.toml", Maintenance((parse_window("00:00-12:00"),), "UTC"))
        device = ("devices/d/plan.toml", Maintenance((parse_window("06:00-18:00"),), "UTC"))
        hold = self.hold("2026-12-02T05:00:00", None, default, device)
        assert hold.at == utc("2026-12-02T06:00:00") and hold.windows == ("devices/d/plan.toml",)
        assert self.hold("2026-12-02T07:00:00", None, default, device) is None

    def test_windows_that_never_overlap_name_every_set(self) -> None:
        agent = Maintenance((parse_window("01:00-02:00"),), "UTC")
        plan = ("plans/default.toml", Maintenance((parse_window("03:00-04:00"),), "UTC"))
        hold = self.hold("2026-12-02T00:00:00", agent, plan)
        assert hold.at is None
        assert hold.message == (
            "waiting for a maintenance window: the windows of agent.toml and "
            "plans/default.toml never overlap"
        )


class TestStep:
    """The rollout step holds a revision for its plan's window and fires at its start."""

    def rig(
        self, agent: Maintenance | None = None
    ) -> tuple[FakeClock, RolloutTracker, list[float]]:
        clock = FakeClock()
        fired: list[float] = []

        def wall() -> float:
            return T0 + clock.now()

        tracker = RolloutTracker(
            lambda: fired.append(wall()),
            wall=wall,
            clock=clock,
            device_id="dev-1",
            maintenance=agent,
        )
        return clock, tracker, fired

    async def sync(
        self, clock: FakeClock, tracker: RolloutTracker, plan: dict[str, Any]
    ) -> SyncResult | None:
        host = FakeHost(metrics=RolloutMetrics())
        host.applied_plan = plan_from_json(
            fleet("1.0.0", {"plans/default.toml": COMPONENT}), environ={}
        )
        ctx = context(SyncRequest(operation="op"), host)
        ctx.rollout = tracker
        answer = verified_answer("db")
        assert answer.verified is not None
        answer = replace(answer, verified=replace(answer.verified, commit_time=T0), plan=plan)
        host.answer = ctx.answer = answer
        assert await p.resolve(ctx) is None and await p.diff(ctx) is None
        result = await p.rollout(ctx)
        await clock.settle()
        return result

    def test_a_plan_window_holds_the_deployment_until_it_opens(self) -> None:
        """T0 is 08:00 UTC; the device's plan allows 09:30-10:00: held, fired at 09:30."""
        plan = fleet(
            "2.0.0",
            {
                "plans/default.toml": COMPONENT,
                "devices/dev-1/plan.toml": '[maintenance]\ntimezone = "UTC"\nwindows = ["09:30-10:00"]\n',
            },
        )

        async def go() -> None:
            clock, tracker, fired = self.rig()
            result = await self.sync(clock, tracker, plan)
            assert result is not None and result.outcome is Outcome.WAITING
            assert result.error == (
                "waiting for maintenance window at 2027-01-15T09:30:00Z "
                "(devices/dev-1/plan.toml: '09:30-10:00')"
            )
            assert result.rollout is not None and result.rollout["reason"] == "window"
            assert result.rollout["windows"] == ["devices/dev-1/plan.toml"]
            assert clock.deadlines == [5400.0]
            await clock.advance(5399)
            assert fired == []
            await clock.advance(1)
            assert fired == [T0 + 5400]  # at the window's start, without a new commit
            assert (await self.sync(clock, tracker, plan)) is None  # the fired sync deploys

        asyncio.run(go())

    def test_agent_and_plan_windows_together(self) -> None:
        """agent.toml opens 09:00-10:00, the plan 09:30-11:00: the deployment waits to 09:30."""
        agent = Maintenance((parse_window("09:00-10:00"),), "UTC")
        plan = fleet(
            "2.0.0",
            {
                "plans/default.toml": COMPONENT
                + '[maintenance]\ntimezone = "UTC"\nwindows = ["09:30-11:00"]\n'
            },
        )

        async def go() -> None:
            clock, tracker, fired = self.rig(agent)
            result = await self.sync(clock, tracker, plan)
            assert result is not None and result.rollout is not None
            assert result.rollout["at"] == T0 + 5400
            assert result.rollout["windows"] == ["agent.toml", "plans/default.toml"]
            await clock.advance(3600)  # 09:00: the agent's window is open, the plan's not
            assert fired == []
            result = await self.sync(clock, tracker, plan)
            assert result is not None and result.rollout is not None
            assert result.rollout["windows"] == ["plans/default.toml"]
            await clock.advance(1800)
            assert fired == [T0 + 5400]
            assert (await self.sync(clock, tracker, plan)) is None

        asyncio.run(go())
