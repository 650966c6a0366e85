"""Login sessions of the status page: random ids kept in memory, bounded and expiring.

The cookie never carries the API token: a login trades the token for a random session id, and
only a digest of that id is kept (a memory dump does not hand out live sessions). Sessions end
after ``idle`` seconds without a request, ``ttl`` seconds after login whatever happens, at
logout, and when the agent restarts. The table holds at most ``limit`` sessions; a new login
beyond that evicts the one idle longest.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from keystone.openssl import sha256, token_urlsafe

COOKIE = "keystone_session"
"""Name of the session cookie."""

TTL = 12 * 3600.0
"""A session's longest life, from login (seconds)."""

IDLE = 3600.0
"""How long a session lives without a request (the page polls, so an open page keeps it)."""

LIMIT = 16
"""Most sessions at once: a device has a technician or two, not a crowd."""


@dataclass
class _Entry:
    created: float
    seen: float


class Sessions:
    """The table of open sessions. Thread-safe; ``clock`` is monotonic seconds (tests drive it)."""

    def __init__(
        self,
        *,
        ttl: float = TTL,
        idle: float = IDLE,
        limit: int = LIMIT,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl = ttl
        self.idle = idle
        self.limit = limit
        self._clock = clock
        self._lock = threading.Lock()
        self._table: dict[bytes, _Entry] = {}

    def __len__(self) -> int:
        with self._lock:
            self._purge(self._clock())
            return len(self._table)

    def open(self) -> str:
        """A new session id (URL-safe, 256 random bits)."""
        sid = token_urlsafe(32)
        now = self._clock()
        with self._lock:
            self._purge(now)
            while len(self._table) >= self.limit:
                oldest = min(self._table, key=lambda k: self._table[k].seen)
                del self._table[oldest]
            self._table[_key(sid)] = _Entry(now, now)
        return sid

    def check(self, sid: str | None) -> bool:
        """Whether ``sid`` is a live session; a live one counts as used now."""
        if not sid:
            return False
        now = self._clock()
        key = _key(sid)
        with self._lock:
            entry = self._table.get(key)
            if entry is None:
                return False
            if self._expired(entry, now):
                del self._table[key]
                return False
            entry.seen = now
            return True

    def close(self, sid: str | None) -> None:
        """End a session (logout); unknown ids are ignored."""
        if sid:
            with self._lock:
                self._table.pop(_key(sid), None)

    def _expired(self, entry: _Entry, now: float) -> bool:
        return now - entry.created >= self.ttl or now - entry.seen >= self.idle

    def _purge(self, now: float) -> None:
        for key in [k for k, e in self._table.items() if self._expired(e, now)]:
            del self._table[key]


def _key(sid: str) -> bytes:
    return sha256(sid.encode("utf-8", "surrogateescape")).digest()


def session_id(cookie_header: str | None) -> str | None:
    """The session id in a ``Cookie`` request header, or None."""
    if not cookie_header:
        return None
    for part in cookie_header.split(";"):
        name, sep, value = part.strip().partition("=")
        if sep and name == COOKIE and value:
            return value.strip().strip('"')
    return None


def set_cookie(sid: str, *, secure: bool, max_age: float = TTL) -> str:
    """The ``Set-Cookie`` value that hands a session to the browser."""
    attrs = f"{COOKIE}={sid}; Path=/; HttpOnly; SameSite=Strict; Max-Age={int(max_age)}"
    return attrs + ("; Secure" if secure else "")


def clear_cookie(*, secure: bool) -> str:
    """The ``Set-Cookie`` value that makes the browser drop its session cookie."""
    return set_cookie("", secure=secure, max_age=0)
