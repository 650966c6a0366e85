"""Operation ids: every change the API accepts names its operation, which the agent reports on."""

from __future__ import annotations

from typing import Any

import pytest

from keystone.client import Client

from .conftest import AgentProc, request

pytestmark = pytest.mark.integration


def operation(agent: AgentProc, op_id: str, wait: str = "20s") -> dict[str, Any]:
    status, body, _ = request(agent, "GET", f"/v1/operations/{op_id}?wait={wait}")
    assert status == 200, body
    data: dict[str, Any] = body
    return data


class TestOperations:
    def test_restart_names_its_operation(self, demo_agent: AgentProc) -> None:
        """A restart reply keeps its keys and adds the operation; the operation is done with it."""
        status, body, _ = request(demo_agent, "POST", "/v1/components/db:restart?wait=health")
        assert status == 200, body
        assert {"component", "pid", "dependents", "operation"} <= set(body)
        op = operation(demo_agent, body["operation"])
        assert op["state"] == "done" and op["kind"] == "restart"
        assert op["result"]["component"] == "db" and op["result"]["pid"] == body["pid"]
        demo_agent.wait_states(dict.fromkeys(("db", "cache", "api"), "healthy"))

    def test_stop_keeps_204_and_names_its_operation_in_a_header(
        self, demo_agent: AgentProc
    ) -> None:
        """A stop answers 204 as the Go agent does; the Keystone-Operation header names it."""
        status, body, headers = request(demo_agent, "POST", "/v1/components/api:stop")
        assert status == 204 and not body
        op = operation(demo_agent, headers["keystone-operation"])
        assert op["state"] == "done" and op["result"] == {"component": "api", "result": "stopped"}
        status, body, _ = request(demo_agent, "POST", "/v1/components/api:restart?wait=health")
        assert status == 200, body

    def test_unknown_operation_is_404(self, demo_agent: AgentProc) -> None:
        """An id the agent never gave (or forgot) is 404."""
        status, body, _ = request(demo_agent, "GET", "/v1/operations/op-nope-1")
        assert status == 404 and "op-nope-1" in body["error"]

    def test_client_waits_on_the_server(self, demo_agent: AgentProc) -> None:
        """Client.wait_operation returns the finished operation (a long poll, no sleep loop)."""
        status, body, _ = request(demo_agent, "POST", "/v1/components/cache:restart")
        assert status == 200, body
        with Client(demo_agent.addr, demo_agent.token()) as client:
            op = client.wait_operation(body["operation"], timeout=30)
        assert op["state"] == "done" and op["result"]["component"] == "cache"
        demo_agent.wait_states(dict.fromkeys(("db", "cache", "api"), "healthy"))


SLEEP_RECIPE = (
    '[metadata]\nname = "extra"\nversion = "1.0.0"\n'
    '[lifecycle.run.exec]\ncommand = "sleep"\nargs = ["3600"]\n'
)
EXTRA_PLAN = b'[[components]]\nname = "extra"\nrecipe = "extra:1.0.0"\n'


class TestPlanApply:
    def test_apply_names_its_operation_and_the_operation_has_the_outcome(
        self, make_agent: Any
    ) -> None:
        """POST /v1/plan/apply answers 202 with its operation; the operation ends with the
        history entry of the deployment (what `keystone apply --wait` reports)."""
        agent = make_agent().start()
        status, body, _ = request(agent, "POST", "/v1/recipes", SLEEP_RECIPE.encode())
        assert status == 201, body
        status, body, _ = request(agent, "POST", "/v1/plan/apply", EXTRA_PLAN)
        assert status == 202 and body["status"] == "applying", body
        assert body["changes"]["added"] == ["extra"] and body["operation"]
        op = operation(agent, body["operation"])
        assert op["kind"] == "apply" and op["state"] == "done"
        result = op["result"]
        assert result["kind"] == "apply" and result["result"] == "ok"
        assert result["operation"] == body["operation"] and result["source"] == "api"
        entries = [h for h in agent.api("GET", "/v1/history")[1] if h["kind"] == "apply"]
        assert entries[0]["result"] == "ok"
        status, body, headers = request(agent, "POST", "/v1/plan/stop")
        assert status == 204 and not body
        op = operation(agent, headers["keystone-operation"])
        assert op["kind"] == "stop-plan" and op["result"]["kind"] == "stop-plan"
        assert agent.components()["extra"]["state"] == "stopped"
