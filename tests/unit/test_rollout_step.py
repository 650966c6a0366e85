"""The rollout step and its tracker over a fake host, on a driven clock (no real waits).

Deferral checks are real: a shell command and a real HTTP server on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from keystone.plan import plan_from_json
from keystone.rollout import assign, parse_rollout
from keystone.runtime.timing import FakeClock
from keystone.sync import pipeline as p
from keystone.sync.model import Outcome, RequestKind, SyncRequest, SyncResult, VerifiedRevision
from keystone.sync.rollout import RolloutTracker
from keystone.windows import Maintenance, parse_window
from tests.unit.test_sync_pipeline import (
    REV,
    FakeHost,
    FakeMetrics,
    context,
    plan_json,
    verified_answer,
)

T0 = 1_800_000_000.0  # commit time of REV in these tests (2027-01-15T08:00:00Z)
TWO_WAVES = 'waves = ["50%", "100%"]\nwait = "1h"\n'


class RolloutMetrics(FakeMetrics):
    def rollout(self, **kw: Any) -> None:
        self.calls.append(("rollout", kw))


def device_in_wave(spec: str, wave: int, rev: str = REV) -> str:
    parsed = parse_rollout(spec)
    for i in range(1000):
        a = assign(parsed, device_id=f"dev-{i}", labels=[], revision=rev, commit_time=0)
        if a.wave == wave:
            return f"dev-{i}"
    raise AssertionError(f"no device in wave {wave}")


class Rig:
    """A tracker on a FakeClock whose wall time is ``T0 + clock.now()``; fired syncs counted."""

    def __init__(
        self, device: str, maintenance: Maintenance | None = None, runtime: Path | None = None
    ) -> None:
        self.clock = FakeClock()
        self.fired: list[float] = []
        self.tracker = RolloutTracker(
            lambda: self.fired.append(self.wall()),
            wall=self.wall,
            clock=self.clock,
            device_id=device,
            maintenance=maintenance,
            runtime=runtime,
        )
        self.host = FakeHost(metrics=RolloutMetrics())

    def wall(self) -> float:
        return T0 + self.clock.now()

    async def sync(
        self,
        rollout: str | None,
        *,
        old: str = "1.0.0",
        new: str = "2.0.0",
        kind: RequestKind = RequestKind.SYNC,
    ) -> SyncResult | None:
        """One pass of resolve -> diff -> rollout for REV (``rollout`` as its rollout.toml)."""
        self.host.applied_plan = plan_from_json(plan_json_with("db", version=old), environ={})
        ctx = context(SyncRequest(kind, operation="op"), self.host)
        ctx.rollout = self.tracker
        answer = verified_answer("db")
        assert answer.verified is not None
        answer = replace(
            answer,
            verified=replace(answer.verified, rollout=rollout, commit_time=T0),
            plan=plan_json_with("db", version=new),
        )
        self.host.answer = ctx.answer = answer
        assert await p.resolve(ctx) is None and await p.diff(ctx) is None
        result = await p.rollout(ctx)
        await self.clock.settle()  # the wake-up task reaches its sleep
        if result is None:
            self.tracker.after(self.host, SyncResult(Outcome.APPLIED, "rollout", revision=REV))
        return result

    def rollout_events(self) -> list[dict[str, Any]]:
        return [e for e in self.host.events if e.get("kind") == "rollout"]


DEFER_TEXT = ""


def plan_json_with(name: str, *, version: str) -> dict[str, Any]:
    doc = plan_json(name, version=version)
    if DEFER_TEXT:
        doc["components"][0]["recipe_text"] += DEFER_TEXT
    return doc


def run(coro: Any) -> Any:
    return asyncio.run(coro)


class TestWaves:
    def test_a_later_wave_waits_and_applies_exactly_at_its_time(self) -> None:
        """Wave 2 opens 1h after the commit: held until then, one sync fired at that instant."""
        dev = device_in_wave(TWO_WAVES, 2)

        async def go() -> None:
            rig = Rig(dev)
            result = await rig.sync(TWO_WAVES)
            assert result is not None and result.outcome is Outcome.WAITING
            assert result.error == "waiting for wave 2 at 2027-01-15T09:00:00Z"
            assert result.rollout is not None and result.rollout["wave"] == 2
            assert rig.tracker.status() == result.rollout
            assert rig.clock.deadlines == [3600.0]
            # Polls meanwhile: still waiting, one history entry only, the same wake-up.
            await rig.clock.advance(1800)
            assert (await rig.sync(TWO_WAVES)) is not None
            assert len(rig.rollout_events()) == 1 and rig.clock.deadlines == [3600.0]
            await rig.clock.advance(1799.999)
            assert rig.fired == []
            await rig.clock.advance(0.001)
            assert rig.fired == [T0 + 3600.0]  # exactly at the wave's time, no new commit
            assert (await rig.sync(TWO_WAVES)) is None  # the fired sync deploys
            assert rig.tracker.hold is None
            metrics = rig.host.metrics
            assert metrics is not None
            rollout_calls = [c[1] for c in metrics.calls if c[0] == "rollout"]
            assert rollout_calls[0]["outcome"] == "waiting" and rollout_calls[0]["wave"] == 2
            assert rollout_calls[0]["until"] == T0 + 3600
            assert rollout_calls[-1]["outcome"] == "applied" and rollout_calls[-1]["until"] is None

        run(go())

    def test_the_previous_soak_ending_keeps_the_held_revisions_series(self) -> None:
        """The soak of the revision before ends while the next one waits for its wave: the
        series still says waiting for the held revision, not healthy for the older one."""
        dev = device_in_wave(TWO_WAVES, 2)

        async def go() -> None:
            rig = Rig(dev)
            result = await rig.sync(TWO_WAVES)
            assert result is not None and result.outcome is Outcome.WAITING
            rig.tracker.soaked(rig.host, "0" * 40, ok=True)
            metrics = rig.host.metrics
            assert metrics is not None
            last = [c[1] for c in metrics.calls if c[0] == "rollout"][-1]
            assert (last["revision"], last["outcome"], last["wave"]) == (REV, "waiting", 2)

        run(go())

    def test_the_first_wave_deploys_at_once(self) -> None:
        dev = device_in_wave(TWO_WAVES, 1)

        async def go() -> None:
            rig = Rig(dev)
            assert (await rig.sync(TWO_WAVES)) is None
            assert rig.tracker.status() == {
                "state": "applied",
                "revision": REV,
                "wave": 1,
                "waves": 2,
                "canary": True,
                "at": T0,
            }

        run(go())

    def test_no_change_here_is_never_held(self) -> None:
        """A commit that changes nothing on this device (a halt commit, say) is not held."""
        dev = device_in_wave(TWO_WAVES, 2)

        async def go() -> None:
            rig = Rig(dev)
            assert (await rig.sync(TWO_WAVES + "halted = true\n", new="1.0.0")) is None

        run(go())

    def test_imports_and_rollbacks_are_not_held(self) -> None:
        dev = device_in_wave(TWO_WAVES, 2)

        async def go() -> None:
            rig = Rig(dev)
            assert (await rig.sync(TWO_WAVES, kind=RequestKind.IMPORT)) is None

        run(go())

    def test_a_halt_commit_stops_the_later_waves(self) -> None:
        """Waiting for wave 2; the next commit halts the rollout: no deployment, no wake-up."""
        dev = device_in_wave(TWO_WAVES, 2)

        async def go() -> None:
            rig = Rig(dev)
            assert (await rig.sync(TWO_WAVES)) is not None
            result = await rig.sync(TWO_WAVES + "halted = true\n")
            assert result is not None and result.outcome is Outcome.HALTED
            assert result.error == "rollout halted"
            assert rig.clock.deadlines == []
            await rig.clock.advance(7200)
            assert rig.fired == [] and rig.host.applied == []
            assert [e["result"] for e in rig.rollout_events()] == ["waiting", "halted"]
            metrics = rig.host.metrics
            assert metrics is not None
            last = [c[1] for c in metrics.calls if c[0] == "rollout"][-1]
            assert last["outcome"] == "halted" and last["halted"] is True

        run(go())


class TestWindows:
    def test_a_window_holds_the_deployment_until_it_opens(self) -> None:
        """T0 is 08:00 UTC; the agent's window opens at 09:30: held, fired at 09:30."""
        windows = Maintenance((parse_window("09:30-10:00"),), "UTC")

        async def go() -> None:
            rig = Rig("dev-1", windows)
            result = await rig.sync(None)
            assert result is not None and result.outcome is Outcome.WAITING
            assert result.error == (
                "waiting for maintenance window at 2027-01-15T09:30:00Z (agent.toml: '09:30-10:00')"
            )
            await rig.clock.advance(5399)
            assert rig.fired == []
            await rig.clock.advance(1)
            assert rig.fired == [T0 + 5400]
            assert (await rig.sync(None)) is None

        run(go())

    def test_the_fleets_window_from_rollout_toml(self) -> None:
        spec = '[maintenance]\ntimezone = "UTC"\nwindows = ["10:00-11:00"]\n'

        async def go() -> None:
            rig = Rig("dev-1")
            result = await rig.sync(spec)
            assert result is not None and result.rollout is not None
            assert result.rollout["reason"] == "window" and result.rollout["at"] == T0 + 7200

        run(go())


@pytest.fixture
def defer_text() -> Iterator[None]:
    yield
    global DEFER_TEXT
    DEFER_TEXT = ""


class DeferServer(BaseHTTPRequestHandler):
    answers: list[bytes] = []
    asked = 0

    def do_GET(self) -> None:
        type(self).asked += 1
        body = self.answers.pop(0) if self.answers else b"ok"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


class TestDeferral:
    def test_a_command_defers_within_its_bound(self, defer_text: None) -> None:
        """Each ask defers 40 s; the bound is 100 s: 40 + 40 + 20, then it proceeds unasked."""
        global DEFER_TEXT
        DEFER_TEXT = '\n[lifecycle.defer]\ncheck = "cmd:echo defer 40"\nmax = "100s"\n'

        async def go() -> None:
            rig = Rig("dev-1")
            waits = []
            for _ in range(3):
                result = await rig.sync(None)
                assert result is not None and result.rollout is not None
                assert result.rollout["reason"] == "defer"
                assert result.rollout["component"] == "db"
                waits.append(result.rollout["at"] - rig.wall())
                await rig.clock.advance_to_next()
            assert waits == [40.0, 40.0, 20.0]
            assert "(100s of at most 100s)" in (result.error or "")
            assert len(rig.fired) == 3
            assert (await rig.sync(None)) is None  # bound honoured: proceeds
            assert rig.tracker.deferred == {}

        run(go())

    def test_the_bound_survives_an_agent_restart(self, defer_text: None, tmp_path: Path) -> None:
        """40 s granted before a restart count against the 100 s bound after it."""
        global DEFER_TEXT
        DEFER_TEXT = '\n[lifecycle.defer]\ncheck = "cmd:echo defer 40"\nmax = "100s"\n'

        async def go() -> None:
            rig = Rig("dev-1", runtime=tmp_path)
            assert (await rig.sync(None)) is not None
            rig.tracker.wake.cancel()
            again = Rig("dev-1", runtime=tmp_path)  # a new agent, same runtime dir
            assert again.tracker.deferred == {(REV, "db"): 40.0}
            waits = []
            for _ in range(2):
                result = await again.sync(None)
                assert result is not None and result.rollout is not None
                waits.append(result.rollout["at"] - again.wall())
            assert waits == [40.0, 20.0]
            assert (await again.sync(None)) is None
            again.tracker.wake.cancel()
            assert Rig("dev-1", runtime=tmp_path).tracker.deferred == {}

        run(go())
        (tmp_path / "state" / "deferrals.json").write_text("[not what we wrote")
        assert Rig("dev-1", runtime=tmp_path).tracker.deferred == {}

    def test_an_http_check_defers_then_lets_it_proceed(self, defer_text: None) -> None:
        server = ThreadingHTTPServer(("127.0.0.1", 0), DeferServer)
        DeferServer.answers = [b"defer 5", b'{"defer": 2}', b"go ahead"]
        DeferServer.asked = 0
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        global DEFER_TEXT
        DEFER_TEXT = f'\n[lifecycle.defer]\ncheck = "http://127.0.0.1:{server.server_port}/defer"\n'
        try:

            async def go() -> None:
                rig = Rig("dev-1")
                first = await rig.sync(None)
                assert first is not None and first.rollout is not None
                assert first.rollout["at"] == rig.wall() + 5
                await rig.clock.advance_to_next()
                second = await rig.sync(None)
                assert second is not None and second.rollout is not None
                assert second.rollout["at"] == rig.wall() + 2
                await rig.clock.advance_to_next()
                assert (await rig.sync(None)) is None
                assert DeferServer.asked == 3

            run(go())
        finally:
            server.shutdown()
            server.server_close()

    def test_a_check_that_fails_or_hangs_lets_it_proceed(self, defer_text: None) -> None:
        global DEFER_TEXT
        DEFER_TEXT = '\n[lifecycle.defer]\ncheck = "cmd:sleep 30"\ntimeout = "200ms"\n'

        async def go() -> None:
            rig = Rig("dev-1")
            assert (await rig.sync(None)) is None

        run(go())
        DEFER_TEXT = '\n[lifecycle.defer]\ncheck = "cmd:echo defer 30; exit 3"\n'
        run(go())
        DEFER_TEXT = '\n[lifecycle.defer]\ncheck = "http://127.0.0.1:9/nothing"\n'
        run(go())


def test_a_verified_revision_carries_its_rollout_across_the_worker_boundary() -> None:
    from keystone.sync.model import WorkerAnswer

    answer = verified_answer("db")
    assert answer.verified is not None
    answer = replace(answer, verified=replace(answer.verified, rollout=TWO_WAVES, commit_time=T0))
    back = WorkerAnswer.from_json(answer.to_json())
    assert back.verified is not None and back.verified.rollout == TWO_WAVES
    assert isinstance(back.verified, VerifiedRevision)


def test_broker_state_events_carry_the_rollout() -> None:
    """A fleet-side gate subscribed to state events sees each device's wave and outcome."""
    from keystone.adapters.common import state_event
    from tests.unit.test_adapters import FakeControl

    rollout = {"state": "waiting", "revision": REV, "wave": 2, "waves": 2, "canary": False}

    class Control(FakeControl):
        def health(self) -> dict[str, Any]:
            return {**super().health(), "rollout": rollout}

    assert state_event(Control(), "d1", 0)["rollout"] == rollout
    assert "rollout" not in state_event(FakeControl(), "d1", 0)


def test_status_shows_the_hold() -> None:
    from keystone.cli import views

    hold = {"state": "waiting", "message": "waiting for wave 2 at 2027-01-15T09:00:00Z"}
    text = views.status_text({"health": {"rollout": hold}, "status": "running"})
    assert "rollout: waiting for wave 2 at 2027-01-15T09:00:00Z" in text
    assert "rollout" not in views.status_text({"health": {}, "status": "running"})


def test_prometheus_series_of_a_rollout() -> None:
    """One outcome series per device (the previous one goes), wave, wait and halt gauges."""
    import time

    from prometheus_client.parser import text_string_to_metric_families

    from keystone.metrics import Metrics

    m = Metrics()

    def samples() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        body, _ = m.render()
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(body.decode())
            for s in fam.samples
            if s.name.startswith("keystone_rollout")
        }

    until = time.time() + 600
    m.rollout(revision=REV, wave=2, canary=False, outcome="waiting", until=until, halted=False)
    got = samples()
    key = (("canary", "false"), ("outcome", "waiting"), ("revision", REV), ("wave", "2"))
    assert got[("keystone_rollout_outcome", key)] == 1
    assert got[("keystone_rollout_wave", ())] == 2
    assert 0 < got[("keystone_rollout_wait_seconds", ())] <= 600
    assert got[("keystone_rollout_halted", ())] == 0
    m.rollout(revision=REV, wave=2, canary=False, outcome="applied", until=None, halted=False)
    got = samples()
    outcomes = [k[1] for k in got if k[0] == "keystone_rollout_outcome"]
    assert outcomes == [
        (("canary", "false"), ("outcome", "applied"), ("revision", REV), ("wave", "2"))
    ]
    assert got[("keystone_rollout_wait_seconds", ())] == 0


def test_a_hold_that_ends_while_suspended_syncs_on_resume() -> None:
    """Suspended: the wave's time passes without a sync; resume then syncs at once."""
    from keystone.sync.rollout import Hold
    from tests.unit.test_sync_engine import engine

    async def go() -> None:
        eng = engine(FakeHost())
        submitted: list[SyncRequest] = []
        eng.submit = lambda request: submitted.append(request)  # type: ignore[assignment,method-assign,return-value]
        await eng.suspend()
        eng._rollout_due()
        assert submitted == []
        eng.rollout.hold = Hold("wave", "waiting for wave 2 at ...", REV, at=4.0)  # past (wall 5)
        await eng.resume()
        assert [r.trigger for r in submitted] == ["rollout"]

    run(go())
