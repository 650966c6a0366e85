"""Self-update's pure parts: the agent recipe, splitting it off the plan, the lock, addresses."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from keystone.agentlock import AgentLock, LockBusy
from keystone.errors import ValidationError
from keystone.plan import PlanEntry, resolve_entries
from keystone.recipe import AGENT_TYPE, parse_recipe
from keystone.selfupdate import Layout, health_url, split_plan

SHA = "a" * 64
AGENT = (
    '[metadata]\nname = "keystone"\nversion = "0.2.0"\ntype = "agent"\n'
    f'[[artifacts]]\nuri = "dist/keystone_agent-0.2.0-py3-none-any.whl"\nsha256 = "{SHA}"\n'
)
SLEEPER = '[metadata]\nname = "s"\nversion = "1"\n[lifecycle.run.exec]\ncommand = "sleep"\n'


class TestAgentRecipe:
    def test_loads_without_a_run(self) -> None:
        r = parse_recipe(AGENT, file="agent.recipe.toml")
        assert r.metadata.type == AGENT_TYPE and r.version == "0.2.0"
        assert r.artifacts[0].sha256 == SHA and r.run.exec is None

    @pytest.mark.parametrize(
        ("extra", "field"),
        [
            ('[lifecycle.run.exec]\ncommand = "x"\n', "lifecycle"),
            ('[[dependencies]]\nname = "db"\n', "dependencies"),
            ("[resources]\nopen_files = 10\n", "resources"),
            ('drift = "repair"\n', "drift"),
        ],
    )
    def test_anything_but_metadata_and_artifacts_is_refused(self, extra: str, field: str) -> None:
        text = extra + AGENT if not extra.startswith("[") else AGENT + extra
        with pytest.raises(ValidationError) as e:
            parse_recipe(text, file="agent.recipe.toml")
        assert e.value.field == field and "the agent runs itself" in str(e.value)
        assert "agent.recipe.toml" in str(e.value)

    def test_unpinned_wheel_is_refused(self) -> None:
        with pytest.raises(ValidationError) as e:
            parse_recipe(AGENT.replace(f'sha256 = "{SHA}"\n', ""), file="a.toml")
        assert e.value.field == "artifacts[0].sha256" and "pinned" in str(e.value)

    def test_no_wheel_is_refused(self) -> None:
        with pytest.raises(ValidationError) as e:
            parse_recipe(AGENT.split("[[artifacts]]")[0], file="a.toml")
        assert e.value.field == "artifacts" and "wheel" in str(e.value)


def plan_of(recipes: dict[str, str]) -> object:
    entries = [PlanEntry(name, f"{name}.toml", file="plan.toml") for name in recipes]
    return resolve_entries(
        entries, lambda e: (recipes[e.name], e.recipe), environ={}, sources=("plan.toml",)
    )


class TestSplitPlan:
    def test_agent_is_split_off(self) -> None:
        plan = plan_of({"keystone": AGENT, "s": SLEEPER})
        rest, agent = split_plan(plan)  # type: ignore[arg-type]
        assert agent is not None and agent.name == "keystone" and agent.version == "0.2.0"
        assert list(rest.components) == ["s"] and [list(x) for x in rest.graph.layers] == [["s"]]

    def test_a_plan_without_the_agent_is_unchanged(self) -> None:
        plan = plan_of({"s": SLEEPER})
        assert split_plan(plan) == (plan, None)  # type: ignore[arg-type]

    def test_two_agents_are_refused(self) -> None:
        plan = plan_of({"a": AGENT, "b": AGENT.replace('name = "keystone"', 'name = "k2"')})
        with pytest.raises(ValidationError, match=r"more than once.*a, b"):
            split_plan(plan)  # type: ignore[arg-type]

    def test_depending_on_the_agent_is_refused(self) -> None:
        dep = SLEEPER + '[[dependencies]]\nname = "keystone"\n'
        plan = plan_of({"keystone": AGENT, "s": dep})
        with pytest.raises(ValidationError) as e:
            split_plan(plan)  # type: ignore[arg-type]
        assert e.value.field == "dependencies" and "'s' depends on 'keystone'" in str(e.value)


@pytest.mark.parametrize(
    ("listen", "tls", "url"),
    [
        ("127.0.0.1:8080", False, "http://127.0.0.1:8080/healthz"),
        ("0.0.0.0:9", False, "http://127.0.0.1:9/healthz"),
        (":9", True, "https://127.0.0.1:9/healthz"),
        ("[::]:9", False, "http://[::1]:9/healthz"),
        ("[::1]:9", False, "http://[::1]:9/healthz"),
    ],
)
def test_health_url(listen: str, tls: bool, url: str) -> None:
    assert health_url(listen, tls=tls) == url


def test_current_points_at_the_install(tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    layout.root.mkdir()
    layout.point_current("1.0")
    layout.point_current("2.0")
    assert os.readlink(layout.current) == "2.0"
    assert [p.name for p in layout.root.iterdir()] == ["current"]


class TestAgentLock:
    def test_second_holder_waits_then_names_the_first(self, tmp_path: Path) -> None:
        """Another process holds the lock: the wait is bounded and the error names its pid."""
        holder = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import sys, pathlib; from keystone.agentlock import AgentLock;"
                "l = AgentLock(pathlib.Path(sys.argv[1])); l.acquire(); print('held', flush=True);"
                "sys.stdin.read()",
                str(tmp_path),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert holder.stdout is not None and holder.stdout.readline() == "held\n"
            holder.stdout.close()
            lock = AgentLock(tmp_path)
            with pytest.raises(LockBusy) as e:
                lock.acquire(wait=0.2)
            assert str(holder.pid) in str(e.value) and "agent.lock" in str(e.value)
            assert lock.fd is None
        finally:
            assert holder.stdin is not None
            holder.stdin.close()
            holder.wait(10)
        # The holder is gone (as after a SIGKILL): the lock is free at once.
        lock.acquire(wait=0.2)
        assert lock.holder() == str(os.getpid())
        lock.release()
