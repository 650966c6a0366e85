"""Health probes: ``http(s)://...``, ``tcp://host:port`` and ``cmd:<shell>``.

Probes run on the agent's event loop (no HTTP client library: an idle agent must stay small) and
each one is bounded as a whole by its timeout, connect and TLS handshake included. A ``tcp://`` or
``http://`` check to an IP literal is a :class:`SocketProbe`: a non-blocking socket driven by loop
callbacks, no task, no transport. Host names and HTTPS go through asyncio streams. Both say the
same words for the same answer. HTTP probes send one ``GET`` (HTTP/1.1, ``Connection: close``),
read the status line and the headers, and never follow redirects: 2xx is healthy, a 3xx is
reported with its ``Location``. HTTPS verifies the server certificate against the system trust
store (honouring ``SSL_CERT_FILE``/``SSL_CERT_DIR``). ``cmd:`` checks run ``/bin/sh -c`` through
the runner's ``run`` (a :class:`~keystone.runtime.runner.CommandRunner`) in the component's work
dir and environment; exit 0 is healthy. When probes run is :mod:`keystone.runtime.probes`'.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import errno
import functools
import ipaddress
import os
import signal
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit

from keystone.errors import ProcessError
from keystone.openssl import is_tls_error
from keystone.recipe import validate_check
from keystone.runtime.runner import CommandRunner
from keystone.runtime.timing import Timer

if TYPE_CHECKING:
    import ssl

#: Bytes of the status line plus headers read from an HTTP answer before giving up on it.
MAX_HEAD = 64 * 1024
USER_AGENT = "keystone-health"


@dataclass(frozen=True)
class ProbeResult:
    """One probe's verdict and a line for status and logs.

    ``detail`` is e.g. ``HTTP 200``, ``connection refused to 127.0.0.1:8081``,
    ``exit 1: <last stderr line>`` or ``timeout after 2s``.
    """

    ok: bool
    detail: str


class Check:
    """A health check parsed once (a probe runs every few seconds for the agent's whole life).

    ``kind`` is ``cmd``, ``tcp``, ``http`` or ``https``. For ``tcp``/``http(s)``: the host, the
    port, the address family of an IP literal host (0 for a name), ``host:port`` for messages, and
    for ``http(s)`` the request bytes. ``direct`` says the probe is a bare socket on the loop (an
    IP-literal ``tcp://`` or ``http://``: no resolution, no TLS, no streams).
    """

    __slots__ = (
        "addr",
        "command",
        "connected",
        "direct",
        "family",
        "host",
        "kind",
        "port",
        "request",
        "request_text",
        "text",
        "where",
    )

    def __init__(self, check: str) -> None:
        self.text = check
        self.command = ""
        self.host = ""
        self.port = 0
        self.family = 0
        self.where = ""
        self.request_text = ""
        self.request: bytes | None = None
        self.direct = False
        self.addr: tuple[str, int] | tuple[str, int, int, int] = ("", 0)
        self.connected = ProbeResult(True, "")
        if check.startswith("cmd:"):
            self.kind = "cmd"
            self.command = check[4:]
            return
        url = urlsplit(check)
        self.kind = url.scheme
        host = self.host = url.hostname or ""
        if url.scheme == "tcp":
            port = url.port or 0
        else:
            port = url.port or (443 if url.scheme == "https" else 80)
        self.port = port
        try:
            self.family = (
                socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
            )
        except ValueError:
            self.family = 0
        self.where = _hostport(host, port)
        # The address as asyncio's sock_connect names it in "Connect call failed" messages.
        self.addr = (host, port, 0, 0) if self.family == socket.AF_INET6 else (host, port)
        self.connected = ProbeResult(True, f"connected to {self.where}")
        self.direct = bool(self.family) and url.scheme != "https"
        if url.scheme != "tcp":
            target = url.path or "/"
            if url.query:
                target += "?" + url.query
            netloc = url.netloc.rpartition("@")[2]
            lines = [
                f"GET {target} HTTP/1.1",
                f"Host: {netloc}",
                f"User-Agent: {USER_AGENT}",
                "Accept: */*",
                "Connection: close",
            ]
            if url.username is not None:
                cred = f"{unquote(url.username)}:{unquote(url.password or '')}"
                lines.append("Authorization: Basic " + base64.b64encode(cred.encode()).decode())
            self.request_text = "\r\n".join(lines) + "\r\n\r\n"
            # A request that latin-1 cannot encode fails each probe once connected, as it did.
            with contextlib.suppress(UnicodeError):
                self.request = self.request_text.encode("latin-1")


@functools.lru_cache(maxsize=1024)
def parse_check(check: str) -> Check | str:
    """The check parsed once, or the reason it is unusable (see :func:`validate_check`)."""
    why = validate_check(check)
    if why is not None:
        return why
    return Check(check)


async def probe(
    check: str,
    *,
    timeout: float,
    runner: CommandRunner,
    cwd: Path,
    env: Mapping[str, str],
) -> ProbeResult:
    """Run one health check; never raises for an unhealthy or unreachable component.

    Args:
        check: as accepted by :func:`validate_check`.
        timeout: seconds for the whole probe (connect, TLS, request and answer, or the command).
        runner: runs ``cmd:`` checks in their own process group (killed whole on timeout).
        cwd: work dir for ``cmd:`` checks.
        env: the complete environment for ``cmd:`` checks.
    """
    parsed = parse_check(check)
    if isinstance(parsed, str):
        return ProbeResult(False, parsed)
    if parsed.kind == "cmd":
        return await _probe_cmd(parsed.command, timeout=timeout, runner=runner, cwd=cwd, env=env)
    if parsed.direct:
        loop = asyncio.get_running_loop()
        sp = SocketProbe(parsed, timeout, loop.create_future(), loop.call_later)
        sp.start()
        return await sp.result()
    return await _probe_streams(parsed, timeout)


async def _probe_streams(parsed: Check, timeout: float) -> ProbeResult:
    """A probe through asyncio streams: a host name to resolve, or TLS."""
    host, port = parsed.host, parsed.port
    tcp = parsed.kind == "tcp"
    coro = _probe_tcp(host, port) if tcp else _probe_http(parsed)
    try:
        async with asyncio.timeout(timeout):
            return await coro
    except (OSError, _BadResponse, ValueError, UnicodeError) as exc:
        return _failure(exc, parsed, timeout)


def _failure(exc: BaseException, parsed: Check, timeout: float) -> ProbeResult:
    """The verdict for a probe that raised ``exc`` (one wording for streams and sockets)."""
    where = parsed.where
    if isinstance(exc, TimeoutError):
        return ProbeResult(False, f"timeout after {timeout:g}s ({where})")
    if isinstance(exc, ConnectionRefusedError):
        return ProbeResult(False, f"connection refused to {where}")
    if is_tls_error(exc):
        # only after an https probe imported ssl (keystone.openssl)
        import ssl

        if isinstance(exc, ssl.SSLCertVerificationError):
            return ProbeResult(
                False, f"TLS certificate of {where} not trusted: {exc.verify_message}"
            )
        assert isinstance(exc, ssl.SSLError)
        return ProbeResult(False, f"TLS error with {where}: {exc.reason or exc}")
    if isinstance(exc, ConnectionError):
        return ProbeResult(
            False, f"connection to {where} failed: {exc.strerror or type(exc).__name__}"
        )
    if isinstance(exc, OSError):
        # socket.gaierror and friends: unresolvable names, unreachable networks.
        return ProbeResult(False, f"cannot connect to {where}: {exc.strerror or exc}")
    if isinstance(exc, (_BadResponse, ValueError)) and not isinstance(exc, UnicodeError):
        # ValueError: a status line or header longer than the stream limit.
        return ProbeResult(False, f"bad HTTP answer from {where}: {exc}")
    return ProbeResult(False, f"cannot encode the host of {parsed.text!r}: {exc}")


class _BadResponse(Exception):
    """The server's answer is not HTTP."""


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def _probe_tcp(host: str, port: int) -> ProbeResult:
    _, writer = await asyncio.open_connection(host, port)
    writer.close()
    return ProbeResult(True, f"connected to {_hostport(host, port)}")


_SSL_CONTEXTS: dict[tuple[str | None, str | None], ssl.SSLContext] = {}


def _ssl_context() -> ssl.SSLContext:
    """A verifying client context, made once per trust-store setting (loading CAs costs CPU)."""
    key = (os.environ.get("SSL_CERT_FILE"), os.environ.get("SSL_CERT_DIR"))
    ctx = _SSL_CONTEXTS.get(key)
    if ctx is None:
        import ssl  # lazy: OpenSSL only once an https probe runs (keystone.openssl)

        ctx = _SSL_CONTEXTS[key] = ssl.create_default_context()
    return ctx


async def _probe_http(parsed: Check) -> ProbeResult:
    host, port = parsed.host, parsed.port
    https = parsed.kind == "https"
    reader, writer = await asyncio.open_connection(
        host, port, ssl=_ssl_context() if https else None, server_hostname=host if https else None
    )
    try:
        writer.write(parsed.request or parsed.request_text.encode("latin-1"))
        await writer.drain()
        status_line = await reader.readline()
        if not status_line:
            return ProbeResult(False, f"connection closed by {parsed.where} before an answer")
        code, verdict = _status(status_line)
        if verdict is None:
            location = await _header(reader)
            verdict = _redirect(code, location)
        return verdict
    finally:
        # No waiting for a polite close (a TLS shutdown may wait 30 s for the peer): a probe
        # must not outlive its timeout. The transport finishes closing on the loop.
        writer.close()


#: The verdict of each 2xx status, made once.
_HTTP_OK: dict[int, ProbeResult] = {}


def _status(status_line: bytes) -> tuple[int, ProbeResult | None]:
    """The code of an HTTP status line and its verdict (None for a 3xx: look for Location)."""
    parts = status_line.decode("latin-1").split(None, 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        raise _BadResponse(repr(status_line[:80]))
    code = int(parts[1])
    if 200 <= code < 300:
        ok = _HTTP_OK.get(code)
        if ok is None:
            ok = _HTTP_OK[code] = ProbeResult(True, f"HTTP {code}")
        return code, ok
    if 300 <= code < 400:
        return code, None
    reason = parts[2].strip() if len(parts) > 2 else ""
    return code, ProbeResult(False, f"HTTP {code}" + (f" {reason}" if reason else ""))


def _redirect(code: int, location: str | None) -> ProbeResult:
    to = f" to {location}" if location else ""
    return ProbeResult(False, f"HTTP {code} redirect{to} (redirects are not followed)")


def _location(line: bytes) -> str | None:
    key, sep, value = line.decode("latin-1").partition(":")
    if sep and key.strip().lower() == "location":
        return value.strip()
    return None


#: The stream reader's line limit, which the socket probe keeps too.
_LINE_LIMIT = 2**16


class SocketProbe:
    """One probe of an IP-literal ``tcp://`` or ``http://`` check as loop callbacks.

    A non-blocking connect watched with ``add_writer``; for HTTP the request is sent and the
    answer read with ``add_reader`` up to the status line (and, for a 3xx, the headers, at most
    :data:`MAX_HEAD` bytes). No task, no transport, no stream; the timeout is one timer from
    ``call_later``. :meth:`start` begins it; the verdict (or an unexpected exception) lands in
    the future, which :meth:`result` awaits. The wording of every verdict is the streams'.
    """

    __slots__ = (
        "budget",
        "buf",
        "call_later",
        "check",
        "code",
        "fd",
        "fut",
        "loop",
        "pending",
        "sock",
        "timeout",
        "timer",
    )

    def __init__(
        self,
        check: Check,
        timeout: float,
        fut: asyncio.Future[ProbeResult],
        call_later: Callable[[float, Callable[[], None]], Timer],
    ) -> None:
        self.check = check
        self.timeout = timeout
        self.fut = fut
        self.call_later = call_later
        self.loop = fut.get_loop()
        self.sock: socket.socket | None = None
        self.fd = -1
        self.timer: Timer | None = None
        self.buf = bytearray()
        self.pending = b""  # request bytes not sent yet
        self.code = 0  # a 3xx status while its headers are read
        self.budget = MAX_HEAD

    async def result(self) -> ProbeResult:
        """The verdict; cancelling the awaiting task closes the socket."""
        try:
            return await self.fut
        except asyncio.CancelledError:
            self._close()
            raise

    def start(self) -> None:
        """Open the socket and connect (nothing when the future is already done: cancelled)."""
        if self.fut.done():
            return
        check = self.check
        try:
            sock = self.sock = socket.socket(check.family, socket.SOCK_STREAM)
            self.fd = sock.fileno()
            sock.setblocking(False)
            err = sock.connect_ex(check.addr)
            if err in (errno.EINPROGRESS, errno.EINTR):
                self.timer = self.call_later(self.timeout, self._timed_out)
                self.loop.add_writer(self.fd, self._connected)
            elif err:
                self._fail(OSError(err, os.strerror(err)))
            else:
                self._up()
        except Exception as exc:
            self._fail(exc)

    def _connected(self) -> None:
        assert self.sock is not None
        try:
            self.loop.remove_writer(self.fd)
            err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self._fail(OSError(err, f"Connect call failed {self.check.addr}"))
            else:
                self._up()
        except Exception as exc:
            self._fail(exc)

    def _up(self) -> None:
        if self.check.kind == "tcp":
            self._done(self.check.connected)
            return
        if self.timer is None:
            self.timer = self.call_later(self.timeout, self._timed_out)
        self.pending = self.check.request or self.check.request_text.encode("latin-1")
        self._send()
        if self.sock is not None:
            self.loop.add_reader(self.fd, self._readable)

    def _send(self) -> None:
        assert self.sock is not None
        try:
            sent = self.sock.send(self.pending)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            # As the stream writer says when its transport died under a write.
            self._fail(ConnectionResetError("Connection lost"))
            return
        self.pending = self.pending[sent:]
        if self.pending:
            self.loop.add_writer(self.fd, self._writable)

    def _writable(self) -> None:
        self.loop.remove_writer(self.fd)
        self._send()

    def _readable(self) -> None:
        assert self.sock is not None
        try:
            data = self.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except Exception as exc:
            self._fail(exc)
            return
        self.buf += data
        try:
            verdict = self._answer(eof=not data)
        except Exception as exc:
            self._fail(exc)
            return
        if verdict is not None:
            self._done(verdict)

    def _line(self, eof: bool) -> bytes | None:
        """The next line of the buffer as ``StreamReader.readline`` gives it; None: read more."""
        buf = self.buf
        isep = buf.find(b"\n")
        if isep < 0:
            if len(buf) > _LINE_LIMIT:
                raise ValueError("Separator is not found, and chunk exceed the limit")
            if not eof:
                return None
            line = bytes(buf)
            buf.clear()
            return line
        if isep > _LINE_LIMIT:
            raise ValueError("Separator is found, but chunk is longer than limit")
        line = bytes(buf[: isep + 1])
        del buf[: isep + 1]
        return line

    def _answer(self, eof: bool) -> ProbeResult | None:
        """The verdict once enough of the answer is in; None: read more."""
        if not self.code:
            line = self._line(eof)
            if line is None:
                return None
            if not line:
                return ProbeResult(
                    False, f"connection closed by {self.check.where} before an answer"
                )
            code, verdict = _status(line)
            if verdict is not None:
                return verdict
            self.code = code
        while self.budget > 0:
            line = self._line(eof)
            if line is None:
                return None
            self.budget -= len(line)
            if line in (b"\r\n", b"\n", b""):
                return _redirect(self.code, None)
            location = _location(line)
            if location is not None:
                return _redirect(self.code, location)
        return _redirect(self.code, None)

    def _timed_out(self) -> None:
        self.timer = None
        self._done(ProbeResult(False, f"timeout after {self.timeout:g}s ({self.check.where})"))

    def _fail(self, exc: BaseException) -> None:
        if isinstance(exc, (OSError, _BadResponse, ValueError)):
            self._done(_failure(exc, self.check, self.timeout))
            return
        self._close()
        if not self.fut.done():
            self.fut.set_exception(exc)

    def _done(self, verdict: ProbeResult) -> None:
        self._close()
        if not self.fut.done():
            self.fut.set_result(verdict)

    def _close(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        sock = self.sock
        if sock is None:
            return
        self.sock = None
        if self.fd >= 0 and not self.loop.is_closed():
            self.loop.remove_writer(self.fd)
            self.loop.remove_reader(self.fd)
        sock.close()


async def _header(reader: asyncio.StreamReader) -> str | None:
    """The value of the ``Location`` header, reading at most :data:`MAX_HEAD` bytes."""
    budget = MAX_HEAD
    while budget > 0:
        line = await reader.readline()
        budget -= len(line)
        if line in (b"\r\n", b"\n", b""):
            return None
        location = _location(line)
        if location is not None:
            return location
    return None


async def _probe_cmd(
    command: str, *, timeout: float, runner: CommandRunner, cwd: Path, env: Mapping[str, str]
) -> ProbeResult:
    try:
        result = await runner.run(
            ["/bin/sh", "-c", command], cwd=cwd, env=env, timeout=timeout, max_output=8192
        )
    except ProcessError as exc:
        return ProbeResult(False, f"cannot run the check: {exc}")
    if result.timed_out:
        return ProbeResult(False, f"timeout after {timeout:g}s")
    if result.returncode == 0:
        return _EXIT_0
    last = _last_line(result.stderr) or _last_line(result.stdout)
    if result.returncode < 0:
        try:
            what = f"killed by {signal.Signals(-result.returncode).name}"
        except ValueError:
            what = f"killed by signal {-result.returncode}"
    else:
        what = f"exit {result.returncode}"
    return ProbeResult(False, f"{what}: {last}" if last else what)


_EXIT_0 = ProbeResult(True, "exit 0")


def _last_line(data: bytes) -> str:
    for line in reversed(data.decode("utf-8", "replace").splitlines()):
        if line.strip():
            return line.strip()[:200]
    return ""
