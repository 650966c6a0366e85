"""Twenty concurrent clients against an agent running fifty real components."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.api.conftest import request, write_sleep_plan

pytestmark = pytest.mark.integration

COMPONENTS = 50
CLIENTS = 20
# Restarts run one at a time, each until its component is ready again (1 s for one without a
# health check): eight concurrent ones show the same as twenty, in a third of the time.
RESTARTS = 8


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


class TestConcurrentClients:
    def test_twenty_clients_get_consistent_answers(self, make_agent: Any, tmp_path: Path) -> None:
        """Concurrent reads agree with each other, and concurrent restarts of eight different
        components each happen exactly once, with the answers matching what the agent reports."""
        plan = write_sleep_plan(tmp_path, COMPONENTS)
        agent = make_agent("--apply", str(plan)).start()
        names = [f"s{i:02d}" for i in range(COMPONENTS)]
        agent.wait_states(dict.fromkeys(names, "healthy"), timeout=60)
        before = agent.components()

        def reader(_: int) -> list[str]:
            out = []
            for path in ("/v1/components", "/v1/plan/status", "/v1/components"):
                status, body, _ = request(agent, "GET", path)
                assert status == 200, body
                out.append(json.dumps(body, sort_keys=True))
            return out

        with ThreadPoolExecutor(CLIENTS) as pool:
            answers = list(pool.map(reader, range(CLIENTS)))
        assert len({a[0] for a in answers} | {a[2] for a in answers}) == 1
        assert len({a[1] for a in answers}) == 1
        listed = json.loads(answers[0][0])
        assert [c["name"] for c in listed] == names
        assert {c["name"]: c["pid"] for c in listed} == {n: c["pid"] for n, c in before.items()}

        targets = names[:RESTARTS]

        def restarter(name: str) -> tuple[int, Any]:
            status, body, _ = request(
                agent, "POST", f"/v1/components/{name}:restart?wait=pid&timeout=60s"
            )
            return status, body

        with ThreadPoolExecutor(RESTARTS) as pool:
            results = dict(zip(targets, pool.map(restarter, targets), strict=True))
        for name, (status, body) in results.items():
            assert status == 200, (name, body)
            assert body["component"] == name and body["dependents"] == {}
            assert body["pid"] != before[name]["pid"]

        after = agent.wait_states(dict.fromkeys(names, "healthy"), timeout=60)
        for name in names:
            if name in results:
                assert after[name]["pid"] == results[name][1]["pid"]
                assert after[name]["restarts"] == before[name]["restarts"] + 1
                assert not alive(before[name]["pid"])
            else:
                assert after[name]["pid"] == before[name]["pid"]
                assert after[name]["restarts"] == before[name]["restarts"]
        current = [c["pid"] for c in after.values()]
        assert len(set(current)) == COMPONENTS and all(alive(p) for p in current)

        # /metrics agrees with /v1/components: state, pid-backed RSS and restart counts.
        _, text, _ = request(agent, "GET", "/metrics")
        restarts: dict[str, float] = {}
        rss: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name == "keystone_component_restarts_total":
                    restarts[s.labels["name"]] = s.value
                elif s.name == "keystone_component_memory_rss_bytes":
                    rss[s.labels["name"]] = s.value
        assert restarts == {n: float(c["restarts"]) for n, c in after.items()}
        assert set(rss) == set(names) and all(v > 0 for v in rss.values())

        # And now every client sees the same new state.
        with ThreadPoolExecutor(CLIENTS) as pool:
            answers = list(pool.map(reader, range(CLIENTS)))
        assert len({a[0] for a in answers}) == 1
        assert {c["name"]: c["pid"] for c in json.loads(answers[0][0])} == {
            n: c["pid"] for n, c in after.items()
        }
