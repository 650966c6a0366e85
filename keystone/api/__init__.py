"""The agent's local HTTP API: the Go Keystone's routes plus the GitOps ones, on the stdlib.

``ApiServer`` serves an ``AgentControl`` (keystone.control) from a threading ``socketserver``: one
background thread accepts, and each connection gets a short-lived thread. No web framework: the
whole server is this package (auth, routes, handler, server), which keeps the resident agent small.

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

from keystone.api.auth import (
    TOKEN_FILE,
    TlsConfig,
    is_loopback,
    parse_listen,
    read_token_file,
    resolve_token,
    token_from_file,
)
from keystone.api.routes import (
    DRAIN_LIMIT,
    MAX_BUNDLE_BYTES,
    MAX_REQUEST_BYTES,
    ROUTES,
    ApiError,
    Route,
    match_routes,
)
from keystone.api.server import ApiServer

__all__ = [
    "DRAIN_LIMIT",
    "MAX_BUNDLE_BYTES",
    "MAX_REQUEST_BYTES",
    "ROUTES",
    "TOKEN_FILE",
    "ApiError",
    "ApiServer",
    "Route",
    "TlsConfig",
    "is_loopback",
    "match_routes",
    "parse_listen",
    "read_token_file",
    "resolve_token",
    "token_from_file",
]
