"""Type=notify as systemd sees it: READY=1 once the plan is up, WATCHDOG=1 pings, STOPPING=1,
on a notify socket the test binds; and --log-json lines for journald."""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.api.conftest import DEMO, demo_env

pytestmark = pytest.mark.integration

WATCHDOG_USEC = 400_000  # pings every 0.2 s


class NotifySocket:
    """A bound AF_UNIX datagram socket that records each message with its sender's pid."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        # Ask the kernel for the sender's credentials (as systemd does for NotifyAccess=main).
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)

    def receive(self, timeout: float) -> tuple[int, dict[str, str]] | None:
        """(sender pid, KEY=value fields) of the next message, or None after ``timeout``."""
        self.sock.settimeout(timeout)
        try:
            data, ancdata, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
        except TimeoutError:
            return None
        pid = 0
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = struct.unpack("=iII", payload[:12])[0]
        fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
        return pid, fields

    def wait_for(self, key: str, timeout: float) -> tuple[list[dict[str, str]], int]:
        """Every message up to and including the first with ``key``; fails after ``timeout``."""
        deadline = time.monotonic() + timeout
        seen: list[dict[str, str]] = []
        while (left := deadline - time.monotonic()) > 0:
            got = self.receive(left)
            if got is None:
                break
            pid, fields = got
            seen.append(fields)
            if key in fields:
                return seen, pid
        pytest.fail(f"no {key} on the notify socket within {timeout}s; got {seen}")

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifySocket]:
    sock = NotifySocket(tmp_path / "notify.sock")
    try:
        yield sock
    finally:
        sock.close()


class TestNotify:
    def test_ready_after_the_plan_is_up_then_watchdog_then_stopping(
        self, make_agent: Any, notify: NotifySocket
    ) -> None:
        """READY=1 comes from the agent's pid once every component is healthy; WATCHDOG=1
        follows every WatchdogSec/2; SIGTERM sends STOPPING=1; components never see the socket."""
        env = {**demo_env(), "NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": str(WATCHDOG_USEC)}
        agent = make_agent("--demo", env=env).start(wait=False)
        assert agent.proc is not None
        before, pid = notify.wait_for("READY", timeout=60)
        assert pid == agent.proc.pid
        assert not any("WATCHDOG" in m for m in before), "watchdog pings before READY=1"
        ready = before[-1]
        assert ready["READY"] == "1"
        assert ready.get("MAINPID", str(agent.proc.pid)) == str(agent.proc.pid)
        # The plan was up when READY=1 was sent.
        comps = agent.components()
        assert {n: c["phase"] for n, c in comps.items()} == dict.fromkeys(DEMO, "healthy")

        for _ in range(3):
            _, pid = notify.wait_for("WATCHDOG", timeout=WATCHDOG_USEC / 1e6 * 3)
            assert pid == agent.proc.pid

        for c in comps.values():
            environ = Path(f"/proc/{c['pid']}/environ").read_bytes().split(b"\0")
            assert not any(e.startswith((b"NOTIFY_SOCKET=", b"WATCHDOG_")) for e in environ)

        agent.proc.send_signal(signal.SIGTERM)
        notify.wait_for("STOPPING", timeout=30)
        assert agent.proc.wait(30) == 0

    def test_watchdog_for_another_pid_is_not_pinged(
        self, make_agent: Any, notify: NotifySocket
    ) -> None:
        """With WATCHDOG_PID naming another process, READY=1 is sent but no WATCHDOG=1."""
        env = {
            "NOTIFY_SOCKET": str(notify.path),
            "WATCHDOG_USEC": "100000",
            "WATCHDOG_PID": str(os.getpid()),
        }
        agent = make_agent(env=env).start(wait=False)
        notify.wait_for("READY", timeout=60)
        # Ten would-be intervals: a ping would have come by now.
        got = notify.receive(timeout=0.5)
        assert got is None or "WATCHDOG" not in got[1], got
        assert agent.stop() == 0


class TestJsonLogs:
    def test_log_json_lines(self, make_agent: Any) -> None:
        """With --log-json every line the agent writes is one JSON object with level and message."""
        agent = make_agent("--demo", "--log-json", env=demo_env()).start()
        agent.wait_states(dict.fromkeys(DEMO, "healthy"))
        assert agent.stop() == 0
        lines = [line for line in agent.output().splitlines() if line.strip()]
        assert len(lines) >= 5
        records = [json.loads(line) for line in lines]
        assert all(r["record"]["level"]["name"] and r["record"]["message"] for r in records)
        assert any("healthy" in r["record"]["message"] for r in records)
