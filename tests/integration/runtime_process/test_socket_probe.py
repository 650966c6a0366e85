"""The socket-level probes of IP-literal tcp:// and http:// checks, against real listeners.

Each server behaviour is probed twice: through :func:`probe` (a :class:`SocketProbe`, loop
callbacks) and through the asyncio streams that host names and HTTPS still use; the verdicts
must be the same, word for word.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from keystone.runtime.health import MAX_HEAD, ProbeResult, _probe_streams, parse_check, probe
from keystone.runtime.probes import ProbeScheduler
from keystone.runtime.process import ProcessRunner
from keystone.runtime.timing import FakeClock, MonotonicClock
from tests.conftest import free_port

from .conftest import run, until

pytestmark = pytest.mark.integration

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def request(reader: asyncio.StreamReader) -> None:
    """Read a whole request head (so a close sends FIN, not RST)."""
    while await reader.readline() not in (b"\r\n", b""):
        pass


def answer(data: bytes, *, drip: bool = False) -> Handler:
    """A server that reads the request, writes ``data`` (a byte at a time with ``drip``), closes."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await request(reader)
            if drip:
                for i in range(len(data)):
                    writer.write(data[i : i + 1])
                    await writer.drain()
                    await asyncio.sleep(0.002)  # the server's pace, not a wait for the probe
            else:
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass  # the probe had its verdict and hung up before the rest
        finally:
            writer.close()

    return handler


async def both(check: str, timeout: float = 5.0) -> tuple[ProbeResult, ProbeResult]:
    """The verdict of the socket probe and of the streams for the same check."""
    parsed = parse_check(check)
    assert not isinstance(parsed, str) and parsed.direct
    kw = {"timeout": timeout, "runner": ProcessRunner(), "cwd": Path("/"), "env": {}}
    direct = await probe(check, **kw)  # type: ignore[arg-type]
    streams = await _probe_streams(parsed, timeout)
    return direct, streams


async def served(handler: Handler, path: str = "/health") -> tuple[ProbeResult, ProbeResult]:
    srv = await asyncio.start_server(handler, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    async with srv:
        return await both(f"http://127.0.0.1:{port}{path}")


LONG_HEADERS = b"HTTP/1.1 301 Moved\r\n" + b"X-Pad: " + b"p" * 1000 + b"\r\n"
ANSWERS: list[tuple[str, bytes, bool | str]] = [
    ("200", b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", "HTTP 200"),
    ("204", b"HTTP/1.0 204 No Content\r\n\r\n", "HTTP 204"),
    ("500", b"HTTP/1.1 500 Internal Server Error\r\n\r\nbody", "HTTP 500 Internal Server Error"),
    ("404 without a reason", b"HTTP/1.1 404\r\n\r\n", "HTTP 404"),
    ("bare LF", b"HTTP/1.1 503 Busy\n\n", "HTTP 503 Busy"),
    (
        "302 with Location",
        b"HTTP/1.1 302 Found\r\nServer: x\r\nlocation:  /login \r\n\r\n",
        "HTTP 302 redirect to /login (redirects are not followed)",
    ),
    (
        "302 without Location",
        b"HTTP/1.1 302 Found\r\nServer: x\r\n\r\n",
        "HTTP 302 redirect (redirects are not followed)",
    ),
    ("302 cut short", b"HTTP/1.1 302 Found\r\nServer: x", False),
    ("headers past MAX_HEAD", LONG_HEADERS * (MAX_HEAD // 1000 + 2), False),
    ("garbage", b"SSH-2.0-OpenSSH\r\n", False),
    ("a partial status line, then EOF", b"HTTP/1.1 20", False),
    ("nothing, then EOF", b"", False),
    ("a status line past the stream limit", b"HTTP/1.1 200 " + b"x" * 70000 + b"\r\n\r\n", False),
    ("no newline past the stream limit", b"H" * 70000, False),
]


class TestSameVerdictAsStreams:
    @pytest.mark.parametrize(("what", "data", "expected"), ANSWERS, ids=[a[0] for a in ANSWERS])
    def test_answer(self, what: str, data: bytes, expected: bool | str) -> None:
        """Each answer gets the streams' verdict, whole or dripped a byte at a time."""

        async def body() -> None:
            for drip in (False, True) if len(data) < 2000 else (False,):
                direct, streams = await served(answer(data, drip=drip))
                assert direct == streams, (what, drip)
                if isinstance(expected, str):
                    assert direct == ProbeResult(expected.startswith("HTTP 2"), expected)
                else:
                    assert not direct.ok

        run(body())

    def test_refused(self) -> None:
        """Nothing listening: 'connection refused' for tcp:// and http:// alike."""

        async def body() -> None:
            port = free_port()
            for check in (f"tcp://127.0.0.1:{port}", f"http://127.0.0.1:{port}/"):
                direct, streams = await both(check)
                assert (
                    direct
                    == streams
                    == ProbeResult(False, f"connection refused to 127.0.0.1:{port}")
                )

        run(body())

    def test_accepting_listener(self) -> None:
        """A listener that accepts is healthy for tcp://; closing without an answer is not HTTP."""

        async def hangup(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await request(reader)
            writer.close()

        async def body() -> None:
            srv = await asyncio.start_server(hangup, "127.0.0.1", 0)
            port = srv.sockets[0].getsockname()[1]
            async with srv:
                direct, streams = await both(f"tcp://127.0.0.1:{port}")
                assert direct == streams == ProbeResult(True, f"connected to 127.0.0.1:{port}")
                direct, streams = await both(f"http://127.0.0.1:{port}/")
                assert (
                    direct
                    == streams
                    == ProbeResult(False, f"connection closed by 127.0.0.1:{port} before an answer")
                )

        run(body())

    def test_ipv6_literal(self) -> None:
        """An IPv6 literal is probed directly too, named [host]:port."""

        async def body() -> None:
            try:
                srv = await asyncio.start_server(
                    answer(b"HTTP/1.1 200 OK\r\n\r\n"), "::1", 0, family=socket.AF_INET6
                )
            except OSError:
                pytest.skip("no IPv6 loopback here")
            port = srv.sockets[0].getsockname()[1]
            async with srv:
                assert await both(f"http://[::1]:{port}/") == (ProbeResult(True, "HTTP 200"),) * 2
                assert (
                    await both(f"tcp://[::1]:{port}")
                    == (ProbeResult(True, f"connected to [::1]:{port}"),) * 2
                )
            refused = ProbeResult(False, f"connection refused to [::1]:{port}")
            assert await both(f"tcp://[::1]:{port}") == (refused, refused)

        run(body())

    def test_basic_auth_and_host_header(self) -> None:
        """The request bytes are the streams' request: GET, Host, credentials, Connection: close."""

        async def body() -> None:
            heads: list[bytes] = []

            async def record(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                head = b""
                while (line := await reader.readline()) not in (b"\r\n", b""):
                    head += line
                heads.append(head)
                writer.write(b"HTTP/1.1 200 OK\r\n\r\n")
                await writer.drain()
                writer.close()

            srv = await asyncio.start_server(record, "127.0.0.1", 0)
            port = srv.sockets[0].getsockname()[1]
            async with srv:
                await both(f"http://probe:s%40cret@127.0.0.1:{port}/ready?full=1")
            assert heads[0] == heads[1]
            assert heads[0] == (
                b"GET /ready?full=1 HTTP/1.1\r\n"
                + f"Host: 127.0.0.1:{port}\r\n".encode()
                + b"User-Agent: keystone-health\r\nAccept: */*\r\nConnection: close\r\n"
                + b"Authorization: Basic cHJvYmU6c0BjcmV0\r\n"
            )

        run(body())


class TestTimeouts:
    def test_a_server_that_never_answers_times_out(self) -> None:
        """Connected, request sent, no answer: 'timeout after', and the socket is closed."""

        async def body() -> None:
            got: list[bool] = []
            hold = asyncio.Event()

            async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                await request(reader)
                got.append(True)
                await hold.wait()
                got.append(await reader.read() == b"")  # the probe hung up
                writer.close()

            srv = await asyncio.start_server(silent, "127.0.0.1", 0)
            port = srv.sockets[0].getsockname()[1]
            async with srv:
                direct, streams = await both(f"http://127.0.0.1:{port}/", timeout=0.3)
                assert (
                    direct
                    == streams
                    == ProbeResult(False, f"timeout after 0.3s (127.0.0.1:{port})")
                )
                hold.set()
                await until(lambda: len(got) == 4, what="the probes to hang up")
            assert got == [True, True, True, True]

        run(body())

    def test_the_timeout_is_a_timer_of_the_schedulers_clock(self) -> None:
        """On a fake clock a silent server times out exactly when the clock passes the timeout."""

        async def body() -> None:
            asked = asyncio.Event()

            async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                await request(reader)
                asked.set()
                await reader.read()
                writer.close()

            srv = await asyncio.start_server(silent, "127.0.0.1", 0)
            port = srv.sockets[0].getsockname()[1]
            async with srv:
                clock = FakeClock(50.0)
                sched = ProbeScheduler(clock)
                task = asyncio.ensure_future(
                    sched.probe(
                        1.0,
                        f"http://127.0.0.1:{port}/",
                        timeout=2.0,
                        runner=ProcessRunner(),
                        cwd=Path("/"),
                        env={},
                    )
                )
                await clock.advance(1.0)
                await asyncio.wait_for(asked.wait(), 20)
                await clock.advance(1.9)
                assert not task.done()
                await clock.advance(0.1)
                assert await task == ProbeResult(False, f"timeout after 2s (127.0.0.1:{port})")

        run(body())

    def test_a_connect_that_hangs_times_out(self) -> None:
        """A full accept queue never completes the connect: the timeout ends it."""

        async def body() -> None:
            with socket.socket() as full:
                full.bind(("127.0.0.1", 0))
                full.listen(0)
                port = full.getsockname()[1]
                fillers = []
                for _ in range(8):
                    f = socket.socket()
                    f.setblocking(False)
                    with contextlib.suppress(BlockingIOError):
                        f.connect(("127.0.0.1", port))
                    fillers.append(f)
                try:
                    direct, _ = await both(f"http://127.0.0.1:{port}/", timeout=0.3)
                finally:
                    for f in fillers:
                        f.close()
            # Linux may still complete it from the SYN queue; then no answer comes: a timeout.
            assert direct == ProbeResult(False, f"timeout after 0.3s (127.0.0.1:{port})")

        run(body())


class TestNoTaskPerCheck:
    def test_scheduled_socket_probes_make_no_tasks(self) -> None:
        """Ten scheduled HTTP probes run as loop callbacks: no task is made for any of them."""

        async def body() -> None:
            with socket.socket() as lsn:
                lsn.bind(("127.0.0.1", 0))
                lsn.listen(16)
                lsn.setblocking(False)
                port = lsn.getsockname()[1]
                loop = asyncio.get_running_loop()
                conns: list[socket.socket] = []

                def accept() -> None:
                    conn, _ = lsn.accept()
                    conn.setblocking(False)
                    conns.append(conn)

                loop.add_reader(lsn.fileno(), accept)
                sched = ProbeScheduler(MonotonicClock())
                kw = {"timeout": 5.0, "runner": ProcessRunner(), "cwd": Path("/"), "env": {}}
                probes = [sched.probe(0.01, f"http://127.0.0.1:{port}/", **kw) for _ in range(10)]  # type: ignore[arg-type]
                gathered = asyncio.gather(*probes)  # ten tasks, one per waiting health loop
                tasks = len(asyncio.all_tasks())
                await until(lambda: len(conns) == 10, what="ten probes connected")
                for conn in conns:
                    await until(lambda c=conn: _has_request(c), what="a request")
                assert len(asyncio.all_tasks()) == tasks  # no task per probe in flight
                for conn in conns:
                    conn.sendall(b"HTTP/1.1 200 OK\r\n\r\n")
                    conn.close()
                assert await gathered == [ProbeResult(True, "HTTP 200")] * 10
                loop.remove_reader(lsn.fileno())

        run(body())


def _has_request(conn: socket.socket) -> bool:
    try:
        return conn.recv(4096, socket.MSG_PEEK).endswith(b"\r\n\r\n")
    except BlockingIOError:
        return False
