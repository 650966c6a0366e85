"""Atomic persistence of the agent's state and an append-only history.

Every write goes to a temp file in the same directory, is fsynced, renamed over the target, and
the directory is fsynced: a crash at any instant leaves the previous or the new file, never a
torn one.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from keystone.statefile import StateDamage, read_bytes, read_state, set_aside


def atomic_write(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` atomically and durably."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    """fsync a directory so a rename in it is durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: Path, value: Any) -> None:
    """Atomically write ``value`` as pretty JSON."""
    atomic_write(path, (json.dumps(value, indent=2, sort_keys=True) + "\n").encode())


def read_json(path: Path, default: Any = None) -> Any:
    """Read JSON, returning ``default`` when the file does not exist.

    Read through :func:`keystone.statefile.read_state` (bounded, UTF-8, JSON): a file that does
    not decode is set aside (``.corrupt-<time>``) and reported, and ``default`` returned, so one
    bad write by another tool cannot keep the agent from starting.
    """
    value = read_state(path, _any)
    return default if value is None else value


def _any(doc: Any) -> Any:
    return doc


class History:
    """An append-only JSON-lines log of syncs, deployments and rollbacks, newest last on disk."""

    def __init__(self, path: Path, *, max_bytes: int = 4 << 20) -> None:
        self.path = path
        self.max_bytes = max_bytes

    def append(self, record: dict[str, Any]) -> dict[str, Any]:
        """Append one record (a ``time`` field is added) and fsync it."""
        rec = {"time": time.time(), **record}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = (json.dumps(rec, sort_keys=True) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
        self._trim()
        return rec

    def _trim(self) -> None:
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return
        if size <= self.max_bytes:
            return
        lines = self.path.read_bytes().splitlines(keepends=True)
        keep: list[bytes] = []
        total = 0
        for line in reversed(lines):
            total += len(line)
            if total > self.max_bytes // 2:
                break
            keep.append(line)
        atomic_write(self.path, b"".join(reversed(keep)))

    def records(self) -> Iterator[dict[str, Any]]:
        """Records oldest first; a line that is not a JSON object (a torn append) is skipped."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return
        for line in data.splitlines():
            rec = _record(line)
            if rec is not None:
                yield rec

    def check(self) -> None:
        """Validate the whole file once (at start): every line a JSON object with a time.

        A damaged file (random bytes, a torn or truncated line, the wrong JSON types) is set
        aside as ``history.jsonl.corrupt-<time>`` and reported; the records that are intact
        are kept in a fresh file, so the history carries on.
        """
        try:
            data = read_bytes(self.path, max_bytes=max(self.max_bytes * 2, 1 << 20))
        except StateDamage as exc:
            set_aside(self.path, str(exc))
            return
        if data is None:
            return
        good: list[bytes] = []
        bad: list[int] = []
        lines = data.split(b"\n")
        if lines and lines[-1] == b"":
            lines.pop()
        elif lines:
            bad.append(len(lines))  # the last line has no newline: torn or truncated
        for no, line in enumerate(lines, 1):
            if _record(line) is None:
                if no not in bad:
                    bad.append(no)
            elif no not in bad:
                good.append(line + b"\n")
        if not data.strip():
            bad = [1]
        if not bad:
            return
        where = ", ".join(str(n) for n in sorted(bad)[:5]) + (" ..." if len(bad) > 5 else "")
        tmp = self.path.with_name(f"{self.path.name}.damaged.tmp")
        try:
            os.replace(self.path, tmp)
            if good:
                atomic_write(self.path, b"".join(good))
        except OSError:
            tmp = self.path
        what = "is empty" if not data.strip() else f"line(s) {where} are not JSON records"
        set_aside(
            tmp,
            f"{what} ({len(good)} intact record(s) kept)",
            name=self.path.name,
            original=self.path,
        )

    def newest(self, limit: int = 50) -> list[dict[str, Any]]:
        """The newest ``limit`` records, newest first."""
        recs = list(self.records())
        return list(reversed(recs[-limit:])) if limit > 0 else []


def _record(line: bytes) -> dict[str, Any] | None:
    """One history line as a record; None for one that is not a JSON object."""
    try:
        rec = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return None
    return rec if isinstance(rec, dict) else None
