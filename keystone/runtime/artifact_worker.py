"""The artifact worker: fetch + verify + unpack in a short-lived child process.

The resident agent must stay small (httpx and cryptography never leave a process once imported)
and the network-facing parsers should not run inside the supervisor, so the agent runs::

    python -m keystone.runtime.artifact_worker  < request.json  > answer.json

Request (stdin)::

    {"policy": {...ArtifactPolicy.to_json()...},
     "artifacts": [{"component": "api", "artifact": {"uri": ..., "sha256": ..., ...}}],
     "gc_keep": ["<sha256>", ...] | null}

Answer (stdout)::

    {"prepared": [{"component": "api", "uri": ..., "sha256": ..., "path": ..., "size": ...,
                   "name": ..., "unpacked": ... | null, "signed_by": ... | null}],
     "gc": {...GcReport...} | null,
     "cache_bytes": 123, "clock_trusted": true,
     "error": null | {"type": "ArtifactIntegrityError", "reason": "hash-mismatch",
                      "message": ..., "component": ..., "uri": ...}}

Artifacts are prepared in order and the first refusal stops the run; GC runs only when everything
was prepared, and never evicts what this run prepared. The exit status is 0 whenever the answer
was written, refusal or not; non-zero means the worker crashed (its traceback is on stderr).
Log lines go to stderr as ``LEVEL|message``; :func:`prepare_in_worker` re-logs them.

Secrets (tokens) travel in the request on stdin, never in argv or the environment.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from loguru import logger

from keystone.errors import KeystoneError, UsageError
from keystone.runtime.artifacts import (
    ERROR_TYPES,
    ArtifactLike,
    ArtifactPolicy,
    ArtifactSpec,
    ArtifactStore,
    GcReport,
    PreparedArtifact,
    clock_trusted,
    public_error_type,
    redact_uri,
)
from keystone.runtime.artifacts.files import prune_go_view
from keystone.statefile import leave_in_place
from keystone.workerproc import ErrorInfo, decode_answer, read_request, write_answer

MODULE = "keystone.runtime.artifact_worker"


@dataclass(frozen=True)
class WorkerResult:
    """A successful worker run.

    Attributes:
        prepared: ``(component, artifact)`` in request order.
        gc: the GC report when ``gc_keep`` was given.
        cache_bytes: the cache size afterwards (for the metric).
        clock_trusted: the ``keystone_clock_trusted`` value.
    """

    prepared: tuple[tuple[str, PreparedArtifact], ...]
    gc: GcReport | None
    cache_bytes: int
    clock_trusted: bool


# --- inside the worker --------------------------------------------------------------------------


def handle(request: Mapping[str, Any]) -> dict[str, Any]:
    """Serve one request (in this process) and return the answer document.

    Keystone errors become the answer's ``error``; anything else propagates (a crash).
    """
    answer: dict[str, Any] = {
        "prepared": [],
        "gc": None,
        "cache_bytes": None,
        "clock_trusted": None,
        "error": None,
    }
    component: str | None = None
    try:
        if not isinstance(request, Mapping):
            raise _usage("the request must be a JSON object")
        policy = ArtifactPolicy.from_json(request.get("policy") or {})
        items = request.get("artifacts") or []
        if not isinstance(items, list):
            raise _usage("'artifacts' must be a list")
        with ArtifactStore(policy) as store:
            done: set[str] = set()
            for item in items:
                component = str(item.get("component") or "")
                spec = ArtifactSpec.from_json(item.get("artifact") or {})
                prepared = store.prepare(spec, component=component)
                done.add(prepared.sha256)
                answer["prepared"].append(
                    {"component": component, "uri": redact_uri(spec.uri), **prepared.to_json()}
                )
            component = None
            keep = request.get("gc_keep")
            if keep is not None:
                report = store.gc({*(str(k) for k in keep), *done})
                answer["gc"] = report.to_json()
                if report.evicted:  # Go-view links of what was evicted (artifacts.files)
                    prune_go_view(store.root)
            answer["cache_bytes"] = store.cache_bytes()
        answer["clock_trusted"] = clock_trusted(policy)
    except KeystoneError as exc:
        answer["error"] = ErrorInfo.of(
            exc, type_name=public_error_type(exc), component=component
        ).to_json()
    return answer


def _usage(message: str) -> KeystoneError:
    return UsageError(f"artifact worker request: {message}")


def main() -> int:
    """Read a request on stdin, write the answer on stdout; 0 unless the worker crashed."""
    leave_in_place()  # state files are the agent's to set aside
    logger.remove()
    logger.add(sys.stderr, format="{level}|{message}", level="INFO")
    try:
        request = read_request(sys.stdin.buffer)
    except KeystoneError as exc:
        answer: dict[str, Any] = {
            "prepared": [],
            "gc": None,
            "cache_bytes": None,
            "clock_trusted": None,
            "error": ErrorInfo.of(_usage(str(exc)), type_name=public_error_type(exc)).to_json(),
        }
    else:
        answer = handle(request)
    write_answer(answer)
    return 0


# --- in the agent -------------------------------------------------------------------------------


def build_request(
    policy: ArtifactPolicy,
    items: Sequence[tuple[str, ArtifactLike]],
    gc_keep: Sequence[str] | None = None,
) -> dict[str, Any]:
    """The request document for ``items`` = ``(component, artifact)`` pairs."""
    return {
        "policy": policy.to_json(),
        "artifacts": [
            {"component": component, "artifact": ArtifactSpec.of(artifact).to_json()}
            for component, artifact in items
        ],
        "gc_keep": None if gc_keep is None else list(gc_keep),
    }


def error_from_answer(error: Mapping[str, Any]) -> KeystoneError:
    """Rebuild the exception a worker reported (same class tree, same message and fields)."""
    return ErrorInfo.from_json(error).to_exception(types=ARTIFACT_ERRORS)


def _artifact_error(cls: type[Any]) -> Any:
    def build(info: ErrorInfo) -> KeystoneError:
        exc: KeystoneError = cls(
            info.message, reason=info.reason or "unknown", component=info.component, uri=info.uri
        )
        return exc

    return build


ARTIFACT_ERRORS = {name: _artifact_error(cls) for name, cls in ERROR_TYPES.items()}
"""Builders for the artifact errors (they carry reason, component and uri)."""


def parse_answer(stdout: bytes, stderr: bytes, returncode: int) -> WorkerResult:
    """Turn a worker's output into a result, or raise what it reported.

    Raises:
        KeystoneError: the reported refusal (its class), or a crash (the stderr tail).
    """
    for line in stderr.decode("utf-8", "replace").splitlines():
        level, sep, message = line.partition("|")
        if sep and level in ("TRACE", "DEBUG", "INFO", "SUCCESS", "WARNING", "ERROR", "CRITICAL"):
            logger.log(level, "artifact worker: {}", message)
    answer = decode_answer(stdout) if returncode == 0 else None
    if answer is None:
        tail = stderr.decode("utf-8", "replace").strip().splitlines()[-5:]
        raise KeystoneError(
            f"the artifact worker crashed (exit {returncode}): {' / '.join(tail) or 'no output'}"
        )
    if answer.get("error"):
        raise error_from_answer(answer["error"])
    prepared = tuple(
        (str(item["component"]), PreparedArtifact.from_json(item)) for item in answer["prepared"]
    )
    gc = answer.get("gc")
    report = (
        GcReport(
            evicted=tuple(gc["evicted"]),
            freed_bytes=int(gc["freed_bytes"]),
            remaining_bytes=int(gc["remaining_bytes"]),
            limit_bytes=int(gc["limit_bytes"]),
            over_limit=bool(gc["over_limit"]),
        )
        if gc
        else None
    )
    return WorkerResult(
        prepared=prepared,
        gc=report,
        cache_bytes=int(answer.get("cache_bytes") or 0),
        clock_trusted=bool(answer.get("clock_trusted")),
    )


def _command(python: str | None) -> list[str]:
    return [python or sys.executable, "-m", MODULE]


def prepare_in_worker(
    policy: ArtifactPolicy,
    items: Sequence[tuple[str, ArtifactLike]],
    *,
    gc_keep: Sequence[str] | None = None,
    python: str | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float | None = None,
) -> WorkerResult:
    """Prepare ``(component, artifact)`` pairs in a child process (blocking).

    Args:
        policy: the artifact policy.
        items: what to prepare, in order.
        gc_keep: sha256s to keep (applied + last known-good plans); ``None`` skips GC.
        python: the interpreter (default: this one).
        env: the child's environment (default: inherited).
        timeout: kill the worker after this many seconds (default: its own deadlines).

    Raises:
        ArtifactRefusedError / ArtifactArchiveError / ArtifactDownloadError: what the worker
            reported; KeystoneError: a crash.
    """
    payload = json.dumps(build_request(policy, items, gc_keep)).encode()
    try:
        proc = subprocess.run(
            _command(python),
            input=payload,
            capture_output=True,
            env=None if env is None else dict(env),
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise KeystoneError(f"the artifact worker did not finish within {timeout}s") from exc
    return parse_answer(proc.stdout, proc.stderr, proc.returncode)


async def prepare_in_worker_async(
    policy: ArtifactPolicy,
    items: Sequence[tuple[str, ArtifactLike]],
    *,
    gc_keep: Sequence[str] | None = None,
    python: str | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float | None = None,
) -> WorkerResult:
    """:func:`prepare_in_worker` for an asyncio agent; a cancelled call kills the worker."""
    payload = json.dumps(build_request(policy, items, gc_keep)).encode()
    proc = await asyncio.create_subprocess_exec(
        *_command(python),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=None if env is None else dict(env),
    )
    try:
        stdout, stderr = await asyncio.wait_for(proc.communicate(payload), timeout)
    except BaseException as exc:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        if isinstance(exc, TimeoutError):
            raise KeystoneError(f"the artifact worker did not finish within {timeout}s") from exc
        raise
    assert proc.returncode is not None
    return parse_answer(stdout, stderr, proc.returncode)


if __name__ == "__main__":
    sys.exit(main())
