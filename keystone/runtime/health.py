"""Health probes: ``http(s)://...``, ``tcp://host:port`` and ``cmd:<shell>``.

Probes run on the agent's event loop with asyncio streams (no HTTP client library: an idle agent
must stay small) and each one is bounded as a whole by its timeout, connect and TLS handshake
included. HTTP probes send one ``GET`` (HTTP/1.1, ``Connection: close``), read the status line
and the headers, and never follow redirects: 2xx is healthy, a 3xx is reported with its
``Location``. HTTPS verifies the server certificate against the system trust store (honouring
``SSL_CERT_FILE``/``SSL_CERT_DIR``). ``cmd:`` checks run ``/bin/sh -c`` through the runner's
``run`` (a :class:`~keystone.runtime.runner.CommandRunner`) in the component's work dir and
environment; exit 0 is healthy.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import ipaddress
import os
import signal
import socket
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import SplitResult, unquote, urlsplit

from keystone.errors import ProcessError
from keystone.recipe import validate_check
from keystone.runtime.runner import CommandRunner

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
    parsed = _parse(check)
    if isinstance(parsed, str):
        return ProbeResult(False, parsed)
    if parsed is None:
        return await _probe_cmd(check[4:], timeout=timeout, runner=runner, cwd=cwd, env=env)
    url, host, port, family, where = parsed
    tcp = url.scheme == "tcp"
    coro = _probe_tcp(host, port, family) if tcp else _probe_http(url, host, port)
    try:
        async with asyncio.timeout(timeout):
            return await coro
    except TimeoutError:
        return ProbeResult(False, f"timeout after {timeout:g}s ({where})")
    except ConnectionRefusedError:
        return ProbeResult(False, f"connection refused to {where}")
    except ssl.SSLCertVerificationError as exc:
        return ProbeResult(False, f"TLS certificate of {where} not trusted: {exc.verify_message}")
    except ssl.SSLError as exc:
        return ProbeResult(False, f"TLS error with {where}: {exc.reason or exc}")
    except ConnectionError as exc:
        return ProbeResult(
            False, f"connection to {where} failed: {exc.strerror or type(exc).__name__}"
        )
    except OSError as exc:
        # socket.gaierror and friends: unresolvable names, unreachable networks.
        return ProbeResult(False, f"cannot connect to {where}: {exc.strerror or exc}")
    except (_BadResponse, ValueError) as exc:
        # ValueError: a status line or header longer than the stream limit.
        return ProbeResult(False, f"bad HTTP answer from {where}: {exc}")
    except UnicodeError as exc:
        return ProbeResult(False, f"cannot encode the host of {check!r}: {exc}")


@functools.lru_cache(maxsize=1024)
def _parse(check: str) -> tuple[SplitResult, str, int, int, str] | str | None:
    """A check parsed once (a probe runs every few seconds for the agent's whole life).

    Returns None for ``cmd:``, the reason for an unusable check, else the URL, host, port,
    the address family of an IP literal host (0 for a name) and ``host:port`` for messages.
    """
    why = validate_check(check)
    if why is not None:
        return why
    if check.startswith("cmd:"):
        return None
    url = urlsplit(check)
    host = url.hostname or ""
    if url.scheme == "tcp":
        port = url.port or 0
    else:
        port = url.port or (443 if url.scheme == "https" else 80)
    family: int
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        family = 0
    return url, host, port, family, _hostport(host, port)


class _BadResponse(Exception):
    """The server's answer is not HTTP."""


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def _probe_tcp(host: str, port: int, family: int = 0) -> ProbeResult:
    if family:
        # An IP literal: a bare non-blocking connect on the loop, no transport, no streams.
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, (host, port))
        finally:
            sock.close()
    else:
        _, writer = await asyncio.open_connection(host, port)
        writer.close()
    return ProbeResult(True, f"connected to {_hostport(host, port)}")


_SSL_CONTEXTS: dict[tuple[str | None, str | None], ssl.SSLContext] = {}


def _ssl_context() -> ssl.SSLContext:
    """A verifying client context, made once per trust-store setting (loading CAs costs CPU)."""
    key = (os.environ.get("SSL_CERT_FILE"), os.environ.get("SSL_CERT_DIR"))
    ctx = _SSL_CONTEXTS.get(key)
    if ctx is None:
        ctx = _SSL_CONTEXTS[key] = ssl.create_default_context()
    return ctx


async def _probe_http(url: SplitResult, host: str, port: int) -> ProbeResult:
    https = url.scheme == "https"
    reader, writer = await asyncio.open_connection(
        host, port, ssl=_ssl_context() if https else None, server_hostname=host if https else None
    )
    try:
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
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        await writer.drain()
        status_line = await reader.readline()
        if not status_line:
            return ProbeResult(
                False, f"connection closed by {_hostport(host, port)} before an answer"
            )
        parts = status_line.decode("latin-1").split(None, 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
            raise _BadResponse(repr(status_line[:80]))
        code = int(parts[1])
        reason = parts[2].strip() if len(parts) > 2 else ""
        if 200 <= code < 300:
            return ProbeResult(True, f"HTTP {code}")
        if 300 <= code < 400:
            location = await _header(reader, "location")
            to = f" to {location}" if location else ""
            return ProbeResult(False, f"HTTP {code} redirect{to} (redirects are not followed)")
        return ProbeResult(False, f"HTTP {code}" + (f" {reason}" if reason else ""))
    finally:
        # No waiting for a polite close (a TLS shutdown may wait 30 s for the peer): a probe
        # must not outlive its timeout. The transport finishes closing on the loop.
        writer.close()


async def _header(reader: asyncio.StreamReader, name: str) -> str | None:
    """The value of header ``name`` (lower case), reading at most :data:`MAX_HEAD` bytes."""
    budget = MAX_HEAD
    while budget > 0:
        line = await reader.readline()
        budget -= len(line)
        if line in (b"\r\n", b"\n", b""):
            return None
        key, sep, value = line.decode("latin-1").partition(":")
        if sep and key.strip().lower() == name:
            return value.strip()
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
        return ProbeResult(True, "exit 0")
    last = _last_line(result.stderr) or _last_line(result.stdout)
    if result.returncode < 0:
        try:
            what = f"killed by {signal.Signals(-result.returncode).name}"
        except ValueError:
            what = f"killed by signal {-result.returncode}"
    else:
        what = f"exit {result.returncode}"
    return ProbeResult(False, f"{what}: {last}" if last else what)


def _last_line(data: bytes) -> str:
    for line in reversed(data.decode("utf-8", "replace").splitlines()):
        if line.strip():
            return line.strip()[:200]
    return ""
