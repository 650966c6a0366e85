"""The MQTT adapter against a real mosquitto: Go's topics and shapes, events, will, reconnect."""

from __future__ import annotations

import json
import re
import signal
from pathlib import Path
from typing import Any

import pytest

from tests.integration.brokers.conftest import (
    MqttProbe,
    demo_env,
    mosquitto,
    recipe_text,
)

pytestmark = pytest.mark.integration

DEV = "edge-001"


def mqtt_config(tmp: Path, port: int, *, extra: str = "", device: str = DEV, top: str = "") -> Path:
    path = tmp / f"agent-{device}.toml"
    path.write_text(
        f'[device]\nid = "{device}"\nlabels = ["gateway"]\n{top}\n'
        f'[mqtt]\nbroker = "tcp://127.0.0.1:{port}"\nstate_interval = "1s"\n'
        f'health_interval = "1s"\nkeepalive = "5s"\n{extra}'
    )
    return path


def start_demo(make_agent: Any, cfg: Path) -> Any:
    agent = make_agent("--demo", "--config", str(cfg), env=demo_env()).start()
    agent.wait_states({"db": "healthy", "cache": "healthy", "api": "healthy"})
    return agent


def online(probe: MqttProbe, device: str = DEV, timeout: float = 30) -> None:
    probe.wait(lambda t, p, r: t == f"keystone/{device}/status" and p == b"online", timeout=timeout)


class TestCommands:
    def test_every_command_answers_in_go_shapes(
        self, mqtt_broker: Any, make_agent: Any, tmp_path: Path, probes: list[Any]
    ) -> None:
        """Each Go command (and sync) answers on resp/<cmd> with correlationId, success, data."""
        agent = start_demo(make_agent, mqtt_config(tmp_path, mqtt_broker.port))
        probe = MqttProbe(mqtt_broker.port).connect(f"keystone/{DEV}/#")
        probes.append(probe)
        online(probe)

        health = probe.request(DEV, "health")
        assert health["success"] is True and health["correlationId"].startswith("req-")
        assert health["data"]["status"] == "ok" and "uptime" in health["data"]
        # Go's HealthStatus: uptime as a Go duration string; our keys beside it.
        assert re.fullmatch(r"(\d+h)?(\d+m)?[\d.]+(ms|s)", health["data"]["uptime"])
        assert health["data"]["device"] == DEV and "version" in health["data"]

        status = probe.request(DEV, "status")["data"]
        assert {"planPath", "status", "components"} <= set(status) and status["status"] == "running"

        comps = probe.request(DEV, "components")["data"]["components"]
        assert {c["name"] for c in comps} == {"db", "cache", "api"}

        graph = probe.request(DEV, "graph")["data"]
        assert set(graph["nodes"]) == {"db", "cache", "api"} and "edges" in graph

        dry = probe.request(DEV, "restart", {"component": "db", "dry": True})["data"]
        assert dry["stopOrder"][0] == "api" and dry["startOrder"][0] == "db"

        before = agent.components()["api"]["pid"]
        restarted = probe.request(
            DEV, "restart", {"component": "api", "wait": "pid", "timeout": "30s"}
        )
        assert restarted["success"] is True, restarted
        assert restarted["data"]["component"] == "api" and restarted["data"]["pid"] != before
        assert restarted["data"]["wait"] == "pid" and restarted["data"]["timeout"] == "30s"

        added = probe.request(DEV, "add-recipe", {"content": recipe_text("sleeper")})
        assert added == {
            "correlationId": added["correlationId"],
            "success": True,
            "data": {"name": "sleeper", "version": "1.0.0"},
        }
        recipes = probe.request(DEV, "recipes")["data"]["recipes"]
        assert any("sleeper" in r for r in recipes)

        plan = '[[components]]\nname = "sleeper"\nrecipe = "sleeper:1.0.0"\n'
        dry_apply = probe.request(DEV, "apply", {"content": plan, "dry": True})
        assert dry_apply["success"] is True and dry_apply["data"]["apply"]["status"] == "dry-run"
        applied = probe.request(DEV, "apply", {"content": plan})
        assert applied["success"] is True, applied
        assert applied["data"]["status"] == "running" and applied["data"]["operation"]
        assert [c["name"] for c in applied["data"]["components"]] == ["sleeper"]

        stopped = probe.request(DEV, "stop-comp", {"component": "sleeper"})
        assert stopped["data"]["status"] == "stopped" and stopped["data"]["component"] == "sleeper"
        assert agent.components()["sleeper"]["state"] == "stopped"

        stop = probe.request(DEV, "stop")
        assert stop["success"] is True and stop["data"]["status"] == "stopped"

        deleted = probe.request(DEV, "delete-recipe", {"name": "nope", "version": "1.0.0"})
        assert deleted["success"] is False and "not in the store" in deleted["error"]

        sync = probe.request(DEV, "sync")
        assert sync["success"] is False and "[source]" in sync["error"]

        unknown = probe.request(DEV, "explode")
        assert unknown["success"] is False and "unknown command" in unknown["error"]

    def test_malformed_and_path_requests_are_refused(
        self, mqtt_broker: Any, make_agent: Any, tmp_path: Path, probes: list[Any]
    ) -> None:
        """Bad JSON, a missing field or a planPath get success=false; nothing running changes."""
        agent = start_demo(make_agent, mqtt_config(tmp_path, mqtt_broker.port))
        pids = {n: c["pid"] for n, c in agent.components().items()}
        probe = MqttProbe(mqtt_broker.port).connect(
            f"keystone/{DEV}/resp/#", f"keystone/{DEV}/status"
        )
        probes.append(probe)
        online(probe)
        bad = probe.request(DEV, "apply", b"{not json")
        assert bad["success"] is False and bad["error"].startswith("invalid request")
        assert "correlationId" not in bad
        missing = probe.request(DEV, "restart", {})
        assert missing == {
            "correlationId": missing["correlationId"],
            "success": False,
            "error": "component name required",
        }
        path = probe.request(DEV, "apply", {"planPath": "/etc/passwd"})
        assert path["success"] is False and "planPath is not accepted" in path["error"]
        wrong = probe.request(DEV, "restart", {"component": 7})
        assert wrong["success"] is False
        assert {n: c["pid"] for n, c in agent.components().items()} == pids

    def test_apply_on_a_git_synced_device_is_refused_unless_accepted(
        self, mqtt_broker: Any, make_agent: Any, tmp_path: Path, probes: list[Any]
    ) -> None:
        """A device with a [source] refuses cmd/apply (but not a dry run) unless accept_local_plans."""
        source = (
            '[source]\ntype = "git"\nurl = "http://127.0.0.1:9/fleet.git"\ninterval = "1h"\n'
            'jitter = "0s"\n'
        )
        agent = make_agent(
            "--config", str(mqtt_config(tmp_path, mqtt_broker.port, top=source))
        ).start()
        probe = MqttProbe(mqtt_broker.port).connect(f"keystone/{DEV}/#")
        probes.append(probe)
        online(probe)
        assert probe.request(DEV, "add-recipe", {"content": recipe_text("s2")})["success"]
        plan = '[[components]]\nname = "s2"\nrecipe = "s2:1.0.0"\n'
        refused = probe.request(DEV, "apply", {"content": plan})
        assert refused["success"] is False and "signed git source" in refused["error"]
        assert probe.request(DEV, "apply", {"content": plan, "dry": True})["success"] is True
        assert agent.components() == {}


class TestEvents:
    def test_state_and_health_events_at_intervals_and_on_change(
        self, mqtt_broker: Any, make_agent: Any, tmp_path: Path, probes: list[Any]
    ) -> None:
        """events/state and events/health carry Go's fields; a component change publishes state."""
        cfg = (
            mqtt_config(tmp_path, mqtt_broker.port)
            .read_text()
            .replace('state_interval = "1s"', 'state_interval = "1h"')
        )
        (tmp_path / "ev.toml").write_text(cfg)
        start_demo(make_agent, tmp_path / "ev.toml")
        probe = MqttProbe(mqtt_broker.port).connect(
            f"keystone/{DEV}/events/#", f"keystone/{DEV}/resp/#"
        )
        probes.append(probe)
        _, raw, _ = probe.wait(lambda t, p, r: t == f"keystone/{DEV}/events/health")
        health = json.loads(raw)
        assert set(health) == {"timestamp", "deviceId", "status", "uptime"}
        assert health["deviceId"] == DEV and health["uptime"].endswith("s")
        assert health["timestamp"].endswith("Z")
        probe.request(DEV, "stop-comp", {"component": "api"})
        _, raw, _ = probe.wait(
            lambda t, p, r: (
                t == f"keystone/{DEV}/events/state"
                and any(
                    c["name"] == "api" and c["state"] == "stopped"
                    for c in json.loads(p)["components"]
                )
            )
        )
        state = json.loads(raw)
        assert {"timestamp", "deviceId", "components", "planStatus"} <= set(state)


class TestConnection:
    def test_last_will_says_offline_when_the_agent_is_killed(
        self, mqtt_broker: Any, make_agent: Any, tmp_path: Path, probes: list[Any]
    ) -> None:
        """status is retained "online" while connected; SIGKILL makes the broker publish "offline"."""
        agent = make_agent("--config", str(mqtt_config(tmp_path, mqtt_broker.port))).start()
        first = MqttProbe(mqtt_broker.port).connect(f"keystone/{DEV}/status")
        probes.append(first)
        first.wait(lambda t, p, r: p == b"online")  # live or retained: the agent is connected
        late = MqttProbe(mqtt_broker.port).connect(f"keystone/{DEV}/status")
        probes.append(late)
        _, payload, retained = late.wait(lambda t, p, r: p == b"online")
        assert retained  # a subscriber arriving later sees the retained status at once
        agent.stop(signal.SIGKILL)
        late.wait(lambda t, p, r: p == b"offline", timeout=20)
        after = MqttProbe(mqtt_broker.port).connect(f"keystone/{DEV}/status")
        probes.append(after)
        _, payload, retained = after.wait(lambda t, p, r: True)
        assert payload == b"offline" and retained

    def test_clean_stop_says_offline(
        self, mqtt_broker: Any, make_agent: Any, tmp_path: Path, probes: list[Any]
    ) -> None:
        """SIGTERM publishes a retained "offline" before the agent disconnects."""
        agent = make_agent("--config", str(mqtt_config(tmp_path, mqtt_broker.port))).start()
        probe = MqttProbe(mqtt_broker.port).connect(f"keystone/{DEV}/status")
        probes.append(probe)
        probe.wait(lambda t, p, r: p == b"online")
        assert agent.stop(signal.SIGTERM) == 0
        probe.wait(lambda t, p, r: p == b"offline", timeout=20)

    def test_broker_restart_reconnects_and_leaves_components_alone(
        self, mqtt_broker: Any, make_agent: Any, tmp_path: Path, probes: list[Any]
    ) -> None:
        """The broker goes away and comes back: same pids, commands answer again."""
        agent = start_demo(
            make_agent, mqtt_config(tmp_path, mqtt_broker.port, extra='max_reconnect_wait = "2s"\n')
        )
        pids = {n: c["pid"] for n, c in agent.components().items()}
        probe = MqttProbe(mqtt_broker.port).connect(f"keystone/{DEV}/status")
        online(probe)
        probe.close()
        mqtt_broker.stop()
        assert agent.healthz() is not None
        mqtt_broker.start()
        again = MqttProbe(mqtt_broker.port).connect(f"keystone/{DEV}/#")
        probes.append(again)
        online(again, timeout=30)
        assert again.request(DEV, "health")["success"] is True
        assert {n: c["pid"] for n, c in agent.components().items()} == pids

    def test_unauthenticated_clients_are_refused(
        self, make_agent: Any, tmp_path: Path, probes: list[Any]
    ) -> None:
        """With a password file, the agent logs in; an anonymous client cannot send commands."""
        broker = mosquitto(tmp_path, users={"agent": "s3cret", "ops": "0ps"}).start()
        try:
            cfg = mqtt_config(tmp_path, broker.port, extra='user = "agent"\npassword = "s3cret"\n')
            agent = start_demo(make_agent, cfg)
            ops = MqttProbe(broker.port, "ops", "0ps").connect(f"keystone/{DEV}/#")
            probes.append(ops)
            online(ops)
            anon = MqttProbe(broker.port)
            probes.append(anon)
            anon.connect()
            assert anon.connect_rc.is_failure
            wrong = MqttProbe(broker.port, "ops", "guess")
            probes.append(wrong)
            wrong.connect()
            assert wrong.connect_rc.is_failure
            assert ops.request(DEV, "health")["success"] is True
            assert agent.components()["db"]["phase"] == "healthy"
        finally:
            broker.stop()


class TestBrokerDownAtStart:
    def test_agent_starts_without_its_brokers_and_connects_when_they_come(
        self, make_agent: Any, tmp_path: Path, probes: list[Any]
    ) -> None:
        """No broker at start: components run; MQTT and NATS connect once the servers are up."""
        from tests.integration.brokers.conftest import NatsProbe, nats_server

        mq, ns = mosquitto(tmp_path), nats_server(tmp_path)
        extra = f'max_reconnect_wait = "2s"\n\n[nats]\nurl = "nats://127.0.0.1:{ns.port}"\n'
        agent = start_demo(make_agent, mqtt_config(tmp_path, mq.port, extra=extra))
        pids = {n: c["pid"] for n, c in agent.components().items()}
        mq.start()
        ns.start()
        try:
            # Listening before the agent can connect: its first state event is the one seen.
            nats = NatsProbe(ns.port).connect(f"keystone.{DEV}.events.state")
            probes.append(nats)
            probe = MqttProbe(mq.port).connect(f"keystone/{DEV}/#")
            probes.append(probe)
            online(probe, timeout=30)
            assert probe.request(DEV, "status")["success"] is True
            nats.wait(lambda s, d: json.loads(d)["deviceId"] == DEV, timeout=60)
            assert nats.request(f"keystone.{DEV}.cmd.health")["success"] is True
            assert {n: c["pid"] for n, c in agent.components().items()} == pids
        finally:
            mq.stop()
            ns.stop()


class TestGoFlags:
    def test_the_go_agent_flags_connect_the_adapter(
        self, mqtt_broker: Any, make_agent: Any, tmp_path: Path, probes: list[Any]
    ) -> None:
        """`keystone agent --mqtt-broker tcp://... --mqtt-device-id=X` (no agent.toml) connects
        as Go's flags do."""
        probe = MqttProbe(mqtt_broker.port).connect("keystone/flags-dev/status")
        probes.append(probe)
        agent = make_agent(
            "--mqtt-broker", f"tcp://127.0.0.1:{mqtt_broker.port}",
            "--mqtt-device-id=flags-dev", "--mqtt-qos", "1",
        ).start()  # fmt: skip
        online(probe, "flags-dev")
        assert agent.stop(signal.SIGTERM) == 0

    def test_a_bad_flag_value_is_a_usage_error(self, make_agent: Any) -> None:
        """A value Go would refuse (qos 7) exits 2 naming the flag; nothing starts."""
        agent = make_agent("--mqtt-broker", "tcp://127.0.0.1:1", "--mqtt-qos", "7")
        agent.start(wait=False)
        assert agent.proc.wait(30) == 2
        assert "--mqtt-qos" in agent.output()
