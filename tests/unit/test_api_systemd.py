"""sd_notify: messages arrive on a datagram socket the test binds; watchdog interval table."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from keystone.systemd import Notifier


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    """A bound AF_UNIX datagram socket, as systemd's $NOTIFY_SOCKET."""
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(5)
    try:
        yield str(path), sock
    finally:
        sock.close()


def fields(sock: socket.socket) -> dict[str, str]:
    """One datagram as its KEY=value lines."""
    data = sock.recv(4096).decode()
    return dict(line.split("=", 1) for line in data.splitlines())


class TestNotifier:
    def test_ready_ping_status_stopping(self, notify_socket: tuple[str, socket.socket]) -> None:
        """READY=1 (with MAINPID), WATCHDOG=1, STATUS= and STOPPING=1 each arrive as a datagram."""
        path, sock = notify_socket
        n = Notifier({"NOTIFY_SOCKET": path})
        assert n.ready()
        ready = fields(sock)
        assert ready["READY"] == "1" and ready["MAINPID"] == str(os.getpid())
        assert n.ping()
        assert fields(sock) == {"WATCHDOG": "1"}
        assert n.status("syncing abc")
        assert fields(sock) == {"STATUS": "syncing abc"}
        assert n.stopping()
        assert fields(sock)["STOPPING"] == "1"

    def test_abstract_socket(self) -> None:
        """An @name address is the abstract namespace, as systemd writes it."""
        name = f"keystone-test-{os.getpid()}-{id(self)}"
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.bind("\0" + name)
            sock.settimeout(5)
            assert Notifier({"NOTIFY_SOCKET": "@" + name}).ping()
            assert fields(sock) == {"WATCHDOG": "1"}

    def test_no_socket_is_a_no_op(self) -> None:
        """Outside systemd nothing is sent and nothing fails."""
        n = Notifier({})
        assert not n.ready() and not n.ping() and not n.stopping()
        assert n.watchdog_interval() is None

    def test_gone_socket_does_not_raise(self, tmp_path: Path) -> None:
        """A socket that vanished makes send return False instead of stopping the agent."""
        n = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})
        assert n.ready() is False
        assert n.ping() is False


@pytest.mark.parametrize(
    ("usec", "pid", "interval"),
    [
        ("30000000", None, 15.0),
        ("2000000", "self", 1.0),
        ("2000000", "1", None),
        ("0", None, None),
        ("", None, None),
        ("soon", None, None),
    ],
)
def test_watchdog_interval(
    notify_socket: tuple[str, socket.socket], usec: str, pid: str | None, interval: float | None
) -> None:
    """Pings every WatchdogSec/2, and only when WATCHDOG_PID is this process (or unset)."""
    env = {"NOTIFY_SOCKET": notify_socket[0], "WATCHDOG_USEC": usec}
    if pid is not None:
        env["WATCHDOG_PID"] = str(os.getpid()) if pid == "self" else pid
    assert Notifier(env).watchdog_interval() == interval
