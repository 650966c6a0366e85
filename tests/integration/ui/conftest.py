"""A real agent with a small plan (four components, every dependency type), and a browser."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import free_port
from tests.integration.agent.conftest import AgentProc, make_agent  # noqa: F401 (fixture)
from tests.integration.ui.cdp import CHROMIUM, Browser


def _recipe(name: str, port: int, deps: list[tuple[str, str]], needs: str = "") -> str:
    lines = [
        "[metadata]",
        f'name = "com.example.{name}"',
        'version = "1.0.0"',
        "",
    ]
    for dep, kind in deps:
        lines += ["[[dependencies]]", f'name = "com.example.{dep}"', f'type = "{kind}"', ""]
    args = f'["-m", "keystone.demo.service", "--name", "{name}", "--port", "{port}"'
    args += f', "--needs", "{needs}"]' if needs else "]"
    lines += [
        "[lifecycle.run]",
        'restart_policy = "on-failure"',
        "",
        "[lifecycle.run.exec]",
        'command = "${KEYSTONE_PYTHON}"',
        f"args = {args}",
        "",
        "[lifecycle.run.health]",
        f'check = "tcp://127.0.0.1:{port}"',
        'interval = "1s"',
        'timeout = "2s"',
        'start_timeout = "20s"',
    ]
    return "\n".join(lines) + "\n"


def write_small_plan(root: Path) -> Path:
    """db <- cache (hard) <- api (hard); api -> metrics (soft); metrics -> db (ordering)."""
    ports = {n: free_port() for n in ("db", "cache", "api", "metrics")}
    recipes = {
        "db": _recipe("db", ports["db"], []),
        "metrics": _recipe("metrics", ports["metrics"], [("db", "ordering")]),
        "cache": _recipe(
            "cache", ports["cache"], [("db", "hard")], f"http://127.0.0.1:{ports['db']}/healthz"
        ),
        "api": _recipe("api", ports["api"], [("cache", "hard"), ("metrics", "soft")]),
    }
    plan = []
    for name, text in recipes.items():
        (root / f"{name}.recipe.toml").write_text(text)
        plan += ["[[components]]", f'name = "{name}"', f'recipe = "{name}.recipe.toml"', ""]
    path = root / "plan.toml"
    path.write_text("\n".join(plan))
    return path


@pytest.fixture
def plan_agent(make_agent: Any, tmp_path: Path) -> AgentProc:  # noqa: F811
    """A running agent with the small plan applied and healthy."""
    plan = write_small_plan(tmp_path)
    agent: AgentProc = make_agent("--apply", str(plan)).start()
    agent.wait_states({n: "healthy" for n in ("db", "cache", "api", "metrics")}, timeout=60)
    return agent


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Browser]:
    if CHROMIUM is None:
        pytest.skip("chromium is not installed: run scripts/setup-test-deps")
    b = Browser(tmp_path / "chromium-profile")
    try:
        yield b
    finally:
        b.close()
