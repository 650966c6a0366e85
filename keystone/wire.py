"""The CLI's side of the agent API that needs no ``http.client``: the address, token discovery,
the error answers and their exit codes, and a small blocking HTTP/1.1 client for ``http://``.

``keystone.client.Client`` (``http.client``: https, ``--ssh``, ``Expect: 100-continue``
uploads) and :class:`WireClient` (the hot read commands, plain HTTP) share everything here,
so both say the same words and exit with the same codes. The wire exists because importing
``http.client`` (the ``email`` package, ``ssl``) costs about as much as starting Python, and
``keystone status`` in a monitoring loop should cost little more than that.

It speaks the HTTP/1.1 the agent speaks: a request line and headers, an answer with
Content-Length, chunked, or up to the close; keep-alive between the requests of one command.
Heads are bounded by :data:`MAX_HEAD`, bodies by :data:`MAX_BODY`. Anything it does not
expect (an interim ``1xx``, a malformed head or chunk, a body over the bound, an answer cut
short) raises :class:`Unusual`, and the caller asks again with ``Client``, whose answer then
is the one the user sees. The socket is ``_socket``'s: ``socket.py`` builds its enums at import,
a fifth of a bare interpreter's start.
"""

from __future__ import annotations

import _socket
import os
import sys
from abc import ABC, abstractmethod

from keystone.errors import (
    AgentUnreachable,
    DeploymentFailed,
    KeystoneError,
    Refused,
    Retryable,
    UsageError,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping
    from pathlib import Path
    from typing import Any, Self


DEFAULT_ADDR = "http://127.0.0.1:8080"
TOKEN_FILE = "api.token"
SYSTEM_RUNTIME_DIR = "/var/lib/keystone"
CONNECT_TIMEOUT = 5.0
MAX_HEAD = 64 * 1024
"""Bytes of status line and headers the wire reads before it calls an answer unusual."""
MAX_BODY = 16 * 1024 * 1024
"""Bytes of body the wire reads before it calls an answer unusual (``Client`` has no bound)."""


# --- errors ---------------------------------------------------------------------------------


class ApiError(KeystoneError):
    """The agent answered with an error status (exit 1 unless a subclass says otherwise)."""

    def __init__(self, status: int, message: str, *, kind: str = "error") -> None:
        self.status = status
        self.api_kind = kind
        super().__init__(message)


class ApiUsageError(ApiError, UsageError):
    """The request was wrong: bad argument, unknown component, wrong token (exit 2)."""


class ApiRefused(ApiError, Refused):
    """The agent refused the content: validation, signature, trust (exit 3)."""


class ApiRolledBack(ApiError, DeploymentFailed):
    """The deployment failed and was rolled back (exit 4)."""


class ApiUnavailable(ApiError, Retryable):
    """The agent cannot do it now; try again later (503, 504; exit 1)."""


class OperationTimeout(AgentUnreachable):
    """An operation was still queued or running when the caller's timeout passed (exit 1)."""

    def __init__(self, message: str, *, operation: dict[str, Any]) -> None:
        self.operation = operation
        super().__init__(message)


class Unusual(Exception):
    """An answer the wire does not read; ``keystone.client.Client`` should ask instead."""


class StaleConnection(Exception):
    """A connection closed by the server before it answered (for a kept-alive one: retry)."""


def error_for(status: int, message: str, kind: str | None) -> ApiError:
    """The ``ApiError`` for an error answer, by the agent's ``kind``, else by status."""
    if kind == "refused" or (kind is None and status == 422):
        return ApiRefused(status, message, kind="refused")
    if kind == "rolled-back":
        return ApiRolledBack(status, message, kind=kind)
    if kind == "retryable" or status in (502, 503, 504):
        return ApiUnavailable(status, message, kind=kind or "retryable")
    if kind == "usage" or 400 <= status < 500:
        return ApiUsageError(status, message, kind=kind or "usage")
    return ApiError(status, message, kind=kind or "error")


def unreachable(where: str, reason: str) -> AgentUnreachable:
    """Nothing (or nothing usable) answered at ``where``, and how to start an agent."""
    return AgentUnreachable(
        f"no agent answers at {where}; start one with `keystone agent` (or pass --addr) [{reason}]"
    )


def describe(exc: BaseException) -> str:
    """A connection error in a few words."""
    ssl = sys.modules.get("ssl")  # an SSLError needs ssl loaded: no import for plain HTTP
    if ssl is not None and isinstance(exc, ssl.SSLError):
        return f"TLS: {exc.reason or exc}"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, _socket.gaierror):
        return f"cannot resolve the host: {exc.strerror}"
    if isinstance(exc, TimeoutError):
        return "timed out connecting"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def decode_answer(
    status: int, ctype: str, raw: bytes, *, where: str, ssh: bool, method: str, path: str
) -> Any:
    """The decoded body of an answer (JSON, else text; None when empty).

    Raises:
        ApiError: for an error status (subclass by the agent's kind).
    """
    import json

    data: Any = None
    if raw:
        if "json" in ctype or raw.lstrip()[:1] in (b"{", b"["):
            try:
                data = json.loads(raw)
            except ValueError:
                data = raw.decode(errors="replace")
        else:
            data = raw.decode(errors="replace")
    if status < 400:
        return data
    message = str(data.get("error") if isinstance(data, dict) else data or "").strip()
    kind = data.get("kind") if isinstance(data, dict) else None
    if status == 401:
        hint = (
            "pass --token or set KEYSTONE_API_TOKEN"
            if ssh
            else "pass --token, set KEYSTONE_API_TOKEN, or point --runtime / KEYSTONE_RUNTIME at "
            "the agent's runtime dir (its api.token)"
        )
        raise ApiUsageError(401, f"the agent at {where} refused the token: {hint}")
    if not message:
        message = f"HTTP {status}"
    raise error_for(status, f"{method} {path}: {message}", kind)


# --- address and token ----------------------------------------------------------------------


class Addr:
    """An agent's address: the base URL as given (no trailing slash), and its parts."""

    __slots__ = ("base", "host", "port", "prefix", "scheme")

    def __init__(self, base: str, scheme: str, host: str, port: int, prefix: str) -> None:
        self.base = base
        self.scheme = scheme
        self.host = host
        self.port = port
        self.prefix = prefix


def parse_addr(addr: str | None, environ: Mapping[str, str]) -> Addr:
    """``addr`` (``--addr``), else ``KEYSTONE_ADDR``, else :data:`DEFAULT_ADDR`; a bare
    ``host:port`` is ``http://``. Raises UsageError for anything not an http(s) URL."""
    from urllib.parse import urlsplit

    base = (addr or environ.get("KEYSTONE_ADDR") or DEFAULT_ADDR).strip()
    if "://" not in base:
        base = "http://" + base
    url = urlsplit(base)
    if url.scheme not in ("http", "https") or not url.hostname:
        raise UsageError(f"--addr {base!r}: expected a URL such as http://127.0.0.1:8080")
    try:
        port = url.port or (443 if url.scheme == "https" else 80)
    except ValueError:
        raise UsageError(f"--addr {base!r}: the port is not a number") from None
    return Addr(base.rstrip("/"), url.scheme, url.hostname, port, url.path.rstrip("/"))


def _token_dirs(runtime: Path | str | None, environ: Mapping[str, str]) -> list[str]:
    dirs = [] if runtime is None else [os.fspath(runtime)]
    if environ.get("KEYSTONE_RUNTIME"):
        dirs.append(environ["KEYSTONE_RUNTIME"])
    return [*dirs, "runtime", SYSTEM_RUNTIME_DIR]


def token_files(runtime: Path | None, environ: Mapping[str, str]) -> list[Path]:
    """Where the agent's generated token may be: --runtime, KEYSTONE_RUNTIME, ./runtime,
    /var/lib/keystone (each ``<dir>/api.token``), in that order."""
    from pathlib import Path

    out: list[Path] = []
    for d in _token_dirs(runtime, environ):
        if Path(d) / TOKEN_FILE not in out:
            out.append(Path(d) / TOKEN_FILE)
    return out


def find_token(
    token: str | None = None,
    *,
    runtime: Path | str | None = None,
    environ: Mapping[str, str] | None = None,
) -> str | None:
    """--token, then ``KEYSTONE_API_TOKEN``, then the first readable ``api.token`` file."""
    env = os.environ if environ is None else environ
    if token and token.strip():
        return token.strip()
    if env.get("KEYSTONE_API_TOKEN", "").strip():
        return env["KEYSTONE_API_TOKEN"].strip()
    for d in _token_dirs(runtime, env):  # a file listed twice is read twice: no harm
        try:
            with open(os.path.join(d, TOKEN_FILE), encoding="utf-8") as f:
                text = f.read().strip()
        except (OSError, UnicodeDecodeError):
            continue
        if text:
            return text
    return None


# --- what every client does with its requests -----------------------------------------------


class Requests(ABC):
    """What the CLI's commands ask of a client (``Client``, :class:`WireClient`): each client
    implements ``request`` and the operation waits; the rest is shared here."""

    @abstractmethod
    def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        body: Any = None,
        content_type: str = "application/json",
        timeout: float | None = None,
    ) -> Any:
        """One request; the parsed JSON answer (text if not JSON; None for 204)."""

    def get(self, path: str, **kw: Any) -> Any:
        """``GET path``."""
        return self.request("GET", path, **kw)

    def post(self, path: str, **kw: Any) -> Any:
        """``POST path``."""
        return self.request("POST", path, **kw)

    @abstractmethod
    def close(self) -> None:
        """Close the connection, if any."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @abstractmethod
    def wait_operation(self, op_id: str, timeout: float) -> dict[str, Any]:
        """Wait until operation ``op_id`` is done and return it (see ``Client``)."""

    @abstractmethod
    def follow_operation(self, op_id: str, timeout: float) -> dict[str, Any]:
        """The result of operation ``op_id``, following the newer ones that superseded it."""


# --- the wire -------------------------------------------------------------------------------


def _idna(host: str) -> str | bytes:
    """``host`` as bytes when the idna codec would not change it (ASCII labels of 1 to 63
    characters), which spares loading that codec; else as is, for getaddrinfo to encode."""
    labels = host.removesuffix(".").split(".")
    if host.isascii() and all(0 < len(label) < 64 for label in labels):
        return host.encode("ascii")
    return host


class WireClient(Requests):
    """``Client``'s requests over plain HTTP, for an ``http://`` agent without ``--ssh``.

    The same arguments, token discovery, timeouts, errors and exit codes as
    ``keystone.client.Client``; ``plain`` is False for an address it does not serve (https,
    ``--ssh`` or ``KEYSTONE_SSH``), which ``Client`` then serves. ``long_polls`` makes the
    client that waits on operations (``Client``, with the same arguments).

    Raises (``request``):
        AgentUnreachable: nothing answered, or the connection broke before the answer.
        ApiError: an error answer (subclass by kind: usage 2, refused 3, rolled back 4).
        Unusual: an answer this client does not read; ask ``Client``.
    """

    def __init__(
        self,
        addr: str | None = None,
        token: str | None = None,
        ssh: str | None = None,
        *,
        runtime: Path | str | None = None,
        timeout: float = 600.0,
        environ: Mapping[str, str] | None = None,
        max_body: int | None = None,
        long_polls: Callable[[], Requests] | None = None,
    ) -> None:
        self.environ = os.environ if environ is None else environ
        self.addr = parse_addr(addr, self.environ)
        self.max_body = MAX_BODY if max_body is None else max_body
        self.long_polls = long_polls
        ssh = ssh if ssh is not None else self.environ.get("KEYSTONE_SSH")
        self.plain = self.addr.scheme == "http" and not (ssh and ssh.strip())
        self.token = find_token(token, runtime=runtime, environ=self.environ)
        self.timeout = timeout
        self._sock: _socket.socket | None = None
        self._buf = b""

    @classmethod
    def from_options(cls, options: Mapping[str, str | None], **kw: Any) -> WireClient:
        """The client of the command line's ``--addr``, ``--token``, ``--ssh`` and
        ``--runtime`` (``options`` by name without the dashes)."""
        return cls(
            options.get("addr"),
            options.get("token"),
            options.get("ssh"),
            runtime=options.get("runtime") or None,
            **kw,
        )

    def _connect(self) -> _socket.socket:
        if self._sock is not None:
            return self._sock
        err: OSError | None = None
        try:
            found = _socket.getaddrinfo(
                _idna(self.addr.host), self.addr.port, 0, _socket.SOCK_STREAM
            )
        except OSError as exc:
            raise unreachable(self.addr.base, describe(exc)) from None
        for family, kind, proto, _, address in found:  # as socket.create_connection: the last error
            sock = _socket.socket(family, kind, proto)
            try:
                sock.settimeout(CONNECT_TIMEOUT)
                sock.connect(address)
            except OSError as exc:
                sock.close()
                err = exc
                continue
            try:  # noqa: SIM105 (contextlib is an import the fast path does without)
                sock.setsockopt(_socket.IPPROTO_TCP, _socket.TCP_NODELAY, 1)
            except OSError:
                pass
            sock.settimeout(self.timeout)
            self._sock, self._buf = sock, b""
            return sock
        raise unreachable(self.addr.base, describe(err or OSError("no address")))

    def wait_operation(self, op_id: str, timeout: float) -> dict[str, Any]:
        """The ``long_polls`` client's ``wait_operation`` (long polls are not the hot path's)."""
        with self._long_polls() as client:
            return client.wait_operation(op_id, timeout)

    def follow_operation(self, op_id: str, timeout: float) -> dict[str, Any]:
        """The ``long_polls`` client's ``follow_operation`` (a superseded sync is rare)."""
        with self._long_polls() as client:
            return client.follow_operation(op_id, timeout)

    def _long_polls(self) -> Requests:
        if self.long_polls is None:
            raise Unusual("no client for long polls was given")
        return self.long_polls()

    def close(self) -> None:
        """Close the connection, if any."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        body: Any = None,
        content_type: str = "application/json",
        timeout: float | None = None,
    ) -> Any:
        """One request; the parsed JSON answer (text if not JSON; None for 204)."""
        if body is not None and (not isinstance(body, bytes) or len(body) >= 1 << 20):
            raise Unusual("a streamed or large body (Client asks with Expect: 100-continue)")
        fresh = self._sock is None
        try:
            return self._request(method, path, params, body, content_type, timeout)
        except StaleConnection:
            if not fresh:
                # A kept-alive connection the server had already closed: once more, afresh.
                self.close()
                try:
                    return self._request(method, path, params, body, content_type, timeout)
                except StaleConnection:
                    pass
            raise unreachable(self.addr.base, "the connection closed before the answer") from None

    def _request(
        self,
        method: str,
        path: str,
        params: Mapping[str, str] | None,
        body: bytes | None,
        content_type: str,
        timeout: float | None,
    ) -> Any:
        sock = self._connect()
        wait = timeout if timeout is not None else self.timeout
        sock.settimeout(wait)
        target = self.addr.prefix + path
        if params:
            from urllib.parse import urlencode

            target += "?" + urlencode(params)
        host = f"[{self.addr.host}]" if ":" in self.addr.host else self.addr.host
        lines = [
            f"{method} {target} HTTP/1.1",
            "Accept: application/json",
            f"Host: {host}:{self.addr.port}",
        ]
        if self.token:
            lines.append(f"Authorization: Bearer {self.token}")
        if body is not None:
            lines += [f"Content-Type: {content_type}", f"Content-Length: {len(body)}"]
        if not target.isascii() or any(c <= " " or c == "\x7f" for c in target):
            raise Unusual("a target http.client refuses (it says why)")
        if self.token and ("\r" in self.token or "\n" in self.token):
            raise Unusual("a token http.client refuses (it says why)")
        try:
            head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        except UnicodeEncodeError:
            raise Unusual("a header that is not Latin-1") from None
        try:
            sock.sendall(head + body if body else head)
            status, headers, raw, keep = self._answer(method)
        except TimeoutError:
            self.close()
            raise AgentUnreachable(
                f"the agent at {self.addr.base} did not answer {method} {path} within {wait:.0f}s"
            ) from None
        except (BrokenPipeError, ConnectionResetError, StaleConnection) as exc:
            self.close()
            raise StaleConnection(describe(exc)) from None
        except Unusual:
            self.close()
            raise
        except OSError as exc:
            self.close()
            raise unreachable(self.addr.base, describe(exc)) from None
        if not keep:
            self.close()
        return decode_answer(
            status,
            headers.get("content-type", ""),
            raw,
            where=self.addr.base,
            ssh=False,
            method=method,
            path=path,
        )

    # --- reading an answer ---

    def _recv(self) -> bytes:
        assert self._sock is not None
        data = self._sock.recv(65536)
        if not data:
            raise Unusual("the answer was cut short")
        return data

    def _answer(self, method: str) -> tuple[int, dict[str, str], bytes, bool]:
        """Status, headers (lower-case names), body, and whether the connection stays open."""
        buf = self._buf
        while True:
            end = buf.find(b"\r\n\r\n")
            if end >= 0:
                break
            if len(buf) > MAX_HEAD:
                raise Unusual(f"an answer head over {MAX_HEAD} bytes")
            assert self._sock is not None
            more = self._sock.recv(65536)
            if not more:
                if not buf:
                    raise StaleConnection("the connection closed before the answer")
                raise Unusual("the answer was cut short")
            buf += more
        if end > MAX_HEAD:
            raise Unusual(f"an answer head over {MAX_HEAD} bytes")
        first, *fields = buf[:end].decode("latin-1").split("\r\n")
        rest = buf[end + 4 :]
        version, _, tail = first.partition(" ")
        code = tail[:3]
        if (
            version not in ("HTTP/1.1", "HTTP/1.0")
            or not code.isdigit()
            or tail[3:4] not in ("", " ")
        ):
            raise Unusual(f"not an HTTP/1.x answer: {first[:40]!r}")
        status = int(code)
        if status < 200:
            raise Unusual(f"an interim answer {status}")
        headers: dict[str, str] = {}
        for line in fields:
            name, sep, value = line.partition(":")
            if not sep or not name or name != name.strip():
                raise Unusual(f"a malformed header line {line[:40]!r}")
            key = name.lower()
            headers[key] = f"{headers[key]}, {value.strip()}" if key in headers else value.strip()
        conn = headers.get("connection", "").lower()
        keep = "close" not in conn if version == "HTTP/1.1" else "keep-alive" in conn
        if method == "HEAD" or status in (204, 304):
            self._buf = rest
            return status, headers, b"", keep
        if "transfer-encoding" in headers:
            if headers["transfer-encoding"].lower() != "chunked":
                raise Unusual(f"Transfer-Encoding {headers['transfer-encoding']!r}")
            body, self._buf = self._chunked(rest)
            return status, headers, body, keep
        if "content-length" in headers:
            declared = headers["content-length"]
            if not declared.isdigit():
                raise Unusual(f"Content-Length {declared!r}")
            size = int(declared)
            if size > self.max_body:
                raise Unusual(f"a body of {size} bytes, over {self.max_body}")
            while len(rest) < size:
                rest += self._recv()
            self._buf = rest[size:]
            return status, headers, rest[:size], keep
        # Neither: the body runs to the close.
        assert self._sock is not None
        while True:
            if len(rest) > self.max_body:
                raise Unusual(f"a body over {self.max_body} bytes")
            more = self._sock.recv(65536)
            if not more:
                return status, headers, rest, False
            rest += more

    def _chunked(self, data: bytes) -> tuple[bytes, bytes]:
        """A chunked body from ``data`` and the socket; the body and the bytes after it."""
        chunks: list[bytes] = []
        size = 0
        while True:
            while (eol := data.find(b"\r\n")) < 0:
                if len(data) > MAX_HEAD:
                    raise Unusual("a chunk size line too long")
                data += self._recv()
            line = data[:eol].split(b";", 1)[0].strip()
            data = data[eol + 2 :]
            try:
                n = int(line, 16)
            except ValueError:
                raise Unusual(f"a bad chunk size {line[:20]!r}") from None
            if n < 0:
                raise Unusual("a negative chunk size")
            if n == 0:
                break
            size += n
            if size > self.max_body:
                raise Unusual(f"a chunked body over {self.max_body} bytes")
            while len(data) < n + 2:
                data += self._recv()
            if data[n : n + 2] != b"\r\n":
                raise Unusual("a chunk not followed by CRLF")
            chunks.append(data[:n])
            data = data[n + 2 :]
        # Trailers, if any, end with an empty line.
        total = 0
        while True:
            while (eol := data.find(b"\r\n")) < 0:
                if len(data) > MAX_HEAD:
                    raise Unusual("trailers too long")
                data += self._recv()
            line, data = data[:eol], data[eol + 2 :]
            total += eol + 2
            if not line:
                return b"".join(chunks), data
            if total > MAX_HEAD:
                raise Unusual("trailers too long")
