"""The agent's local HTTP API: the Go Keystone's routes plus the GitOps ones, on the stdlib.

``ApiServer`` serves an ``AgentControl`` (keystone.control) from a ``ThreadingHTTPServer``: one
background thread accepts, and each connection gets a short-lived thread. No web framework: the
whole server is this module, which keeps the resident agent small.

Contracts (DESIGN section 10, GO-COMPAT.md "HTTP API"):

- every route but ``/healthz`` needs ``Authorization: Bearer <token>``, compared in constant
  time; a missing or wrong token gets 401 with ``WWW-Authenticate: Bearer`` and changes nothing;
- request bodies are capped (``KEYSTONE_MAX_REQUEST_BYTES``, 4 MiB, 413), except a bundle
  upload, which is streamed to the agent and capped by ``KEYSTONE_MAX_BUNDLE_BYTES`` (4 GiB);
- a wrong method gets 405 with ``Allow``, an unknown path or component 404, malformed JSON 400
  with the parser's reason;
- binding beyond loopback needs an explicit token (``KEYSTONE_API_TOKEN``) or TLS with client
  certificates (mTLS); otherwise the server refuses to start (``UsageError``).

Error bodies are ``{"error": message, "status": code, "kind": kind}``; ``kind`` is the
``KeystoneError.kind`` of the failure (``usage``, ``refused``, ``retryable``, ``rolled-back``,
``error``) so that a client can pick its exit code without parsing messages.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import io
import ipaddress
import json
import os
import re
import secrets
import socket
import socketserver
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, BinaryIO, cast
from urllib.parse import parse_qs, unquote, urlsplit

from loguru import logger

from keystone.control import AgentControl, Conflict, NotFound
from keystone.errors import (
    KeystoneError,
    Refused,
    Retryable,
    UsageError,
    ValidationError,
)

MAX_REQUEST_BYTES = 4 << 20
"""Default cap of a request body (``KEYSTONE_MAX_REQUEST_BYTES``), as in the Go agent."""

MAX_BUNDLE_BYTES = 4 << 30
"""Default cap of a streamed bundle upload (``KEYSTONE_MAX_BUNDLE_BYTES``)."""

DRAIN_LIMIT = 16 << 20
"""How much of a refused body the server reads and discards so that the client sees the answer
(a socket closed with unread data is reset, and the reset can destroy the response)."""

TOKEN_FILE = "api.token"


class ApiError(Exception):
    """An HTTP error answer decided by the server itself (bad query, body too large...)."""

    def __init__(self, status: int, message: str, *, kind: str = "usage") -> None:
        self.status = status
        self.kind = kind
        super().__init__(message)


@dataclass(frozen=True)
class TlsConfig:
    """Server certificate and key (PEM); with ``client_ca``, clients must present a
    certificate issued by that CA (mTLS) or the TLS handshake fails."""

    cert: Path
    key: Path
    client_ca: Path | None = None


# --- token ----------------------------------------------------------------------------------


def read_token_file(path: Path) -> str | None:
    """The token stored in ``path``, or None when the file is missing, unreadable or empty."""
    try:
        text = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return text or None


def resolve_token(runtime_dir: Path, environ: Mapping[str, str]) -> str:
    """The API token: ``KEYSTONE_API_TOKEN`` if set, else ``runtime_dir/api.token``.

    At first start the file does not exist: a random token is generated and written atomically
    with mode 0600 (never readable by other users, whatever the umask). A file found with looser
    permissions is tightened, since the token grants full control of the device.
    """
    explicit = environ.get("KEYSTONE_API_TOKEN", "").strip()
    if explicit:
        return explicit
    return token_from_file(runtime_dir / TOKEN_FILE)


def token_from_file(path: Path) -> str:
    """The token stored in ``path``; a new random one (written 0600) when there is none."""
    token = read_token_file(path)
    if token is not None:
        try:
            if path.stat().st_mode & 0o077:
                os.chmod(path, 0o600)
                logger.warning("{}: permissions were wider than 0600; tightened", path)
        except OSError as exc:
            logger.warning("{}: cannot check permissions: {}", path, exc)
        return token
    from keystone.state import atomic_write

    token = secrets.token_urlsafe(32)
    try:
        atomic_write(path, (token + "\n").encode(), mode=0o600)
    except OSError as exc:
        raise UsageError(
            f"cannot write the API token to {path}: {exc.strerror or exc}; make the runtime "
            "directory writable or set KEYSTONE_API_TOKEN"
        ) from exc
    logger.info("generated an API token in {} (mode 0600)", path)
    return token


def _digest(token: str) -> bytes:
    # Comparing fixed-size digests keeps the comparison constant-time in the token's length too.
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()


# --- listen address -------------------------------------------------------------------------


def parse_listen(listen: str) -> tuple[str, int]:
    """Split ``127.0.0.1:8080``, ``[::1]:8080``, ``localhost:8080`` or ``:8080`` (every interface,
    as in Go) into host and port. Raises UsageError naming the expected form."""
    text = listen.strip()
    if "://" in text:
        text = urlsplit(text).netloc
    m = re.fullmatch(r"(?:\[([0-9A-Fa-f:.]+)\]|([^\[\]:]*)):(\d{1,5})", text)
    if not m or int(m.group(3)) > 65535:
        raise UsageError(
            f"API listen address {listen!r}: expected host:port, e.g. 127.0.0.1:8080 or [::1]:8080"
        )
    host = m.group(1) if m.group(1) is not None else (m.group(2) or "0.0.0.0")
    return host, int(m.group(3))


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback IP literals (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# --- routes ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Route:
    """One documented endpoint: method, path template, handler name, and what it needs."""

    method: str
    path: str
    handler: str
    auth: bool = True
    body: str = "none"  # none | text (TOML or JSON, capped) | stream (bundle upload)

    @property
    def pattern(self) -> re.Pattern[str]:
        return _compile(self.path)


_PATTERNS: dict[str, re.Pattern[str]] = {}


def _compile(path: str) -> re.Pattern[str]:
    pat = _PATTERNS.get(path)
    if pat is None:
        regex = "".join(
            f"(?P<{part[1:-1]}>[^/:]+)" if part.startswith("{") else re.escape(part)
            for part in re.split(r"(\{\w+\})", path)
        )
        pat = _PATTERNS[path] = re.compile(f"^{regex}$")
    return pat


ROUTES: tuple[Route, ...] = (
    Route("GET", "/healthz", "healthz", auth=False),
    Route("GET", "/metrics", "metrics"),
    Route("GET", "/v1/openapi.json", "openapi"),
    Route("GET", "/v1/components", "components"),
    Route("POST", "/v1/components/{name}:stop", "stop_component"),
    Route("POST", "/v1/components/{name}:restart", "restart_component"),
    Route("GET", "/v1/recipes", "recipes"),
    Route("POST", "/v1/recipes", "upload_recipe", body="text"),
    Route("DELETE", "/v1/recipes/{name}/{version}", "delete_recipe"),
    Route("GET", "/v1/plan/status", "plan_status"),
    Route("GET", "/v1/plan/graph", "plan_graph"),
    Route("POST", "/v1/plan/apply", "apply_plan", body="text"),
    Route("POST", "/v1/plan/reconcile", "reconcile"),
    Route("POST", "/v1/plan/stop", "stop_plan"),
    Route("GET", "/v1/datasets", "datasets"),
    Route("POST", "/v1/datasets:refresh", "datasets_refresh"),
    Route("GET", "/v1/revision", "revision"),
    Route("POST", "/v1/sync", "sync"),
    Route("GET", "/v1/history", "history"),
    Route("POST", "/v1/rollback", "rollback"),
    Route("POST", "/v1/suspend", "suspend"),
    Route("POST", "/v1/resume", "resume"),
    Route("POST", "/v1/bundles:import", "import_bundle", body="stream"),
    Route("GET", "/v1/operations/{id}", "operation"),
)


def match_routes(path: str) -> list[tuple[Route, dict[str, str]]]:
    """Every route whose path template matches ``path``, with its path parameters (decoded)."""
    out = []
    for route in ROUTES:
        m = route.pattern.match(path)
        if m:
            out.append((route, {k: unquote(v) for k, v in m.groupdict().items()}))
    return out


# --- query helpers --------------------------------------------------------------------------

Query = Mapping[str, list[str]]

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"", "0", "false", "no", "off"}


def _param(q: Query, name: str) -> str | None:
    values = q.get(name)
    return values[-1] if values else None


def _flag(q: Query, *names: str) -> bool:
    """A boolean query parameter (``?dry=true``); several names are synonyms."""
    result = False
    for name in names:
        value = _param(q, name)
        if value is None:
            continue
        low = value.strip().lower()
        if low in _TRUE:
            result = True
        elif low not in _FALSE:
            raise ApiError(400, f"query parameter {name}={value!r}: expected true or false")
    return result


def _duration(q: Query, name: str, default: float) -> float:
    from keystone.units import parse_duration

    value = _param(q, name)
    if value is None or value == "":
        return default
    try:
        seconds = parse_duration(value)
    except (ValueError, KeystoneError) as exc:
        raise ApiError(400, f"query parameter {name}={value!r}: {exc}") from None
    if seconds <= 0:
        raise ApiError(400, f"query parameter {name}={value!r}: must be positive, e.g. 60s")
    return seconds


# --- the server -----------------------------------------------------------------------------


class ApiServer:
    """The HTTP API of one agent.

    Args:
        control: what the routes call (the agent, or a fake in tests).
        listen: ``host:port``; port 0 picks a free port (see ``address`` after ``start()``).
        token: the operator's token (``KEYSTONE_API_TOKEN``), or None to use ``token_file``,
            which is created with a random token (mode 0600) if it does not exist.
        token_file: where the generated token lives (``runtime/api.token``).
        tls: serve HTTPS; with ``client_ca`` clients need a certificate from that CA.

    Raises:
        UsageError: when asked to listen beyond loopback without an explicit token or mTLS,
            or when the TLS files cannot be loaded.
    """

    def __init__(
        self,
        control: AgentControl,
        *,
        listen: str,
        token: str | None,
        token_file: Path,
        tls: TlsConfig | None = None,
    ) -> None:
        self.control = control
        self.host, self.port = parse_listen(listen)
        self.tls = tls
        self.token_file = token_file
        stored = read_token_file(token_file)
        # A token equal to the generated file's is not the operator's choice (the agent may pass
        # resolve_token()'s answer through): only a token from elsewhere counts as explicit.
        explicit = bool(token) and token != stored
        self.token = token if token else token_from_file(token_file)
        mtls = tls is not None and tls.client_ca is not None
        if not is_loopback(self.host) and not explicit and not mtls:
            raise UsageError(
                f"refusing to serve the API on {listen}, beyond loopback, with only a generated "
                "token: set KEYSTONE_API_TOKEN, or configure TLS with client certificates "
                "([api] tls_cert, tls_key, client_ca), or listen on 127.0.0.1"
            )
        self._token_digest = _digest(self.token)
        self.max_request = _env_int("KEYSTONE_MAX_REQUEST_BYTES", MAX_REQUEST_BYTES)
        self.max_bundle = _env_int("KEYSTONE_MAX_BUNDLE_BYTES", MAX_BUNDLE_BYTES)
        self._ssl: ssl.SSLContext | None = self._ssl_context() if tls else None
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._openapi: bytes | None = None

    def _ssl_context(self) -> ssl.SSLContext:
        assert self.tls is not None
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            ctx.load_cert_chain(str(self.tls.cert), str(self.tls.key))
            if self.tls.client_ca is not None:
                ctx.load_verify_locations(cafile=str(self.tls.client_ca))
                ctx.verify_mode = ssl.CERT_REQUIRED
        except (OSError, ssl.SSLError) as exc:
            raise UsageError(
                f"API TLS: cannot load {self.tls.cert}, {self.tls.key}"
                + (f" or {self.tls.client_ca}" if self.tls.client_ca else "")
                + f": {exc}; check [api] tls_cert, tls_key and client_ca"
            ) from exc
        return ctx

    @property
    def address(self) -> str:
        """Base URL of the running server, e.g. ``http://127.0.0.1:8080``."""
        scheme = "https" if self.tls else "http"
        port = self._server.server_address[1] if self._server is not None else self.port
        host = self.host if self.host not in ("0.0.0.0", "::") else "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        return f"{scheme}://{host}:{port}"

    def start(self) -> None:
        """Bind and serve in a background thread. Raises UsageError if the port is taken."""
        if self._server is not None:
            return
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        try:
            server = _Server((self.host, self.port), _Handler, family=family, api=self)
        except OSError as exc:
            raise UsageError(
                f"cannot listen on {self.host}:{self.port} for the API: "
                f"{exc.strerror or exc}; pick another address with --http or [api] listen"
            ) from None
        if self._ssl is not None:
            server.socket = self._ssl.wrap_socket(
                server.socket, server_side=True, do_handshake_on_connect=False
            )
        self._server = server
        self._thread = threading.Thread(target=server.serve, name="keystone-api", daemon=True)
        self._thread.start()
        logger.info("API listening on {}", self.address)

    def stop(self) -> None:
        """Stop accepting and close the listening socket (requests in flight may finish)."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close_listener()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    # --- used by the handler ---

    def authorized(self, header: str | None) -> bool:
        """Whether an ``Authorization`` header carries the token (constant-time)."""
        if not header:
            return False
        scheme, _, value = header.strip().partition(" ")
        if scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(_digest(value.strip()), self._token_digest)

    def openapi_bytes(self) -> bytes:
        if self._openapi is None:
            from keystone.openapi import openapi_document

            self._openapi = json.dumps(openapi_document(), indent=1).encode()
        return self._openapi


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        from keystone.units import parse_size

        n = parse_size(value)
    except ValueError as exc:
        raise UsageError(f"{name}={value!r}: {exc}") from None
    return n if n > 0 else default


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # bursts of concurrent clients must not hit the default backlog of 5
    api: ApiServer

    def __init__(
        self,
        address: tuple[str, int],
        handler: type[BaseHTTPRequestHandler],
        *,
        family: socket.AddressFamily,
        api: ApiServer,
    ) -> None:
        self.address_family = family
        self.api = api
        self._closing = False
        self._lock = threading.Lock()
        self._open: set[Any] = set()
        super().__init__(address, handler)

    def serve(self) -> None:
        """Accept until ``close_listener()``: blocked in accept(), so an idle API never wakes
        (socketserver's serve_forever polls every half second)."""
        while not self._closing:
            try:
                request, client = self.socket.accept()
            except OSError as exc:
                if self._closing:
                    break
                # EMFILE and friends: do not spin; the condition usually passes.
                logger.warning("api: accept failed: {}", exc)
                time.sleep(0.1)
                continue
            try:
                self.process_request(request, client)
            except Exception:
                self.handle_error(request, client)
                self.shutdown_request(request)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._lock:
            self._open.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._lock:
            self._open.discard(request)
        super().shutdown_request(request)

    def close_listener(self) -> None:
        """Stop ``serve()``, close the listening socket, and end idle kept-alive connections
        (a request in flight still gets its answer written, or a broken pipe)."""
        self._closing = True
        with contextlib.suppress(OSError):
            self.socket.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in accept()
        self.server_close()
        with self._lock:
            open_now = list(self._open)
        for sock in open_now:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RD)

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host's FQDN, which can wait on DNS; not needed.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that hangs up or fails the TLS handshake is not the agent's problem.
        import sys

        exc = sys.exc_info()[1]
        logger.debug("api: connection from {} ended: {!r}", client_address, exc)


class _Handler(BaseHTTPRequestHandler):
    """One connection. Routing, auth, body limits and error mapping; the work is the control's."""

    server: _Server
    protocol_version = "HTTP/1.1"
    server_version = "keystone"
    sys_version = ""
    timeout = 60  # an idle keep-alive connection or a stalled upload is dropped after this
    # Headers and body go out in two writes; with Nagle on, the body of every answer after the
    # first on a kept-alive connection waits for the client's delayed ACK (40 ms on Linux).
    disable_nagle_algorithm = True

    def setup(self) -> None:
        super().setup()
        if isinstance(self.connection, ssl.SSLSocket):
            # The handshake runs here, in the connection's thread, not in the accept loop where
            # one slow or hostile client would stall every other.
            self.connection.do_handshake()

    @property
    def api(self) -> ApiServer:
        return self.server.api

    def version_string(self) -> str:
        return "keystone"

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        self._status = code  # logged once, with the duration, at the end of _dispatch

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("api: {}: {}", self.address_string(), format % args)

    # --- responses ---

    def _send(
        self,
        status: int,
        body: Any = None,
        *,
        content_type: str = "application/json",
        headers: Mapping[str, str] | None = None,
    ) -> None:
        if status == 204 or body is None:
            data = b""
        elif isinstance(body, bytes):
            data = body
        else:
            data = json.dumps(body, default=str, separators=(",", ":")).encode() + b"\n"
        self.send_response(status)
        if data:
            self.send_header("Content-Type", content_type)
        if status != 204:
            self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if data and self.command != "HEAD":
            self.wfile.write(data)

    def _error(
        self,
        status: int,
        message: str,
        *,
        kind: str = "usage",
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self._send(status, {"error": message, "status": status, "kind": kind}, headers=headers)

    def _unauthorized(self) -> None:
        self._error(
            401,
            "missing or wrong bearer token: send Authorization: Bearer <KEYSTONE_API_TOKEN or "
            "the token in the agent's runtime/api.token>",
            headers={"WWW-Authenticate": 'Bearer realm="keystone"'},
        )

    # --- bodies ---

    def _length(self) -> int | None:
        """Content-Length as an int; None when absent. Raises ApiError for a bad header."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            raise ApiError(411, "send the body with a Content-Length (chunked bodies are refused)")
        value = self.headers.get("Content-Length")
        if value is None:
            return None
        if not value.strip().isdigit():
            self.close_connection = True
            raise ApiError(400, f"bad Content-Length {value!r}")
        return int(value)

    def _discard_body(self) -> None:
        """Read and drop an unwanted body so the client can read the answer; close if huge."""
        try:
            n = self._length() or 0
        except ApiError:
            return
        if n > DRAIN_LIMIT:
            self.close_connection = True
            return
        while n > 0:
            chunk = self.rfile.read(min(n, 1 << 16))
            if not chunk:
                self.close_connection = True
                return
            n -= len(chunk)

    def _read_body(self) -> bytes:
        n = self._length() or 0
        if n > self.api.max_request:
            self._discard_body()
            raise ApiError(
                413,
                f"request body of {n} bytes is over the limit of {self.api.max_request} bytes "
                "(KEYSTONE_MAX_REQUEST_BYTES)",
            )
        try:
            data = self.rfile.read(n) if n else b""
        except TimeoutError:
            self.close_connection = True
            raise ApiError(408, f"the request body did not arrive within {self.timeout}s") from None
        if len(data) != n:
            self.close_connection = True
            raise ApiError(400, f"request body ended after {len(data)} of {n} bytes")
        return data

    def handle_expect_100(self) -> bool:
        # Answer a client that asks first (curl does for large uploads) before it sends
        # megabytes: 401 without the token, 413 over the limit, else 100 Continue.
        path = urlsplit(self.path).path
        limit = self.api.max_bundle if path == "/v1/bundles:import" else self.api.max_request
        try:
            n = self._length() or 0
        except ApiError as exc:
            self.close_connection = True
            self._error(exc.status, str(exc))
            return False
        if path != "/healthz" and not self.api.authorized(self.headers.get("Authorization")):
            self.close_connection = True
            self._unauthorized()
            return False
        if n > limit:
            self.close_connection = True
            self._error(413, f"request body of {n} bytes is over the limit of {limit} bytes")
            return False
        return super().handle_expect_100()

    # --- dispatch ---

    def _dispatch(self) -> None:
        url = urlsplit(self.path)
        path = url.path
        matched = match_routes(path)
        if path != "/healthz" and not self.api.authorized(self.headers.get("Authorization")):
            self._discard_body()
            self._unauthorized()
            return
        if not matched:
            self._discard_body()
            self._error(404, f"no such route: {path} (see /v1/openapi.json)")
            return
        chosen = next(
            (
                (r, params)
                for r, params in matched
                if r.method == self.command or (self.command == "HEAD" and r.method == "GET")
            ),
            None,
        )
        if chosen is None:
            allow = ", ".join(sorted({r.method for r, _ in matched} | _gets(matched)))
            self._discard_body()
            self._error(
                405,
                f"{self.command} is not allowed on {path}; allowed: {allow}",
                headers={"Allow": allow},
            )
            return
        route, params = chosen
        started = time.monotonic()
        try:
            query = parse_qs(url.query, keep_blank_values=True)
            body = b"" if route.body == "stream" else self._read_body()
            handler: Callable[..., None] = getattr(self, "h_" + route.handler)
            handler(query, body, **params)
        except ApiError as exc:
            self._error(exc.status, str(exc), kind=exc.kind)
        except NotFound as exc:
            self._error(404, _text(exc))
        except Conflict as exc:
            self._error(409, _text(exc))
        except TimeoutError as exc:
            self._error(504, _text(exc) or "timed out", kind="retryable")
        except KeystoneError as exc:
            self._error(_status_of(exc), _text(exc), kind=exc.kind)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as exc:
            logger.exception("api: {} {} failed", self.command, path)
            self._error(500, f"internal error: {type(exc).__name__}: {exc}", kind="error")
        finally:
            logger.debug(
                "api: {} {} -> {} in {:.1f} ms",
                self.command,
                path,
                getattr(self, "_status", "-"),
                (time.monotonic() - started) * 1000,
            )

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = _dispatch

    @property
    def c(self) -> AgentControl:
        return self.api.control

    def _json_object(self, body: bytes) -> dict[str, Any] | None:
        """A JSON object body (for a JSON Content-Type or a body starting with ``{``), else None."""
        ctype = self.headers.get("Content-Type", "").lower()
        if not body.strip():
            return None
        if "json" not in ctype and not body.lstrip().startswith(b"{"):
            return None
        try:
            doc = json.loads(body)
        except UnicodeDecodeError:
            raise ApiError(400, "malformed JSON body: not UTF-8") from None
        except json.JSONDecodeError as exc:
            raise ApiError(
                400, f"malformed JSON body: {exc.msg} at line {exc.lineno} column {exc.colno}"
            ) from None
        if not isinstance(doc, dict):
            raise ApiError(
                400, f"malformed JSON body: expected an object, got {type(doc).__name__}"
            )
        return doc

    def _toml_body(self, body: bytes, key: str) -> tuple[str, dict[str, Any]]:
        """The TOML document of a plan or recipe upload: the raw body, or ``{key: "..."}``.

        A JSON ``planPath`` (the Go agent's old form) is refused: the API never reads a file
        whose path a client names.
        """
        doc = self._json_object(body)
        if doc is None:
            try:
                return body.decode("utf-8"), {}
            except UnicodeDecodeError:
                raise ApiError(400, "the body is not UTF-8 text; send the TOML document") from None
        for bad in ("planPath", "recipePath", "path"):
            if bad in doc:
                raise ApiError(
                    400,
                    f"{bad} is not accepted: the API never reads a file a client names; send the "
                    "TOML document itself as the body (keystone apply FILE does)",
                )
        text = doc.get(key)
        if not isinstance(text, str):
            raise ApiError(400, f"JSON body: expected the TOML document as a string in {key!r}")
        return text, doc

    # --- routes -----------------------------------------------------------------------------

    def h_healthz(self, q: Query, body: bytes) -> None:
        self._send(200, self.c.health())

    def h_metrics(self, q: Query, body: bytes) -> None:
        data, content_type = self.c.metrics_text()
        self._send(200, data, content_type=content_type)

    def h_openapi(self, q: Query, body: bytes) -> None:
        self._send(200, self.api.openapi_bytes())

    def h_components(self, q: Query, body: bytes) -> None:
        self._send(200, self.c.components())

    def h_stop_component(self, q: Query, body: bytes, name: str) -> None:
        self._json_object(body)
        op = self.c.stop_component(name)
        # 204 as the Go agent answers: the operation id travels in a header.
        self._send(204, headers={"Keystone-Operation": op} if op else None)

    def h_restart_component(self, q: Query, body: bytes, name: str) -> None:
        self._json_object(body)
        wait = (_param(q, "wait") or "").strip().lower() or None
        if wait not in (None, "pid", "health"):
            raise ApiError(400, f"query parameter wait={wait!r}: expected pid or health")
        timeout = _duration(q, "timeout", 60.0)
        dry = _flag(q, "dry", "dry_run")
        self._send(200, self.c.restart_component(name, wait=wait, timeout=timeout, dry=dry))

    def h_recipes(self, q: Query, body: bytes) -> None:
        self._send(200, self.c.recipes())

    def h_upload_recipe(self, q: Query, body: bytes) -> None:
        text, doc = self._toml_body(body, "recipe")
        force = _flag(q, "force") or doc.get("force") is True
        self._send(201, self.c.upload_recipe(text, force=force))

    def h_delete_recipe(self, q: Query, body: bytes, name: str, version: str) -> None:
        self.c.delete_recipe(name, version)
        self._send(204)

    def h_plan_status(self, q: Query, body: bytes) -> None:
        self._send(200, self.c.plan_status())

    def h_plan_graph(self, q: Query, body: bytes) -> None:
        self._send(200, self.c.plan_graph())

    def h_apply_plan(self, q: Query, body: bytes) -> None:
        text, doc = self._toml_body(body, "plan")
        if not text.strip():
            raise ApiError(400, "empty body: send the plan TOML ([[components]] name, recipe)")
        dry = _flag(q, "dry", "dry_run") or doc.get("dry") is True
        # 202 as the Go agent answers, for a dry run too: scripts check it.
        self._send(202, self.c.apply_plan(text, dry=dry))

    def h_reconcile(self, q: Query, body: bytes) -> None:
        self._json_object(body)
        self._send(200, self.c.reconcile())

    def h_stop_plan(self, q: Query, body: bytes) -> None:
        self._json_object(body)
        op = self.c.stop_plan()
        self._send(204, headers={"Keystone-Operation": op} if op else None)

    def h_datasets(self, q: Query, body: bytes) -> None:
        # Datasets are a Go-agent feature this agent does not manage: none, honestly.
        self._send(200, [])

    def h_datasets_refresh(self, q: Query, body: bytes) -> None:
        self._send(200, [])

    def h_revision(self, q: Query, body: bytes) -> None:
        self._send(200, self.c.revision())

    def h_sync(self, q: Query, body: bytes) -> None:
        self._json_object(body)
        result = self.c.sync(
            dry_run=_flag(q, "dry", "dry_run"),
            allow_rollback=_flag(q, "allow_rollback"),
            retry=_flag(q, "retry"),
        )
        self._send(200, result)

    def h_history(self, q: Query, body: bytes) -> None:
        value = _param(q, "limit") or "50"
        if not value.isdigit() or int(value) < 1:
            raise ApiError(400, f"query parameter limit={value!r}: expected a positive integer")
        self._send(200, self.c.history(limit=min(int(value), 10_000)))

    def h_rollback(self, q: Query, body: bytes) -> None:
        self._json_object(body)
        self._send(200, self.c.rollback(to=_param(q, "to") or None))

    def h_suspend(self, q: Query, body: bytes) -> None:
        self._json_object(body)
        self._send(200, self.c.suspend())

    def h_resume(self, q: Query, body: bytes) -> None:
        self._json_object(body)
        self._send(200, self.c.resume())

    def h_operation(self, q: Query, body: bytes, id: str) -> None:
        wait = _duration(q, "wait", 0.0) if _param(q, "wait") else None
        self._send(200, self.c.operation(id, wait=min(wait, 300.0) if wait else None))

    def h_import_bundle(self, q: Query, body: bytes) -> None:
        length = self._length()
        if length is None:
            self.close_connection = True
            raise ApiError(411, "send the bundle with a Content-Length")
        if length > self.api.max_bundle:
            self._discard_body()
            raise ApiError(
                413,
                f"bundle of {length} bytes is over the limit of {self.api.max_bundle} bytes "
                "(KEYSTONE_MAX_BUNDLE_BYTES)",
            )
        reader = _BodyReader(self.rfile, length)
        try:
            result = self.c.import_bundle(cast(BinaryIO, reader), length)
        finally:
            if reader.remaining:
                # The agent stopped reading early (a refused bundle): never parse the rest of the
                # upload as the next request.
                self.close_connection = True
        self._send(200, result)


def _gets(matched: list[tuple[Route, dict[str, str]]]) -> set[str]:
    return {"HEAD"} if any(r.method == "GET" for r, _ in matched) else set()


def _text(exc: BaseException) -> str:
    return str(exc.args[0]) if len(exc.args) == 1 and isinstance(exc.args[0], str) else str(exc)


def _status_of(exc: KeystoneError) -> int:
    """HTTP status of a Keystone error: will sending the same request again ever work?"""
    if isinstance(exc, UsageError | ValidationError):
        return 400  # the caller's input is wrong; as the Go agent answers a bad plan
    if isinstance(exc, Refused):
        return 422  # well-formed, but refused (signature, anti-rollback, damaged bundle)
    if isinstance(exc, Retryable):
        return 503  # try again later
    return 500  # ProcessError, DeploymentFailed (kind "rolled-back"), anything else


class _BodyReader(io.RawIOBase):
    """The request body as a stream that ends at Content-Length (it never reads into the next
    request). A client that hangs up early makes it end early: the reader compares the bytes
    it got with the length it was given, and the server then closes the connection."""

    def __init__(self, raw: Any, length: int) -> None:
        super().__init__()
        self._raw = raw
        self.remaining = length

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        data = self.read(len(view))
        view[: len(data)] = data
        return len(data)

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            size = self.remaining
        size = min(size, self.remaining)
        parts: list[bytes] = []
        while size > 0:
            try:
                data = bytes(self._raw.read(size))
            except (ConnectionError, TimeoutError):
                data = b""
            if not data:
                break  # the client hung up: a short body
            parts.append(data)
            size -= len(data)
            self.remaining -= len(data)
        return b"".join(parts)
