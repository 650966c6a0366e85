"""One API connection: routing, authorization, body limits and error mapping.

The work itself is the control's (keystone.control.AgentControl); what the connection needs of
the server is the small :class:`HandlerHost` protocol, so this module does not import the server.
"""

from __future__ import annotations

import contextlib
import io
import json
import socket
import socketserver
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, BinaryIO, Protocol, cast
from urllib.parse import parse_qs, urlsplit

from loguru import logger

from keystone.api.http1 import RequestHandler
from keystone.api.logtail import MAX_LINES, tail_lines
from keystone.api.routes import (
    DRAIN_LIMIT,
    ROUTES,
    UI_HEADER,
    UI_ROUTES,
    ApiError,
    Query,
    Route,
    duration,
    flag,
    is_ui,
    match_routes,
    param,
    status_of,
)
from keystone.control import AgentControl, Conflict, NotFound
from keystone.errors import KeystoneError
from keystone.limits import Limits, how_to_raise
from keystone.openssl import is_tls_socket


class HandlerHost(Protocol):
    """What a connection needs of the server that accepted it."""

    control: AgentControl
    max_request: int
    max_bundle: int
    log_root: Path
    limits: Limits
    header_timeout: float
    idle_timeout: float

    @property
    def secure_cookies(self) -> bool: ...

    def authorized(self, header: str | None) -> bool: ...

    def token_valid(self, token: str) -> bool: ...

    def open_session(self) -> str: ...

    def session_valid(self, cookie_header: str | None) -> bool: ...

    def close_session(self, cookie_header: str | None) -> None: ...

    def openapi_bytes(self) -> bytes: ...


class _Conn:
    """One open connection: since when it waits for a request (None: answering one) and the
    instant the watchdog closes it unless its request head has arrived."""

    __slots__ = ("deadline", "sock", "waiting_since")

    def __init__(self, sock: Any, now: float, deadline: float) -> None:
        self.sock = sock
        self.waiting_since: float | None = now
        self.deadline: float | None = deadline

    def close_read(self) -> None:
        """Wake its thread out of a blocking read: it sees end of file and ends."""
        self.deadline = self.waiting_since = None
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)


class Server(socketserver.ThreadingMixIn, socketserver.TCPServer):
    """The API's HTTP server: at most ``max_api_connections`` connections (one thread each),
    and a watchdog thread that closes a connection whose request head is late.

    A new connection beyond the bound closes the connection that has waited longest for a
    request (an idle keep-alive client, or a slow one still sending its head); when every
    connection is busy answering a request, the new one is answered 503 and closed. So slow
    clients cannot hold all the slots, and the thread count stays bounded.
    """

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128  # bursts of concurrent clients must not hit the default backlog of 5
    api: HandlerHost

    def __init__(
        self,
        address: tuple[str, int],
        handler: type[RequestHandler],
        *,
        family: socket.AddressFamily,
        api: HandlerHost,
    ) -> None:
        self.address_family = family
        self.api = api
        self.max_connections = api.limits.max_api_connections
        self._closing = False
        self._lock = threading.Condition()
        self._open: dict[Any, _Conn] = {}
        self._watchdog: threading.Thread | None = None
        super().__init__(address, handler)

    # --- connection bookkeeping (called by the handlers' threads) ---

    def waiting(self, sock: Any, timeout: float) -> None:
        """``sock`` waits for (the rest of) a request head, for at most ``timeout`` seconds."""
        now = time.monotonic()
        with self._lock:
            conn = self._open.get(sock)
            if conn is not None:
                if conn.waiting_since is None:
                    conn.waiting_since = now
                conn.deadline = now + timeout
                self._lock.notify_all()

    def busy(self, sock: Any) -> None:
        """``sock`` has sent a request head and is being answered: not evicted, no deadline."""
        with self._lock:
            conn = self._open.get(sock)
            if conn is not None:
                conn.waiting_since = conn.deadline = None

    @property
    def connections(self) -> int:
        with self._lock:
            return len(self._open)

    def _watch(self) -> None:
        """Close connections past their deadline; sleeps until the nearest one (no polling)."""
        with self._lock:
            while not self._closing:
                now = time.monotonic()
                nearest: float | None = None
                for conn in self._open.values():
                    if conn.deadline is None:
                        continue
                    if conn.deadline <= now:
                        logger.debug("api: closing a connection whose request head is late")
                        conn.close_read()
                    elif nearest is None or conn.deadline < nearest:
                        nearest = conn.deadline
                self._lock.wait(None if nearest is None else nearest - now)

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
        if self._watchdog is None:
            self._watchdog = threading.Thread(
                target=self._watch, name="keystone-api-watchdog", daemon=True
            )
            self._watchdog.start()
        now = time.monotonic()
        with self._lock:
            if len(self._open) >= self.max_connections:
                idle = [c for c in self._open.values() if c.waiting_since is not None]
                if idle:
                    min(idle, key=lambda c: c.waiting_since or now).close_read()
                    # Its thread ends at once (end of file); wait for the slot, briefly.
                    self._lock.wait_for(lambda: len(self._open) < self.max_connections, 2.0)
                if len(self._open) >= self.max_connections:
                    self._refuse(request)
                    return
            self._open[request] = _Conn(request, now, now + self.api.header_timeout)
            self._lock.notify_all()
        super().process_request(request, client_address)

    def _refuse(self, request: Any) -> None:
        """Answer 503 without a thread: every connection is busy answering a request."""
        logger.warning(
            "api: refusing a connection: {} connections are busy (the limit; raise it with "
            "KEYSTONE_MAX_API_CONNECTIONS or [limits] max_api_connections in agent.toml)",
            self.max_connections,
        )
        if not is_tls_socket(request):  # no handshake in the accept loop
            body = json.dumps(
                {
                    "error": f"the agent is answering {self.max_connections} connections "
                    "already; retry shortly",
                    "status": 503,
                    "kind": "retryable",
                }
            ).encode()
            head = (
                "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n"
            )
            with contextlib.suppress(OSError):
                request.settimeout(1.0)
                request.sendall(head.encode() + body)
        super().shutdown_request(request)

    def shutdown_request(self, request: Any) -> None:
        with self._lock:
            self._open.pop(request, None)
            self._lock.notify_all()
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
            self._lock.notify_all()  # ends the watchdog
        for sock in open_now:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RD)

    def server_bind(self) -> None:
        # Not http.server's, which resolves the host's FQDN and can wait on DNS.
        super().server_bind()
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that hangs up or fails the TLS handshake is not the agent's problem.
        exc = sys.exc_info()[1]
        logger.debug("api: connection from {} ended: {!r}", client_address, exc)


class Handler(RequestHandler):
    """One connection. Routing, auth, body limits and error mapping; the work is the control's."""

    server: Server
    protocol_version = "HTTP/1.1"
    timeout = 60  # an idle keep-alive connection or a stalled upload is dropped after this
    # Headers and body go out in two writes; with Nagle on, the body of every answer after the
    # first on a kept-alive connection waits for the client's delayed ACK (40 ms on Linux).
    disable_nagle_algorithm = True

    def setup(self) -> None:
        super().setup()
        # Each read waits at most this long (KEYSTONE_API_IDLE_TIMEOUT); the request head also
        # has the watchdog's deadline.
        self.connection.settimeout(self.server.api.idle_timeout)
        if is_tls_socket(self.connection):
            # The handshake runs here, in the connection's thread, not in the accept loop where
            # one slow or hostile client would stall every other.
            self.connection.do_handshake()
        self.rfile = cast(Any, _HeadReader(self.rfile, self.server.api.limits))

    def handle_one_request(self) -> None:
        """Wait (idle) for a request's first byte, then give its head ``header_timeout``;
        a head over the header bounds is answered 431 (414 for the request line) and closed."""
        head = cast(_HeadReader, self.rfile)
        server, api = self.server, self.server.api
        if self._served:
            server.waiting(self.connection, api.idle_timeout)
            try:
                if not head.peek(1):
                    self.close_connection = True
                    return
            except (OSError, ValueError):
                self.close_connection = True
                return
            server.waiting(self.connection, api.header_timeout)
        self._served = True
        head.begin()
        try:
            super().handle_one_request()
        except _HeadTooLarge as exc:
            self.close_connection = True
            self.command, self.request_version = "", "HTTP/1.1"
            self._error(exc.status, str(exc), kind="refused")
        finally:
            head.end()

    _served = False

    @property
    def api(self) -> HandlerHost:
        return self.server.api

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
                f"request body of {n} bytes is over the limit of {self.api.max_request} bytes: "
                + how_to_raise("max_request_bytes"),
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

    def _credentials(self) -> str:
        """How the request authenticates: ``bearer``, ``cookie`` (a status-page session), or
        ``""`` for neither."""
        if self.api.authorized(self.headers.get("Authorization")):
            return "bearer"
        if self.api.session_valid(self.headers.get("Cookie")):
            return "cookie"
        return ""

    def _dispatch(self) -> None:
        cast(_HeadReader, self.rfile).end()
        self.server.busy(self.connection)
        url = urlsplit(self.path)
        path = url.path
        matched = match_routes(path, UI_ROUTES if is_ui(path) else ROUTES)
        chosen = next(
            (
                (r, params)
                for r, params in matched
                if r.method == self.command or (self.command == "HEAD" and r.method == "GET")
            ),
            None,
        )
        public = path == "/healthz" or (chosen is not None and not chosen[0].auth)
        self._how = "" if public else self._credentials()
        if not public and not self._how:
            self._discard_body()
            self._unauthorized()
            return
        # SameSite=Strict keeps the cookie off cross-site requests in today's browsers; the
        # header, which a cross-site form or image cannot set, covers the others.
        if (
            self._how == "cookie"
            and self.command not in ("GET", "HEAD")
            and self.headers.get(UI_HEADER, "").strip() != "1"
        ):
            self._discard_body()
            self._error(
                403,
                f"a request signed in with the status page's cookie that changes state must "
                f"carry the header {UI_HEADER}: 1 (or use Authorization: Bearer)",
            )
            return
        if not matched:
            self._discard_body()
            self._error(404, f"no such route: {path} (see /v1/openapi.json)")
            return
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
            self._error(status_of(exc), _text(exc), kind=exc.kind)
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

    def h_root(self, q: Query, body: bytes) -> None:
        self._send(
            200,
            b"Keystone agent is running. See /healthz, /metrics and /v1/components\n",
            content_type="text/plain; charset=utf-8",
        )

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
        if flag(q, "dry", "dry_run"):
            # A stop touches that one component; the dry run names it and what depends on it
            # (which keeps running without it), and changes nothing.
            if name not in {c.get("name") for c in self.c.components()}:
                raise NotFound(f"component {name!r} is not in the applied plan")
            edges = self.c.plan_graph().get("typedEdges") or []
            needs = sorted({e["from"] for e in edges if e.get("to") == name})
            self._send(200, {"stopOrder": [name], "dependents": needs})
            return
        op = self.c.stop_component(name)
        # 204 as the Go agent answers: the operation id travels in a header.
        self._send(204, headers={"Keystone-Operation": op} if op else None)

    def h_restart_component(self, q: Query, body: bytes, name: str) -> None:
        self._json_object(body)
        wait = (param(q, "wait") or "").strip().lower() or None
        if wait not in (None, "pid", "health"):
            raise ApiError(400, f"query parameter wait={wait!r}: expected pid or health")
        timeout = duration(q, "timeout", 60.0)
        dry = flag(q, "dry", "dry_run")
        self._send(200, self.c.restart_component(name, wait=wait, timeout=timeout, dry=dry))

    def h_component_logs(self, q: Query, body: bytes, name: str) -> None:
        value = param(q, "lines") or "50"
        if not value.isdigit() or not 1 <= int(value) <= MAX_LINES:
            raise ApiError(400, f"query parameter lines={value!r}: expected 1 to {MAX_LINES}")
        if name not in {c.get("name") for c in self.c.components()}:
            raise NotFound(f"component {name!r} is not in the applied plan")
        logdir = self.api.log_root / name
        n = int(value)
        self._send(
            200,
            {
                "component": name,
                "lines": n,
                "stdout": tail_lines(logdir / "stdout.log", n),
                "stderr": tail_lines(logdir / "stderr.log", n),
            },
        )

    def h_recipes(self, q: Query, body: bytes) -> None:
        # Go's answer is the store's file names; ?detail=true gives ours (digest, path).
        if flag(q, "detail"):
            self._send(200, self.c.recipes())
        else:
            self._send(200, self.c.recipe_files())

    def h_upload_recipe(self, q: Query, body: bytes) -> None:
        text, doc = self._toml_body(body, "recipe")
        force = flag(q, "force") or doc.get("force") is True
        self._send(201, self.c.upload_recipe(text, force=force))

    def h_delete_recipe(self, q: Query, body: bytes, name: str, version: str) -> None:
        self.c.delete_recipe(name, version)
        self._send(204)

    def h_plan_status(self, q: Query, body: bytes) -> None:
        self._send(200, self.c.plan_status())

    def h_plan_graph(self, q: Query, body: bytes) -> None:
        fmt = (param(q, "format") or "json").strip().lower()
        if fmt == "json":
            self._send(200, self.c.plan_graph())
            return
        if fmt not in _GRAPH_TYPES:
            raise ApiError(
                400, f"query parameter format={fmt!r}: expected json, dot, mermaid or svg"
            )
        # Lazy: only a client asking for a picture pays for the renderer.
        from keystone.graph import graph_command

        text = graph_command(self.c.plan_graph(), fmt, self.c.components())
        self._send(200, text.encode(), content_type=_GRAPH_TYPES[fmt], headers=_NO_STORE)

    def h_apply_plan(self, q: Query, body: bytes) -> None:
        text, doc = self._toml_body(body, "plan")
        if not text.strip():
            raise ApiError(400, "empty body: send the plan TOML ([[components]] name, recipe)")
        dry = flag(q, "dry", "dry_run") or doc.get("dry") is True
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
        self._send(200, self.c.datasets())

    def h_dataset(self, q: Query, body: bytes, name: str) -> None:
        self._send(200, self.c.dataset(name))

    def h_datasets_refresh(self, q: Query, body: bytes) -> None:
        self._send(200, self.c.refresh_datasets())

    def h_drift(self, q: Query, body: bytes) -> None:
        self._send(200, self.c.drift())

    def h_drift_check(self, q: Query, body: bytes) -> None:
        self._json_object(body)
        self._send(200, self.c.drift_check())

    def h_revision(self, q: Query, body: bytes) -> None:
        self._send(200, self.c.revision())

    def h_sync(self, q: Query, body: bytes) -> None:
        self._json_object(body)
        result = self.c.sync(
            dry_run=flag(q, "dry", "dry_run"),
            allow_rollback=flag(q, "allow_rollback"),
            retry=flag(q, "retry"),
        )
        self._send(200, result)

    def h_history(self, q: Query, body: bytes) -> None:
        value = param(q, "limit") or "50"
        if not value.isdigit() or int(value) < 1:
            raise ApiError(400, f"query parameter limit={value!r}: expected a positive integer")
        self._send(200, self.c.history(limit=min(int(value), 10_000)))

    def h_rollback(self, q: Query, body: bytes) -> None:
        self._json_object(body)
        self._send(200, self.c.rollback(to=param(q, "to") or None))

    def h_suspend(self, q: Query, body: bytes) -> None:
        self._json_object(body)
        self._send(200, self.c.suspend())

    def h_resume(self, q: Query, body: bytes) -> None:
        self._json_object(body)
        self._send(200, self.c.resume())

    def h_operation(self, q: Query, body: bytes, id: str) -> None:
        wait = duration(q, "wait", 0.0) if param(q, "wait") else None
        self._send(200, self.c.operation(id, wait=min(wait, 300.0) if wait else None))

    # --- the status page (keystone.ui, imported on the first /ui request) --------------------

    def _page(self, status: int, data: bytes, content_type: str, csp: str | None = None) -> None:
        # lazy: the status page loads on its first request, never in an agent nobody looks at
        from keystone.ui import assets

        self._send(
            status,
            data,
            content_type=content_type,
            headers=assets.headers(csp) if csp else assets.headers(),
        )

    def _redirect(self, location: str, headers: Mapping[str, str] | None = None) -> None:
        self._send(303, b"", headers={"Location": location, **(headers or {})})

    def h_ui_page(self, q: Query, body: bytes) -> None:
        if not self._credentials():
            self._redirect("/ui/login")
            return
        self.h_ui_asset(q, body, asset="index.html")

    def h_ui_login_page(self, q: Query, body: bytes) -> None:
        # lazy: the status page loads on its first request, never in an agent nobody looks at
        from keystone.ui import assets

        if self._credentials():
            self._redirect("/ui/")
            return
        self._page(200, assets.login_page(), assets.TYPES[".html"], assets.LOGIN_CSP)

    def h_ui_login(self, q: Query, body: bytes) -> None:
        # lazy: the status page loads on its first request, never in an agent nobody looks at
        from keystone.ui import assets

        # lazy: the status page loads on its first request, never in an agent nobody looks at
        from keystone.ui.session import set_cookie

        origin = self.headers.get("Origin")
        if origin and origin != "null" and urlsplit(origin).netloc != self.headers.get("Host"):
            raise ApiError(403, f"login from another origin ({origin}) refused")
        doc = self._json_object(body)
        if doc is not None:
            token = doc.get("token")
        else:
            form = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
            token = param(form, "token")
        if not isinstance(token, str) or not self.api.token_valid(token):
            logger.warning("api: status page login from {} refused", self.address_string())
            if doc is not None:
                self._unauthorized()
            else:
                page = assets.login_page("Wrong token.")
                self._page(401, page, assets.TYPES[".html"], assets.LOGIN_CSP)
            return
        cookie = set_cookie(self.api.open_session(), secure=self.api.secure_cookies)
        logger.info("api: status page login from {}", self.address_string())
        if doc is not None:
            self._send(200, {"login": True}, headers={"Set-Cookie": cookie, **_NO_STORE})
        else:
            self._redirect("/ui/", {"Set-Cookie": cookie, **_NO_STORE})

    def h_ui_logout(self, q: Query, body: bytes) -> None:
        # lazy: the status page loads on its first request, never in an agent nobody looks at
        from keystone.ui.session import clear_cookie

        self.api.close_session(self.headers.get("Cookie"))
        self._send(204, headers={"Set-Cookie": clear_cookie(secure=self.api.secure_cookies)})

    def h_ui_asset(self, q: Query, body: bytes, asset: str) -> None:
        # lazy: the status page loads on its first request, never in an agent nobody looks at
        from keystone.ui import assets

        found = assets.read(asset)
        if found is None or asset == "login.html":
            raise ApiError(404, f"no such file of the status page: {asset}")
        self._page(200, *found)

    def h_import_bundle(self, q: Query, body: bytes) -> None:
        length = self._length()
        if length is None:
            self.close_connection = True
            raise ApiError(411, "send the bundle with a Content-Length")
        if length > self.api.max_bundle:
            self._discard_body()
            raise ApiError(
                413,
                f"bundle of {length} bytes is over the limit of {self.api.max_bundle} bytes: "
                + how_to_raise("max_bundle_bytes"),
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


_GRAPH_TYPES = {
    "svg": "image/svg+xml",
    "dot": "text/vnd.graphviz; charset=utf-8",
    "mermaid": "text/vnd.mermaid; charset=utf-8",
}
_NO_STORE = {"Cache-Control": "no-store"}


def _gets(matched: list[tuple[Route, dict[str, str]]]) -> set[str]:
    return {"HEAD"} if any(r.method == "GET" for r, _ in matched) else set()


def _text(exc: BaseException) -> str:
    return str(exc.args[0]) if len(exc.args) == 1 and isinstance(exc.args[0], str) else str(exc)


class _HeadTooLarge(Exception):
    """A request line or header over the bounds (``max_header_line_bytes``, ``max_headers``)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class _HeadReader:
    """The connection's input: while a request head is read (``begin`` .. ``end``), each line
    is bounded by ``max_header_line_bytes`` and their number by ``max_headers``; the body and
    everything else pass through."""

    def __init__(self, raw: Any, limits: Limits) -> None:
        self._raw = raw
        self._limits = limits
        self._lines = -1  # -1: not in a head

    def begin(self) -> None:
        self._lines = 0

    def end(self) -> None:
        self._lines = -1

    def readline(self, limit: int = -1) -> bytes:
        if self._lines < 0:
            return bytes(self._raw.readline(limit))
        bound = self._limits.max_header_line_bytes
        line = bytes(self._raw.readline(bound + 3))  # the line end is not counted
        first = self._lines == 0
        self._lines += 1
        if len(line.rstrip(b"\r\n")) > bound:
            name = "max_header_line_bytes"
            what = "the request line" if first else "a request header line"
            raise _HeadTooLarge(
                414 if first else 431,
                str(self._limits.refuse(name, f"more than {bound} bytes", what=what)),
            )
        if self._lines > self._limits.max_headers + 2:  # + the request line and the blank one
            raise _HeadTooLarge(
                431,
                str(
                    self._limits.refuse(
                        "max_headers",
                        f"more than {self._limits.max_headers} headers",
                        what="the request's header block",
                    )
                ),
            )
        return line

    def __getattr__(self, name: str) -> Any:
        return getattr(self._raw, name)


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
