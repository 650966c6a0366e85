"""The CLI's client for the agent API: stdlib ``http.client`` (https with mTLS, uploads with
``Expect: 100-continue``), token discovery, and ``--ssh`` tunnels through the operator's own
``ssh -W``, as the Go keystonectl does.

Errors map to the CLI's exit codes (DESIGN section 8) through the ``KeystoneError`` tree:
nothing answering is ``AgentUnreachable`` (exit 1); an error answer becomes an ``ApiError``
subclass chosen by the ``kind`` the agent reports: misuse 2, refused 3, rolled back 4, else 1.
The address, token discovery and the error answers are :mod:`keystone.wire`'s (re-exported
here), shared with the plain-HTTP client of the CLI's fast path.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any, BinaryIO, NamedTuple
from urllib.parse import quote, urlencode

from keystone.errors import AgentUnreachable, UsageError
from keystone.wire import (
    CONNECT_TIMEOUT,
    DEFAULT_ADDR,
    TOKEN_FILE,
    ApiError,
    ApiRefused,
    ApiRolledBack,
    ApiUnavailable,
    ApiUsageError,
    OperationTimeout,
    Requests,
    StaleConnection,
    decode_answer,
    describe,
    error_for,
    find_token,
    parse_addr,
    token_files,
    unreachable,
)

__all__ = [
    "CONNECT_TIMEOUT",
    "DEFAULT_ADDR",
    "EXPECT_CONTINUE_BYTES",
    "OPERATION_WAIT",
    "SYSTEM_RUNTIME",
    "TOKEN_FILE",
    "ApiError",
    "ApiRefused",
    "ApiRolledBack",
    "ApiUnavailable",
    "ApiUsageError",
    "Client",
    "OperationTimeout",
    "SshTarget",
    "api_call",
    "component_path",
    "error_for",
    "find_token",
    "parse_ssh_target",
    "ssh_command",
    "token_files",
]

SYSTEM_RUNTIME = Path("/var/lib/keystone")
OPERATION_WAIT = 30.0
"""Seconds one ``GET /v1/operations/{id}?wait=`` may hold the connection."""
EXPECT_CONTINUE_BYTES = 1 << 20
"""Bodies at least this large ask first (``Expect: 100-continue``), so a wrong token or an
oversized upload is refused before the bytes travel."""


# --- ssh ------------------------------------------------------------------------------------


class SshTarget(NamedTuple):
    """A ``--ssh`` destination: what ``ssh`` gets as host (``[user@]host``) and the port."""

    host: str
    port: str | None = None


def parse_ssh_target(dest: str) -> SshTarget:
    """Parse ``[user@]host[:port]`` (``[v6]:port`` in brackets; a bare IPv6 address has no
    port). Raises UsageError for anything ``ssh`` could read as an option or that is empty."""
    import ipaddress

    text = dest.strip()
    bad = UsageError(f"--ssh {dest!r}: expected [user@]host[:port], e.g. ops@edge-001:2222")
    if not text or text.startswith("-") or any(c.isspace() for c in text):
        raise bad
    user, host = "", text
    if "@" in text:
        at = text.rindex("@")
        if at == 0:
            raise bad
        user, host = text[: at + 1], text[at + 1 :]
    port: str | None = None
    if host.startswith("["):
        end = host.find("]")
        if end < 0:
            raise bad
        rest = host[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise bad
            port = rest[1:]
            host = host[: end + 1]
    elif host.count(":") == 1:
        host, port = host.split(":")
    elif host.count(":") > 1:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise bad from None
    if not host or host == "[]" or host.startswith("-"):
        raise bad
    if port is not None and not (port.isdigit() and 0 < int(port) < 65536):
        raise bad
    return SshTarget(user + host, port)


def ssh_command(target: SshTarget, host: str, port: int) -> list[str]:
    """``ssh -o LogLevel=ERROR [-p PORT] HOST -W host:port``: splice stdio to the agent's
    address as seen from the far side (the operator's keys, config and jump hosts apply)."""
    forward = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    args = ["ssh", "-o", "LogLevel=ERROR"]
    if target.port:
        args += ["-p", target.port]
    return [*args, target.host, "-W", forward]


class _SshTunnel:
    """One ``ssh -W`` process; its stdio is the far end of a socket pair."""

    def __init__(self, target: SshTarget, host: str, port: int, environ: Mapping[str, str]):
        import subprocess

        ours, theirs = socket.socketpair()
        self.sock = ours
        cmd = ssh_command(target, host, port)
        try:
            self.proc = subprocess.Popen(
                cmd,
                stdin=theirs.fileno(),
                stdout=theirs.fileno(),
                stderr=subprocess.PIPE,
                close_fds=True,
                env=dict(environ),
            )
        except OSError as exc:
            ours.close()
            raise AgentUnreachable(
                f"--ssh {target.host}: cannot run ssh ({exc.strerror or exc}); install the "
                "OpenSSH client or drop --ssh"
            ) from None
        finally:
            theirs.close()

    def reason(self) -> str:
        """ssh's own words when it failed (exit status and stderr)."""
        import subprocess

        try:
            self.proc.wait(2)
        except subprocess.TimeoutExpired:
            return "ssh is still running"
        err = self.proc.stderr.read().decode(errors="replace").strip() if self.proc.stderr else ""
        return f"ssh exited with {self.proc.returncode}" + (f": {err}" if err else "")

    def close(self) -> None:
        import subprocess

        with contextlib.suppress(OSError):
            self.sock.close()
        try:
            self.proc.wait(2)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stderr:
            self.proc.stderr.close()


# --- the client -----------------------------------------------------------------------------


class Client(Requests):
    """A connection to one agent's API, reused across the requests of one command.

    Args:
        addr: base URL (``--addr``); else ``KEYSTONE_ADDR``; else ``http://127.0.0.1:8080``.
            With ``ssh`` it is resolved on the far side.
        token: ``--token``; else ``KEYSTONE_API_TOKEN``; else the agent's ``api.token``
            (under ``runtime``, ``KEYSTONE_RUNTIME``, ./runtime, /var/lib/keystone).
        ssh: ``[user@]host[:port]`` (``--ssh``, ``KEYSTONE_SSH``): tunnel with ``ssh -W``.
        timeout: seconds to wait for an answer once connected.

    For ``https://`` addresses, ``KEYSTONE_CA_CERT`` names the CA that signed the agent's
    certificate and ``KEYSTONE_CLIENT_CERT`` / ``KEYSTONE_CLIENT_KEY`` the client certificate
    (mTLS).
    """

    def __init__(
        self,
        addr: str | None = None,
        token: str | None = None,
        ssh: str | None = None,
        *,
        runtime: Path | None = None,
        timeout: float = 600.0,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.environ = os.environ if environ is None else environ
        addr_ = parse_addr(addr, self.environ)
        self.base = addr_.base
        self.scheme = addr_.scheme
        self.host = addr_.host
        self.port = addr_.port
        self.prefix = addr_.prefix
        ssh = ssh if ssh is not None else self.environ.get("KEYSTONE_SSH")
        self.ssh = parse_ssh_target(ssh) if ssh and ssh.strip() else None
        # A local token file belongs to a local agent; through ssh, only an explicit token.
        if self.ssh is not None:
            explicit = (token or self.environ.get("KEYSTONE_API_TOKEN") or "").strip()
            self.token = explicit or None
        else:
            self.token = find_token(token, runtime=runtime, environ=self.environ)
        self.timeout = timeout
        self._conn: http.client.HTTPConnection | None = None
        self._tunnel: _SshTunnel | None = None

    # --- connection ---

    @property
    def where(self) -> str:
        return f"{self.base} (through ssh {self.ssh.host})" if self.ssh else self.base

    def _unreachable(self, reason: str) -> AgentUnreachable:
        return unreachable(self.where, reason)

    def _ssl_context(self) -> Any:
        import ssl

        ctx = ssl.create_default_context(cafile=self.environ.get("KEYSTONE_CA_CERT") or None)
        cert = self.environ.get("KEYSTONE_CLIENT_CERT")
        if cert:
            ctx.load_cert_chain(cert, self.environ.get("KEYSTONE_CLIENT_KEY") or None)
        return ctx

    def _connect(self) -> http.client.HTTPConnection:
        if self._conn is not None:
            return self._conn
        conn: http.client.HTTPConnection
        ctx: Any = None
        if self.scheme == "https":
            try:
                ctx = self._ssl_context()
            except OSError as exc:
                raise UsageError(
                    f"TLS client files (KEYSTONE_CA_CERT, KEYSTONE_CLIENT_CERT, "
                    f"KEYSTONE_CLIENT_KEY): {exc}"
                ) from None
            conn = http.client.HTTPSConnection(
                self.host, self.port, timeout=CONNECT_TIMEOUT, context=ctx
            )
        else:
            conn = http.client.HTTPConnection(self.host, self.port, timeout=CONNECT_TIMEOUT)
        try:
            if self.ssh is not None:
                self._tunnel = _SshTunnel(self.ssh, self.host, self.port, self.environ)
                sock: socket.socket = self._tunnel.sock
                if self.scheme == "https":
                    sock = ctx.wrap_socket(sock, server_hostname=self.host)
                conn.sock = sock
            else:
                conn.connect()
        except AgentUnreachable:
            raise
        except OSError as exc:
            conn.close()
            raise self._unreachable(describe(exc)) from None
        assert conn.sock is not None
        conn.sock.settimeout(self.timeout)
        self._conn = conn
        return conn

    def close(self) -> None:
        """Close the connection and the ssh tunnel, if any."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self._tunnel is not None:
            self._tunnel.close()
            self._tunnel = None

    # --- requests ---

    def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        body: bytes | BinaryIO | None = None,
        content_type: str = "application/json",
        timeout: float | None = None,
    ) -> Any:
        """One request; the parsed JSON answer (text if not JSON; None for 204).

        Raises:
            AgentUnreachable: nothing answered, or the connection broke before the answer.
            ApiError: an error answer (subclass by kind: usage 2, refused 3, rolled back 4).
        """
        fresh = self._conn is None
        try:
            return self._request(method, path, params, body, content_type, timeout)
        except StaleConnection:
            if fresh or (body is not None and not isinstance(body, bytes)):
                raise self._unreachable("the connection closed before the answer") from None
            # A kept-alive connection the server had already closed: once more, afresh.
            self.close()
            return self._request(method, path, params, body, content_type, timeout)

    def _request(
        self,
        method: str,
        path: str,
        params: Mapping[str, str] | None,
        body: bytes | BinaryIO | None,
        content_type: str,
        timeout: float | None,
    ) -> Any:
        conn = self._connect()
        assert conn.sock is not None
        conn.sock.settimeout(timeout if timeout is not None else self.timeout)
        target = self.prefix + path + ("?" + urlencode(params) if params else "")
        host = f"[{self.host}]" if ":" in self.host else self.host
        headers = {"Accept": "application/json", "Host": f"{host}:{self.port}"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        size = 0
        if body is not None:
            size = len(body) if isinstance(body, bytes) else _stream_size(body)
            headers["Content-Type"] = content_type
            headers["Content-Length"] = str(size)
        expect = size >= EXPECT_CONTINUE_BYTES and self.scheme == "http"
        if expect:
            headers["Expect"] = "100-continue"
        try:
            conn.putrequest(method, target, skip_host=True, skip_accept_encoding=True)
            for key, value in headers.items():
                conn.putheader(key, value)
            conn.endheaders()
            if body is not None and (not expect or _continue(conn.sock)):
                # The agent may answer early (401, 413) and stop reading: read that answer below.
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    _send_body(conn, body)
            resp = conn.getresponse()
            raw = resp.read()
        except TimeoutError:
            self.close()
            raise AgentUnreachable(
                f"the agent at {self.where} did not answer {method} {path} within "
                f"{timeout if timeout is not None else self.timeout:.0f}s"
            ) from None
        except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as exc:
            reason = self._tunnel.reason() if self._tunnel is not None else describe(exc)
            self.close()
            if self.ssh is not None:
                raise self._unreachable(reason) from None
            raise StaleConnection(reason) from None
        except (OSError, http.client.HTTPException) as exc:
            self.close()
            raise self._unreachable(describe(exc)) from None
        if resp.will_close:
            self.close()
        return decode_answer(
            resp.status,
            resp.getheader("Content-Type", ""),
            raw,
            where=self.where,
            ssh=self.ssh is not None,
            method=method,
            path=path,
        )

    def wait_operation(self, op_id: str, timeout: float) -> dict[str, Any]:
        """Wait until operation ``op_id`` is done and return it (``GET /v1/operations/{id}``).

        The agent holds each request until the operation is done (long poll, at most
        ``OPERATION_WAIT`` seconds each), so this asks again only after such a wait.

        Raises:
            OperationTimeout: ``timeout`` passed before the operation was done (its last
                state is in ``.operation``).
            AgentUnreachable: no agent answered.
        """
        import time

        deadline = time.monotonic() + timeout
        path = "/v1/operations/" + quote(op_id, safe="")
        while True:
            left = deadline - time.monotonic()
            wait = max(0.0, min(left, OPERATION_WAIT))
            op = self.get(
                path, params={"wait": f"{wait:.3f}s"} if wait > 0 else None, timeout=wait + 30
            )
            if not isinstance(op, dict):
                raise AgentUnreachable(f"GET {path}: the agent answered {op!r}")
            if op.get("state") == "done":
                return op
            if time.monotonic() >= deadline:
                raise OperationTimeout(
                    f"operation {op_id} was {op.get('state')} when the timeout of {timeout:g}s "
                    "passed; it goes on in the agent (keystone status follows it)",
                    operation=op,
                )

    def follow_operation(self, op_id: str, timeout: float) -> dict[str, Any]:
        """The result of operation ``op_id``, following the newer ones that superseded it.

        A queued request that a newer one replaced (latest wins) ends "superseded by <id>":
        what the caller asked for is then decided by that newer operation, so this waits on it.

        Raises:
            OperationTimeout: ``timeout`` passed first (it counts for the whole chain).
            AgentUnreachable: no agent answered.
        """
        import time  # lazy: keeps the fast status path's imports as they were

        deadline = time.monotonic() + timeout
        while True:
            op = self.wait_operation(op_id, max(0.0, deadline - time.monotonic()))
            result = dict(op.get("result") or {})
            newer = op.get("superseded_by") or result.get("superseded_by")
            if result.get("result") != "superseded" or not newer:
                return result
            op_id = str(newer)


def _stream_size(body: IO[bytes]) -> int:
    pos = body.tell()
    end = body.seek(0, os.SEEK_END)
    body.seek(pos)
    return end - pos


def _continue(sock: socket.socket | None) -> bool:
    """After headers with ``Expect: 100-continue``: True to send the body (100 Continue, or
    no word within a second, as RFC 9110 allows); False when a final answer came instead."""
    import select

    if sock is None:
        return True
    ready, _, _ = select.select([sock], [], [], 1.0)
    if not ready:
        return True
    head = sock.recv(1024, socket.MSG_PEEK)
    if not head.startswith((b"HTTP/1.1 100", b"HTTP/1.0 100")):
        return False
    end = head.find(b"\r\n\r\n")
    if end < 0:
        return True
    sock.recv(end + 4)  # consume the interim answer; getresponse() reads the final one
    return True


def _send_body(conn: http.client.HTTPConnection, body: bytes | IO[bytes]) -> None:
    if isinstance(body, bytes):
        conn.send(body)
        return
    while True:
        chunk = body.read(1 << 20)
        if not chunk:
            return
        conn.send(chunk)


def api_call(
    addr: str | None,
    token: str | None,
    ssh: str | None,
    method: str,
    path: str,
    *,
    params: dict[str, str] | None = None,
    body: bytes | BinaryIO | None = None,
    timeout: float = 600.0,
    content_type: str = "application/json",
    runtime: Path | None = None,
) -> Any:
    """One request on a fresh connection (see ``Client.request``)."""
    with Client(addr, token, ssh, runtime=runtime, timeout=timeout) as client:
        return client.request(method, path, params=params, body=body, content_type=content_type)


def component_path(name: str, action: str) -> str:
    """``/v1/components/{name}:{action}`` with the name escaped (it cannot reshape the URL)."""
    return f"/v1/components/{quote(name.strip('/'), safe='')}:{action}"
