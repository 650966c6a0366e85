"""The agent's local HTTP API: the Go Keystone's routes plus GitOps, on the standard library.

``ApiServer`` serves ``AgentControl`` (keystone.control) from a ``ThreadingHTTPServer`` in one
background thread (a short-lived thread per request). Every route but ``/healthz`` needs
``Authorization: Bearer <token>``, compared in constant time. Request bodies are capped
(``KEYSTONE_MAX_REQUEST_BYTES``, 4 MiB; a bundle upload has its own bound). Binding beyond
loopback needs an explicit token or TLS with client certificates.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import os
import re
import secrets
import ssl
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, BinaryIO, cast
from urllib.parse import parse_qs, unquote, urlsplit

from loguru import logger

from keystone.control import AgentControl, Conflict, NotFound
from keystone.errors import KeystoneError, Refused, Retryable, UsageError
from keystone.units import parse_duration

MAX_REQUEST = 4 << 20


@dataclass(frozen=True)
class TlsConfig:
    """Server certificate and key; with ``client_ca``, clients must present a cert from it."""

    cert: Path
    key: Path
    client_ca: Path | None = None


def resolve_token(runtime: Path, environ: Mapping[str, str]) -> str:
    """``KEYSTONE_API_TOKEN``, else the token in ``runtime/api.token`` (made 0600 at first start)."""
    if environ.get("KEYSTONE_API_TOKEN"):
        return environ["KEYSTONE_API_TOKEN"]
    path = runtime / "api.token"
    try:
        token = path.read_text().strip()
        if token:
            return token
    except FileNotFoundError:
        pass
    runtime.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    os.chmod(path, 0o600)
    return token


def parse_listen(listen: str) -> tuple[str, int]:
    """``127.0.0.1:8080``, ``[::1]:8080``, ``:8080`` (all interfaces, as in Go) -> (host, port)."""
    text = listen.strip()
    if text.startswith("http://") or text.startswith("https://"):
        text = urlsplit(text).netloc
    m = re.fullmatch(r"\[?([^\]]*?)\]?:(\d+)", text)
    if not m:
        raise UsageError(f"listen address {listen!r}: expected host:port, e.g. 127.0.0.1:8080")
    host = m.group(1) or "0.0.0.0"
    return host, int(m.group(2))


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Route:
    method: str
    pattern: re.Pattern[str]
    handler: str
    summary: str
    auth: bool = True


def _r(method: str, path: str, handler: str, summary: str, auth: bool = True) -> Route:
    regex = "^" + re.sub(r"\{(\w+)\}", r"(?P<\1>[^/:]+)", path.replace(".", r"\.")) + "$"
    return Route(method, re.compile(regex), handler, summary, auth)


ROUTES = [
    _r(
        "GET",
        "/healthz",
        "healthz",
        "Liveness: status, uptime, time, version, applied revision",
        auth=False,
    ),
    _r("GET", "/metrics", "metrics", "Prometheus metrics"),
    _r("GET", "/v1/openapi.json", "openapi", "This API's OpenAPI document"),
    _r("GET", "/v1/components", "components", "Components with state, restarts, health, pid"),
    _r("POST", "/v1/components/{name}:stop", "stop_component", "Stop one component (204)"),
    _r(
        "POST",
        "/v1/components/{name}:restart",
        "restart_component",
        "Restart a component and its dependents",
    ),
    _r("GET", "/v1/recipes", "recipes", "The recipe store"),
    _r(
        "POST",
        "/v1/recipes",
        "upload_recipe",
        "Store a recipe (body: recipe TOML; ?force=true replaces) (201)",
    ),
    _r("DELETE", "/v1/recipes/{name}/{version}", "delete_recipe", "Remove a stored recipe (204)"),
    _r("GET", "/v1/plan/status", "plan_status", "Plan status"),
    _r("GET", "/v1/plan/graph", "plan_graph", "Dependency graph and start layers"),
    _r(
        "POST",
        "/v1/plan/apply",
        "apply_plan",
        "Apply a plan (body: plan TOML with name:version recipes; ?dry=true) (202)",
    ),
    _r("POST", "/v1/plan/reconcile", "reconcile", "Start what should run and does not"),
    _r(
        "POST",
        "/v1/plan/stop",
        "stop_plan",
        "Stop every component; stays stopped across restarts (204)",
    ),
    _r("GET", "/v1/datasets", "datasets", "Datasets (not supported by this agent: always empty)"),
    _r("POST", "/v1/datasets:refresh", "datasets_refresh", "Refresh datasets (nothing to refresh)"),
    _r(
        "GET",
        "/v1/revision",
        "revision",
        "Applied and last known-good revision, source, signer, last sync",
    ),
    _r("POST", "/v1/sync", "sync", "Sync now (?dry=true&allow_rollback=true&retry=true)"),
    _r("GET", "/v1/history", "history", "Syncs, deployments and rollbacks, newest first (?limit=)"),
    _r("POST", "/v1/rollback", "rollback", "Deploy the last known-good revision again (?to=REV)"),
    _r("POST", "/v1/suspend", "suspend", "Stop polling the source"),
    _r("POST", "/v1/resume", "resume", "Start polling again"),
    _r("POST", "/v1/bundles:import", "import_bundle", "Import a bundle (body: the bundle file)"),
]


def openapi_document() -> dict[str, Any]:
    """The OpenAPI 3 description of every route."""
    from keystone import __version__

    paths: dict[str, dict[str, Any]] = {}
    for route in ROUTES:
        path = route.pattern.pattern.strip("^$").replace(r"\.", ".")
        path = re.sub(r"\(\?P<(\w+)>\[\^/:\]\+\)", r"{\1}", path)
        op: dict[str, Any] = {
            "summary": route.summary,
            "operationId": route.handler,
            "responses": {
                "200": {"description": "OK"},
                "401": {"description": "missing or wrong token"},
            },
        }
        params = [
            {"name": n, "in": "path", "required": True, "schema": {"type": "string"}}
            for n in re.findall(r"\{(\w+)\}", path)
        ]
        if params:
            op["parameters"] = params
        if not route.auth:
            op["security"] = []
            del op["responses"]["401"]
        paths.setdefault(path, {})[route.method.lower()] = op
    return {
        "openapi": "3.0.3",
        "info": {"title": "Keystone agent API", "version": __version__},
        "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "security": [{"bearer": []}],
        "paths": paths,
    }


class HttpError(Exception):
    def __init__(self, status: int, message: str) -> None:
        self.status = status
        super().__init__(message)


def _param(q: Mapping[str, list[str]], name: str) -> str | None:
    values = q.get(name)
    return values[-1] if values else None


def _flag(q: Mapping[str, list[str]], name: str) -> bool:
    return (q.get(name) or ["false"])[-1].lower() in ("1", "true", "yes", "on")


class ApiServer:
    """The HTTP API of one agent."""

    def __init__(
        self,
        control: AgentControl,
        *,
        listen: str,
        token: str | None,
        token_file: Path | None = None,
        tls: TlsConfig | None = None,
        explicit_token: bool | None = None,
    ) -> None:
        self.control = control
        self.host, self.port = parse_listen(listen)
        self.token = token
        self.tls = tls
        explicit = (
            bool(os.environ.get("KEYSTONE_API_TOKEN")) if explicit_token is None else explicit_token
        )
        if not is_loopback(self.host) and not explicit and not (tls and tls.client_ca):
            raise UsageError(
                f"refusing to listen on {listen} (beyond loopback) without KEYSTONE_API_TOKEN or TLS with client "
                "certificates ([api] tls_cert, tls_key, client_ca); use 127.0.0.1:PORT for local use"
            )
        self.max_request = int(os.environ.get("KEYSTONE_MAX_REQUEST_BYTES") or MAX_REQUEST)
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> str:
        scheme = "https" if self.tls else "http"
        host = f"[{self.host}]" if ":" in self.host else self.host
        port = self._server.server_address[1] if self._server else self.port
        return f"{scheme}://{host}:{port}"

    def start(self) -> None:
        """Bind and serve in a background thread (raises UsageError if the port is taken)."""
        api = self

        class Handler(_Handler):
            server_api = api

        family_server = _V6Server if ":" in self.host else ThreadingHTTPServer
        try:
            server = family_server((self.host, self.port), Handler)
        except OSError as exc:
            raise UsageError(f"cannot listen on {self.host}:{self.port}: {exc.strerror}") from None
        server.daemon_threads = True
        if self.tls:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            ctx.load_cert_chain(str(self.tls.cert), str(self.tls.key))
            if self.tls.client_ca:
                ctx.verify_mode = ssl.CERT_REQUIRED
                ctx.load_verify_locations(str(self.tls.client_ca))
            server.socket = ctx.wrap_socket(server.socket, server_side=True)
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, name="keystone-api", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


class _V6Server(ThreadingHTTPServer):
    import socket as _socket

    address_family = _socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    server_api: ApiServer
    protocol_version = "HTTP/1.1"
    server_version = "keystone"

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("api: " + format, *args)

    # --- plumbing ---------------------------------------------------------------------------

    def _send(
        self,
        status: int,
        body: Any = None,
        *,
        ctype: str = "application/json",
        headers: Mapping[str, str] | None = None,
    ) -> None:
        if body is None or status == 204:
            data = b""
        elif isinstance(body, bytes):
            data = body
        else:
            data = (json.dumps(body, indent=None, default=str) + "\n").encode()
        self.send_response(status)
        if data or status != 204:
            self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if data and self.command != "HEAD":
            self.wfile.write(data)

    def _error(self, status: int, message: str, headers: Mapping[str, str] | None = None) -> None:
        self._send(status, {"error": message, "status": status}, headers=headers)

    def _body(self) -> bytes:
        length = self.headers.get("Content-Length")
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            raise HttpError(411, "send a Content-Length (chunked bodies are not accepted)")
        n = int(length or 0)
        if n > self.server_api.max_request:
            self.close_connection = True
            raise HttpError(
                413,
                f"request body of {n} bytes is over the limit of {self.server_api.max_request} bytes",
            )
        return self.rfile.read(n) if n else b""

    def _authorized(self) -> bool:
        token = self.server_api.token
        if not token:
            return True
        got = self.headers.get("Authorization", "")
        if not got.startswith("Bearer "):
            return False
        return hmac.compare_digest(got[7:].strip().encode(), token.encode())

    def _dispatch(self) -> None:
        url = urlsplit(self.path)
        path = unquote(url.path)
        query = parse_qs(url.query)
        matched = [(r, m) for r in ROUTES if (m := r.pattern.match(path))]
        if not matched:
            self._error(404, f"no route {path}")
            return
        for route, m in matched:  # noqa: B007 (the match of the chosen route is used below)
            if route.method == self.command or (self.command == "HEAD" and route.method == "GET"):
                break
        else:
            allow = ", ".join(sorted({r.method for r, _ in matched}))
            self._error(
                405, f"{self.command} is not allowed on {path} (allowed: {allow})", {"Allow": allow}
            )
            return
        if route.auth and not self._authorized():
            self._error(
                401,
                "missing or wrong bearer token (KEYSTONE_API_TOKEN or runtime/api.token)",
                {"WWW-Authenticate": 'Bearer realm="keystone"'},
            )
            return
        try:
            getattr(self, "h_" + route.handler)(query, **m.groupdict())
        except HttpError as exc:
            self._error(exc.status, str(exc))
        except NotFound as exc:
            self._error(404, str(exc))
        except Conflict as exc:
            self._error(409, str(exc))
        except TimeoutError as exc:
            self._error(504, str(exc) or "timed out")
        except UsageError as exc:
            self._error(400, str(exc))
        except Refused as exc:
            self._error(422, str(exc))
        except Retryable as exc:
            self._error(503, str(exc))
        except KeystoneError as exc:
            self._error(500, str(exc))
        except Exception as exc:
            logger.exception("api: {} {} failed", self.command, path)
            self._error(500, f"{type(exc).__name__}: {exc}")

    def do_GET(self) -> None:
        self._dispatch()

    def do_HEAD(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def do_DELETE(self) -> None:
        self._dispatch()

    def do_PUT(self) -> None:
        self._dispatch()

    def do_PATCH(self) -> None:
        self._dispatch()

    @property
    def c(self) -> AgentControl:
        return self.server_api.control

    def _text_body(self, key: str) -> str:
        """A TOML body, given raw or as JSON ``{key: "..."}``; a JSON path is refused."""
        raw = self._body()
        ctype = self.headers.get("Content-Type", "")
        stripped = raw.lstrip()
        if "json" in ctype or stripped.startswith(b"{"):
            try:
                doc = json.loads(raw or b"null")
            except json.JSONDecodeError as exc:
                raise HttpError(
                    400, f"malformed JSON body: {exc.msg} at line {exc.lineno} column {exc.colno}"
                ) from None
            if not isinstance(doc, dict):
                raise HttpError(400, "expected a JSON object")
            if "planPath" in doc or "path" in doc:
                raise HttpError(
                    400,
                    "the API never reads a file path a client names; send the TOML itself as the body",
                )
            text = doc.get(key)
            if not isinstance(text, str):
                raise HttpError(400, f"expected the TOML text in field {key!r}")
            if doc.get("dry") is True:
                self._json_dry = True
            return text
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise HttpError(400, "the body is not UTF-8 text") from None

    # --- routes -----------------------------------------------------------------------------

    def h_healthz(self, q: Mapping[str, list[str]]) -> None:
        self._send(200, self.c.health())

    def h_metrics(self, q: Mapping[str, list[str]]) -> None:
        body, ctype = self.c.metrics_text()
        self._send(200, body, ctype=ctype)

    def h_openapi(self, q: Mapping[str, list[str]]) -> None:
        self._send(200, openapi_document())

    def h_components(self, q: Mapping[str, list[str]]) -> None:
        self._send(200, self.c.components())

    def h_stop_component(self, q: Mapping[str, list[str]], name: str) -> None:
        self._body()
        self.c.stop_component(name)
        self._send(204)

    def h_restart_component(self, q: Mapping[str, list[str]], name: str) -> None:
        self._body()
        wait = _param(q, "wait")
        if wait not in (None, "", "pid", "health"):
            raise HttpError(400, f"wait must be pid or health, got {wait!r}")
        try:
            timeout = parse_duration((q.get("timeout") or ["60s"])[-1])
        except ValueError as exc:
            raise HttpError(400, f"timeout: {exc}") from None
        self._send(
            200,
            self.c.restart_component(name, wait=wait or None, timeout=timeout, dry=_flag(q, "dry")),
        )

    def h_recipes(self, q: Mapping[str, list[str]]) -> None:
        self._send(200, self.c.recipes())

    def h_upload_recipe(self, q: Mapping[str, list[str]]) -> None:
        text = self._text_body("recipe")
        self._send(201, self.c.upload_recipe(text, force=_flag(q, "force")))

    def h_delete_recipe(self, q: Mapping[str, list[str]], name: str, version: str) -> None:
        self.c.delete_recipe(name, version)
        self._send(204)

    def h_plan_status(self, q: Mapping[str, list[str]]) -> None:
        self._send(200, self.c.plan_status())

    def h_plan_graph(self, q: Mapping[str, list[str]]) -> None:
        self._send(200, self.c.plan_graph())

    def h_apply_plan(self, q: Mapping[str, list[str]]) -> None:
        self._json_dry = False
        text = self._text_body("plan")
        dry = _flag(q, "dry") or self._json_dry
        self._send(200 if dry else 202, self.c.apply_plan(text, dry=dry))

    def h_reconcile(self, q: Mapping[str, list[str]]) -> None:
        self._body()
        self._send(200, self.c.reconcile())

    def h_stop_plan(self, q: Mapping[str, list[str]]) -> None:
        self._body()
        self.c.stop_plan()
        self._send(204)

    def h_datasets(self, q: Mapping[str, list[str]]) -> None:
        self._send(200, [])

    def h_datasets_refresh(self, q: Mapping[str, list[str]]) -> None:
        self._body()
        self._send(200, {"refreshed": []})

    def h_revision(self, q: Mapping[str, list[str]]) -> None:
        self._send(200, self.c.revision())

    def h_sync(self, q: Mapping[str, list[str]]) -> None:
        self._body()
        self._send(
            200,
            self.c.sync(
                dry_run=_flag(q, "dry") or _flag(q, "dry_run"),
                allow_rollback=_flag(q, "allow_rollback"),
                retry=_flag(q, "retry"),
            ),
        )  # type: ignore[call-arg]

    def h_history(self, q: Mapping[str, list[str]]) -> None:
        try:
            limit = int((q.get("limit") or ["50"])[-1])
        except ValueError:
            raise HttpError(400, "limit must be an integer") from None
        self._send(200, self.c.history(limit=limit))

    def h_rollback(self, q: Mapping[str, list[str]]) -> None:
        self._body()
        self._send(200, self.c.rollback(to=_param(q, "to")))

    def h_suspend(self, q: Mapping[str, list[str]]) -> None:
        self._body()
        self._send(200, self.c.suspend())

    def h_resume(self, q: Mapping[str, list[str]]) -> None:
        self._body()
        self._send(200, self.c.resume())

    def h_import_bundle(self, q: Mapping[str, list[str]]) -> None:
        length = self.headers.get("Content-Length")
        if length is None:
            raise HttpError(411, "send the bundle with a Content-Length")
        self._send(200, self.c.import_bundle(cast(BinaryIO, self.rfile), int(length)))


HandlerFn = Callable[..., None]
