"""The status page's static files, read from the package directory on each request."""

from __future__ import annotations

import re
from pathlib import Path

STATIC = Path(__file__).parent / "static"

TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}

_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*\.(html|js|css|svg)$")

# Everything the page loads comes from this origin; nothing inline runs, nothing frames it.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
# The login page is one self-contained file (no script at all, its style inline): it is the
# only thing served without a session, so it must not need a second request.
LOGIN_CSP = (
    "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'"
)


def headers(csp: str = CSP) -> dict[str, str]:
    """Response headers of every page file."""
    return {
        "Content-Security-Policy": csp,
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "X-Frame-Options": "DENY",
        "Cache-Control": "no-cache",
    }


def read(name: str) -> tuple[bytes, str] | None:
    """The bytes and content type of the static file ``name``, or None when there is none.

    Only plain file names of the known types are served: no directories, no dot files.
    """
    if not _NAME.match(name):
        return None
    try:
        data = (STATIC / name).read_bytes()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None
    return data, TYPES[Path(name).suffix]


def login_page(error: str = "") -> bytes:
    """The login form, with a fixed message after a refused login (never the user's input)."""
    page = (STATIC / "login.html").read_text(encoding="utf-8")
    note = f'<p class="error" role="alert">{error}</p>' if error else ""
    return page.replace("<!--error-->", note).encode()
