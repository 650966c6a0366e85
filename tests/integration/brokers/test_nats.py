"""The NATS adapter against a real nats-server: request/reply, events, JetStream jobs, reconnect."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import wait_until
from tests.integration.brokers.conftest import NatsProbe, demo_env, nats_server, recipe_text

pytestmark = pytest.mark.integration

DEV = "edge-002"


def nats_config(tmp: Path, port: int, *, extra: str = "", device: str = DEV) -> Path:
    path = tmp / f"agent-{device}.toml"
    path.write_text(
        f'[device]\nid = "{device}"\n\n'
        f'[nats]\nurl = "nats://127.0.0.1:{port}"\nstate_interval = "1s"\n'
        f'health_interval = "1s"\nreconnect_wait = "500ms"\n{extra}'
    )
    return path


def start_demo(make_agent: Any, cfg: Path) -> Any:
    agent = make_agent("--demo", "--config", str(cfg), env=demo_env()).start()
    agent.wait_states({"db": "healthy", "cache": "healthy", "api": "healthy"})
    return agent


def subject(cmd: str) -> str:
    return f"keystone.{DEV}.cmd.{cmd}"


def ready(probe: NatsProbe, timeout: float = 30) -> None:
    """Wait until the agent answers requests."""

    def ok() -> bool:
        try:
            return bool(probe.request(subject("health"), timeout=1)["success"])
        except Exception:
            return False

    wait_until(ok, timeout=timeout, what="the agent answers on NATS")


class TestRequests:
    def test_every_command_answers_in_go_shapes(
        self, nats_broker: Any, make_agent: Any, tmp_path: Path, probes: list[Any]
    ) -> None:
        """Each Go command (and sync) replies {success, error?, data?} on the request's inbox."""
        agent = start_demo(make_agent, nats_config(tmp_path, nats_broker.port))
        probe = NatsProbe(nats_broker.port).connect()
        probes.append(probe)
        ready(probe)
        health = probe.request(subject("health"))
        assert set(health) == {"success", "data"} and health["data"]["status"] == "ok"
        assert re.fullmatch(r"(\d+h)?(\d+m)?[\d.]+(ms|s)", health["data"]["uptime"])
        assert health["data"]["device"] == DEV and "version" in health["data"]
        assert probe.request(subject("status"))["data"]["status"] == "running"
        comps = probe.request(subject("components"))["data"]["components"]
        assert {c["name"] for c in comps} == {"db", "cache", "api"}
        assert set(probe.request(subject("graph"))["data"]["nodes"]) == {"db", "cache", "api"}
        dry = probe.request(subject("restart"), {"component": "db", "dry": True})["data"]
        assert dry["stopOrder"][0] == "api"
        before = agent.components()["cache"]["pid"]
        restarted = probe.request(subject("restart"), {"component": "cache"})
        assert restarted["success"] is True and restarted["data"]["pid"] != before
        assert restarted["data"]["wait"] == "pid" and restarted["data"]["timeout"] == "1m0s"
        added = probe.request(subject("add-recipe"), {"content": recipe_text("napper")})
        assert added == {"success": True, "data": {"name": "napper", "version": "1.0.0"}}
        again = probe.request(subject("add-recipe"), {"content": recipe_text("napper")})
        assert again["success"] is False and "error" in again and "data" not in again
        assert "napper-1.0.0.toml" in probe.request(subject("recipes"))["data"]["recipes"]
        plan = '[[components]]\nname = "napper"\nrecipe = "napper:1.0.0"\n'
        applied = probe.request(subject("apply"), {"content": plan})
        assert applied["success"] is True, applied
        assert [c["name"] for c in applied["data"]["components"]] == ["napper"]
        stopped = probe.request(subject("stop-comp"), {"component": "napper"})
        assert stopped["data"] == {
            "status": "stopped",
            "component": "napper",
            "operation": stopped["data"]["operation"],
        }
        assert probe.request(subject("stop"))["data"]["status"] == "stopped"
        assert probe.request(subject("sync"))["success"] is False
        bad = probe.request(subject("apply"), b"[1, 2")
        assert bad["success"] is False and bad["error"].startswith("invalid request")

    def test_events_carry_go_fields(
        self, nats_broker: Any, make_agent: Any, tmp_path: Path, probes: list[Any]
    ) -> None:
        """events.state and events.health are published with Go's fields."""
        start_demo(make_agent, nats_config(tmp_path, nats_broker.port))
        probe = NatsProbe(nats_broker.port).connect(f"keystone.{DEV}.events.>")
        probes.append(probe)
        _, raw = probe.wait(lambda s, d: s.endswith(".events.state"))
        state = json.loads(raw)
        assert state["deviceId"] == DEV and state["planStatus"] == "running"
        assert {c["name"] for c in state["components"]} == {"db", "cache", "api"}
        _, raw = probe.wait(lambda s, d: s.endswith(".events.health"))
        assert set(json.loads(raw)) == {"timestamp", "deviceId", "status", "uptime"}

    def test_server_restart_reconnects_and_leaves_components_alone(
        self, nats_broker: Any, make_agent: Any, tmp_path: Path, probes: list[Any]
    ) -> None:
        """nats-server goes away and comes back: same pids, requests answer again."""
        agent = start_demo(make_agent, nats_config(tmp_path, nats_broker.port))
        probe = NatsProbe(nats_broker.port).connect()
        ready(probe)
        probe.close()
        pids = {n: c["pid"] for n, c in agent.components().items()}
        nats_broker.stop()
        assert agent.healthz() is not None
        nats_broker.start()
        again = NatsProbe(nats_broker.port).connect()
        probes.append(again)
        ready(again)
        assert {n: c["pid"] for n, c in agent.components().items()} == pids

    def test_a_token_server_refuses_clients_without_it(
        self, make_agent: Any, tmp_path: Path, probes: list[Any]
    ) -> None:
        """The agent connects with its token; a client without one is refused by the server."""
        server = nats_server(tmp_path, token="t0ken").start()
        try:
            start_demo(make_agent, nats_config(tmp_path, server.port, extra='token = "t0ken"\n'))
            ops = NatsProbe(server.port, token="t0ken").connect()
            probes.append(ops)
            ready(ops)
            anon = NatsProbe(server.port)
            probes.append(anon)
            with pytest.raises(Exception, match=r"(?i)authorization"):
                anon.connect()
        finally:
            server.stop()


class TestJetStream:
    def test_a_job_queued_while_offline_runs_once_after_reconnect(
        self, nats_broker: Any, make_agent: Any, tmp_path: Path, probes: list[Any]
    ) -> None:
        """A job published while the agent is down is delivered once when it starts, then acked."""
        cfg = nats_config(tmp_path, nats_broker.port, extra="jetstream = true\n")
        first = make_agent("--config", str(cfg)).start()
        probe = NatsProbe(nats_broker.port).connect(f"keystone.{DEV}.jobs.results")
        probes.append(probe)
        ready(probe)

        async def consumer_exists() -> bool:
            js = probe.nc.jetstream()
            try:
                await js.consumer_info("KEYSTONE_JOBS", f"keystone-{DEV}")
                return True
            except Exception:
                return False

        wait_until(lambda: probe.run(consumer_exists()), timeout=30, what="durable consumer")
        assert first.stop() == 0

        job = {
            "id": "job-1",
            "type": "add-recipe",
            "deviceId": DEV,
            "payload": {"content": recipe_text("queued")},
            "createdAt": "2026-01-01T00:00:00Z",
        }
        bad = {"id": "job-2", "type": "frobnicate", "deviceId": DEV, "payload": {}}

        async def publish() -> None:
            js = probe.nc.jetstream()
            await js.publish(f"keystone.{DEV}.jobs", json.dumps(job).encode())
            await js.publish(f"keystone.{DEV}.jobs", json.dumps(bad).encode())

        probe.run(publish())
        second = make_agent("--config", str(cfg), runtime=first.runtime).start()
        _, raw = probe.wait(lambda s, d: json.loads(d)["jobId"] == "job-1", timeout=60)
        result = json.loads(raw)
        assert result["success"] is True and result["data"] == {
            "name": "queued",
            "version": "1.0.0",
        }
        assert result["processedAt"].endswith("Z")
        _, raw = probe.wait(lambda s, d: json.loads(d)["jobId"] == "job-2", timeout=60)
        assert json.loads(raw)["error"] == "unknown job type: frobnicate"

        async def info() -> Any:
            return await probe.nc.jetstream().consumer_info("KEYSTONE_JOBS", f"keystone-{DEV}")

        wait_until(
            lambda: (i := probe.run(info())).num_ack_pending == 0 and i.num_pending == 0,
            timeout=30,
            what="every job acked",
        )
        assert probe.run(info()).num_redelivered == 0

        async def stream_msgs() -> int:
            return int((await probe.nc.jetstream().stream_info("KEYSTONE_JOBS")).state.messages)

        # Work-queue retention: an acked job leaves the stream, so it cannot come again.
        assert probe.run(stream_msgs()) == 0
        assert probe.messages.empty(), "a job result arrived twice"
        status, recipes = second.api("GET", "/v1/recipes")
        assert status == 200 and recipes == ["queued-1.0.0.toml"]
