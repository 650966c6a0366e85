"""Real brokers for the adapter tests: mosquitto and nats-server on free loopback ports.

Each broker is a process owned by its fixture (stopped at teardown). They are installed by
``scripts/setup-test-deps`` when missing; a test skips, saying why, only if that fails.
The test side speaks to them with the same client libraries the adapters use.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import json
import queue
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import free_port, wait_until
from tests.integration.agent.conftest import make_agent  # noqa: F401  (fixture re-export)

REPO = Path(__file__).resolve().parents[3]


def broker_binary(name: str) -> str:
    """The path of ``name``; runs the setup script once if it is missing; skips if still so."""
    found = shutil.which(name) or next(
        (str(p) for p in (Path("/usr/sbin") / name, Path("/usr/bin") / name) if p.exists()), None
    )
    if found:
        return found
    script = REPO / "scripts" / "setup-test-deps"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        subprocess.run(["bash", str(script)], check=False, timeout=600, capture_output=True)
    found = shutil.which(name) or next(
        (str(p) for p in (Path("/usr/sbin") / name, Path("/usr/bin") / name) if p.exists()), None
    )
    if not found:
        pytest.skip(f"{name} is not installed and scripts/setup-test-deps could not install it")
    return found


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


@dataclass
class Broker:
    """One broker process: start, stop, restart on the same port."""

    argv: list[str]
    port: int
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Broker:
        out = self.log.open("ab")
        self.proc = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT)
        out.close()
        wait_until(
            lambda: port_open(self.port) or self.proc is None or self.proc.poll() is not None,
            timeout=20,
            what=f"broker on port {self.port}",
        )
        assert self.proc.poll() is None, self.log.read_text(errors="replace")
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        wait_until(lambda: not port_open(self.port), timeout=10, what="broker port closed")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid


def mosquitto(tmp: Path, *, users: dict[str, str] | None = None) -> Broker:
    """A mosquitto on loopback (anonymous, or only ``users`` with passwords)."""
    binary = broker_binary("mosquitto")
    port = free_port()
    conf = tmp / f"mosquitto-{port}.conf"
    # Run as whoever runs the tests: mosquitto started as root would switch to its own user,
    # who cannot read the test's temporary files.
    lines = [
        f"listener {port} 127.0.0.1",
        "persistence false",
        "set_tcp_nodelay true",
        f"user {getpass.getuser()}",
    ]
    if users:
        pwfile = tmp / f"mosquitto-{port}.passwd"
        pwfile.write_text("")
        for user, password in users.items():
            subprocess.run(
                ["mosquitto_passwd", "-b", str(pwfile), user, password],
                check=True,
                capture_output=True,
            )
        pwfile.chmod(0o600)
        lines += ["allow_anonymous false", f"password_file {pwfile}"]
    else:
        lines += ["allow_anonymous true"]
    conf.write_text("\n".join(lines) + "\n")
    return Broker([binary, "-c", str(conf)], port, tmp / f"mosquitto-{port}.log")


def nats_server(tmp: Path, *, token: str = "") -> Broker:
    """A nats-server with JetStream on loopback (a token if given)."""
    binary = broker_binary("nats-server")
    port = free_port()
    store = tmp / f"nats-{port}"
    store.mkdir()
    argv = [binary, "-a", "127.0.0.1", "-p", str(port), "-js", "-sd", str(store)]
    if token:
        argv += ["--auth", token]
    return Broker(argv, port, tmp / f"nats-{port}.log")


@pytest.fixture
def mqtt_broker(tmp_path: Path) -> Iterator[Broker]:
    broker = mosquitto(tmp_path).start()
    yield broker
    broker.stop()


@pytest.fixture
def nats_broker(tmp_path: Path) -> Iterator[Broker]:
    broker = nats_server(tmp_path).start()
    yield broker
    broker.stop()


# --- test-side clients ----------------------------------------------------------------------


@dataclass
class MqttProbe:
    """A paho client on the test side: records every message on the topics it follows."""

    port: int
    user: str = ""
    password: str = ""
    messages: queue.Queue[tuple[str, bytes, bool]] = field(default_factory=queue.Queue)
    seen: list[tuple[str, bytes, bool]] = field(default_factory=list)
    client: Any = None
    connect_rc: Any = None
    _acked: set[int] = field(default_factory=set)
    _suback: threading.Event = field(default_factory=threading.Event)

    def connect(self, *topics: str) -> MqttProbe:
        import paho.mqtt.client as paho
        from paho.mqtt.enums import CallbackAPIVersion

        ready = threading.Event()

        def on_connect(c: Any, u: Any, f: Any, rc: Any, p: Any) -> None:
            self.connect_rc = rc
            ready.set()

        def on_subscribe(c: Any, u: Any, mid: int, rcs: Any, p: Any) -> None:
            self._acked.add(mid)
            self._suback.set()

        def on_message(c: Any, u: Any, msg: Any) -> None:
            self.messages.put((msg.topic, bytes(msg.payload), bool(msg.retain)))

        self.client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=f"probe-{time.monotonic_ns()}"
        )
        if self.user:
            self.client.username_pw_set(self.user, self.password)
        self.client.on_connect = on_connect
        self.client.on_message = on_message
        self.client.on_subscribe = on_subscribe
        self.client.connect("127.0.0.1", self.port, keepalive=30)
        self.client.loop_start()
        assert ready.wait(10), "probe did not connect"
        if not self.connect_rc.is_failure:
            for t in topics:
                self.subscribe(t)
        return self

    def subscribe(self, topic: str) -> None:
        """Subscribe and wait for the broker's acknowledgement."""
        rc, mid = self.client.subscribe(topic, qos=1)
        assert rc == 0
        wait_until(lambda: mid in self._acked, timeout=10, what=f"SUBACK for {topic}")

    def publish(self, topic: str, doc: Any, *, qos: int = 1) -> None:
        payload = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
        self.client.publish(topic, payload, qos=qos).wait_for_publish(5)

    def wait(self, predicate: Any, timeout: float = 30) -> tuple[str, bytes, bool]:
        """The first message (seen before or arriving) for which ``predicate(topic, payload, retain)``."""
        for m in self.seen:
            if predicate(*m):
                self.seen.remove(m)
                return m
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                pytest.fail(f"no matching MQTT message within {timeout}s; saw {self.seen[-10:]}")
            try:
                m = self.messages.get(timeout=left)
            except queue.Empty:
                continue
            if predicate(*m):
                return m
            self.seen.append(m)

    def request(
        self, device: str, cmd: str, doc: dict[str, Any] | bytes | None = None, timeout: float = 60
    ) -> dict[str, Any]:
        """Publish a command with a fresh correlationId; the matching response."""
        cid = f"req-{time.monotonic_ns()}"
        body: Any = doc if isinstance(doc, bytes) else {"correlationId": cid, **(doc or {})}
        self.publish(f"keystone/{device}/cmd/{cmd}", body)
        want = f"keystone/{device}/resp/{cmd}"

        def match(topic: str, payload: bytes, retain: bool) -> bool:
            if topic != want:
                return False
            if isinstance(doc, bytes):
                return True
            return bool(json.loads(payload).get("correlationId") == cid)

        _, payload, _ = self.wait(match, timeout)
        resp: dict[str, Any] = json.loads(payload)
        return resp

    def close(self) -> None:
        if self.client is not None:
            self.client.disconnect()
            self.client.loop_stop()
            self.client = None


class NatsProbe:
    """A nats-py client on the test side, on its own event loop in one thread."""

    def __init__(self, port: int, **opts: Any) -> None:
        self.url = f"nats://127.0.0.1:{port}"
        self.opts = opts
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.nc: Any = None
        self.messages: queue.Queue[tuple[str, bytes]] = queue.Queue()

    def run(self, coro: Any, timeout: float = 60) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def connect(self, *subjects: str) -> NatsProbe:
        from nats.aio.client import Client

        async def go() -> None:
            nc = Client()
            try:
                await nc.connect(self.url, allow_reconnect=False, **self.opts)
            except BaseException:
                # A refused connection leaves its socket open unless closed here.
                with contextlib.suppress(Exception):
                    await nc.close()
                if nc._transport is not None:
                    nc._transport.close()
                raise
            self.nc = nc
            for s in subjects:
                await self.follow(s)

        self.run(go())
        return self

    async def follow(self, subject: str) -> None:
        async def cb(msg: Any) -> None:
            self.messages.put((msg.subject, msg.data))

        await self.nc.subscribe(subject, cb=cb)
        await self.nc.flush()

    def subscribe(self, subject: str) -> None:
        self.run(self.follow(subject))

    def request(self, subject: str, doc: Any = None, timeout: float = 60) -> dict[str, Any]:
        payload = doc if isinstance(doc, bytes) else json.dumps(doc or {}).encode()
        msg = self.run(self.nc.request(subject, payload, timeout=timeout), timeout + 5)
        resp: dict[str, Any] = json.loads(msg.data)
        return resp

    def publish(self, subject: str, doc: Any) -> None:
        payload = doc if isinstance(doc, bytes) else json.dumps(doc).encode()

        async def go() -> None:
            await self.nc.publish(subject, payload)
            await self.nc.flush()

        self.run(go())

    def wait(self, predicate: Any, timeout: float = 30) -> tuple[str, bytes]:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                pytest.fail(f"no matching NATS message within {timeout}s")
            try:
                m = self.messages.get(timeout=left)
            except queue.Empty:
                continue
            if predicate(*m):
                return m

    def close(self) -> None:
        if self.nc is not None:
            with contextlib.suppress(Exception):
                self.run(self.nc.close(), 10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def probes() -> Iterator[list[Any]]:
    """Probes created by a test are closed at its end."""
    made: list[Any] = []
    yield made
    for p in made:
        p.close()


def recipe_text(name: str, version: str = "1.0.0") -> str:
    """A recipe whose process just sleeps (no health check: running is healthy)."""
    import sys

    return (
        f'[metadata]\nname = "{name}"\nversion = "{version}"\n\n'
        '[lifecycle.run]\nstop_timeout = "2s"\n\n'
        f"[lifecycle.run.exec]\ncommand = {json.dumps(sys.executable)}\n"
        'args = ["-c", "import time; time.sleep(3600)"]\n'
    )


def demo_env() -> dict[str, str]:
    return {
        "DEMO_DB_PORT": str(free_port()),
        "DEMO_CACHE_PORT": str(free_port()),
        "DEMO_API_PORT": str(free_port()),
    }
