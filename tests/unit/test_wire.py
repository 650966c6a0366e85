"""The fast path's HTTP/1.1 wire against real servers on 127.0.0.1 (``http.server``): bodies by
length, chunked and to the close, keep-alive, bounds, broken and silent servers, and the same
errors and exit codes as ``keystone.client.Client``."""

from __future__ import annotations

import http.server
import json
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from keystone.cli.fast import fast_main
from keystone.client import (
    ApiRefused,
    ApiUnavailable,
    ApiUsageError,
    Client,
)
from keystone.errors import AgentUnreachable, KeystoneError
from keystone.wire import Unusual, WireClient
from tests.conftest import free_port

Handler = Callable[[http.server.BaseHTTPRequestHandler], None]

CLEAN_ENV = ("KEYSTONE_ADDR", "KEYSTONE_API_TOKEN", "KEYSTONE_SSH", "KEYSTONE_RUNTIME")


class Server:
    """An ``http.server`` on 127.0.0.1 whose GET and POST answers are ``handle`` (swappable);
    it records the requests it read and the connections it accepted."""

    def __init__(self) -> None:
        self.handle: Handler = lambda h: send(h, 200, b'{"ok": true}')
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.connections = 0
        outer = self

        class _H(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                outer.connections += 1

            def do_GET(self) -> None:
                outer.requests.append((self.command, self.path, dict(self.headers.items())))
                outer.handle(self)

            do_POST = do_GET

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _H)
        self.httpd.daemon_threads = True
        self.addr = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.closing = False
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        # Accept-driven (no poll interval): __exit__ wakes the accept with a connection.
        while not self.closing:
            self.httpd._handle_request_noblock()

    def __enter__(self) -> Server:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.closing = True
        socket.create_connection(self.httpd.server_address[:2]).close()
        self.thread.join(10)
        self.httpd.server_close()


def send(
    h: http.server.BaseHTTPRequestHandler,
    status: int,
    body: bytes,
    *,
    ctype: str = "application/json",
    close: bool = False,
) -> None:
    h.send_response(status)
    h.send_header("Content-Type", ctype)
    h.send_header("Content-Length", str(len(body)))
    if close:
        h.send_header("Connection", "close")
    h.end_headers()
    h.wfile.write(body)


def chunked(
    h: http.server.BaseHTTPRequestHandler, parts: list[bytes], trailer: bytes = b""
) -> None:
    h.send_response(200)
    h.send_header("Content-Type", "application/json")
    h.send_header("Transfer-Encoding", "chunked")
    h.end_headers()
    for p in parts:
        h.wfile.write(b"%x;ext=1\r\n%s\r\n" % (len(p), p))
    h.wfile.write(b"0\r\n" + trailer + b"\r\n")


@pytest.fixture
def server() -> Iterator[Server]:
    with Server() as s:
        yield s


def wire(server: Server, **kw: Any) -> WireClient:
    return WireClient(server.addr, "tok", environ={}, **kw)


def outcome(make: Callable[[], Any], method: str, path: str) -> tuple[type, str, int]:
    """The class, message and exit code of the error a client raises for one request."""
    with make() as c, pytest.raises(KeystoneError) as info:
        c.request(method, path)
    return type(info.value), str(info.value), info.value.exit_code


class TestBodies:
    def test_length_json_text_and_204(self, server: Server) -> None:
        """A JSON body decodes, a text body is text, a 204 is None; the request carries the
        Accept, Host and Authorization headers Client sends."""
        with wire(server) as c:
            assert c.get("/a") == {"ok": True}
            server.handle = lambda h: send(h, 200, b"hello", ctype="text/plain")
            assert c.get("/b") == "hello"
            server.handle = lambda h: send(h, 204, b"")
            assert c.post("/c", params={"dry": "true", "x": "a b"}) is None
        method, path, headers = server.requests[-1]
        assert (method, path) == ("POST", "/c?dry=true&x=a+b")
        port = server.addr.rsplit(":", 1)[1]
        assert headers["Host"] == f"127.0.0.1:{port}"
        assert headers["Authorization"] == "Bearer tok"
        assert headers["Accept"] == "application/json"

    def test_chunked(self, server: Server) -> None:
        """A chunked answer (with extensions and a trailer) decodes to its joined chunks."""
        server.handle = lambda h: chunked(h, [b'{"a": ', b"[1, 2", b"]}"], b"X-T: 1\r\n")
        with wire(server) as c:
            assert c.get("/x") == {"a": [1, 2]}
            assert c.get("/x") == {"a": [1, 2]}
        assert server.connections == 1

    def test_body_to_the_close(self, server: Server) -> None:
        """An answer with neither length nor chunks runs to the close; the next request
        opens a new connection."""

        def to_close(h: http.server.BaseHTTPRequestHandler) -> None:
            h.send_response(200)
            h.send_header("Content-Type", "application/json")
            h.end_headers()
            h.wfile.write(b'{"n": 1}')
            h.close_connection = True

        server.handle = to_close
        with wire(server) as c:
            assert c.get("/x") == {"n": 1}
            assert c.get("/x") == {"n": 1}
        assert server.connections == 2

    def test_body_over_the_bound_is_unusual_and_the_fast_path_asks_client(
        self, server: Server, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A body over the wire's bound is Unusual; ``keystone health`` then asks Client and
        prints the whole answer."""
        big = json.dumps({"status": "ok", "pad": "x" * 5000}).encode()
        server.handle = lambda h: send(h, 200, big)
        with wire(server, max_body=4096) as c, pytest.raises(Unusual):
            c.get("/healthz")
        server.handle = lambda h: chunked(h, [big[:3000], big[3000:]])
        with wire(server, max_body=4096) as c, pytest.raises(Unusual):
            c.get("/healthz")
        for var in CLEAN_ENV:
            monkeypatch.delenv(var, raising=False)
        monkeypatch.setattr("keystone.wire.MAX_BODY", 4096)
        before = len(server.requests)
        assert fast_main(["health", "--json", "--addr", server.addr, "--token", "t"]) == 0
        assert json.loads(capsys.readouterr().out)["pad"] == "x" * 5000
        assert len(server.requests) == before + 2  # the wire's, then Client's


class TestConnections:
    def test_keep_alive_and_connection_close(self, server: Server) -> None:
        """Answers on one connection while the server keeps it; a new one after it says close."""
        with wire(server) as c:
            c.get("/a")
            c.get("/b")
            assert server.connections == 1
            server.handle = lambda h: send(h, 200, b"{}", close=True)
            c.get("/c")
            c.get("/d")
        assert server.connections == 2  # /c closed the first; /d opened the second

    def test_a_kept_connection_the_server_closed_is_replaced(self, server: Server) -> None:
        """A kept-alive connection the server dropped after its answer is replaced silently."""

        def answer_then_drop(h: http.server.BaseHTTPRequestHandler) -> None:
            send(h, 200, b'{"n": 1}')
            h.close_connection = True

        server.handle = answer_then_drop
        with wire(server) as c:
            assert c.get("/a") == {"n": 1}
            assert c.get("/b") == {"n": 1}
        assert server.connections == 2

    def test_a_fresh_connection_closed_without_an_answer(self, server: Server) -> None:
        """A server that reads the request and hangs up: Client's words, exit 1."""
        server.handle = lambda h: setattr(h, "close_connection", True)
        a = outcome(lambda: wire(server), "GET", "/x")
        b = outcome(lambda: Client(server.addr, "tok", environ={}), "GET", "/x")
        assert a == b and "the connection closed before the answer" in a[1] and a[2] == 1

    def test_a_server_that_closes_mid_answer(self, server: Server) -> None:
        """An answer cut short is Unusual for the wire; Client reports it unreachable (exit 1)."""

        def cut(h: http.server.BaseHTTPRequestHandler) -> None:
            h.send_response(200)
            h.send_header("Content-Length", "100")
            h.end_headers()
            h.wfile.write(b'{"half": ')
            h.close_connection = True

        server.handle = cut
        with wire(server) as c, pytest.raises(Unusual):
            c.get("/x")
        cls, _, code = outcome(lambda: Client(server.addr, "t", environ={}), "GET", "/x")
        assert issubclass(cls, AgentUnreachable) and code == 1

    def test_a_silent_server_times_out_as_client_does(self, server: Server) -> None:
        """A server that never answers: the same message and exit code as Client."""
        done = threading.Event()
        server.handle = lambda h: done.wait(30) and None
        try:
            a = outcome(lambda: wire(server, timeout=1), "GET", "/healthz")
            b = outcome(lambda: Client(server.addr, "t", timeout=1, environ={}), "GET", "/healthz")
        finally:
            done.set()
        assert a == b
        assert a[0] is AgentUnreachable and "did not answer GET /healthz within 1s" in a[1]

    def test_nothing_listening(self) -> None:
        """No agent: word for word Client's error, exit 1."""
        addr = f"http://127.0.0.1:{free_port()}"
        a = outcome(lambda: WireClient(addr, environ={}), "GET", "/healthz")
        b = outcome(lambda: Client(addr, environ={}), "GET", "/healthz")
        assert a == b
        assert a[1] == (
            f"error: no agent answers at {addr}; start one with `keystone agent` (or pass "
            "--addr) [connection refused]"
        ).removeprefix("error: ")

    @pytest.mark.parametrize(
        "raw",
        [
            b"SSH-2.0-OpenSSH\r\n\r\n",
            b"HTTP/1.1 100 Continue\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nbad\r\n\r\n",
        ],
    )
    def test_not_the_http_it_expects_is_unusual(self, server: Server, raw: bytes) -> None:
        """Not HTTP/1.x, an interim answer, a malformed header: Unusual (Client then asks)."""

        def odd(h: http.server.BaseHTTPRequestHandler) -> None:
            h.wfile.write(raw)
            h.close_connection = True

        server.handle = odd
        with wire(server) as c, pytest.raises(Unusual):
            c.get("/x")


class TestErrors:
    @pytest.mark.parametrize(
        ("status", "body", "cls", "code"),
        [
            (401, b'{"error": "unauthorized"}', ApiUsageError, 2),
            (404, b'{"error": "no component ghost", "kind": "usage"}', ApiUsageError, 2),
            (422, b'{"error": "unknown field"}', ApiRefused, 3),
            (503, b"", ApiUnavailable, 1),
        ],
    )
    def test_error_answers_as_client(
        self, server: Server, status: int, body: bytes, cls: type, code: int
    ) -> None:
        """401, 404, 422, 503: the same exception, message and exit code as Client."""
        server.handle = lambda h: send(h, status, body)
        a = outcome(lambda: wire(server), "POST", "/v1/x")
        b = outcome(lambda: Client(server.addr, "tok", environ={}), "POST", "/v1/x")
        assert a == b and a[0] is cls and a[2] == code

    @pytest.mark.parametrize(("status", "code"), [(401, 2), (404, 2), (422, 3)])
    def test_exit_codes_of_the_fast_path(
        self,
        server: Server,
        status: int,
        code: int,
        capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """``keystone status`` exits 2 for 401 and 404, 3 for 422, JSON on stdout with --json."""
        for var in CLEAN_ENV:
            monkeypatch.delenv(var, raising=False)
        server.handle = lambda h: send(h, status, b'{"error": "no"}')
        assert fast_main(["status", "--json", "--addr", server.addr, "--token", "t"]) == code
        out = capsys.readouterr()
        assert json.loads(out.out)["status"] == status and out.err.startswith("error: ")


class TestChoice:
    def test_https_and_ssh_are_not_plain(self, tmp_path: Path) -> None:
        """https and --ssh (or KEYSTONE_SSH) go to Client; plain http stays on the wire."""
        assert WireClient("http://h:1", environ={}).plain
        assert not WireClient("https://h:1", environ={}).plain
        assert not WireClient("http://h:1", ssh="edge", environ={}).plain
        assert not WireClient("http://h:1", environ={"KEYSTONE_SSH": "edge"}).plain
        assert WireClient("http://h:1", environ={"KEYSTONE_SSH": " "}).plain

    def test_token_from_the_runtime_dir(self, tmp_path: Path) -> None:
        """The same token discovery as Client (here: --runtime)."""
        (tmp_path / "api.token").write_text("from-file\n")
        assert WireClient(runtime=tmp_path, environ={}).token == "from-file"
        assert WireClient(runtime=str(tmp_path), environ={}).token == "from-file"
        assert Client(runtime=tmp_path, environ={}).token == "from-file"


class TestSync:
    def test_a_superseded_sync_follows_the_newer_operation(
        self, server: Server, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """``sync --once`` superseded by a newer request prints that one's outcome and exits
        with its code; the wire hands the long poll to Client."""
        for var in CLEAN_ENV:
            monkeypatch.delenv(var, raising=False)
        done = {"state": "done", "result": {"result": "refused", "error": "bad sig"}}

        def agent(h: http.server.BaseHTTPRequestHandler) -> None:
            if h.command == "POST":
                send(h, 200, b'{"result": "superseded", "superseded_by": "op 2"}')
            else:
                send(h, 200, json.dumps(done).encode())

        server.handle = agent
        assert fast_main(["sync", "--once", "--json", "--addr", server.addr, "--token", "t"]) == 3
        assert json.loads(capsys.readouterr().out) == done["result"]
        (post, sync, _), (get, path, _) = server.requests
        assert (post, sync) == ("POST", "/v1/sync?dry=false&allow_rollback=false&retry=false")
        assert get == "GET" and path.startswith("/v1/operations/op%202?wait=")


class TestWhatHttpClientRefuses:
    @pytest.mark.parametrize("addr_path", ["/a b", "/caf\u00e9"])
    def test_a_target_http_client_refuses_is_unusual(self, server: Server, addr_path: str) -> None:
        """A target with a space or beyond ASCII is not sent; Client then says what is wrong."""
        with WireClient(server.addr + addr_path, "t", environ={}) as c, pytest.raises(Unusual):
            c.get("/healthz")
        assert server.requests == []

    @pytest.mark.parametrize("token", ["a\nb", "caf\u20ac"])
    def test_a_token_http_client_refuses_is_unusual(self, server: Server, token: str) -> None:
        """A token with a line break or beyond Latin-1 is not sent."""
        with WireClient(server.addr, token, environ={}) as c, pytest.raises(Unusual):
            c.get("/healthz")
        assert server.requests == []


class TestKeystonectl:
    def test_reads_errors_and_fallback(
        self, server: Server, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """``keystonectl components`` on the wire: the Go body, the Go error line and exit 1,
        and an answer over the wire's bound printed whole through Client."""
        from keystone.cli import goctl

        for var in CLEAN_ENV:
            monkeypatch.delenv(var, raising=False)
        argv = ["--addr", server.addr, "--token", "t", "components"]
        server.handle = lambda h: send(h, 200, b'[{"name": "a<b"}]')
        assert goctl.ctl_fast(argv) == 0
        assert capsys.readouterr().out == '[\n  {\n    "name": "a\\u003cb"\n  }\n]\n'
        server.handle = lambda h: send(h, 404, b'{"error": "nope"}')
        assert goctl.ctl_fast(argv) == 1
        assert capsys.readouterr().err == "Error: 404 Not Found: GET /v1/components: nope\n"
        monkeypatch.setattr("keystone.wire.MAX_BODY", 10)
        server.handle = lambda h: send(h, 200, b'[{"name": "longer than ten"}]')
        assert goctl.ctl_fast(argv) == 0
        assert "longer than ten" in capsys.readouterr().out
        assert len(server.requests) == 4  # the last asked twice: the wire, then Client
