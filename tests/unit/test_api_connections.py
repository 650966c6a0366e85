"""The API's connection bounds with real sockets on 127.0.0.1: concurrent connections, slow
request heads (slowloris), header line and count bounds."""

from __future__ import annotations

import http.client
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from keystone.api import ApiServer
from keystone.limits import Limits
from tests.conftest import wait_until
from tests.unit.test_api_server import TOKEN, Api, FakeControl

MAX = 8


@pytest.fixture
def bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Api]:
    monkeypatch.setenv("KEYSTONE_API_HEADER_TIMEOUT", "30s")
    control = FakeControl()
    server = ApiServer(
        control,
        listen="127.0.0.1:0",
        token=TOKEN,
        token_file=tmp_path / "api.token",
        limits=Limits(max_api_connections=MAX, max_headers=20, max_header_line_bytes=1024),
    )
    server.start()
    try:
        yield Api(server, control)
    finally:
        server.stop()


def connect(api: Api) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", api.port), timeout=30)
    return s


def answer(s: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    out = b""
    while chunk := s.recv(65536):
        out += chunk
    return out


class TestConnectionBound:
    def test_many_slow_connections_keep_threads_bounded_and_the_api_answers(
        self, bounded: Api
    ) -> None:
        """200 slow clients sending half a request head hold at most MAX threads, and a
        normal request is still answered (it closes the longest-waiting slow one)."""
        base = threading.active_count()
        slow = []
        peak = 0
        try:
            for _ in range(200):
                s = connect(bounded)
                s.sendall(b"GET /v1/components HTTP/1.1\r\nHost: x\r\nX-Slow: ")
                slow.append(s)
                peak = max(peak, threading.active_count())
            server = bounded.server._server
            assert server is not None
            wait_until(lambda: server.connections == MAX, what="the connection table to fill")
            # The handlers of the bound and the watchdog, never one per connection (an evicted
            # handler may still be finishing while its successor starts).
            assert peak <= base + 2 * MAX + 1, peak
            wait_until(
                lambda: threading.active_count() <= base + MAX + 1, what="the evicted to end"
            )
            status, body, _ = bounded.request("GET", "/v1/components")
            assert status == 200, body
            wait_until(
                lambda: threading.active_count() <= base + MAX + 1, what="the evicted to end"
            )
        finally:
            for s in slow:
                s.close()

    def test_busy_connections_make_a_new_one_503(self, bounded: Api) -> None:
        """When every connection is answering a request (here: reading its body), a new one is
        answered 503 naming the bound, without a thread."""
        busy = []
        try:
            for _ in range(MAX):
                s = connect(bounded)
                s.sendall(
                    b"POST /v1/plan:apply HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                    + TOKEN.encode()
                    + b"\r\nContent-Length: 100\r\n\r\n{"
                )
                busy.append(s)
            server = bounded.server._server
            assert server is not None
            wait_until(
                lambda: (
                    server.connections == MAX
                    and all(c.waiting_since is None for c in list(server._open.values()))
                ),
                what="every connection busy",
            )
            extra = connect(bounded)
            got = answer(extra)
            extra.close()
            assert got.startswith(b"HTTP/1.1 503"), got
            assert b"retry" in got
        finally:
            for s in busy:
                s.close()


class TestSlowHeads:
    def test_a_late_request_head_is_closed(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A client that does not finish its request head within KEYSTONE_API_HEADER_TIMEOUT
        is disconnected by the watchdog, however it trickles."""
        monkeypatch.setenv("KEYSTONE_API_HEADER_TIMEOUT", "0.3s")
        server = ApiServer(
            FakeControl(), listen="127.0.0.1:0", token=TOKEN, token_file=tmp_path / "t"
        )
        server.start()
        try:
            api = Api(server, FakeControl())
            s = connect(api)
            s.sendall(b"GET /healthz HTTP/1.1\r\nX-Slow: a")
            assert answer(s) == b""  # closed, nothing answered
            s.close()
            status, _, _ = api.request("GET", "/healthz")
            assert status == 200
        finally:
            server.stop()


class TestHeaderBounds:
    def test_long_header_line(self, bounded: Api) -> None:
        """A header line over max_header_line_bytes is answered 431 naming the bound."""
        s = connect(bounded)
        s.sendall(b"GET /healthz HTTP/1.1\r\nX-Big: " + b"a" * 2000 + b"\r\n\r\n")
        got = answer(s)
        s.close()
        assert got.startswith(b"HTTP/1.1 431"), got
        assert b"KEYSTONE_MAX_HEADER_LINE_BYTES" in got and b"max_header_line_bytes" in got

    def test_too_many_headers(self, bounded: Api) -> None:
        """More header lines than max_headers is answered 431 naming the bound."""
        s = connect(bounded)
        lines = b"".join(b"X-H%d: v\r\n" % i for i in range(40))
        s.sendall(b"GET /healthz HTTP/1.1\r\n" + lines + b"\r\n")
        got = answer(s)
        s.close()
        assert got.startswith(b"HTTP/1.1 431"), got
        assert b"KEYSTONE_MAX_HEADERS" in got

    def test_long_request_line(self, bounded: Api) -> None:
        """A request line over max_header_line_bytes is answered 414."""
        s = connect(bounded)
        s.sendall(b"GET /" + b"a" * 3000 + b" HTTP/1.1\r\n\r\n")
        got = answer(s)
        s.close()
        assert got.startswith(b"HTTP/1.1 414"), got

    def test_headers_within_bounds_pass(self, bounded: Api) -> None:
        """A request inside the bounds is answered, also on a kept-alive connection."""
        conn = http.client.HTTPConnection("127.0.0.1", bounded.port, timeout=30)
        try:
            for _ in range(3):
                conn.request("GET", "/healthz", headers={"X-Ok": "a" * 500})
                resp = conn.getresponse()
                resp.read()
                assert resp.status == 200
        finally:
            conn.close()
