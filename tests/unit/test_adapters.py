"""The broker adapters' pure parts: command table, codec, events, buffer, settings, names."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from keystone.adapters.common import (
    BadRequest,
    EventBuffer,
    EventLoop,
    Policy,
    Reply,
    decode,
    go_duration,
    health_event,
    run_command,
    state_event,
    utc_stamp,
)
from keystone.adapters.jetstream import BadJob, parse_job
from keystone.brokerconfig import (
    MqttConfig,
    NatsConfig,
    apply_broker_env,
    apply_broker_flags,
)
from keystone.config import parse_config
from keystone.control import JSON, NotFound
from keystone.errors import ValidationError


class FakeControl:
    """Records calls; answers like the control service does."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.op_result: JSON = {"kind": "apply", "result": "ok"}

    def health(self) -> JSON:
        return {"status": "ok", "uptime": "1m15.5s", "uptime_seconds": 75.5, "revision": "abc"}

    def components(self) -> list[JSON]:
        return [{"name": "db", "state": "healthy", "pid": 10}]

    def plan_status(self) -> JSON:
        return {
            "planPath": "api",
            "status": "running",
            "error": None,
            "components": self.components(),
        }

    def plan_graph(self) -> JSON:
        return {"nodes": ["db"], "edges": {}, "order": [["db"]]}

    def restart_component(self, name: str, *, wait: str | None, timeout: float, dry: bool) -> JSON:
        self.calls.append(("restart", (name, wait, timeout, dry)))
        if name == "ghost":
            raise NotFound("component 'ghost' is not in the applied plan")
        if dry:
            return {"stopOrder": [name], "startOrder": [name]}
        return {"component": name, "pid": 11, "dependents": {}, "operation": "op-1"}

    def stop_component(self, name: str) -> str:
        self.calls.append(("stop-comp", name))
        return "op-2"

    def stop_plan(self) -> None:
        self.calls.append(("stop", None))

    def recipe_files(self) -> list[str]:
        return ["db-1.0.0.toml"]

    def recipes(self) -> list[JSON]:
        return [
            {"name": "db", "version": "1.0.0", "sha256": "x", "path": "/r/db/1.0.0.recipe.toml"}
        ]

    def upload_recipe(self, text: str, *, force: bool) -> JSON:
        self.calls.append(("upload", force))
        return {"name": "db", "version": "1.0.0", "path": "/r", "replaced": False}

    def delete_recipe(self, name: str, version: str) -> None:
        self.calls.append(("delete", (name, version)))

    def apply_plan(self, text: str, *, dry: bool) -> JSON:
        self.calls.append(("apply", dry))
        body: JSON = {"status": "dry-run" if dry else "applying", "actions": []}
        if not dry:
            body["operation"] = "op-3"
        return body

    def operation(self, op_id: str, *, wait: float | None = None) -> JSON:
        return {"id": op_id, "state": "done", "result": self.op_result}

    def sync(self, *, dry_run: bool, allow_rollback: bool, retry: bool = False) -> JSON:
        self.calls.append(("sync", (dry_run, allow_rollback, retry)))
        return {"result": "applied", "revision": "def", "exit_code": 0}


PLAIN = Policy("d1")
SYNCED = Policy("d1", git_synced=True)


class TestCommandTable:
    def test_health_has_go_uptime_beside_our_keys(self) -> None:
        reply = run_command(FakeControl(), "health", {}, PLAIN)
        assert reply.success and reply.data == {
            "status": "ok",
            "uptime": "1m15.5s",
            "uptime_seconds": 75.5,
            "revision": "abc",
        }

    @pytest.mark.parametrize(
        ("name", "req", "success", "error"),
        [
            ("status", {}, True, ""),
            ("components", {}, True, ""),
            ("graph", {}, True, ""),
            ("health", {}, True, ""),
            ("restart", {}, False, "component name required"),
            ("restart", {"component": 3}, False, "invalid request: component must be a string"),
            (
                "restart",
                {"component": "db", "wait": "forever"},
                False,
                "invalid request: wait must be pid or health, got 'forever'",
            ),
            (
                "restart",
                {"component": "ghost"},
                False,
                "component 'ghost' is not in the applied plan",
            ),
            ("stop-comp", {}, False, "component name required"),
            ("add-recipe", {}, False, "recipe content required"),
            ("delete-recipe", {"name": "db"}, False, "recipe version required"),
            ("apply", {}, False, "planPath or content required"),
            (
                "apply",
                {"planPath": "/etc/plan.toml"},
                False,
                "planPath is not accepted: the agent never reads a file a client names; send the plan itself as content",
            ),
            (
                "apply",
                {"content": "x", "recipes": "no"},
                False,
                "invalid request: recipes must be an array of TOML strings",
            ),
            ("explode", {}, False, "unknown command: explode"),
        ],
    )
    def test_outcomes(self, name: str, req: JSON, success: bool, error: str) -> None:
        """Each command's refusals carry Go's (or a clear) message."""
        reply = run_command(FakeControl(), name, req, PLAIN)
        assert (reply.success, reply.error) == (success, error)

    def test_restart_defaults_like_go(self) -> None:
        """wait defaults to pid and timeout to 60s; a bad timeout is the default, as in Go."""
        control = FakeControl()
        reply = run_command(control, "restart", {"component": "db", "timeout": "soon"}, PLAIN)
        assert control.calls == [("restart", ("db", "pid", 60.0, False))]
        assert reply.data["wait"] == "pid" and reply.data["timeout"] == "1m0s"

    def test_apply_waits_for_the_deployment_and_reports_its_record(self) -> None:
        """A non-dry apply answers with the plan status once its operation is done."""
        control = FakeControl()
        reply = run_command(control, "apply", {"content": "plan", "recipes": ["r1"]}, PLAIN)
        assert reply.success and reply.data["operation"] == "op-3"
        assert reply.data["status"] == "running" and reply.data["apply"] == {
            "kind": "apply",
            "result": "ok",
        }
        assert control.calls == [("upload", True), ("apply", False)]

    def test_a_rolled_back_apply_is_unsuccessful(self) -> None:
        control = FakeControl()
        control.op_result = {"kind": "apply", "result": "rolled-back", "error": "db: exited"}
        reply = run_command(control, "apply", {"content": "plan"}, PLAIN)
        assert not reply.success and reply.error == "apply failed: db: exited"

    def test_git_synced_device_refuses_apply_but_not_a_dry_run(self) -> None:
        """No recipe is stored and nothing applied; a dry run still answers."""
        control = FakeControl()
        refused = run_command(control, "apply", {"content": "p", "recipes": ["r"]}, SYNCED)
        assert not refused.success and "signed git source" in refused.error
        assert not refused.retryable and control.calls == []
        assert run_command(control, "apply", {"content": "p", "dry": True}, SYNCED).success
        accepted = Policy("d1", git_synced=True, accept_local_plans=True)
        assert run_command(control, "apply", {"content": "p"}, accepted).success

    def test_sync_maps_flags_and_outcome(self) -> None:
        control = FakeControl()
        reply = run_command(control, "sync", {"dryRun": True, "allowRollback": True}, PLAIN)
        assert control.calls == [("sync", (True, True, False))]
        assert reply.success and reply.data["revision"] == "def"

    def test_go_recipe_list_and_stop_comp_shapes(self) -> None:
        control = FakeControl()
        assert run_command(control, "recipes", {}, PLAIN).data["recipes"] == ["db-1.0.0.toml"]
        assert run_command(control, "stop-comp", {"component": "db"}, PLAIN).data == {
            "status": "stopped",
            "component": "db",
            "operation": "op-2",
        }


class TestCodec:
    @pytest.mark.parametrize(
        ("payload", "expected"),
        [(b"", {}), (b"  ", {}), (b'{"a": 1}', {"a": 1})],
    )
    def test_decode(self, payload: bytes, expected: JSON) -> None:
        assert decode(payload) == expected

    @pytest.mark.parametrize("payload", [b"{", b"[1]", b'"x"', b"\xff\xfe"])
    def test_decode_refuses(self, payload: bytes) -> None:
        with pytest.raises(BadRequest, match=r"^invalid request"):
            decode(payload)

    @pytest.mark.parametrize(
        ("reply", "cid", "expected"),
        [
            (
                Reply(True, {"x": 1}),
                "c1",
                {"correlationId": "c1", "success": True, "data": {"x": 1}},
            ),
            (Reply(False, error="bad"), "", {"success": False, "error": "bad"}),
            (Reply(True), None, {"success": True}),
        ],
    )
    def test_reply_shape_omits_empty_fields(
        self, reply: Reply, cid: str | None, expected: JSON
    ) -> None:
        """Go's Response: correlationId, error and data are omitempty."""
        assert reply.to_json(cid) == expected

    @pytest.mark.parametrize(
        ("seconds", "text"),
        [(0, "0s"), (0.25, "250ms"), (1.5, "1.5s"), (60, "1m0s"), (3723.5, "1h2m3.5s")],
    )
    def test_go_duration(self, seconds: float, text: str) -> None:
        assert go_duration(seconds) == text

    def test_utc_stamp(self) -> None:
        assert utc_stamp(0.5) == "1970-01-01T00:00:00.500000Z"


class TestEvents:
    def test_event_shapes(self) -> None:
        control = FakeControl()
        state = state_event(control, "d1", 0)
        assert state == {
            "timestamp": "1970-01-01T00:00:00.000000Z",
            "deviceId": "d1",
            "components": control.components(),
            "planStatus": "running",
            "planPath": "api",
            "revision": "abc",
        }
        assert health_event(control, "d1", 0)["uptime"] == "1m15.5s"

    def test_buffer_drops_oldest_and_counts(self) -> None:
        buf = EventBuffer(2)
        for i in range(5):
            buf.push("t", bytes([i]))
        assert buf.dropped == 3 and buf.drain() == [("t", b"\x03"), ("t", b"\x04")]
        assert len(buf) == 0
        none = EventBuffer(0)
        none.push("t", b"x")
        assert none.dropped == 1 and none.drain() == []

    def test_drops_and_connection_state_reach_the_metrics(self) -> None:
        from keystone.adapters.common import AdapterMetrics
        from keystone.metrics import Metrics

        metrics = Metrics()
        stats = AdapterMetrics(metrics, "mqtt")
        AdapterMetrics(None, "nats").dropped()  # no metrics: nothing to do, no error

        def series() -> set[str]:
            text = metrics.render()[0].decode()
            return {line for line in text.splitlines() if line.startswith("keystone_broker_")}

        assert series() == {
            'keystone_broker_connected{adapter="mqtt"} 0.0',
            'keystone_broker_events_dropped_total{adapter="mqtt"} 0.0',
        }
        buf = EventBuffer(1, stats.dropped)
        for i in range(4):
            buf.push("t", bytes([i]))
        stats.connected(True)
        assert series() == {
            'keystone_broker_connected{adapter="mqtt"} 1.0',
            'keystone_broker_events_dropped_total{adapter="mqtt"} 3.0',
        }
        stats.connected(False)
        assert 'keystone_broker_connected{adapter="mqtt"} 0.0' in series()

    def test_a_burst_of_changes_is_one_state_event(self) -> None:
        """Ten changes inside the settle window publish one state event."""
        sent: list[str] = []

        async def go() -> None:
            events = EventLoop(
                FakeControl(),
                "d1",
                lambda k, e: sent.append(k),
                state_interval=0,
                health_interval=0,
                settle=0.01,
            )
            events.start()
            for _ in range(10):
                events.changed()
            await asyncio.sleep(0.05)
            await events.stop()

        asyncio.run(go())
        assert sent == ["state"]


class TestJobs:
    def test_parse(self) -> None:
        job = {"id": "j1", "type": "restart", "deviceId": "d", "payload": {"component": "db"}}
        assert parse_job(json.dumps(job).encode()) == ("j1", "restart", {"component": "db"})

    @pytest.mark.parametrize(
        ("doc", "job_id", "message"),
        [
            (b"nope", "unknown", "invalid job format"),
            (b'{"id": "j2", "type": "reboot"}', "j2", "unknown job type: reboot"),
            (
                b'{"id": "j3", "type": "stop", "payload": [1]}',
                "j3",
                "payload must be a JSON object",
            ),
        ],
    )
    def test_refusals_keep_the_id(self, doc: bytes, job_id: str, message: str) -> None:
        with pytest.raises(BadJob, match=message) as info:
            parse_job(doc)
        assert info.value.job_id == job_id


class FakeJetStream:
    """The JetStream calls JobQueue makes, over an in-memory server that can lose its store."""

    def __init__(self) -> None:
        self.streams: set[str] = set()
        self.consumers: set[tuple[str, str]] = set()
        self.calls: list[str] = []

    def lose_store(self) -> None:
        self.streams.clear()
        self.consumers.clear()

    async def stream_info(self, name: str) -> Any:
        from nats.js.errors import NotFoundError

        if name not in self.streams:
            raise NotFoundError(code=404, err_code=10059, description="stream not found")
        return name

    async def add_stream(self, config: Any) -> None:
        self.calls.append(f"add_stream {config.name}")
        self.streams.add(config.name)

    async def consumer_info(self, stream: str, durable: str) -> Any:
        from nats.js.errors import NotFoundError

        await asyncio.sleep(0)  # a round trip: the other workers run meanwhile
        if (stream, durable) not in self.consumers:
            raise NotFoundError(code=404, err_code=10014, description="consumer not found")
        return durable

    async def add_consumer(self, stream: str, config: Any) -> None:
        await asyncio.sleep(0)
        self.calls.append(f"add_consumer {config.durable_name}")
        self.consumers.add((stream, config.durable_name))

    async def pull_subscribe_bind(self, durable: str, stream: str) -> Any:
        self.calls.append("bind")
        return FakeSub()


class FakeSub:
    async def fetch(self, n: int, timeout: float) -> list[Any]:
        await asyncio.sleep(3600)  # an idle pull: waits until it is cancelled
        return []

    async def unsubscribe(self) -> None:
        pass


class FakeNats:
    def __init__(self, js: FakeJetStream) -> None:
        self.js = js

    def jetstream(self) -> FakeJetStream:
        return self.js


class TestJobQueueRecovery:
    def test_a_lost_stream_and_consumer_are_created_once_and_the_workers_move_over(self) -> None:
        from keystone.adapters.jetstream import JobQueue
        from keystone.adapters.nats import Subjects

        js = FakeJetStream()
        cfg = NatsConfig(url="nats://x", jetstream=True, js_workers=3)
        queue = JobQueue(
            FakeNats(js),  # type: ignore[arg-type]
            cfg,
            Subjects("d1"),
            None,  # type: ignore[arg-type]  (no job runs here)
        )

        async def go() -> None:
            await queue.start()
            assert js.calls == ["add_stream KEYSTONE_JOBS", "add_consumer keystone-d1", "bind"]
            await asyncio.sleep(0)  # the workers enter their pulls
            before = list(queue._workers)
            js.calls.clear()
            assert await queue.check() is False and js.calls == []  # all there: nothing done

            js.lose_store()
            created = await asyncio.gather(queue.check(), queue.check(), queue.check())
            assert sorted(created) == [False, False, True]  # one of them did it, once
            assert js.calls == ["add_stream KEYSTONE_JOBS", "add_consumer keystone-d1", "bind"]
            assert all(t.cancelled() or t.cancelling() for t in before)
            assert not set(before) & set(queue._workers) and len(queue._workers) == 3

            js.lose_store()
            js.streams.add("KEYSTONE_JOBS")  # another device re-created the stream already
            js.calls.clear()
            assert await queue.check() is True
            assert js.calls == ["add_consumer keystone-d1", "bind"]
            await queue.stop()

        asyncio.run(go())


class TestNatsErrors:
    def test_a_repeated_connection_error_is_logged_once_until_connected(self) -> None:
        from loguru import logger

        from keystone.adapters.common import Commands
        from keystone.adapters.nats import NatsAdapter

        adapter = NatsAdapter(
            NatsConfig(url="nats://x"),
            Commands(FakeControl(), PLAIN),  # type: ignore[arg-type]
            device_id="d1",
        )
        seen: list[str] = []
        sink = logger.add(lambda m: seen.append(m.record["message"]), level="WARNING")
        try:

            async def go() -> None:
                for text in ("bad certificate", "reset by peer", "bad certificate"):
                    await adapter._on_error(OSError(text))
                adapter._errors.clear()  # what a successful (re)connection does
                await adapter._on_error(OSError("bad certificate"))

            asyncio.run(go())
        finally:
            logger.remove(sink)
        assert seen == ["[nats] bad certificate", "[nats] reset by peer", "[nats] bad certificate"]


class TestSettings:
    def test_file_tables(self, tmp_path: Path) -> None:
        cfg = parse_config(
            '[mqtt]\nbroker = "ssl://b:8883"\nqos = 2\ntls_ca = "ca.pem"\nstate_interval = "0"\n'
            '[nats]\nurl = "nats://n:4222"\njetstream = true\njs_workers = 3\n',
            file=str(tmp_path / "agent.toml"),
        )
        assert cfg.mqtt == MqttConfig(
            broker="ssl://b:8883", qos=2, tls_ca=tmp_path / "ca.pem", state_interval=0
        )
        assert cfg.nats == NatsConfig(url="nats://n:4222", jetstream=True, js_workers=3)

    @pytest.mark.parametrize(
        ("text", "message"),
        [
            ("[mqtt]\nqos = 3\n", "a.toml:2: mqtt.qos: expected an integer from 0 to 2, got 3"),
            (
                '[mqtt]\nbroker = "http://x"\n',
                "a.toml:2: mqtt.broker: expected a URL such as tcp://host:1883",
            ),
            (
                '[nats]\nurl = "x:1"\n',
                "a.toml:2: nats.url: expected a URL such as nats://host:4222",
            ),
            (
                '[nats]\nstate_interval = "often"\n',
                "a.toml:2: nats.state_interval: expected a duration",
            ),
            ('[mqtt]\ntls_cert = "c.pem"\n', "mqtt.tls_key: tls_cert and tls_key go together"),
            ('[nats]\nurll = "nats://x"\n', "unknown field nats.urll"),
        ],
    )
    def test_file_errors_name_file_line_field(self, text: str, message: str) -> None:
        with pytest.raises(ValidationError) as info:
            parse_config(text, file="a.toml")
        assert message in str(info.value)

    def test_env_then_flags(self) -> None:
        """Go's KEYSTONE_MQTT_* fill in; a flag wins over both."""
        mqtt, nats = apply_broker_env(
            MqttConfig(broker="tcp://file:1883"),
            None,
            {
                "KEYSTONE_MQTT_QOS": "0",
                "KEYSTONE_MQTT_USER": "u",
                "KEYSTONE_NATS_URL": "nats://e:4222",
            },
        )
        assert mqtt == MqttConfig(broker="tcp://file:1883", qos=0, user="u")
        assert nats == NatsConfig(url="nats://e:4222")
        mqtt, nats = apply_broker_flags(
            mqtt,
            nats,
            {"mqtt-qos": "2", "nats-jetstream": "true", "nats-js-workers": "4", "mqtt-user": None},
        )
        assert mqtt is not None and mqtt.qos == 2 and mqtt.user == "u"
        assert nats is not None and nats.jetstream and nats.js_workers == 4

    @pytest.mark.parametrize(
        ("env", "message"),
        [
            ({"KEYSTONE_MQTT_QOS": "9"}, "KEYSTONE_MQTT_QOS: expected an integer from 0 to 2"),
            (
                {"KEYSTONE_MQTT_TLS_VERIFY": "maybe"},
                "KEYSTONE_MQTT_TLS_VERIFY: expected true or false",
            ),
        ],
    )
    def test_env_errors_name_the_variable(self, env: dict[str, str], message: str) -> None:
        with pytest.raises(ValidationError, match=message):
            apply_broker_env(None, None, env)


class TestNames:
    def test_mqtt_topics(self) -> None:
        from keystone.adapters.mqtt import Topics, broker_address

        t = Topics("device-123", ("gw",))
        assert (t.cmd("apply"), t.resp("stop-comp"), t.cmd_wildcard) == (
            "keystone/device-123/cmd/apply",
            "keystone/device-123/resp/stop-comp",
            "keystone/device-123/cmd/+",
        )
        assert (t.event_state, t.event_health, t.status) == (
            "keystone/device-123/events/state",
            "keystone/device-123/events/health",
            "keystone/device-123/status",
        )
        assert t.command_of("keystone/device-123/cmd/add-recipe") == "add-recipe"
        assert t.command_of("keystone/label/gw/sync") == "sync"
        assert t.command_of("keystone/label/other/sync") is None
        assert t.command_of("keystone/device-123/resp/apply") is None
        assert broker_address("ssl://b") == ("b", 8883, True, "tcp")
        assert broker_address("tcp://127.0.0.1:1999") == ("127.0.0.1", 1999, False, "tcp")

    def test_nats_subjects_and_auth_priority(self) -> None:
        from keystone.adapters.nats import Subjects, connect_options

        s = Subjects("device-123", ("gw",))
        assert (s.cmd("stop-comp"), s.event_state, s.jobs, s.job_results) == (
            "keystone.device-123.cmd.stop-comp",
            "keystone.device-123.events.state",
            "keystone.device-123.jobs",
            "keystone.device-123.jobs.results",
        )
        assert (
            s.command_of("keystone.fleet.sync") == s.command_of("keystone.label.gw.sync") == "sync"
        )
        everything = NatsConfig(
            url="nats://x", nkey=Path("/k"), creds=Path("/c"), token="t", user="u"
        )
        assert "nkeys_seed" in connect_options(everything, "d")
        opts = connect_options(NatsConfig(url="nats://x", token="t", user="u", password="p"), "d")
        assert opts["token"] == "t" and "user" not in opts and "tls" not in opts
        assert opts["name"] == "keystone-agent-d" and opts["max_reconnect_attempts"] == -1

    @pytest.mark.parametrize(
        ("text", "seed"),
        [
            # nsc's layout with a JWT: left to nats-py (operator mode).
            (
                "-----BEGIN NATS USER JWT-----\neyJhbGciOi.x.y\n------END NATS USER JWT------\n\n"
                "-----BEGIN USER NKEY SEED-----\nSUAXYZ\n------END USER NKEY SEED------\n",
                None,
            ),
            # No JWT at all, or an empty JWT block: the seed alone.
            ("-----BEGIN USER NKEY SEED-----\nSUAXYZ\n------END USER NKEY SEED------\n", "SUAXYZ"),
            (
                "-----BEGIN NATS USER JWT-----\n\n------END NATS USER JWT------\n"
                "-----BEGIN USER NKEY SEED-----\n  SUAXYZ  \n-----END USER NKEY SEED-----\n",
                "SUAXYZ",
            ),
            # Neither: nats-py reports the file.
            ("garbage\n", None),
            ("-----BEGIN USER NKEY SEED-----\n------END USER NKEY SEED------\n", None),
        ],
    )
    def test_a_creds_file_without_a_jwt_authenticates_with_its_seed(
        self, tmp_path: Path, text: str, seed: str | None
    ) -> None:
        from keystone.adapters.nats import connect_options, creds_seed

        creds = tmp_path / "device.creds"
        creds.write_text(text)
        assert creds_seed(creds) == seed
        opts = connect_options(NatsConfig(url="nats://x", creds=creds), "d")
        if seed is None:
            assert opts["user_credentials"] == str(creds) and "nkeys_seed_str" not in opts
        else:
            assert opts["nkeys_seed_str"] == seed and "user_credentials" not in opts
        assert creds_seed(tmp_path / "missing.creds") is None


class TestLazyImports:
    def test_an_agent_without_brokers_imports_no_adapter(self) -> None:
        """Loading the agent and its config never imports paho, nats or the adapters."""
        code = (
            "import sys, keystone.agent, keystone.config\n"
            "bad = [m for m in sys.modules if m.split('.')[0] in ('paho', 'nats')"
            " or m in ('keystone.adapters.common', 'keystone.adapters.mqtt', 'keystone.adapters.nats')]\n"
            "print(bad)"
        )
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        )
        assert out.stdout.strip() == "[]"
