"""HTTP details of the API server on raw sockets: keep-alive, Expect 100-continue, bad framing,
bundle streams that end at Content-Length, a slow TLS client, and the OpenAPI document's shape."""

from __future__ import annotations

import http.client
import json
import re
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from keystone.api import ROUTES, ApiServer, TlsConfig, match_routes, parse_listen
from keystone.errors import UsageError
from keystone.openapi import openapi_document
from tests.unit.test_client import TOKEN, Control
from tests.unit.test_client import pki as pki  # a fixture

AUTH = f"Authorization: Bearer {TOKEN}\r\n"


@pytest.fixture
def control() -> Control:
    return Control()


@pytest.fixture
def server(control: Control, tmp_path: Path) -> Iterator[ApiServer]:
    s = ApiServer(control, listen="127.0.0.1:0", token=TOKEN, token_file=tmp_path / "api.token")
    s.start()
    try:
        yield s
    finally:
        s.stop()


def port_of(server: ApiServer) -> int:
    return int(server.address.rsplit(":", 1)[1])


_PENDING: dict[int, bytes] = {}


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response (Content-Length framed) from a raw socket; bytes of the next
    response, if they came along, are kept for the next call."""
    buf = _PENDING.pop(sock.fileno(), b"")
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed after {buf!r}")
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
    n = int(headers.get("content-length", "0"))
    while len(rest) < n:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed mid-body")
        rest += chunk
    if rest[n:]:
        _PENDING[sock.fileno()] = rest[n:]
    return status, headers, rest[:n]


class TestKeepAlive:
    def test_many_requests_on_one_connection(self, server: ApiServer) -> None:
        """401, 404, 405, 200 and 204 answers all leave the connection usable."""
        conn = http.client.HTTPConnection("127.0.0.1", port_of(server), timeout=10)
        try:
            seen = []
            for method, path, auth in [
                ("GET", "/v1/components", False),
                ("GET", "/v1/nope", True),
                ("DELETE", "/v1/components", True),
                ("GET", "/healthz", False),
                ("POST", "/v1/components/api:stop", True),
                ("GET", "/v1/components", True),
            ]:
                conn.request(
                    method, path, headers={"Authorization": f"Bearer {TOKEN}"} if auth else {}
                )
                resp = conn.getresponse()
                resp.read()
                seen.append(resp.status)
            assert seen == [401, 404, 405, 200, 204, 200]
        finally:
            conn.close()

    def test_body_sent_to_a_bodiless_route_is_consumed(self, server: ApiServer) -> None:
        """A body on a route that takes none does not become the next request."""
        with socket.create_connection(("127.0.0.1", port_of(server)), timeout=10) as s:
            s.sendall(
                (
                    f"POST /v1/plan/stop HTTP/1.1\r\nHost: x\r\n{AUTH}Content-Length: 24\r\n\r\n"
                ).encode()
                + b"GET /v1/nope HTTP/1.1\r\n\r\n"[:24]
            )
            assert read_response(s)[0] == 204
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert read_response(s)[0] == 200


class TestFraming:
    @pytest.mark.parametrize(
        ("headers", "status"),
        [
            ("Transfer-Encoding: chunked\r\n", 411),
            ("Content-Length: ten\r\n", 400),
            ("Content-Length: -1\r\n", 400),
        ],
    )
    def test_bad_framing(
        self, server: ApiServer, control: Control, headers: str, status: int
    ) -> None:
        """Chunked bodies are refused (411) and a Content-Length that is not a number is 400."""
        with socket.create_connection(("127.0.0.1", port_of(server)), timeout=10) as s:
            s.sendall(f"POST /v1/recipes HTTP/1.1\r\nHost: x\r\n{AUTH}{headers}\r\n".encode())
            got, hdrs, body = read_response(s)
        assert got == status, body
        assert hdrs.get("connection") == "close"
        assert not [c for c in control.calls if c[0] == "upload"]

    def test_expect_continue_is_answered_before_the_body(self, server: ApiServer) -> None:
        """Expect: 100-continue gets 100 with the token, 401 without it, 413 over the cap."""
        port = port_of(server)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(
                f"POST /v1/recipes HTTP/1.1\r\nHost: x\r\n{AUTH}Content-Length: 40\r\n"
                "Expect: 100-continue\r\n\r\n".encode()
            )
            assert s.recv(1024).startswith(b"HTTP/1.1 100")
            s.sendall(b'[metadata]\nname = "e"\nversion = "1"\n#xxx')
            assert read_response(s)[0] == 201
        for auth, length, want in (("", 10, 401), (AUTH, 5 << 20, 413)):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                s.sendall(
                    f"POST /v1/recipes HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: {length}\r\n"
                    "Expect: 100-continue\r\n\r\n".encode()
                )
                status, headers, _ = read_response(s)
                assert status == want and headers["connection"] == "close"

    def test_bundle_stream_ends_at_content_length(
        self, server: ApiServer, control: Control
    ) -> None:
        """The agent reads the bundle up to Content-Length; the next request on the connection
        is served as a request."""
        with socket.create_connection(("127.0.0.1", port_of(server)), timeout=10) as s:
            s.sendall(
                f"POST /v1/bundles:import HTTP/1.1\r\nHost: x\r\n{AUTH}Content-Length: 5\r\n\r\n".encode()
                + b"abcde"
                + f"GET /v1/components HTTP/1.1\r\nHost: x\r\n{AUTH}\r\n".encode()
            )
            status, _, body = read_response(s)
            assert status == 200 and json.loads(body)["bytes"] == 5
            assert read_response(s)[0] == 200
        assert control.bundle == b"abcde"

    def test_a_bundle_cut_short_ends_short(self, server: ApiServer, control: Control) -> None:
        """A client that stops mid-bundle: the agent gets the bytes that came and the announced
        length to compare them with, and the connection is closed after the answer."""
        with socket.create_connection(("127.0.0.1", port_of(server)), timeout=10) as s:
            s.sendall(
                f"POST /v1/bundles:import HTTP/1.1\r\nHost: x\r\n{AUTH}Content-Length: 100\r\n\r\n".encode()
                + b"only-ten!!"
            )
            s.shutdown(socket.SHUT_WR)
            _, headers, _ = read_response(s)
            assert headers["connection"] == "close"
            assert s.recv(1024) == b""
        assert control.bundle == b"only-ten!!"
        assert ("import", 100) in control.calls

    def test_bundle_needs_a_length(self, server: ApiServer) -> None:
        """A bundle upload without Content-Length is 411."""
        with socket.create_connection(("127.0.0.1", port_of(server)), timeout=10) as s:
            s.sendall(f"POST /v1/bundles:import HTTP/1.1\r\nHost: x\r\n{AUTH}\r\n".encode())
            assert read_response(s)[0] == 411


class TestServer:
    @pytest.mark.parametrize(
        ("listen", "want"),
        [
            ("127.0.0.1:8080", ("127.0.0.1", 8080)),
            ("[::1]:9", ("::1", 9)),
            (":8080", ("0.0.0.0", 8080)),
            ("localhost:1", ("localhost", 1)),
            ("http://127.0.0.1:80", ("127.0.0.1", 80)),
        ],
    )
    def test_parse_listen(self, listen: str, want: tuple[str, int]) -> None:
        """host:port forms, as the Go agent's --http takes them."""
        assert parse_listen(listen) == want

    def test_port_in_use(self, server: ApiServer, control: Control, tmp_path: Path) -> None:
        """A taken port is a usage error naming the address."""
        other = ApiServer(
            control, listen=f"127.0.0.1:{port_of(server)}", token=TOKEN, token_file=tmp_path / "t"
        )
        with pytest.raises(UsageError, match=r"cannot listen on 127\.0\.0\.1"):
            other.start()

    def test_stop_is_prompt_and_frees_the_port(self, control: Control, tmp_path: Path) -> None:
        """stop() wakes the accept loop at once; the port can be bound again."""
        s = ApiServer(control, listen="127.0.0.1:0", token=TOKEN, token_file=tmp_path / "t")
        s.start()
        port = port_of(s)
        t0 = time.monotonic()
        s.stop()
        assert time.monotonic() - t0 < 5
        again = ApiServer(
            control, listen=f"127.0.0.1:{port}", token=TOKEN, token_file=tmp_path / "t"
        )
        again.start()
        again.stop()

    def test_stop_ends_idle_kept_alive_connections(self, control: Control, tmp_path: Path) -> None:
        """After stop() a kept-alive connection is closed, not left to call a stopped agent."""
        s = ApiServer(control, listen="127.0.0.1:0", token=TOKEN, token_file=tmp_path / "t")
        s.start()
        with socket.create_connection(("127.0.0.1", port_of(s)), timeout=10) as conn:
            conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert read_response(conn)[0] == 200
            s.stop()
            assert conn.recv(1024) == b""

    def test_token_file_of_any_name(self, control: Control, tmp_path: Path) -> None:
        """Without a token the server creates and uses exactly the token_file it was given."""
        path = tmp_path / "secrets" / "keystone.token"
        s = ApiServer(control, listen="127.0.0.1:0", token=None, token_file=path)
        assert path.read_text().strip() == s.token
        assert oct(path.stat().st_mode & 0o777) == "0o600"

    def test_ipv6_loopback(self, control: Control, tmp_path: Path) -> None:
        """[::1] is served over IPv6."""
        if not socket.has_ipv6:
            pytest.skip("no IPv6")
        s = ApiServer(control, listen="[::1]:0", token=TOKEN, token_file=tmp_path / "t")
        try:
            s.start()
        except UsageError:
            pytest.skip("IPv6 loopback not configured")
        try:
            assert s.address.startswith("http://[::1]:")
            conn = http.client.HTTPConnection("::1", port_of(s), timeout=10)
            conn.request("GET", "/healthz")
            assert conn.getresponse().status == 200
            conn.close()
        finally:
            s.stop()

    def test_unreadable_tls_files_are_usage(self, control: Control, tmp_path: Path) -> None:
        """TLS files that do not load stop the start with the config keys to check."""
        tls = TlsConfig(tmp_path / "none.pem", tmp_path / "none.key")
        with pytest.raises(UsageError, match="tls_cert"):
            ApiServer(
                control, listen="127.0.0.1:0", token=TOKEN, token_file=tmp_path / "t", tls=tls
            )

    def test_a_stalled_tls_handshake_does_not_block_others(
        self, control: Control, pki: Path, tmp_path: Path
    ) -> None:
        """A client that connects and says nothing holds only its own thread."""
        tls = TlsConfig(pki / "server.pem", pki / "server.key", pki / "ca.pem")
        s = ApiServer(
            control, listen="127.0.0.1:0", token=TOKEN, token_file=tmp_path / "t", tls=tls
        )
        s.start()
        try:
            with socket.create_connection(("127.0.0.1", port_of(s)), timeout=10):
                ctx = ssl.create_default_context(cafile=str(pki / "ca.pem"))
                ctx.load_cert_chain(str(pki / "client.pem"), str(pki / "client.key"))
                conn = http.client.HTTPSConnection("127.0.0.1", port_of(s), context=ctx, timeout=10)
                conn.request("GET", "/healthz")
                assert conn.getresponse().status == 200
                conn.close()
        finally:
            s.stop()


def resolve(doc: dict[str, Any], ref: str) -> Any:
    node: Any = doc
    for part in ref.removeprefix("#/").split("/"):
        node = node[part]
    return node


class TestOpenApiDocument:
    def test_every_ref_resolves(self) -> None:
        """Every $ref in the document points at a schema it defines."""
        doc = openapi_document()
        refs = re.findall(r'"\$ref": "([^"]+)"', json.dumps(doc))
        assert refs
        for ref in refs:
            assert isinstance(resolve(doc, ref), dict), ref

    def test_operations_are_complete(self) -> None:
        """Each operation has a unique id, a summary, its path parameters, a success answer, and
        401 exactly when it needs the token."""
        doc = openapi_document()
        ids = set()
        for path, ops in doc["paths"].items():
            for method, op in ops.items():
                assert op["operationId"] not in ids
                ids.add(op["operationId"])
                assert op["summary"] and op["description"]
                declared = {p["name"] for p in op.get("parameters", []) if p["in"] == "path"}
                assert declared == set(re.findall(r"\{(\w+)\}", path)), (method, path)
                codes = set(op["responses"])
                assert any(c.startswith("2") for c in codes)
                assert ("401" in codes) == (path != "/healthz")
                route = next(r for r in ROUTES if r.path == path and r.method == method.upper())
                assert ("requestBody" in op) == (route.body != "none")

    def test_go_statuses(self) -> None:
        """The Go statuses: 204 for stop routes and delete, 201 for a stored recipe, 202 apply."""
        paths = openapi_document()["paths"]
        assert "204" in paths["/v1/components/{name}:stop"]["post"]["responses"]
        assert "204" in paths["/v1/plan/stop"]["post"]["responses"]
        assert "204" in paths["/v1/recipes/{name}/{version}"]["delete"]["responses"]
        assert "201" in paths["/v1/recipes"]["post"]["responses"]
        assert "202" in paths["/v1/plan/apply"]["post"]["responses"]
        assert "504" in paths["/v1/components/{name}:restart"]["post"]["responses"]
        assert "413" in paths["/v1/bundles:import"]["post"]["responses"]

    def test_routes_match_their_own_paths_only(self) -> None:
        """Each route template matches its concrete path, with decoded parameters."""
        assert [r.handler for r, _ in match_routes("/v1/components/db:stop")] == ["stop_component"]
        assert match_routes("/v1/recipes/a%2Bb/1.0")[0][1] == {"name": "a+b", "version": "1.0"}
        assert match_routes("/v1/components/a/b:stop") == []
        assert match_routes("/v1/components/:stop") == []
