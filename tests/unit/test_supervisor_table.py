"""The supervisor's transition table and restart logic, on a fake clock with a fake runner.

No process is started and nothing sleeps: time moves only when a test advances the clock.
"""

from __future__ import annotations

import asyncio
import random
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from keystone.plan import Component, DesiredPlan, PlanEntry, resolve_entries
from keystone.recipe import parse_recipe
from keystone.runtime.deployer import Deployer
from keystone.runtime.supervisor import (
    RUNNING,
    TRANSITIONS,
    RestartTuning,
    State,
    Supervisor,
    component_paths,
)
from keystone.runtime.timing import FakeClock

from .fake_runner import FakeHandle, FakeRunner

S = State
TUNING = RestartTuning(initial=1.0, maximum=60.0, factor=2.0, jitter=0.2, stable_after=60.0)


def recipe_text(
    name: str = "app",
    *,
    policy: str = "always",
    max_retries: int = 5,
    health: bool = False,
    interval: str = "2s",
    threshold: int = 3,
    start_timeout: str = "10s",
    install: str | None = None,
    shutdown: str | None = None,
    reload_signal: str | None = None,
) -> str:
    text = f'[metadata]\nname = "{name}"\nversion = "1.0.0"\n'
    if install is not None:
        text += f'[lifecycle.install]\nscript = "{install}"\n'
    text += f'[lifecycle.run]\nrestart_policy = "{policy}"\nmax_retries = {max_retries}\n'
    text += 'stop_timeout = "7s"\n[lifecycle.run.exec]\ncommand = "/bin/app"\n'
    if health:
        text += (
            f'[lifecycle.run.health]\ncheck = "cmd:probe"\ninterval = "{interval}"\n'
            f'failure_threshold = {threshold}\nstart_timeout = "{start_timeout}"\n'
        )
    if shutdown is not None:
        text += f'[lifecycle.shutdown]\nscript = "{shutdown}"\n'
    if reload_signal is not None:
        text += f'[lifecycle.reload]\nsignal = "{reload_signal}"\n'
    return text


def component(name: str = "app", **kw: object) -> Component:
    recipe = parse_recipe(recipe_text(name, **kw), file=f"{name}.recipe.toml")  # type: ignore[arg-type]
    return Component(name, recipe, "plan.toml", f"{name}.recipe.toml")


@dataclass
class Rig:
    """A supervisor wired to a fake clock and a fake runner, recording every state it enters."""

    sup: Supervisor
    clock: FakeClock
    runner: FakeRunner
    states: list[State] = field(default_factory=list)

    def record(self, sup: Supervisor) -> None:
        if not self.states or self.states[-1] is not sup.state:
            self.states.append(sup.state)

    @property
    def handle(self) -> FakeHandle:
        assert isinstance(self.sup.handle, FakeHandle)
        return self.sup.handle

    async def crash(self, status: int | None = 1) -> None:
        """The running process exits with ``status``; let the supervisor react."""
        self.runner.exit(self.handle, status)
        await self.clock.settle()


def rig(
    tmp_path: Path,
    comp: Component | None = None,
    *,
    seed: int = 7,
    runner: FakeRunner | None = None,
) -> Rig:
    clock = FakeClock(1000.0)
    fake = runner or FakeRunner()
    comp = comp or component()
    holder: list[Rig] = []
    sup = Supervisor(
        comp,
        fake,
        component_paths(tmp_path, comp.name, comp.version),
        tuning=TUNING,
        as_root=False,
        on_change=lambda s: holder[0].record(s),
        rng=random.Random(seed).random,
        clock=clock,
    )
    r = Rig(sup, clock, fake)
    holder.append(r)
    return r


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(test())  # type: ignore[arg-type]


ALLOWED = sorted((a, b) for a, targets in TRANSITIONS.items() for b in targets)
REFUSED = sorted((a, b) for a in State for b in State if a is not b and b not in TRANSITIONS[a])


class TestTable:
    def test_every_state_has_a_row(self) -> None:
        """The table names every state, and no state lists itself."""
        assert set(TRANSITIONS) == set(State)
        assert all(s not in targets for s, targets in TRANSITIONS.items())

    @pytest.mark.parametrize(("old", "new"), ALLOWED)
    def test_allowed(self, tmp_path: Path, old: State, new: State) -> None:
        """Every transition in the table is made, and reported once."""
        r = rig(tmp_path)
        r.sup.state = old
        r.sup._set(new, "why")
        assert r.sup.state is new
        assert r.states == [new]

    @pytest.mark.parametrize(("old", "new"), REFUSED)
    def test_refused(self, tmp_path: Path, old: State, new: State) -> None:
        """Every transition not in the table raises and leaves the state alone."""
        r = rig(tmp_path)
        r.sup.state = old
        with pytest.raises(RuntimeError, match="illegal transition"):
            r.sup._set(new)
        assert r.sup.state is old
        assert r.states == []

    def test_refused_sample_is_not_empty(self) -> None:
        """A stopping component cannot become healthy; a stopped one cannot back off."""
        assert (S.STOPPING, S.HEALTHY) in REFUSED
        assert (S.STOPPED, S.BACKOFF) in REFUSED
        assert (S.PENDING, S.HEALTHY) in REFUSED


class TestStart:
    def test_no_health_check_is_ready_after_settle(self, tmp_path: Path) -> None:
        """Without a health check a process alive for ``settle`` seconds is healthy."""

        async def t() -> None:
            r = rig(tmp_path)
            await r.sup.start()
            assert r.states == [S.STARTING]
            await r.clock.settle()
            assert r.clock.deadlines == [1001.0]
            await r.clock.advance(0.5)
            assert r.sup.state is S.STARTING
            await r.clock.advance(0.5)
            assert r.states == [S.STARTING, S.HEALTHY]
            assert r.sup.pid == r.handle.pid
            assert r.runner.spawned[0].argv == ("/bin/app",)

        run(t)

    def test_install_once_per_hash(self, tmp_path: Path) -> None:
        """The install script runs before the first start and not again for the same hash."""

        async def t() -> None:
            r = rig(tmp_path, component(install="setup"))
            await r.sup.start()
            assert r.states == [S.INSTALLING, S.STARTING]
            await r.sup.stop()
            await r.sup.start()
            assert [c for c, _, _ in r.runner.commands] == ["setup"]
            assert r.states[-1] is S.STARTING

        run(t)

    def test_install_failure_fails(self, tmp_path: Path) -> None:
        """A failing install script leaves the component failed, naming the status."""

        async def t() -> None:
            r = rig(tmp_path, component(install="setup"), runner=FakeRunner(codes={"setup": 3}))
            await r.sup.start()
            assert r.states == [S.INSTALLING, S.FAILED]
            assert "install script failed with exit status 3" in (r.sup.error or "")
            assert r.runner.spawned == []

        run(t)

    def test_spawn_failure_fails(self, tmp_path: Path) -> None:
        """A command that cannot start leaves the component failed with the runner's reason."""

        async def t() -> None:
            r = rig(tmp_path, runner=FakeRunner(spawn_error="command not found: /bin/app"))
            await r.sup.start()
            assert r.states == [S.FAILED]
            assert "command not found" in (r.sup.error or "")

        run(t)


class TestRestartPolicy:
    @pytest.mark.parametrize(
        ("policy", "status", "expected"),
        [
            ("always", 0, S.BACKOFF),
            ("always", 1, S.BACKOFF),
            ("always", -9, S.BACKOFF),
            ("on-failure", 0, S.STOPPED),
            ("on-failure", 1, S.BACKOFF),
            ("on-failure", -9, S.BACKOFF),
            ("never", 0, S.STOPPED),
            ("never", 1, S.FAILED),
            ("never", -9, S.FAILED),
        ],
    )
    def test_exit(self, tmp_path: Path, policy: str, status: int, expected: State) -> None:
        """What an exit leads to depends on the policy and the exit status."""

        async def t() -> None:
            r = rig(tmp_path, component(policy=policy))
            await r.sup.start()
            await r.clock.advance(1.0)
            await r.crash(status)
            assert r.sup.state is expected
            if expected is S.BACKOFF:
                await r.clock.advance_to_next()
                assert r.sup.state is S.STARTING
                assert len(r.runner.spawned) == 2
                assert r.sup.restarts == 1
            else:
                await r.clock.advance(3600)
                assert len(r.runner.spawned) == 1

        run(t)

    def test_exit_reason_names_the_signal(self, tmp_path: Path) -> None:
        """A process killed by a signal is reported by the signal's name."""

        async def t() -> None:
            r = rig(tmp_path, component(policy="never"))
            await r.sup.start()
            await r.crash(-signal.SIGKILL)
            assert (r.sup.error or "").startswith("killed by SIGKILL")

        run(t)


class TestBackoff:
    def test_sequence_with_seeded_jitter(self, tmp_path: Path) -> None:
        """Each restart waits initial * factor**n, +-jitter drawn from the seeded generator."""

        async def t() -> None:
            r = rig(tmp_path, component(max_retries=5), seed=42)
            draws = random.Random(42)
            expected = [TUNING.delay(n, draws.random()) for n in range(1, 6)]
            for base, delay in zip((1, 2, 4, 8, 16), expected, strict=True):
                assert base * 0.8 <= delay <= base * 1.2
            assert len(set(expected)) == 5
            await r.sup.start()
            for n, delay in enumerate(expected, start=1):
                await r.crash()
                assert r.sup.state is S.BACKOFF
                assert r.sup.retries == n
                assert r.clock.deadlines == [pytest.approx(r.clock.now() + delay)]
                assert f"restart {n}/5 in {delay:.1f}s" in (r.sup.error or "")
                await r.clock.advance(delay)
                assert r.sup.state is S.STARTING
            assert r.sup.restarts == 5
            assert len(r.runner.spawned) == 6

        run(t)

    def test_delay_is_capped(self) -> None:
        """The delay never exceeds ``maximum`` (plus jitter)."""
        assert TUNING.delay(30, 0.5) == 60.0
        assert TUNING.delay(30, 0.999) <= 72.0

    def test_crash_loop_fails_after_max_retries(self, tmp_path: Path) -> None:
        """Exits without a stable run exhaust max_retries and leave the component failed."""

        async def t() -> None:
            r = rig(tmp_path, component(max_retries=3))
            await r.sup.start()
            for _ in range(3):
                await r.crash()
                assert r.sup.state is S.BACKOFF
                await r.clock.advance_to_next()
            await r.crash()
            assert r.sup.state is S.FAILED
            assert "crash loop: gave up after 3 restarts (max_retries = 3)" in (r.sup.error or "")
            await r.clock.advance(3600)
            assert len(r.runner.spawned) == 4

        run(t)

    def test_stable_run_resets_retries(self, tmp_path: Path) -> None:
        """A process that stayed up ``stable_after`` seconds starts the backoff over."""

        async def t() -> None:
            r = rig(tmp_path, component(max_retries=2))
            await r.sup.start()
            await r.crash()
            await r.clock.advance_to_next()
            await r.crash()
            assert r.sup.retries == 2
            await r.clock.advance_to_next()
            await r.clock.advance(TUNING.stable_after)
            await r.crash()
            assert r.sup.state is S.BACKOFF
            assert r.sup.retries == 1

        run(t)

    def test_stop_during_backoff(self, tmp_path: Path) -> None:
        """A stop while waiting to restart cancels the restart for good."""

        async def t() -> None:
            r = rig(tmp_path)
            await r.sup.start()
            await r.crash()
            assert r.sup.state is S.BACKOFF
            await r.sup.stop(reason="operator")
            assert r.states[-2:] == [S.STOPPING, S.STOPPED]
            await r.clock.advance(3600)
            assert r.sup.state is S.STOPPED
            assert len(r.runner.spawned) == 1
            assert not r.sup.wanted

        run(t)


class TestHealth:
    def test_healthy_then_failure_threshold_restarts(self, tmp_path: Path) -> None:
        """``failure_threshold`` failed probes in a row make it unhealthy; it is killed and restarted."""

        async def t() -> None:
            r = rig(tmp_path, component(health=True, interval="2s", threshold=3))
            await r.sup.start()
            await r.clock.settle()
            assert r.sup.state is S.HEALTHY
            first = r.handle
            r.runner.probe_status = 1
            await r.clock.advance(2.0)
            await r.clock.advance(2.0)
            assert r.sup.state is S.HEALTHY
            await r.clock.advance(2.0)
            assert r.states == [S.STARTING, S.HEALTHY, S.UNHEALTHY, S.BACKOFF]
            assert "3 failed health checks: exit 1" in (r.sup.error or "")
            assert r.runner.stops == [(first.pid, 7.0)]
            r.runner.probe_status = 0
            await r.clock.advance_to_next()
            await r.clock.settle()
            assert r.sup.state is S.HEALTHY
            assert r.handle is not first

        run(t)

    def test_the_same_healthy_answer_again_is_no_news(self, tmp_path: Path) -> None:
        """on_change (snapshot, metrics, brokers) runs when a probe's answer changes, not for
        every identical healthy probe."""

        async def t() -> None:
            r = rig(tmp_path, component(health=True, interval="2s", threshold=3))
            calls: list[str] = []
            r.sup.on_change = lambda s: calls.append(s.last_health.detail if s.last_health else "")
            await r.sup.start()
            await r.clock.settle()
            assert r.sup.state is S.HEALTHY
            before = len(calls)
            for _ in range(5):
                await r.clock.advance(2.0)
            assert len(calls) == before  # five identical "exit 0": nothing to tell
            r.runner.probe_status = 1
            await r.clock.advance(2.0)
            r.runner.probe_status = 0
            await r.clock.advance(2.0)
            assert calls[before:] == ["exit 0"]  # healthy again after a failed probe: news
            assert r.sup.state is S.HEALTHY

        run(t)

    def test_supervisors_of_one_deployer_probe_on_one_timer(self, tmp_path: Path) -> None:
        """The components of a deployer wait for their next probes on one shared timer."""

        async def t() -> None:
            clock = FakeClock(1000.0)
            runner = FakeRunner()
            deployer = Deployer(runner, tmp_path, tuning=TUNING, clock=clock)
            sups = [
                deployer.make_supervisor(component(n, health=True, interval="2s"))
                for n in ("a", "b", "c")
            ]
            for sup in sups:
                sup.on_change = None
                await sup.start()
            await clock.settle()
            assert all(sup.state is S.HEALTHY for sup in sups)
            assert clock.deadlines == [1002.0]  # one timer for three components
            probes = len(runner.commands)
            await clock.advance(2.0)
            assert len(runner.commands) == probes + 3
            assert clock.deadlines == [1004.0]

        run(t)

    def test_one_success_resets_the_failure_count(self, tmp_path: Path) -> None:
        """Failures must be consecutive to count."""

        async def t() -> None:
            r = rig(tmp_path, component(health=True, interval="2s", threshold=2))
            await r.sup.start()
            for status in (1, 0, 1, 0, 1, 0):
                r.runner.probe_status = status
                await r.clock.advance(2.0)
            assert r.sup.state is S.HEALTHY
            assert r.runner.stops == []

        run(t)

    def test_start_timeout(self, tmp_path: Path) -> None:
        """A component never healthy within ``start_timeout`` is unhealthy and restarted."""

        async def t() -> None:
            r = rig(tmp_path, component(health=True, interval="2s", start_timeout="10s"))
            r.runner.probe_status = 1
            await r.sup.start()
            await r.clock.advance(9.9)
            assert r.sup.state is S.STARTING
            await r.clock.advance(1.1)
            assert r.states == [S.STARTING, S.UNHEALTHY, S.BACKOFF]
            assert "not healthy within 10s" in (r.sup.error or "")

        run(t)

    def test_never_policy_stays_unhealthy(self, tmp_path: Path) -> None:
        """With restart_policy never an unhealthy process is left running."""

        async def t() -> None:
            r = rig(tmp_path, component(policy="never", health=True, threshold=1))
            await r.sup.start()
            await r.clock.settle()
            r.runner.probe_status = 1
            await r.clock.advance(2.0)
            assert r.sup.state is S.UNHEALTHY
            assert r.runner.stops == []
            r.runner.probe_status = 0
            await r.clock.advance(2.0)
            assert r.sup.state is S.HEALTHY

        run(t)


class TestStopAndAdopt:
    def test_stop_runs_shutdown_then_stops(self, tmp_path: Path) -> None:
        """Stop runs the shutdown script with the pid, then the runner's stop with its grace."""

        async def t() -> None:
            r = rig(tmp_path, component(shutdown="bye"))
            await r.sup.start()
            pid = r.handle.pid
            await r.sup.stop()
            assert r.states[-2:] == [S.STOPPING, S.STOPPED]
            ((script, env, _),) = r.runner.commands
            assert script == "bye" and env["KEYSTONE_PID"] == str(pid)
            assert r.runner.stops == [(pid, 7.0)]
            assert r.sup.handle is None and r.sup.describe() is None

        run(t)

    def test_exit_after_stop_is_ignored(self, tmp_path: Path) -> None:
        """The exit a stop causes does not trigger a restart."""

        async def t() -> None:
            r = rig(tmp_path)
            await r.sup.start()
            await r.sup.stop()
            await r.clock.advance(3600)
            assert r.sup.state is S.STOPPED
            assert len(r.runner.spawned) == 1

        run(t)

    def test_adopt_from_record(self, tmp_path: Path) -> None:
        """A snapshot record adopted through the runner is supervised like a spawned process."""

        async def t() -> None:
            r = rig(tmp_path)
            handle = r.runner.adopt_record("app", {"runner": "fake", "pid": 42, "hash": "x"})
            assert handle is not None
            r.sup.adopt(handle)
            assert r.sup.wanted and r.sup.state is S.STARTING
            record = r.sup.describe()
            assert record is not None and record.to_json() == {"runner": "fake", "pid": 42}
            await r.clock.advance(1.0)
            assert r.sup.state is S.HEALTHY and r.sup.pid == 42
            await r.crash(None)  # an adopted process's status is unknown
            assert r.sup.state is S.BACKOFF
            await r.clock.advance_to_next()
            assert r.sup.state is S.STARTING and len(r.runner.spawned) == 1

        run(t)

    def test_record_of_another_runner_is_not_adopted(self) -> None:
        """An entry without a kind is a process entry, which the fake runner does not take."""
        runner = FakeRunner()
        assert runner.adopt_record("app", {"pid": 1, "pgid": 1, "start_ticks": 5}) is None

    def test_reload_signals_the_main_process(self, tmp_path: Path) -> None:
        """A reload signal goes to the process alone, not its group."""

        async def t() -> None:
            r = rig(tmp_path, component(reload_signal="HUP"))
            await r.sup.start()
            await r.sup.reload()
            assert r.runner.signals == [(r.handle.pid, signal.SIGHUP, False)]

        run(t)


class TestWaitFor:
    def test_times_out_on_the_fake_clock(self, tmp_path: Path) -> None:
        """``wait_for`` gives up after its timeout in clock time, not wall time."""

        async def t() -> None:
            r = rig(tmp_path)
            waiter = asyncio.ensure_future(r.sup.wait_for(lambda s: s is S.HEALTHY, 5.0))
            await r.clock.advance(4.0)
            assert not waiter.done()
            await r.clock.advance(1.0)
            assert waiter.done() and waiter.result() is False

        run(t)

    def test_wakes_on_the_transition(self, tmp_path: Path) -> None:
        """``wait_for`` returns as soon as the state holds."""

        async def t() -> None:
            r = rig(tmp_path)
            waiter = asyncio.ensure_future(r.sup.wait_for(lambda s: s in RUNNING, 5.0))
            await r.clock.settle()
            await r.sup.start()
            await r.clock.settle()
            assert waiter.done() and waiter.result() is True

        run(t)


class TestDeployerOnFakes:
    def test_deploy_waits_for_health_in_clock_time(self, tmp_path: Path) -> None:
        """The deployer's supervisors share its clock, so a deployment runs on fake time."""

        async def t() -> None:
            clock = FakeClock()
            runner = FakeRunner()
            deployer = Deployer(runner, tmp_path, tuning=TUNING, clock=clock)
            text = recipe_text("app")
            plan = resolve_entries(
                [PlanEntry("app", "app", True, "plan.toml", None)],
                lambda e: (text, "app.recipe.toml"),
                environ={},
            )
            assert isinstance(plan, DesiredPlan)
            task = asyncio.ensure_future(deployer.deploy(plan))
            await clock.settle()
            assert not task.done()
            await clock.advance(TUNING.settle)
            result = await task
            assert result.ok and deployer.supervisors["app"].state is S.HEALTHY
            await deployer.stop_all()
            assert runner.stops and deployer.supervisors["app"].state is S.STOPPED

        run(t)


class TestGoReport:
    """``Supervisor.reported`` / ``to_json``: Go's state, last_health and pid guarantees."""

    def test_running_only_while_the_process_lives(self, tmp_path: Path) -> None:
        """A process that died before its exit is observed is reported stopped with pid 0."""

        async def t() -> None:
            r = rig(tmp_path, component(health=True))
            await r.sup.start()
            await r.clock.settle()
            assert r.sup.state is S.HEALTHY
            state, health, pid = r.sup.reported()
            assert (state, health) == ("running", "healthy") and pid == r.handle.pid
            r.runner._status[r.handle.pid] = 1  # gone; the exit watcher has not run yet
            assert r.sup.state is S.HEALTHY
            assert r.sup.reported() == ("stopped", "unknown", 0)
            row = r.sup.to_json()
            assert (row["state"], row["phase"], row["pid"]) == ("stopped", "healthy", 0)

        run(t)

    def test_health_is_unknown_when_not_running_and_after_a_restart(self, tmp_path: Path) -> None:
        """last_health resets to unknown on exit, and a new process starts with no verdict."""

        async def t() -> None:
            r = rig(tmp_path, component(health=True))
            await r.sup.start()
            await r.clock.settle()
            assert r.sup.reported()[1] == "healthy"
            await r.crash()
            assert r.sup.state is S.BACKOFF
            assert r.sup.reported() == ("stopped", "unknown", 0)
            assert r.sup.to_json()["health_detail"]  # the detail of the last probe stays
            r.runner.probe_status = 1
            await r.clock.advance(2.0)
            assert r.sup.state is S.STARTING
            assert r.sup.reported()[0] == "running"
            assert r.sup.reported()[1] in ("unknown", "unhealthy")

        run(t)

    def test_without_a_health_check_health_stays_unknown(self, tmp_path: Path) -> None:
        """Only components that declare a health check ever get a verdict."""

        async def t() -> None:
            r = rig(tmp_path)
            await r.sup.start()
            await r.clock.advance(TUNING.settle + 1)
            assert r.sup.state is S.HEALTHY
            assert r.sup.reported()[:2] == ("running", "unknown")

        run(t)

    def test_failed_and_pending(self, tmp_path: Path) -> None:
        """Nothing started yet is none; exhausted restarts are failed, pid 0."""

        async def t() -> None:
            r = rig(tmp_path, component(policy="never"))
            assert r.sup.reported() == ("none", "unknown", 0)
            await r.sup.start()
            await r.crash(3)
            assert r.sup.state is S.FAILED
            assert r.sup.reported() == ("failed", "unknown", 0)

        run(t)
