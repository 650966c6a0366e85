"""Every route of the agent API against a running agent with real components."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from keystone.api import ROUTES
from keystone.units import parse_duration
from tests.conftest import free_port, wait_until
from tests.integration.api.conftest import (
    DEMO,
    AgentProc,
    demo_env,
    pids,
    request,
    stop_agent,
    write_sleep_plan,
)

pytestmark = pytest.mark.integration

SLEEP_RECIPE = (
    '[metadata]\nname = "extra"\nversion = "1.0.0"\n'
    '[lifecycle.run.exec]\ncommand = "sleep"\nargs = ["3600"]\n'
)
EXTRA_PLAN = b'[[components]]\nname = "extra"\nrecipe = "extra:1.0.0"\n'


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def snapshot(agent: AgentProc) -> dict[str, Any]:
    """What a refused request must not change: components, plan status, recipes, history."""
    comps = {n: (c["state"], c["pid"], c["restarts"]) for n, c in agent.components().items()}
    status = agent.api("GET", "/v1/plan/status")[1]
    return {
        "components": comps,
        "plan": (status["status"], status["planPath"]),
        "recipes": agent.api("GET", "/v1/recipes")[1],
        "history": len(agent.api("GET", "/v1/history?limit=1000")[1]),
    }


class TestReads:
    def test_healthz(self, demo_agent: AgentProc) -> None:
        """/healthz needs no token and says status, uptime, time, version and applied revision."""
        status, body, _ = request(demo_agent, "GET", "/healthz", token=None)
        assert status == 200
        assert body["status"] == "ok" and body["uptime_seconds"] > 0
        assert parse_duration(body["uptime"]) == pytest.approx(body["uptime_seconds"], abs=1)
        assert {"closed", "clock_trusted", "clock_source", "time_utc", "version"} <= set(body)
        assert body["closed"] is False and body["clock_source"] in ("system", "high-water", "build")

    def test_components(self, demo_agent: AgentProc) -> None:
        """/v1/components has the Go fields for each component, with live pids."""
        status, body, _ = request(demo_agent, "GET", "/v1/components")
        assert status == 200
        assert sorted(c["name"] for c in body) == sorted(DEMO)
        for c in body:
            assert {"name", "state", "restarts", "last_health", "pid", "recipe", "version"} <= set(
                c
            )
            assert c["state"] == "running" and c["phase"] == "healthy"
            assert c["version"] == "1.0.0"
            assert Path(f"/proc/{c['pid']}").exists()
        assert {c["name"]: c["recipe"] for c in body}["db"] == "com.example.db"

    def test_plan_status(self, demo_agent: AgentProc) -> None:
        """/v1/plan/status has the Go fields and says running."""
        status, body, _ = request(demo_agent, "GET", "/v1/plan/status")
        assert status == 200
        assert {
            "planPath",
            "status",
            "error",
            "unknownFields",
            "components",
        } <= set(body)
        assert body["status"] == "running" and body["error"] is None
        assert sorted(c["name"] for c in body["components"]) == sorted(DEMO)

    def test_plan_graph(self, demo_agent: AgentProc) -> None:
        """/v1/plan/graph: Go's nodes, edges (dependency -> dependents) and flat order; our
        typed edges and start layers beside them."""
        status, body, _ = request(demo_agent, "GET", "/v1/plan/graph")
        assert status == 200
        assert sorted(body["nodes"]) == sorted(DEMO)
        assert body["edges"] == {"db": ["cache"], "cache": ["api"]}
        assert body["order"] == ["db", "cache", "api"]
        edges = {(e["from"], e["to"], e["type"]) for e in body["typedEdges"]}
        assert edges == {("cache", "db", "hard"), ("api", "cache", "hard")}
        assert body["layers"] == [["db"], ["cache"], ["api"]]

    def test_openapi(self, demo_agent: AgentProc) -> None:
        """/v1/openapi.json documents exactly the routes the agent serves."""
        status, doc, _ = request(demo_agent, "GET", "/v1/openapi.json")
        assert status == 200 and doc["openapi"].startswith("3.")
        documented = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
        assert documented == {(r.method, r.path) for r in ROUTES}

    def test_recipes_and_history_and_revision(self, demo_agent: AgentProc) -> None:
        """The store, the ledger and the revision answer 200 with JSON."""
        assert request(demo_agent, "GET", "/v1/recipes")[0] == 200
        status, history, _ = request(demo_agent, "GET", "/v1/history?limit=5")
        assert status == 200 and isinstance(history, list) and len(history) <= 5
        status, rev, _ = request(demo_agent, "GET", "/v1/revision")
        assert status == 200 and "applied" in rev


class TestMetrics:
    def test_parses_and_carries_the_names(self, demo_agent: AgentProc) -> None:
        """/metrics parses with prometheus-client's parser and carries the Go names and ours."""
        status, text, headers = request(demo_agent, "GET", "/metrics")
        assert status == 200 and headers["content-type"].startswith("text/plain")
        families = {f.name: f for f in text_string_to_metric_families(text)}
        samples = {s.name: s for f in families.values() for s in f.samples}
        for name in (
            "keystone_component_state",
            "keystone_component_state_health",
            "keystone_component_restarts_total",
            "keystone_component_healthy",
            "keystone_component_cpu_percent",
            "keystone_component_memory_rss_bytes",
            "keystone_reconcile_total",
            "keystone_clock_trusted",
            "keystone_build_info",
            "keystone_uptime_seconds",
            "keystone_deployments_total",
            "keystone_sync_last_timestamp_seconds",
            "keystone_artifact_cache_bytes",
        ):
            assert name in samples, f"{name} missing from /metrics"
        for family in ("keystone_rollbacks", "keystone_sync", "keystone_signature_failures"):
            assert family in families, f"{family} missing from /metrics"
        assert samples["keystone_uptime_seconds"].value > 0

    def test_per_component_series(self, demo_agent: AgentProc) -> None:
        """Each component has its state, health, CPU and RSS (the RSS its /proc says)."""
        _, text, _ = request(demo_agent, "GET", "/metrics")
        series: dict[str, dict[str, float]] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name.startswith("keystone_component_"):
                    who = s.labels.get("name") or s.labels.get("component", "")
                    key = s.name + (f"[{s.labels['state']}]" if "state" in s.labels else "")
                    series.setdefault(who, {})[key] = s.value
        comps = demo_agent.components()
        assert set(series) == set(DEMO)
        for name, c in comps.items():
            got = series[name]
            assert got["keystone_component_state[running]"] == 1
            assert got["keystone_component_state[stopped]"] == 0
            assert got["keystone_component_healthy"] == 1
            assert got["keystone_component_cpu_percent"] >= 0
            rss = got["keystone_component_memory_rss_bytes"]
            # The same process, sampled a moment apart: within a factor of two.
            assert rss_bytes(c["pid"]) / 2 < rss < rss_bytes(c["pid"]) * 2
        build = [
            s
            for f in text_string_to_metric_families(text)
            for s in f.samples
            if s.name == "keystone_build_info"
        ]
        assert build and build[0].labels["version"]


class TestRefusedRequestsChangeNothing:
    MUTATIONS: tuple[tuple[str, str, bytes | None], ...] = (
        ("POST", "/v1/components/db:stop", None),
        ("POST", "/v1/components/cache:restart", None),
        ("POST", "/v1/plan/stop", None),
        ("POST", "/v1/plan/apply", EXTRA_PLAN),
        ("POST", "/v1/plan/reconcile", None),
        ("POST", "/v1/recipes", SLEEP_RECIPE.encode()),
        ("DELETE", "/v1/recipes/extra/1.0.0", None),
    )

    @pytest.mark.parametrize("token", [None, "wrong-token"], ids=["no-token", "wrong-token"])
    def test_without_the_token_401_and_nothing_changes(
        self, demo_agent: AgentProc, token: str | None
    ) -> None:
        """Every route but /healthz answers 401 without the right token and changes nothing."""
        before = snapshot(demo_agent)
        for method, path, body in self.MUTATIONS:
            status, answer, headers = request(demo_agent, method, path, body, token=token)
            assert status == 401, (path, answer)
            assert headers["www-authenticate"].startswith("Bearer")
        for path in ("/v1/components", "/metrics", "/v1/openapi.json", "/v1/plan/status"):
            assert request(demo_agent, "GET", path, token=token)[0] == 401
        assert snapshot(demo_agent) == before

    def test_unknown_component_is_404_and_not_created(self, demo_agent: AgentProc) -> None:
        """Stopping or restarting an unknown component is 404 and leaves no placeholder."""
        before = snapshot(demo_agent)
        for path in (
            "/v1/components/ghost:stop",
            "/v1/components/ghost:restart",
            "/v1/components/ghost:restart?dry=true",
        ):
            status, body, _ = request(demo_agent, "POST", path)
            assert status == 404, body
            assert "ghost" in body["error"]
        assert snapshot(demo_agent) == before

    @pytest.mark.parametrize(
        ("path", "body"),
        [
            ("/v1/plan/apply", b'{"plan": "x"'),
            ("/v1/recipes", b'{"recipe": 1,,}'),
            ("/v1/plan/reconcile", b"{oops"),
            ("/v1/components/db:stop", b'{"x": }'),
        ],
    )
    def test_malformed_json_is_400_with_the_reason(
        self, demo_agent: AgentProc, path: str, body: bytes
    ) -> None:
        """Malformed JSON is 400 with the parser's reason and position; nothing changes."""
        before = snapshot(demo_agent)
        status, data, _ = request(
            demo_agent, "POST", path, body, headers={"Content-Type": "application/json"}
        )
        assert status == 400, data
        assert "JSON" in data["error"] and "column" in data["error"]
        assert snapshot(demo_agent) == before

    def test_plan_paths_that_leave_the_working_directory_are_refused(
        self, demo_agent: AgentProc, tmp_path: Path
    ) -> None:
        """A JSON planPath is refused (the API never reads a plan file a client names); a plan
        naming a recipe file through ``..``, through a symlink out of the agent's working
        directory, or a file that is not there is refused with the field, and nothing changes."""
        before = snapshot(demo_agent)
        (tmp_path / "x.recipe.toml").write_text(SLEEP_RECIPE)
        link = demo_agent.cwd / "outside-link"
        if not link.exists():
            link.symlink_to(tmp_path)
        status, data, _ = request(
            demo_agent,
            "POST",
            "/v1/plan/apply",
            json.dumps({"planPath": str(tmp_path / "plan.toml")}).encode(),
            headers={"Content-Type": "application/json"},
        )
        assert status == 400 and "planPath" in data["error"]
        for ref, words in (
            (f"../{tmp_path.name}/x.recipe.toml", "escapes"),
            ("outside-link/x.recipe.toml", "escapes"),
            ("recipes/missing.recipe.toml", "not found"),
        ):
            body = f'[[components]]\nname = "x"\nrecipe = "{ref}"\n'.encode()
            status, data, _ = request(demo_agent, "POST", "/v1/plan/apply", body)
            assert status == 400 and words in data["error"], (ref, data)
            assert "recipe" in data["error"]
        assert snapshot(demo_agent) == before

    def test_body_over_4_mib_is_413(self, demo_agent: AgentProc) -> None:
        """A request body over 4 MiB is 413 and nothing changes."""
        before = snapshot(demo_agent)
        status, data, _ = request(demo_agent, "POST", "/v1/recipes", b"#" * ((4 << 20) + 1))
        assert status == 413, data
        assert snapshot(demo_agent) == before

    def test_wrong_method_is_405(self, demo_agent: AgentProc) -> None:
        """A wrong method is 405 with Allow."""
        status, _, headers = request(demo_agent, "DELETE", "/v1/plan/status")
        assert status == 405 and "GET" in headers["allow"]


class TestGitOpsRoutesWithoutSource:
    def test_datasets_sync_suspend_resume_rollback_import(self, demo_agent: AgentProc) -> None:
        """Without a [source] the GitOps routes answer clearly and touch no component."""
        before = pids(demo_agent)
        assert request(demo_agent, "GET", "/v1/datasets")[:2] == (200, [])
        assert request(demo_agent, "POST", "/v1/datasets:refresh")[0] == 200
        for path in ("/v1/sync", "/v1/suspend", "/v1/resume"):
            status, body, _ = request(demo_agent, "POST", path)
            assert status == 400 and "[source]" in body["error"], (path, body)
        status, body, _ = request(demo_agent, "POST", "/v1/rollback")
        assert status == 200 and body["result"] == "refused"
        assert "known-good" in body["error"]
        status, body, _ = request(demo_agent, "POST", "/v1/bundles:import", b"not a bundle")
        assert status in (200, 422) and body["result"] == "refused", body
        assert request(demo_agent, "GET", "/v1/history?limit=0")[0] == 400
        assert pids(demo_agent) == before


class TestRestart:
    def test_dry_run_orders_and_changes_nothing(self, demo_agent: AgentProc) -> None:
        """?dry=true answers the stop and start order and restarts nothing."""
        before = pids(demo_agent)
        status, body, _ = request(demo_agent, "POST", "/v1/components/cache:restart?dry=true")
        assert status == 200
        assert body == {"stopOrder": ["api"], "startOrder": ["cache", "api"]}
        assert pids(demo_agent) == before

    def test_stop_dry_run_names_what_depends_on_it(self, demo_agent: AgentProc) -> None:
        """:stop?dry=true (an addition) names the component and its direct dependents."""
        before = pids(demo_agent)
        status, body, _ = request(demo_agent, "POST", "/v1/components/cache:stop?dry=true")
        assert status == 200 and body == {"stopOrder": ["cache"], "dependents": ["api"]}
        assert pids(demo_agent) == before

    def test_wait_health_restarts_it_and_its_dependents(self, demo_agent: AgentProc) -> None:
        """wait=health answers once the component is healthy again, with its new pid."""
        before = pids(demo_agent)
        status, body, _ = request(
            demo_agent, "POST", "/v1/components/cache:restart?wait=health&timeout=60s"
        )
        assert status == 200, body
        assert body["component"] == "cache" and set(body["dependents"]) == {"api"}
        assert (body["wait"], body["timeout"]) == ("health", "1m0s")
        assert body["pid"] != before["cache"]
        comps = demo_agent.wait_states(dict.fromkeys(DEMO, "healthy"))
        assert body["dependents"]["api"] == comps["api"]["pid"]
        assert comps["cache"]["pid"] == body["pid"]
        assert comps["db"]["pid"] == before["db"]
        assert comps["api"]["pid"] != before["api"]

    def test_stop_then_restart_with_wait_pid(self, demo_agent: AgentProc) -> None:
        """:stop is 204 and leaves it stopped; :restart?wait=pid starts it with a new pid."""
        before = pids(demo_agent)
        status, body, _ = request(demo_agent, "POST", "/v1/components/api:stop")
        assert status == 204 and body is None
        comps = demo_agent.components()
        assert comps["api"]["state"] == "stopped" and comps["api"]["pid"] == 0
        assert comps["api"]["last_health"] == "unknown"
        assert not Path(f"/proc/{before['api']}").exists() or _zombie_or_gone(before["api"])
        status, body, _ = request(demo_agent, "POST", "/v1/components/api:restart?wait=pid")
        assert status == 200 and body["pid"] not in (0, before["api"])
        assert (body["dependents"], body["wait"], body["timeout"]) == ({}, "pid", "1m0s")
        demo_agent.wait_states(dict.fromkeys(DEMO, "healthy"))

    def test_reconcile_answers_what_it_repaired(self, demo_agent: AgentProc) -> None:
        """/v1/plan/reconcile with everything running repairs nothing."""
        demo_agent.wait_states(dict.fromkeys(DEMO, "healthy"))
        status, body, _ = request(demo_agent, "POST", "/v1/plan/reconcile")
        assert status == 200 and body["skipped"] is False and "repaired" not in body
        assert parse_duration(body["duration"]) >= 0
        plan = request(demo_agent, "GET", "/v1/plan/status")[1]
        assert plan["lastReconcile"].endswith("Z") and plan["lastReconcileResult"] == "ok"

    def test_timeout_is_504(self, demo_agent: AgentProc) -> None:
        """A restart that does not finish within ?timeout answers 504."""
        status, body, _ = request(
            demo_agent, "POST", "/v1/components/api:restart?wait=health&timeout=1ms"
        )
        assert status == 504, body
        assert "1ms" in body["error"] or "0.001" in body["error"]

    def test_a_timed_out_restart_still_completes(self, make_agent: Any) -> None:
        """After a 504, the restart goes on: every component is healthy again."""
        agent = make_agent("--demo", env=demo_env()).start()
        agent.wait_states(dict.fromkeys(DEMO, "healthy"))
        status, _, _ = request(
            agent, "POST", "/v1/components/cache:restart?wait=health&timeout=1ms"
        )
        assert status == 504
        # Unfixed, it never recovers; fixed, it takes about a second.
        agent.wait_states(dict.fromkeys(DEMO, "healthy"), timeout=8)


def _zombie_or_gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


class TestStoreApplyStop:
    def test_recipe_store_apply_and_stop_plan(self, make_agent: Any) -> None:
        """Upload (201, 409, force 201), dry apply (202, nothing changes), apply (202, the new
        plan runs), delete (409 in use, 204, 404), stop-plan (204, stays stopped on restart)."""
        agent = make_agent("--demo", env=demo_env()).start()
        agent.wait_states(dict.fromkeys(DEMO, "healthy"))
        demo_pids = pids(agent)
        recipe = SLEEP_RECIPE.encode()

        status, body, _ = request(agent, "POST", "/v1/recipes", recipe)
        assert status == 201
        assert (body["status"], body["name"], body["version"]) == ("created", "extra", "1.0.0")
        assert request(agent, "POST", "/v1/recipes", recipe)[0] == 409
        assert request(agent, "POST", "/v1/recipes?force=true", recipe)[0] == 201
        other = recipe.replace(b'"extra"', b'"spare"')
        assert request(agent, "POST", "/v1/recipes", other)[0] == 201
        assert request(agent, "GET", "/v1/recipes")[1] == ["extra-1.0.0.toml", "spare-1.0.0.toml"]
        detail = request(agent, "GET", "/v1/recipes?detail=true")[1]
        assert {(r["name"], r["version"]) for r in detail} == {
            ("extra", "1.0.0"),
            ("spare", "1.0.0"),
        }

        status, body, _ = request(agent, "POST", "/v1/plan/apply?dry=true", EXTRA_PLAN)
        assert status == 202 and body["status"] == "dry-run"
        actions = {(a["action"], a["component"]) for a in body["actions"]}
        assert ("start", "extra") in actions
        assert {("stop", n) for n in DEMO} <= actions
        # A dry run changes neither what runs nor the saved plan and status (a Go flaw).
        assert pids(agent) == demo_pids
        plan = request(agent, "GET", "/v1/plan/status")[1]
        assert (plan["status"], plan["planPath"]) == ("running", "demo")

        status, body, _ = request(agent, "POST", "/v1/plan/apply", EXTRA_PLAN)
        assert status == 202, body
        wait_until(
            lambda: (
                set(agent.components()) == {"extra"}
                and agent.components()["extra"]["phase"] == "healthy"
            ),
            timeout=30,
            what="the applied plan",
        )
        assert all(_zombie_or_gone(p) for p in demo_pids.values() if p)
        graph = request(agent, "GET", "/v1/plan/graph")[1]
        assert graph["nodes"] == ["extra"] and graph["order"] == ["extra"]
        assert graph["edges"] == {}

        status, body, _ = request(agent, "DELETE", "/v1/recipes/extra/1.0.0")
        assert status == 409 and "extra" in body["error"]
        assert request(agent, "DELETE", "/v1/recipes/spare/1.0.0")[0] == 204
        assert request(agent, "DELETE", "/v1/recipes/spare/1.0.0")[0] == 404

        extra_pid = agent.components()["extra"]["pid"]
        status, body, _ = request(agent, "POST", "/v1/plan/stop")
        assert status == 204 and body is None
        assert agent.components()["extra"]["state"] == "stopped"
        assert _zombie_or_gone(extra_pid)
        assert request(agent, "GET", "/v1/plan/status")[1]["status"] == "stopped"

        # A stopped plan stays stopped across an agent restart.
        stop_agent(agent)
        again = AgentProc(agent.cwd, agent.runtime, agent.port, [], agent.env)
        again.start()
        try:
            assert request(again, "GET", "/v1/plan/status")[1]["status"] == "stopped"
            assert all(c["pid"] == 0 for c in again.components().values())
        finally:
            stop_agent(again)
        assert os.path.exists(agent.runtime / "api.token")


class TestMetricsFollowThePlan:
    def test_removed_component_leaves_metrics(self, make_agent: Any, tmp_path: Path) -> None:
        """After a plan without it is applied, a component has no series in /metrics."""
        plan = write_sleep_plan(tmp_path, 2, prefix="m")
        agent = make_agent("--apply", str(plan)).start()
        agent.wait_states({"m00": "healthy", "m01": "healthy"})
        recipe = (tmp_path / "m00.recipe.toml").read_bytes()
        assert request(agent, "POST", "/v1/recipes", recipe)[0] == 201
        body = b'[[components]]\nname = "m00"\nrecipe = "m00:1.0.0"\n'
        assert request(agent, "POST", "/v1/plan/apply", body)[0] == 202
        wait_until(lambda: set(agent.components()) == {"m00"}, timeout=30, what="m01 removed")
        _, text, _ = request(agent, "GET", "/metrics")
        named = {
            s.labels["name"]
            for f in text_string_to_metric_families(text)
            for s in f.samples
            if s.name.startswith("keystone_component_")
        }
        assert named == {"m00"}


class TestRefusedApplyIsLogged:
    def test_the_journal_names_why_an_api_apply_was_refused(
        self, make_agent: Any, tmp_path: Path
    ) -> None:
        """An API apply refused while it runs (its artifact cannot be fetched) is answered in
        its operation and also said in the agent's log; what ran keeps running."""
        plan = write_sleep_plan(tmp_path, 1, prefix="k")
        # A short download deadline: the refusal comes after it, not after a minute of retries.
        env = {"KEYSTONE_ARTIFACT_DOWNLOAD_TIMEOUT": "2s"}
        agent = make_agent("--apply", str(plan), env=env).start()
        agent.wait_states({"k00": "healthy"})
        before = pids(agent)
        closed = free_port()  # nothing listens there
        uri = f"http://127.0.0.1:{closed}/missing.bin"
        recipe = (
            '[metadata]\nname = "unfetchable"\nversion = "1.0.0"\n'
            f'[[artifacts]]\nuri = "{uri}"\nsha256 = "{"0" * 64}"\n'
            '[lifecycle.run.exec]\ncommand = "sleep"\nargs = ["3600"]\n'
        )
        assert request(agent, "POST", "/v1/recipes", recipe.encode())[0] == 201
        body = b'[[components]]\nname = "unfetchable"\nrecipe = "unfetchable:1.0.0"\n'
        status, reply, _ = request(agent, "POST", "/v1/plan/apply", body)
        assert status == 202, reply
        status, op, _ = request(agent, "GET", f"/v1/operations/{reply['operation']}?wait=120s")
        assert status == 200 and op["result"]["result"] == "refused", op
        wait_until(
            lambda: "refused" in agent.output() and uri in agent.output(),
            timeout=30,
            what="the refusal in the agent's log",
        )
        line = next(x for x in agent.output().splitlines() if "plan apply" in x)
        assert "WARNING" in line and reply["operation"] in line and uri in line
        assert pids(agent) == before
