"""The Go Keystone's request collection (its bruno/ directory), replayed against a real agent:
the same methods, paths, query strings and bodies, and the keys and values its handlers answer
(internal/adapter/http, internal/adapter/adapter.go). The one difference on purpose: this agent
always wants its bearer token (bruno's ``auth: none`` works against a Go agent without one)."""

from __future__ import annotations

import json
import os
import re
import signal
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import wait_until
from tests.integration.api.conftest import AgentProc, request

pytestmark = pytest.mark.integration

GO_DURATION = re.compile(r"^(\d+h)?(\d+m)?\d+(\.\d+)?(s|ms|µs|ns)$")
RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")

# bruno/Upload Recipe.bru, byte for byte.
HELLO = """[metadata]
name = "com.example.hello"
version = "1.0.0"
description = "Hello world recipe"
[lifecycle.run.exec]
command = "echo"
args = ["hello from remote"]
"""

# What bruno/Apply Plan.bru names (com.keystone.server:1.0.0), as a long-running process.
SERVER = """[metadata]
name = "com.keystone.server"
version = "1.0.0"
[lifecycle.run]
restart_policy = "always"
[lifecycle.run.exec]
command = "sleep"
args = ["3600"]
[lifecycle.run.health]
check = "cmd:true"
interval = "200ms"
"""

# bruno/Apply Plan.bru's body.
APPLY = b'[[components]]\nname = "keystone-server"\nrecipe = "com.keystone.server:1.0.0"\n'

COMPONENT_KEYS = {"name", "state", "restarts", "last_health", "pid", "recipe", "version"}


def go_component(c: dict[str, Any]) -> None:
    """One store.ComponentInfo: Go's keys, Go's values."""
    assert set(c) >= COMPONENT_KEYS, c
    assert c["state"] in ("none", "stopped", "running", "failed"), c
    assert c["last_health"] in ("healthy", "unhealthy", "unknown"), c
    assert isinstance(c["pid"], int) and isinstance(c["restarts"], int), c
    if c["state"] == "running" and c["pid"]:
        assert Path(f"/proc/{c['pid']}").exists()
    else:
        assert c["pid"] == 0 and c["last_health"] == "unknown", c


def running_series(agent: AgentProc) -> dict[str, dict[str, float]]:
    """``keystone_component_state`` per component and state."""
    status, text, _ = request(agent, "GET", "/metrics")
    assert status == 200
    out: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "keystone_component_state":
                out.setdefault(s.labels["name"], {})[s.labels["state"]] = s.value
    return out


def server(agent: AgentProc) -> dict[str, Any]:
    return agent.components()["keystone-server"]


def test_the_bruno_collection(make_agent: Any) -> None:
    agent: AgentProc = make_agent().start()

    # Health.bru: GET /healthz, no auth.
    status, health, _ = request(agent, "GET", "/healthz", token=None)
    assert status == 200
    assert {"status", "uptime", "closed", "time_utc", "clock_trusted", "clock_source"} <= set(
        health
    )
    assert health["status"] == "ok" and GO_DURATION.match(health["uptime"]), health
    assert health["closed"] is False and isinstance(health["clock_trusted"], bool)
    assert health["clock_source"] in ("system", "high-water", "build")
    assert RFC3339.match(health["time_utc"])

    # Get Info.bru: GET / answers Go's line of text.
    status, text, headers = request(agent, "GET", "/")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    assert text == "Keystone agent is running. See /healthz, /metrics and /v1/components\n"

    # Upload Recipe.bru: 201 {status, name, version}; the same again is a conflict (409).
    status, body, _ = request(agent, "POST", "/v1/recipes", HELLO.encode())
    assert status == 201, body
    assert {k: body[k] for k in ("status", "name", "version")} == {
        "status": "created",
        "name": "com.example.hello",
        "version": "1.0.0",
    }
    assert request(agent, "POST", "/v1/recipes", HELLO.encode())[0] == 409
    assert request(agent, "POST", "/v1/recipes?force=true", HELLO.encode())[0] == 201
    assert request(agent, "POST", "/v1/recipes", SERVER.encode())[0] == 201

    # Get Recipes.bru: the store's file names.
    status, recipes, _ = request(agent, "GET", "/v1/recipes")
    assert status == 200
    assert recipes == ["com.example.hello-1.0.0.toml", "com.keystone.server-1.0.0.toml"]

    # Apply Plan JSON.bru: a planPath is refused (400), nothing changes.
    body = json.dumps({"planPath": "configs/examples/plan.toml", "dry": False}).encode()
    status, data, _ = request(
        agent, "POST", "/v1/plan/apply", body, headers={"Content-Type": "application/json"}
    )
    assert status == 400 and "planPath" in data["error"]
    assert agent.components() == {}

    # Apply Plan.bru: the plan TOML as a text body, ?dry=false: 202.
    status, _, _ = request(
        agent, "POST", "/v1/plan/apply?dry=false", APPLY, headers={"Content-Type": "text/plain"}
    )
    assert status == 202
    # The apply runs in the background here (Go's answers when it is done): wait for it.
    wait_until(
        lambda: request(agent, "GET", "/v1/plan/status")[1]["status"] == "running",
        timeout=30,
        what="the plan running",
    )
    wait_until(lambda: server(agent)["last_health"] == "healthy", timeout=30, what="healthy")

    # Get Components.bru.
    status, comps, _ = request(agent, "GET", "/v1/components")
    assert status == 200 and [c["name"] for c in comps] == ["keystone-server"]
    for c in comps:
        go_component(c)
    c = comps[0]
    assert (c["state"], c["last_health"], c["version"]) == ("running", "healthy", "1.0.0")
    assert running_series(agent)["keystone-server"] == {
        "none": 0,
        "stopped": 0,
        "running": 1,
        "failed": 0,
    }

    # Get Plan Status.bru: PlanStatus; no reconcile has run, so its keys are absent (omitempty).
    status, plan, _ = request(agent, "GET", "/v1/plan/status")
    assert status == 200
    assert {"planPath", "status", "components"} <= set(plan)
    assert plan["status"] == "running" and "lastReconcile" not in plan
    assert [c["name"] for c in plan["components"]] == ["keystone-server"]

    # Get Plan Graph.bru: GraphInfo.
    status, graph, _ = request(agent, "GET", "/v1/plan/graph")
    assert status == 200
    assert (graph["nodes"], graph["edges"], graph["order"]) == (
        ["keystone-server"],
        {},
        ["keystone-server"],
    )

    # Restart Component.bru: ?dry=true (its disabled query), then ?wait=health&timeout=60s.
    status, dry, _ = request(agent, "POST", "/v1/components/keystone-server:restart?dry=true")
    assert status == 200 and dry == {"stopOrder": [], "startOrder": ["keystone-server"]}
    before = server(agent)["pid"]
    status, restarted, _ = request(
        agent, "POST", "/v1/components/keystone-server:restart?wait=health&timeout=60s"
    )
    assert status == 200, restarted
    assert {k: restarted[k] for k in ("component", "dependents", "wait", "timeout")} == {
        "component": "keystone-server",
        "dependents": {},
        "wait": "health",
        "timeout": "1m0s",
    }
    assert restarted["pid"] not in (0, before) and server(agent)["pid"] == restarted["pid"]

    # Stop Component.bru: 204; stopped, pid 0, last_health unknown; Go's alert selects it.
    status, body, _ = request(agent, "POST", "/v1/components/keystone-server:stop")
    assert status == 204 and body is None
    go_component(server(agent))
    assert server(agent)["state"] == "stopped"
    series = wait_until(
        lambda: s if (s := running_series(agent))["keystone-server"]["stopped"] == 1 else None,
        timeout=10,
        what="the stopped series",
    )
    assert series["keystone-server"]["running"] == 0  # KeystoneComponentDown fires

    # POST /v1/plan/reconcile (keystonectl reconcile): ReconcileResult.
    status, rec, _ = request(agent, "POST", "/v1/plan/reconcile")
    assert status == 200 and rec["skipped"] is False and GO_DURATION.match(rec["duration"])
    plan = request(agent, "GET", "/v1/plan/status")[1]
    assert RFC3339.match(plan["lastReconcile"]) and plan["lastReconcileResult"]
    request(agent, "POST", "/v1/components/keystone-server:restart?wait=pid")
    assert server(agent)["state"] == "running"

    # Stop Plan.bru: 204; a reconcile of a stopped plan is skipped, with the reason.
    status, body, _ = request(agent, "POST", "/v1/plan/stop")
    assert status == 204 and body is None
    assert request(agent, "GET", "/v1/plan/status")[1]["status"] == "stopped"
    status, rec, _ = request(agent, "POST", "/v1/plan/reconcile")
    assert status == 200 and rec["skipped"] is True and "stopped" in rec["reason"]
    plan = request(agent, "GET", "/v1/plan/status")[1]
    assert plan["lastReconcileResult"].startswith("skipped: ")
    go_component(server(agent))

    # Delete Recipe.bru: 204, then it is gone from the list.
    status, body, _ = request(agent, "DELETE", "/v1/recipes/com.example.hello/1.0.0")
    assert status == 204 and body is None
    assert request(agent, "GET", "/v1/recipes")[1] == ["com.keystone.server-1.0.0.toml"]

    # Metrics.bru: the exposition parses (checked above) and says stopped.
    assert running_series(agent)["keystone-server"]["stopped"] == 1


def test_a_posted_plan_names_recipe_files_on_the_device(make_agent: Any, tmp_path: Path) -> None:
    """``curl --data-binary @plan.toml`` with a plan naming recipe files, as Go's docs show:
    relative to the agent's working directory, or absolute."""
    agent: AgentProc = make_agent().start()
    relative = agent.cwd / "configs" / "examples" / "com.keystone.server.recipe.toml"
    relative.parent.mkdir(parents=True)
    relative.write_text(SERVER)
    elsewhere = tmp_path.parent / f"{tmp_path.name}-opt" / "hello.recipe.toml"
    elsewhere.parent.mkdir()
    elsewhere.write_text(SERVER.replace("com.keystone.server", "com.example.other"))
    body = (
        '[[components]]\nname = "keystone-server"\n'
        'recipe = "configs/examples/com.keystone.server.recipe.toml"\n'
        f'[[components]]\nname = "other"\nrecipe = "{elsewhere}"\n'
    ).encode()
    status, reply, _ = request(agent, "POST", "/v1/plan/apply", body)
    assert status == 202, reply
    comps = agent.wait_states({"keystone-server": "healthy", "other": "healthy"})
    assert {n: c["state"] for n, c in comps.items()} == {
        "keystone-server": "running",
        "other": "running",
    }
    # the plan is reported running once its deployment is recorded, a loop turn after the
    # components are healthy
    wait_until(
        lambda: request(agent, "GET", "/v1/plan/status")[1]["status"] == "running",
        what="plan status running",
    )


def test_a_reconcile_repair_is_counted_by_component(make_agent: Any, tmp_path: Path) -> None:
    """Go's ``KeystoneComponentRepeatedlyRepaired`` alert reads
    ``keystone_reconcile_repairs_total`` and names ``$labels.component``: a component that
    died with no restart left is started again by ``POST /v1/plan/reconcile`` and counted
    under its name."""
    (tmp_path / "once.recipe.toml").write_text(
        '[metadata]\nname = "once"\nversion = "1.0.0"\n'
        '[lifecycle.run]\nrestart_policy = "never"\n'
        '[lifecycle.run.exec]\ncommand = "sleep"\nargs = ["3600"]\n'
    )
    plan = tmp_path / "plan.toml"
    plan.write_text('[[components]]\nname = "once"\nrecipe = "once.recipe.toml"\n')
    agent: AgentProc = make_agent("--apply", str(plan)).start()
    agent.wait_states({"once": "healthy"})
    os.kill(agent.components()["once"]["pid"], signal.SIGKILL)
    # Go's state says "stopped" as soon as the pid is gone; the supervisor has taken the exit
    # (and so a reconcile may repair it) once its phase is failed (no restart left).
    wait_until(
        lambda: agent.components()["once"]["phase"] == "failed",
        timeout=30,
        what="the killed component failed",
    )
    assert agent.components()["once"]["state"] != "running"
    status, rec, _ = request(agent, "POST", "/v1/plan/reconcile")
    assert status == 200 and rec["repaired"] == ["once"], rec
    _, text, _ = request(agent, "GET", "/metrics")
    repairs = {
        s.labels.get("component"): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == "keystone_reconcile_repairs_total"
    }
    assert repairs == {"once": 1.0}
