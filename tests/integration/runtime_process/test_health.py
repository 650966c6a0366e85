"""Health probes against real servers on 127.0.0.1 and real shell commands."""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from keystone.runtime.health import ProbeResult, probe
from keystone.runtime.process import ProcessRunner, pgid_members
from tests.conftest import free_port
from tests.integration.api.conftest import AgentProc, request, stop_agent
from tests.tlscert import server_context

from .conftest import Bench, run

pytestmark = pytest.mark.integration


@dataclass
class Server:
    """A real HTTP server in a thread; ``seen`` records (method, path, version, headers)."""

    httpd: ThreadingHTTPServer
    release: threading.Event
    seen: list[tuple[str, str, str, dict[str, str]]] = field(default_factory=list)

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    def url(self, path: str, scheme: str = "http") -> str:
        return f"{scheme}://127.0.0.1:{self.port}{path}"


def make_server(tls: ssl.SSLContext | None = None) -> Server:
    release = threading.Event()
    server: Server

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            server.seen.append(
                (self.command, self.path, self.request_version, dict(self.headers.items()))
            )
            path = self.path.split("?")[0]
            if path == "/slow":
                release.wait(60)  # held until the test ends: the probe must give up first
            code, headers = {
                "/ok": (200, {}),
                "/slow": (200, {}),
                "/nocontent": (204, {}),
                "/err": (500, {}),
                "/redirect": (302, {"Location": "/ok"}),
            }.get(path, (404, {}))
            body = b"" if code == 204 else b"body\n"
            self.send_response(code)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    class Quiet(ThreadingHTTPServer):
        daemon_threads = True

        def handle_error(self, request: Any, client_address: Any) -> None:
            pass  # probes hang up without reading bodies; that is expected

    httpd = Quiet(("127.0.0.1", 0), Handler)
    if tls is not None:
        httpd.socket = tls.wrap_socket(httpd.socket, server_side=True)
    server = Server(httpd, release)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return server


def stop_server(server: Server) -> None:
    server.release.set()
    server.httpd.shutdown()
    server.httpd.server_close()


@pytest.fixture
def http() -> Iterator[Server]:
    server = make_server()
    try:
        yield server
    finally:
        stop_server(server)


@dataclass
class Tls:
    cert: Path
    server: Server


@pytest.fixture
def https(tmp_path: Path) -> Iterator[Tls]:
    """An HTTPS server with a self-signed certificate for 127.0.0.1 (made with cryptography)."""
    ctx, cert_pem = server_context(tmp_path)
    server = make_server(ctx)
    try:
        yield Tls(cert_pem, server)
    finally:
        stop_server(server)


def check(bench: Bench, spec: str, timeout: float = 5.0) -> ProbeResult:
    async def body() -> ProbeResult:
        return await probe(
            spec, timeout=timeout, runner=ProcessRunner(), cwd=bench.cwd, env=bench.env(X="1")
        )

    return run(body())


class TestHttp:
    def test_200_is_healthy(self, bench: Bench, http: Server) -> None:
        """2xx is healthy; the request is one HTTP/1.1 GET with Host and Connection: close."""
        assert check(bench, http.url("/ok?probe=1")) == ProbeResult(True, "HTTP 200")
        method, path, version, headers = http.seen[-1]
        assert (method, path, version) == ("GET", "/ok?probe=1", "HTTP/1.1")
        assert headers["Host"] == f"127.0.0.1:{http.port}"
        assert headers["Connection"] == "close"

    def test_204_is_healthy(self, bench: Bench, http: Server) -> None:
        """Any 2xx counts, not only 200."""
        assert check(bench, http.url("/nocontent")) == ProbeResult(True, "HTTP 204")

    def test_500_is_unhealthy(self, bench: Bench, http: Server) -> None:
        """A 5xx is unhealthy and the detail carries the status and reason."""
        assert check(bench, http.url("/err")) == ProbeResult(
            False, "HTTP 500 Internal Server Error"
        )

    def test_redirect_is_not_followed(self, bench: Bench, http: Server) -> None:
        """A 302 is unhealthy, names its Location, and the target is never requested."""
        result = check(bench, http.url("/redirect"))
        assert not result.ok
        assert result.detail.startswith("HTTP 302 redirect to /ok")
        assert [p for _, p, _, _ in http.seen] == ["/redirect"]

    def test_closed_port(self, bench: Bench) -> None:
        """Nothing listening is 'connection refused' with the address."""
        port = free_port()
        assert check(bench, f"http://127.0.0.1:{port}/healthz") == ProbeResult(
            False, f"connection refused to 127.0.0.1:{port}"
        )

    def test_slow_server_times_out(self, bench: Bench, http: Server) -> None:
        """A server that does not answer within the timeout is unhealthy with 'timeout after'."""
        result = check(bench, http.url("/slow"), timeout=0.3)
        assert not result.ok
        assert result.detail.startswith("timeout after 0.3s")

    def test_basic_auth_from_userinfo(self, bench: Bench, http: Server) -> None:
        """user:password in the URL becomes a Basic Authorization header, not part of Host."""
        url = f"http://probe:s%40cret@127.0.0.1:{http.port}/ok"
        assert check(bench, url).ok
        headers = http.seen[-1][3]
        assert headers["Authorization"] == "Basic cHJvYmU6c0BjcmV0"  # probe:s@cret
        assert headers["Host"] == f"127.0.0.1:{http.port}"

    def test_not_http(self, bench: Bench) -> None:
        """A server that answers something other than HTTP is unhealthy, and a silent close too."""

        async def body() -> tuple[ProbeResult, ProbeResult]:
            async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                await reader.readline()
                writer.write(b"SSH-2.0-OpenSSH\r\n")
                await writer.drain()
                writer.close()

            async def hangup(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                while await reader.readline() not in (b"\r\n", b""):
                    pass  # read the whole request, so closing sends FIN rather than RST
                writer.close()

            runner = ProcessRunner()
            results = []
            for handler in (garbage, hangup):
                srv = await asyncio.start_server(handler, "127.0.0.1", 0)
                port = srv.sockets[0].getsockname()[1]
                async with srv:
                    results.append(
                        await probe(
                            f"http://127.0.0.1:{port}/",
                            timeout=5,
                            runner=runner,
                            cwd=bench.cwd,
                            env={},
                        )
                    )
            return results[0], results[1]

        bad, closed = run(body())
        assert not bad.ok and bad.detail.startswith("bad HTTP answer from 127.0.0.1:")
        assert not closed.ok
        assert closed.detail.startswith("connection closed by 127.0.0.1:")
        assert closed.detail.endswith("before an answer")


class TestHttps:
    def test_untrusted_certificate_is_unhealthy(self, bench: Bench, https: Tls) -> None:
        """Certificates are verified by default: a self-signed one is refused with a reason."""
        result = check(bench, https.server.url("/ok", scheme="https"))
        assert not result.ok
        assert "certificate" in result.detail and "not trusted" in result.detail
        assert https.server.seen == []

    def test_trusted_certificate_is_healthy(
        self, bench: Bench, https: Tls, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """With the certificate in the trust store (SSL_CERT_FILE) the same server is healthy."""
        monkeypatch.setenv("SSL_CERT_FILE", str(https.cert))
        assert check(bench, https.server.url("/ok", scheme="https")) == ProbeResult(
            True, "HTTP 200"
        )


class TestTcp:
    def test_open_port(self, bench: Bench, http: Server) -> None:
        """tcp:// is healthy when the port accepts a connection."""
        assert check(bench, f"tcp://127.0.0.1:{http.port}") == ProbeResult(
            True, f"connected to 127.0.0.1:{http.port}"
        )

    def test_closed_port(self, bench: Bench) -> None:
        """tcp:// to a closed port is 'connection refused'."""
        port = free_port()
        assert check(bench, f"tcp://127.0.0.1:{port}") == ProbeResult(
            False, f"connection refused to 127.0.0.1:{port}"
        )

    def test_ipv6_literal_and_host_name(self, bench: Bench) -> None:
        """An IP literal is a bare connect on the loop; a name is resolved first: both probe."""
        import socket

        with socket.socket(socket.AF_INET6) as six:
            try:
                six.bind(("::1", 0))
            except OSError:
                pytest.skip("no IPv6 loopback here")
            six.listen(4)
            port = six.getsockname()[1]
            assert check(bench, f"tcp://[::1]:{port}") == ProbeResult(
                True, f"connected to [::1]:{port}"
            )
        with socket.socket() as four:
            four.bind(("127.0.0.1", 0))
            four.listen(4)
            port = four.getsockname()[1]
            assert check(bench, f"tcp://localhost:{port}").ok

    def test_a_connect_that_hangs_times_out(self, bench: Bench) -> None:
        """A full backlog never completes the connect: the probe's timeout ends it."""
        import socket

        with socket.socket() as full:
            full.bind(("127.0.0.1", 0))
            full.listen(0)
            port = full.getsockname()[1]
            fillers = []
            for _ in range(8):  # fill the accept queue: later connects are not answered
                f = socket.socket()
                f.setblocking(False)
                with contextlib.suppress(BlockingIOError):
                    f.connect(("127.0.0.1", port))
                fillers.append(f)
            try:
                result = check(bench, f"tcp://127.0.0.1:{port}", timeout=0.3)
            finally:
                for f in fillers:
                    f.close()
        # Linux may still complete it from the SYN queue; either way the probe answered.
        assert result.ok or result.detail == f"timeout after 0.3s (127.0.0.1:{port})"


class TestCmd:
    def test_exit_zero(self, bench: Bench) -> None:
        """cmd: runs /bin/sh -c in the work dir with the given env; exit 0 is healthy."""
        assert check(bench, f'cmd:test "$(pwd)" = "{bench.cwd}" && test "$X" = 1') == ProbeResult(
            True, "exit 0"
        )

    def test_failure_shows_last_stderr_line(self, bench: Bench) -> None:
        """A failing command reports its status and its last stderr line."""
        result = check(bench, "cmd:echo starting >&2; echo 'db not ready' >&2; exit 3")
        assert result == ProbeResult(False, "exit 3: db not ready")

    def test_failure_falls_back_to_stdout(self, bench: Bench) -> None:
        """Without stderr, the last stdout line explains the failure."""
        assert check(bench, "cmd:echo degraded; exit 1") == ProbeResult(False, "exit 1: degraded")

    def test_timeout_kills_the_check(self, bench: Bench) -> None:
        """A hanging check is unhealthy after its timeout and leaves no process behind."""
        pidfile = bench.cwd / "pid"
        result = check(bench, f"cmd:echo $$ > {pidfile}; sleep 300 & sleep 300", timeout=0.3)
        assert result == ProbeResult(False, "timeout after 0.3s")
        assert pgid_members(int(pidfile.read_text())) == []


class TestInvalid:
    def test_invalid_check_is_unhealthy_not_an_exception(self, bench: Bench) -> None:
        """An unusable check string yields an unhealthy result that says what was expected."""
        result = check(bench, "ftp://127.0.0.1/")
        assert not result.ok
        assert "expected http://" in result.detail


def _maps_openssl(pid: int) -> set[str]:
    """The OpenSSL libraries process ``pid`` has mapped (``libcrypto``, ``libssl``)."""
    names = set()
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        lib = line.rsplit("/", 1)[-1]
        if lib.startswith(("libcrypto", "libssl")):
            names.add(lib.split(".so")[0])
    return names


def _probe_plan(root: Path, check: str) -> Path:
    (root / "svc.recipe.toml").write_text(
        '[metadata]\nname = "svc"\nversion = "1.0.0"\n'
        '[lifecycle.run.exec]\ncommand = "sleep"\nargs = ["3600"]\n'
        f'[lifecycle.run.health]\ncheck = "{check}"\ninterval = "1s"\n'
    )
    plan = root / "plan.toml"
    plan.write_text('[[components]]\nname = "svc"\nrecipe = "svc.recipe.toml"\n')
    return plan


class TestOpenSslInTheAgent:
    """The agent loads OpenSSL when it first speaks TLS (keystone.openssl), and asyncio's TLS
    works from then on as after a plain import."""

    def test_an_agent_probing_plain_http_never_maps_libcrypto(
        self, tmp_path: Path, http: Server
    ) -> None:
        plan = _probe_plan(tmp_path, http.url("/ok"))
        agent = AgentProc(tmp_path, tmp_path / "rt", free_port(), ["--apply", str(plan)])
        agent.start()
        try:
            agent.wait_states({"svc": "healthy"})
            for path in (
                "/healthz",
                "/v1/components",
                "/metrics",
                "/v1/recipes?detail=true",
                "/v1/drift",
            ):
                assert request(agent, "GET", path)[0] == 200, path
            assert agent.proc is not None
            assert _maps_openssl(agent.proc.pid) == set(), agent.output()
        finally:
            stop_agent(agent)

    def test_an_https_probe_loads_it_and_is_healthy(self, tmp_path: Path, https: Tls) -> None:
        plan = _probe_plan(tmp_path, https.server.url("/ok", scheme="https"))
        agent = AgentProc(
            tmp_path,
            tmp_path / "rt",
            free_port(),
            ["--apply", str(plan)],
            {"SSL_CERT_FILE": str(https.cert)},
        )
        agent.start()
        try:
            comps = agent.wait_states({"svc": "healthy"})
            assert "HTTP 200" in json.dumps(comps["svc"]), comps
            assert agent.proc is not None
            assert _maps_openssl(agent.proc.pid) == {"libcrypto", "libssl"}
        finally:
            stop_agent(agent)
