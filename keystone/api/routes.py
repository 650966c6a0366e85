"""The API's routes, its own error answers, request limits and query-parameter parsing."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import unquote

from keystone.errors import KeystoneError, Refused, Retryable, UsageError, ValidationError
from keystone.units import parse_duration

MAX_REQUEST_BYTES = 4 << 20
"""Default cap of a request body (``KEYSTONE_MAX_REQUEST_BYTES``), as in the Go agent."""

MAX_BUNDLE_BYTES = 4 << 30
"""Default cap of a streamed bundle upload (``KEYSTONE_MAX_BUNDLE_BYTES``)."""

DRAIN_LIMIT = 16 << 20
"""How much of a refused body the server reads and discards so that the client sees the answer
(a socket closed with unread data is reset, and the reset can destroy the response)."""


class ApiError(Exception):
    """An HTTP error answer decided by the server itself (bad query, body too large...)."""

    def __init__(self, status: int, message: str, *, kind: str = "usage") -> None:
        self.status = status
        self.kind = kind
        super().__init__(message)


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
    Route("GET", "/", "root"),
    Route("GET", "/healthz", "healthz", auth=False),
    Route("GET", "/metrics", "metrics"),
    Route("GET", "/v1/openapi.json", "openapi"),
    Route("GET", "/v1/components", "components"),
    Route("POST", "/v1/components/{name}:stop", "stop_component"),
    Route("POST", "/v1/components/{name}:restart", "restart_component"),
    Route("GET", "/v1/components/{name}/logs", "component_logs"),
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
    Route("GET", "/v1/drift", "drift"),
    Route("POST", "/v1/drift:check", "drift_check"),
    Route("GET", "/v1/datasets/{name}", "dataset"),
    Route("GET", "/v1/revision", "revision"),
    Route("POST", "/v1/sync", "sync"),
    Route("GET", "/v1/history", "history"),
    Route("POST", "/v1/rollback", "rollback"),
    Route("POST", "/v1/suspend", "suspend"),
    Route("POST", "/v1/resume", "resume"),
    Route("POST", "/v1/bundles:import", "import_bundle", body="stream"),
    Route("GET", "/v1/operations/{id}", "operation"),
)


UI_ROUTES: tuple[Route, ...] = (
    Route("GET", "/ui", "ui_page", auth=False),
    Route("GET", "/ui/", "ui_page", auth=False),
    Route("GET", "/ui/login", "ui_login_page", auth=False),
    Route("POST", "/ui/login", "ui_login", auth=False, body="text"),
    Route("POST", "/ui/logout", "ui_logout"),
    Route("GET", "/ui/{asset}", "ui_asset"),
)
"""The status page (keystone.ui): not part of the API document. ``ui_page`` and the login
page decide for themselves (a visitor without a session is sent to the login form)."""

UI_HEADER = "X-Keystone-UI"
"""A request authenticated by the page's session cookie that changes state must carry this
header with the value ``1``: a cross-site form or image cannot set it (CSRF defence)."""


def is_ui(path: str) -> bool:
    """Whether ``path`` belongs to the status page rather than the API."""
    return path == "/ui" or path.startswith("/ui/")


def match_routes(
    path: str, routes: tuple[Route, ...] = ROUTES
) -> list[tuple[Route, dict[str, str]]]:
    """Every route whose path template matches ``path``, with its path parameters (decoded)."""
    out = []
    for route in routes:
        m = route.pattern.match(path)
        if m:
            out.append((route, {k: unquote(v) for k, v in m.groupdict().items()}))
    return out


# --- query helpers --------------------------------------------------------------------------

Query = Mapping[str, list[str]]

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"", "0", "false", "no", "off"}


def param(q: Query, name: str) -> str | None:
    values = q.get(name)
    return values[-1] if values else None


def flag(q: Query, *names: str) -> bool:
    """A boolean query parameter (``?dry=true``); several names are synonyms."""
    result = False
    for name in names:
        value = param(q, name)
        if value is None:
            continue
        low = value.strip().lower()
        if low in _TRUE:
            result = True
        elif low not in _FALSE:
            raise ApiError(400, f"query parameter {name}={value!r}: expected true or false")
    return result


def duration(q: Query, name: str, default: float) -> float:
    value = param(q, name)
    if value is None or value == "":
        return default
    try:
        seconds = parse_duration(value)
    except (ValueError, KeystoneError) as exc:
        raise ApiError(400, f"query parameter {name}={value!r}: {exc}") from None
    if seconds <= 0:
        raise ApiError(400, f"query parameter {name}={value!r}: must be positive, e.g. 60s")
    return seconds


def status_of(exc: KeystoneError) -> int:
    """HTTP status of a Keystone error: will sending the same request again ever work?"""
    if isinstance(exc, UsageError | ValidationError):
        return 400  # the caller's input is wrong; as the Go agent answers a bad plan
    if isinstance(exc, Refused):
        return 422  # well-formed, but refused (signature, anti-rollback, damaged bundle)
    if isinstance(exc, Retryable):
        return 503  # try again later
    return 500  # ProcessError, DeploymentFailed (kind "rolled-back"), anything else
