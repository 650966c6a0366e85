"""One validating reader for every file the agent keeps in its runtime directory.

A state file on a device's flash can be truncated by a power cut, zeroed by a failing card,
replaced by an older copy or deleted. Every reader goes through :func:`read_state`: the bytes are
bounded (``KEYSTONE_MAX_STATE_BYTES``, 64 MiB), decoded as UTF-8 (and JSON), and handed to the
file's typed schema, a function that raises :class:`StateDamage` naming the field and what was
expected. A file that fails any of these is *damaged*: it is moved aside as
``<file>.corrupt-<UTC time>`` (kept for a post-mortem, never read again), reported once as a
WARNING naming the file, what was wrong and where it went, and recorded in :data:`RECOVERIES`,
which the agent shows in ``keystone status`` (``damaged state``) and counts in
``keystone_state_recovered_total{file}``. The caller carries on from what it can trust.

A file that should exist and does not (the snapshot gone while the history is there) is reported
the same way through :func:`report_missing`.

This module imports only the standard library and :mod:`keystone.errors` (loguru when it has
something to report), so any layer (the API, the trust clock, the sync worker, a CLI command
that reads a state file) may use it at no cost.
"""

from __future__ import annotations

import json
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from keystone.errors import KeystoneError

T = TypeVar("T")

MAX_STATE_BYTES = 64 << 20
MAX_STATE_BYTES_ENV = "KEYSTONE_MAX_STATE_BYTES"


class StateDamage(KeystoneError):
    """A state file does not hold what its schema says (the message names the field)."""


@dataclass(frozen=True)
class Recovery:
    """One damaged (or missing) state file the agent recovered from."""

    file: str
    """The file's name (``agent.json``), the ``file`` label of the metric."""
    path: str
    problem: str
    moved_to: str | None
    time: float

    def to_json(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "path": self.path,
            "problem": self.problem,
            "moved_to": self.moved_to,
            "time": self.time,
        }

    def describe(self) -> str:
        """One line for status: what file, what was wrong, where it went."""
        where = f"; moved to {self.moved_to}" if self.moved_to else ""
        return f"{self.path}: {self.problem}{where}"


class Recoveries:
    """The state files recovered by this process, in order (thread-safe; the API reads it)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: list[Recovery] = []
        self._listeners: list[Callable[[Recovery], None]] = []

    def add(self, rec: Recovery) -> None:
        with self._lock:
            self._items.append(rec)
            listeners = list(self._listeners)
        for fn in listeners:
            fn(rec)

    def listen(self, fn: Callable[[Recovery], None]) -> None:
        """Call ``fn`` with every recovery from now on."""
        with self._lock:
            self._listeners.append(fn)

    def items(self) -> list[Recovery]:
        with self._lock:
            return list(self._items)

    def counts(self) -> dict[str, int]:
        """Recoveries by file name (the metric)."""
        out: dict[str, int] = {}
        for rec in self.items():
            out[rec.file] = out.get(rec.file, 0) + 1
        return out

    def __iter__(self) -> Iterator[Recovery]:
        return iter(self.items())


RECOVERIES = Recoveries()
"""Every recovery of this process (the agent's status and metric read it)."""

_OWNER = True


def leave_in_place() -> None:
    """This process is not the agent (a worker): damage is logged and the file left alone.

    The agent reads every state file at start and sets a damaged one aside there, where the
    report reaches its status and metrics; a worker that moved it would report to nobody.
    """
    global _OWNER
    _OWNER = False


def _warn(message: str, *args: object) -> None:
    """A WARNING on loguru's logger, as if logged where ``_warn`` was called."""
    from loguru import logger  # lazy: a command that finds nothing damaged never loads it

    logger.opt(depth=1).warning(message, *args)


def max_state_bytes(environ: Mapping[str, str] | None = None) -> int:
    """The bound on one state file (``KEYSTONE_MAX_STATE_BYTES``, bytes; 64 MiB)."""
    env = os.environ if environ is None else environ
    raw = (env.get(MAX_STATE_BYTES_ENV) or "").strip()
    try:
        value = int(raw) if raw else MAX_STATE_BYTES
    except ValueError:
        _warn("{}={!r} is not a number of bytes; using 64 MiB", MAX_STATE_BYTES_ENV, raw)
        return MAX_STATE_BYTES
    return value if value > 0 else MAX_STATE_BYTES


def utc_stamp(ts: float) -> str:
    """``20260102T030405Z``: the suffix of a file moved aside."""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y%m%dT%H%M%SZ")


def set_aside(
    path: Path, problem: str, *, name: str | None = None, original: Path | None = None
) -> Recovery:
    """Move a damaged ``path`` to ``<file>.corrupt-<UTC time>``, log it, record it.

    ``original`` is the state file reported when ``path`` is a copy of it (damage found inside
    a file that stays in use and is rewritten: the copy is what is kept aside).
    """
    now = time.time()
    orig = original or path
    if not _OWNER:
        _warn("damaged state file {}: {}; not used (the agent sets it aside)", orig, problem)
        return Recovery(name or orig.name, str(orig), problem, None, now)
    target = orig.with_name(f"{orig.name}.corrupt-{utc_stamp(now)}")
    n = 1
    while target.exists():
        n += 1
        target = orig.with_name(f"{orig.name}.corrupt-{utc_stamp(now)}-{n}")
    moved: str | None = str(target)
    try:
        os.replace(path, target)
    except FileNotFoundError:
        moved = None
    except OSError as exc:
        moved = None
        problem = f"{problem} (could not move it aside: {exc.strerror or exc})"
    rec = Recovery(name or orig.name, str(orig), problem, moved, now)
    _warn(
        "damaged state file {}: {}; {}; carrying on without it",
        orig,
        problem,
        f"moved to {moved}" if moved else "it could not be kept",
    )
    RECOVERIES.add(rec)
    return rec


def report_missing(path: Path, why: str, *, name: str | None = None) -> Recovery:
    """Report a state file that should exist and does not (nothing to move aside)."""
    rec = Recovery(name or path.name, str(path), f"missing ({why})", None, time.time())
    _warn("state file {} is missing ({}); carrying on without it", path, why)
    RECOVERIES.add(rec)
    return rec


def read_bytes(path: Path, *, max_bytes: int | None = None) -> bytes | None:
    """The bytes of ``path`` (None when it does not exist).

    Raises:
        StateDamage: larger than the bound, not a regular file, or unreadable.
    """
    bound = max_state_bytes() if max_bytes is None else max_bytes
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StateDamage(f"cannot be read: {exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise StateDamage("is not a regular file")
        if st.st_size > bound:
            raise StateDamage(
                f"is {st.st_size} bytes, larger than the bound of {bound} bytes "
                f"(raise it with {MAX_STATE_BYTES_ENV})"
            )
        chunks: list[bytes] = []
        total = 0
        while True:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                break
            total += len(chunk)
            if total > bound:
                raise StateDamage(f"grew past the bound of {bound} bytes while being read")
            chunks.append(chunk)
        return b"".join(chunks)
    except OSError as exc:
        raise StateDamage(f"cannot be read: {exc.strerror or exc}") from None
    finally:
        os.close(fd)


def decode_json(data: bytes) -> Any:
    """UTF-8 then JSON, as :class:`StateDamage` naming what failed and where."""
    if not data.strip():
        raise StateDamage("is empty")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise StateDamage(f"is not UTF-8 text (byte {exc.start})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        # Some of json's messages already end in "at" ("Unterminated string starting at").
        what = exc.msg if exc.msg.endswith(" at") else f"{exc.msg} at"
        raise StateDamage(f"is not JSON: {what} line {exc.lineno} column {exc.colno}") from None
    except RecursionError:
        raise StateDamage("is not JSON this reader accepts: nested too deeply") from None


def read_state(
    path: Path,
    schema: Callable[[Any], T],
    *,
    name: str | None = None,
    max_bytes: int | None = None,
    raw: bool = False,
) -> T | None:
    """Read ``path`` through ``schema``; None when it is missing or was damaged (set aside).

    ``schema`` gets the decoded JSON (or, with ``raw=True``, the bytes) and returns the typed
    value; it raises :class:`StateDamage` (or ``ValueError``/``TypeError``/``KeyError``, taken as
    damage too, so a schema bug never crashes the agent) for a document it does not accept.
    """
    try:
        data = read_bytes(path, max_bytes=max_bytes)
        if data is None:
            return None
        doc: Any = data if raw else decode_json(data)
        return schema(doc)
    except StateDamage as exc:
        set_aside(path, str(exc), name=name)
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        set_aside(path, f"does not match its schema: {type(exc).__name__}: {exc}", name=name)
    return None


# --- schema helpers ---------------------------------------------------------------------------


def obj(value: Any, where: str) -> dict[str, Any]:
    """``value`` as a JSON object with string keys, else :class:`StateDamage`."""
    if not isinstance(value, dict):
        raise StateDamage(f"{where}: expected an object, got {_kind(value)}")
    return value


def opt_obj(value: Any, where: str) -> dict[str, Any] | None:
    return None if value is None else obj(value, where)


def string(value: Any, where: str, *, optional: bool = False) -> str:
    if value is None and optional:
        return ""
    if not isinstance(value, str):
        raise StateDamage(f"{where}: expected a string, got {_kind(value)}")
    return value


def opt_string(value: Any, where: str) -> str | None:
    if value is None:
        return None
    return string(value, where)


def number(value: Any, where: str, *, default: float | None = None) -> float:
    if value is None and default is not None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise StateDamage(f"{where}: expected a number, got {_kind(value)}")
    return float(value)


def opt_number(value: Any, where: str) -> float | None:
    return None if value is None else number(value, where)


def integer(value: Any, where: str, *, default: int | None = None) -> int:
    if value is None and default is not None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise StateDamage(f"{where}: expected an integer, got {_kind(value)}")
    return value


def boolean(value: Any, where: str, *, default: bool | None = None) -> bool:
    if value is None and default is not None:
        return default
    if not isinstance(value, bool):
        raise StateDamage(f"{where}: expected true or false, got {_kind(value)}")
    return value


def version(doc: Mapping[str, Any], where: str, newest: int) -> int:
    """The ``version`` field of a state document: absent (1) or an integer up to ``newest``."""
    v = integer(doc.get("version"), f"{where}.version", default=1)
    if v < 1 or v > newest:
        raise StateDamage(f"{where}.version: {v} is not a version this agent reads (1..{newest})")
    return v


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, int | float):
        return "a number"
    return type(value).__name__
