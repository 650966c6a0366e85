"""The API server: binds, serves in a background thread, authorizes, stops."""

from __future__ import annotations

import json
import os
import socket
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from loguru import logger

from keystone.api.auth import (
    TlsConfig,
    digest,
    is_loopback,
    parse_listen,
    read_token_file,
    token_from_file,
)
from keystone.api.handler import Handler, Server
from keystone.control import AgentControl
from keystone.errors import UsageError
from keystone.limits import Limits
from keystone.openssl import compare_digest
from keystone.units import parse_duration

if TYPE_CHECKING:
    import ssl

    # lazy: the status page loads on its first request, never in an agent nobody looks at
    from keystone.ui.session import Sessions


class ApiServer:
    """The HTTP API of one agent.

    Args:
        control: what the routes call (the agent, or a fake in tests).
        listen: ``host:port``; port 0 picks a free port (see ``address`` after ``start()``).
        token: the operator's token (``KEYSTONE_API_TOKEN``), or None to use ``token_file``,
            which is created with a random token (mode 0600) if it does not exist.
        token_file: where the generated token lives (``runtime/api.token``).
        tls: serve HTTPS; with ``client_ca`` clients need a certificate from that CA.
        log_root: where component logs live (``runtime/logs/<name>/stdout.log``); by default
            ``logs`` beside the token file, which is the runtime directory's layout.
        sessions: the status page's session table (tests pass one with their own clock); by
            default one is made at the first login.
        limits: the request bounds (body, header lines, concurrent connections); default
            ``Limits.from_env()``. ``KEYSTONE_API_HEADER_TIMEOUT`` (10 s) bounds the time a
            request head may take to arrive, ``KEYSTONE_API_IDLE_TIMEOUT`` (60 s) each read
            and the idle time between requests.

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
        log_root: Path | None = None,
        sessions: Sessions | None = None,
        limits: Limits | None = None,
    ) -> None:
        self.control = control
        self.log_root = log_root if log_root is not None else token_file.parent / "logs"
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
                "token: set KEYSTONE_API_TOKEN (or --api-token), or configure TLS with client certificates "
                "([api] tls_cert, tls_key, client_ca), or listen on 127.0.0.1"
            )
        self._token_digest = digest(self.token)
        self.limits = limits or Limits.from_env()
        self.max_request = self.limits.max_request_bytes
        self.max_bundle = self.limits.max_bundle_bytes
        self.header_timeout = _env_duration("KEYSTONE_API_HEADER_TIMEOUT", HEADER_TIMEOUT)
        self.idle_timeout = _env_duration("KEYSTONE_API_IDLE_TIMEOUT", IDLE_TIMEOUT)
        self._ssl: ssl.SSLContext | None = self._ssl_context() if tls else None
        self._server: Server | None = None
        self._thread: threading.Thread | None = None
        self._openapi: bytes | None = None
        # The status page's login sessions: created at the first login, so that an agent whose
        # page nobody opens never imports keystone.ui.
        self._sessions: Sessions | None = sessions
        self._sessions_lock = threading.Lock()

    def _ssl_context(self) -> ssl.SSLContext:
        import ssl  # lazy: OpenSSL only for a TLS API (keystone.openssl)

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
            server = Server((self.host, self.port), Handler, family=family, api=self)
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
        return compare_digest(digest(value.strip()), self._token_digest)

    def token_valid(self, token: str) -> bool:
        """Whether ``token`` is the API token (constant-time); the status page's login."""
        return compare_digest(digest(token.strip()), self._token_digest)

    @property
    def secure_cookies(self) -> bool:
        """Session cookies are marked Secure when the API is served over TLS."""
        return self.tls is not None

    def open_session(self) -> str:
        """Start a status-page session after a login; returns its id (the cookie's value)."""
        with self._sessions_lock:
            if self._sessions is None:
                # lazy: the status page loads on its first request, never in an agent nobody looks at
                from keystone.ui.session import Sessions

                self._sessions = Sessions()
            sessions = self._sessions
        return sessions.open()

    def session_valid(self, cookie_header: str | None) -> bool:
        """Whether a ``Cookie`` header carries a live status-page session."""
        sessions = self._sessions
        if sessions is None or not cookie_header:
            return False  # nobody ever logged in: no session can be valid
        # lazy: the status page loads on its first request, never in an agent nobody looks at
        from keystone.ui.session import session_id

        return sessions.check(session_id(cookie_header))

    def close_session(self, cookie_header: str | None) -> None:
        """End the session named by a ``Cookie`` header (logout)."""
        sessions = self._sessions
        if sessions is not None and cookie_header:
            # lazy: the status page loads on its first request, never in an agent nobody looks at
            from keystone.ui.session import session_id

            sessions.close(session_id(cookie_header))

    def openapi_bytes(self) -> bytes:
        if self._openapi is None:
            # lazy: the OpenAPI document is 600 lines of data, built only when a client asks
            from keystone.openapi import openapi_document

            self._openapi = json.dumps(openapi_document(), indent=1).encode()
        return self._openapi


HEADER_TIMEOUT = 10.0
"""Seconds a request head may take from its first byte (``KEYSTONE_API_HEADER_TIMEOUT``)."""

IDLE_TIMEOUT = 60.0
"""Seconds a connection may be idle, or a read take (``KEYSTONE_API_IDLE_TIMEOUT``)."""


def _env_duration(name: str, default: float) -> float:
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        seconds = float(value) if value.replace(".", "", 1).isdigit() else parse_duration(value)
    except ValueError as exc:
        raise UsageError(f"{name}={value!r}: {exc}") from None
    if not seconds > 0:
        raise UsageError(f"{name}={value!r}: expected a duration > 0")
    return seconds
