"""One codec for Keystone's short-lived worker processes (the sync and the artifact worker).

A worker is ``python -m <module>``: the agent writes one JSON request on its stdin and reads one
JSON answer from its stdout, bounded in size. A refusal travels inside the answer as an error
document that keeps every field a Keystone error carries (type, kind, message, reason,
component, uri, file, line, field), so the agent raises the same error the worker saw.

This module imports only the standard library and ``keystone.errors``: it is loaded by the
resident agent and by both workers.
"""

from __future__ import annotations

import builtins
import json
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

from keystone import errors

MAX_ANSWER = 64 << 20
"""Bytes of answer the agent reads from a worker; a longer answer is no answer."""

MAX_REQUEST = 64 << 20
"""Bytes of request a worker reads from its stdin."""

ERROR_FIELDS = ("reason", "component", "uri", "file", "line", "field")


@dataclass(frozen=True)
class ErrorInfo:
    """A Keystone error as it crosses a process boundary.

    Attributes:
        type: the error's class name (``SignatureError``, ``ArtifactIntegrityError``...).
        kind: what the caller should do next (``refused``, ``retryable``, ``bug``...).
        message: the rendered message (``str(exc)``).
        reason, component, uri: the context of artifact and deployment errors.
        file, line, field: where a validation error was found.
    """

    type: str
    kind: str
    message: str
    reason: str | None = None
    component: str | None = None
    uri: str | None = None
    file: str | None = None
    line: int | None = None
    field: str | None = None

    @classmethod
    def of(
        cls, exc: BaseException, *, type_name: str | None = None, component: str | None = None
    ) -> ErrorInfo:
        """Describe ``exc`` (``component`` fills in when the error names none)."""

        def text(name: str) -> str | None:
            value = getattr(exc, name, None)
            return None if value is None else str(value)

        line = getattr(exc, "line", None)
        return cls(
            type=type_name or type(exc).__name__,
            kind=str(getattr(exc, "kind", "bug")),
            message=str(exc),
            reason=text("reason"),
            component=text("component") or component,
            uri=text("uri"),
            file=text("file"),
            line=int(line) if isinstance(line, int) else None,
            field=text("field"),
        )

    def to_json(self) -> dict[str, Any]:
        """The error document (every key present; absent fields are null)."""
        return {
            "type": self.type,
            "kind": self.kind,
            "message": self.message,
            **{name: getattr(self, name) for name in ERROR_FIELDS},
        }

    @classmethod
    def from_json(cls, doc: Mapping[str, Any] | None) -> ErrorInfo:
        """Read an error document (older answers lack some keys: they read as absent)."""
        doc = doc or {}

        def text(name: str) -> str | None:
            value = doc.get(name)
            return None if value is None else str(value)

        line = doc.get("line")
        return cls(
            type=str(doc.get("type") or "KeystoneError"),
            kind=str(doc.get("kind") or "error"),
            message=str(doc.get("message") or ""),
            reason=text("reason"),
            component=text("component"),
            uri=text("uri"),
            file=text("file"),
            line=line if isinstance(line, int) else None,
            field=text("field"),
        )

    def to_exception(
        self,
        *,
        types: Mapping[str, Callable[[ErrorInfo], errors.KeystoneError]] | None = None,
        default: Callable[[str], errors.KeystoneError] = errors.KeystoneError,
        refuse: Sequence[builtins.type[errors.KeystoneError]] = (),
    ) -> errors.KeystoneError:
        """The exception this document describes, with every field set again.

        Args:
            types: builders for error types outside ``keystone.errors`` (or to override one).
            default: the class for an unknown type (or one in ``refuse``).
            refuse: ``keystone.errors`` classes a worker may not report (built as ``default``).
        """
        type_name: str = self.type
        build = (types or {}).get(type_name)
        if build is not None:
            exc = build(self)
        else:
            cls = getattr(errors, type_name, None)
            if (
                not isinstance(cls, type)
                or not issubclass(cls, errors.KeystoneError)
                or any(cls is r for r in refuse)
            ):
                exc = default(self.message)
            elif issubclass(cls, errors.ValidationError):
                if self.reason is not None and (self.file or self.field):
                    exc = cls(self.reason, file=self.file, line=self.line, field=self.field)
                else:
                    exc = cls(self.message)
            elif issubclass(cls, errors.DeploymentFailed):
                exc = cls(self.message, component=self.component)
            else:
                exc = cls(self.message)
        for name in ERROR_FIELDS:
            value = getattr(self, name)
            if value is not None and getattr(exc, name, None) is None:
                setattr(exc, name, value)
        return exc


# --- the agent's side ---------------------------------------------------------------------------


class CommandResult(Protocol):
    """What a one-shot command left (``keystone.runtime.process.RunResult``)."""

    @property
    def returncode(self) -> int: ...

    @property
    def stdout(self) -> bytes: ...

    @property
    def stderr(self) -> bytes: ...

    @property
    def timed_out(self) -> bool: ...

    @property
    def truncated(self) -> bool: ...


class CommandRunner(Protocol):
    """Runs a one-shot command in its own process group (``ProcessRunner.run``)."""

    async def run(
        self,
        argv: Sequence[str],
        *,
        cwd: Path,
        env: Mapping[str, str],
        timeout: float,
        input: bytes | None = None,
        max_output: int = ...,
    ) -> CommandResult:
        """Run ``argv`` to completion (killed past ``timeout``)."""
        ...


@dataclass(frozen=True)
class Reply:
    """What came back from one worker run.

    Attributes:
        answer: the JSON object it wrote, or None (crash, timeout, garbage, over the bound).
        returncode: its exit status.
        timed_out: it was killed at its deadline.
        stderr: the tail of its standard error (a traceback, log lines).
    """

    answer: dict[str, Any] | None
    returncode: int
    timed_out: bool
    stderr: bytes = b""


def decode_answer(stdout: bytes, *, truncated: bool = False) -> dict[str, Any] | None:
    """The answer object in ``stdout``; None unless it is one whole JSON object."""
    if truncated:
        return None
    try:
        answer = json.loads(stdout.decode() or "null")
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return answer if isinstance(answer, dict) and answer else None


async def call(
    runner: CommandRunner,
    module: str,
    request: Mapping[str, Any],
    *,
    cwd: Path,
    env: Mapping[str, str],
    timeout: float,
    max_answer: int = MAX_ANSWER,
    python: str | None = None,
) -> Reply:
    """Run ``python -m module`` once with ``request`` on its stdin; read its one answer.

    Secrets in the request travel over the pipe, never in argv or the environment.
    """
    result = await runner.run(
        [python or sys.executable, "-m", module],
        cwd=cwd,
        env=dict(env),
        timeout=timeout,
        input=json.dumps(request).encode(),
        max_output=max_answer,
    )
    answer = (
        None
        if result.timed_out
        else decode_answer(result.stdout, truncated=bool(getattr(result, "truncated", False)))
    )
    return Reply(answer, result.returncode, result.timed_out, result.stderr)


# --- the worker's side --------------------------------------------------------------------------


def read_request(stream: IO[bytes] | None = None, *, limit: int = MAX_REQUEST) -> Any:
    """The JSON request on stdin (raises ``UsageError`` when it is not JSON or too large)."""
    raw = (stream or sys.stdin.buffer).read(limit + 1)
    if len(raw) > limit:
        raise errors.UsageError(f"worker request over {limit} bytes")
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise errors.UsageError(f"not JSON ({exc})") from None


def write_answer(answer: Mapping[str, Any], stream: IO[str] | None = None) -> None:
    """Write the one answer on stdout and flush it."""
    out = stream or sys.stdout
    out.write(json.dumps(answer) + "\n")
    out.flush()
