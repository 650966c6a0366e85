"""The short-lived sync worker: fetch, verify and resolve in a process of its own.

``python -m keystone.sync.worker`` reads one JSON request on stdin and writes one JSON answer on
stdout. dulwich, cryptography and httpx are imported here and die with the process, so the
resident agent stays small (DESIGN section 12); a crash in a pack or TOML parser cannot take the
supervisor down. Refusals are answers, not crashes: ``{"ok": false, "error": {...}}``.

Operations:
    fetch          fetch the source, verify the tip, resolve the device plan
    verify-rev     verify and resolve a revision the mirror already has (rollback, restart)
    import-bundle  add a bundle's objects to the mirror, then as verify-rev on its tip
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from keystone.errors import (
    BundleError,
    KeystoneError,
    RollbackRefused,
    SourceUnreachable,
    StaleRevision,
    ValidationError,
)
from keystone.state import read_json, write_json
from keystone.sync.imports import max_bundle_bytes
from keystone.sync.model import (
    FetchedTip,
    Gate,
    VerifiedRevision,
    WorkerAnswer,
    WorkerOp,
    WorkerRequest,
    gate,
)
from keystone.workerproc import ErrorInfo, read_request, write_answer

APPLIED_REF = "refs/keystone/applied"


def _error(exc: BaseException) -> ErrorInfo:
    return ErrorInfo.of(exc)


def _mirror(req: WorkerRequest) -> Any:
    # dulwich lives here, in the worker, never in the resident agent.
    from keystone.sources.git import GitMirror

    return GitMirror(Path(req.runtime) / "repo")


def _verifier(req: WorkerRequest) -> Any:
    # cryptography is loaded by the verifier: worker only.
    from keystone.trust import CommitVerifier, TrustPolicy

    t = req.trust

    def p(value: str | None) -> Path | None:
        return Path(value) if value else None

    return CommitVerifier(
        TrustPolicy(
            allowed_signers=p(t.allowed_signers),
            gpg_home=p(t.gpg_home),
            revoked_keys=p(t.revoked_keys),
        )
    )


def verify_and_resolve(req: WorkerRequest, mirror: Any, tip: FetchedTip) -> WorkerAnswer:
    """Verify ``tip`` (signature, ancestry, freshness) and resolve this device's plan there."""
    # Plans and recipes parse with tomlkit: loaded only for a tip that is verified.
    from keystone.plan import plan_to_json
    from keystone.sync.resolve import resolve

    rev = tip.revision or ""
    verifier = _verifier(req)
    verdict = verifier.require(mirror.raw_commit(rev), revision=rev)
    anchor = req.applied or mirror.ref(APPLIED_REF)
    if anchor and not mirror.has(anchor):
        anchor = None if req.allow_rollback else anchor
    if anchor and not req.allow_rollback:
        if not mirror.has(anchor):
            raise RollbackRefused(
                f"cannot prove that {rev[:12]} descends from the applied revision {anchor[:12]}, which this "
                "device no longer has; sync once with --allow-rollback to re-anchor"
            )
        if not mirror.is_ancestor(anchor, rev):
            raise RollbackRefused(
                f"revision {rev[:12]} does not descend from the applied revision {anchor[:12]} "
                "(a force-push or an older commit); refused. Use --allow-rollback for one sync to accept it"
            )
    if req.trust.verify == "all":
        base = anchor if anchor and mirror.has(anchor) and mirror.is_ancestor(anchor, rev) else None
        for older in mirror.commits_between(base, rev):
            if older != rev:
                verifier.require(mirror.raw_commit(older), revision=older)
    commit_time = mirror.commit_time(rev)
    max_age = req.trust.max_age
    if max_age > 0 and time.time() - commit_time > max_age:
        age = time.time() - commit_time
        raise StaleRevision(
            f"revision {rev[:12]} was committed {age / 3600:.1f}h ago, older than max_age {max_age / 3600:.1f}h"
        )
    _observe_time(req, commit_time)
    tree = mirror.file_source(rev)
    desired = resolve(
        tree,
        device_id=req.device_id,
        labels=list(req.labels),
        environ=dict(req.environ),
        revision=rev,
    )
    if desired.unknown_fields and req.refuse_unknown:
        raise ValidationError(
            f"revision {rev[:12]} has unknown fields: " + "; ".join(desired.unknown_fields)
        )
    checkout = _export_artifacts(req, tree, rev, desired)
    return WorkerAnswer(
        ok=True,
        tip=tip,
        verified=VerifiedRevision(
            revision=rev,
            signer=verdict.signer,
            fingerprint=verdict.fingerprint,
            signature=verdict.format,
            commit_time=commit_time,
            source=tip.source,
            checkout=str(checkout),
            warnings=tuple(desired.warnings),
        ),
        plan=plan_to_json(desired),
    )


def checked(req: WorkerRequest, mirror: Any, tip: FetchedTip) -> WorkerAnswer:
    """The gate, then verification: a tip applied or failed before is not verified again."""
    skip = gate(req, tip.revision)
    if skip is not None:
        return WorkerAnswer(ok=True, tip=tip, gate=skip)
    try:
        return verify_and_resolve(req, mirror, tip)
    except KeystoneError as exc:
        return WorkerAnswer.failed(_error(exc), tip)


def _observe_time(req: WorkerRequest, when: float) -> None:
    """A verified commit's time is evidence of the current time: advance the trusted clock."""
    # The artifacts module is large; only a verified revision needs its trusted clock.
    from keystone.runtime.artifacts import ArtifactPolicy, observe_trusted_time

    runtime = Path(req.runtime)
    observe_trusted_time(
        ArtifactPolicy.from_env(runtime / "artifacts", os.environ, state_dir=runtime / "state"),
        when,
    )


def _export_artifacts(req: WorkerRequest, tree: Any, tip: str, desired: Any) -> Path:
    """Copy the repo-relative artifact files of the plan out of the verified tree."""
    from keystone.sync.resolve import repo_path  # with resolve (tomlkit), as above

    root = Path(req.runtime) / "checkouts" / tip
    done = root / ".complete"
    if done.exists():
        return root
    root.mkdir(parents=True, exist_ok=True)
    for comp in desired.components.values():
        for art in comp.recipe.artifacts:
            for uri in (art.uri, art.sig_uri, art.cert_uri):
                if not uri or "://" in uri:
                    continue
                rel = repo_path(uri, file=comp.recipe.source, field="artifacts.uri")
                dest = root / rel
                if dest.exists():
                    continue
                dest.parent.mkdir(parents=True, exist_ok=True)
                tree.export(rel, dest)
    done.write_text(tip + "\n")
    return root


def op_fetch(req: WorkerRequest) -> WorkerAnswer:
    """Fetch the git source, then gate and verify its tip."""
    from keystone.sources.git import GitSource  # dulwich

    src = req.source
    if src is None:
        raise ValidationError("no [source] is configured", field="source")
    mirror = _mirror(req)
    result = GitSource(src.url, src.ref or "refs/heads/main", mirror, timeout=src.timeout).fetch()
    tip = FetchedTip(result.revision, result.source, result.bytes_received, result.changed)
    return checked(req, mirror, tip)


def op_verify_rev(req: WorkerRequest) -> WorkerAnswer:
    """Verify and resolve a revision the mirror already has (rollback)."""
    mirror = _mirror(req)
    rev = mirror.resolve(req.rev)
    try:
        return verify_and_resolve(req, mirror, FetchedTip(revision=rev))
    except KeystoneError as exc:
        return WorkerAnswer.failed(_error(exc), FetchedTip(revision=rev))


def _max_bundle_bytes(req: WorkerRequest) -> int:
    """The bundle size bound: the request's, else ``KEYSTONE_MAX_BUNDLE_BYTES`` (4 GiB)."""
    return int(req.max_bytes or max_bundle_bytes())


def op_import_bundle(req: WorkerRequest) -> WorkerAnswer:
    """Add a bundle's objects to the mirror, then gate and verify its tip."""
    from keystone.sources.bundle import import_bundle  # dulwich

    bundle = Path(req.bundle or "")
    limit = _max_bundle_bytes(req)
    try:
        size = bundle.stat().st_size
    except OSError as exc:
        raise BundleError(f"cannot read bundle {bundle}: {exc.strerror or exc}") from exc
    if size > limit:
        # Staged and watched files never passed the API's upload bound: check the whole file.
        raise BundleError(
            f"{bundle}: bundle of {size} bytes is over the limit of {limit} bytes "
            "(KEYSTONE_MAX_BUNDLE_BYTES); nothing was imported"
        )
    mirror = _mirror(req)
    info = import_bundle(bundle, mirror, max_bytes=limit)
    shas = [a.sha256 for a in info.artifacts]
    tip = FetchedTip(
        revision=info.revision,
        source=req.source_label or f"bundle:{bundle.name}",
        bytes=info.size,
        changed=True,
        wire={"bundle_kind": info.kind, "bundle_artifacts": shas},
    )
    answer = checked(req, mirror, tip)
    if answer.verified is not None:
        try:
            _cache_bundle_artifacts(req, bundle, shas)
        except KeystoneError as exc:
            return WorkerAnswer.failed(_error(exc), tip)
    return answer


def _cache_bundle_artifacts(req: WorkerRequest, bundle: Path, shas: list[str]) -> None:
    """Copy a verified revision's bundle artifacts into the cache, all or none.

    Each is hash-checked into a staging directory beside the cache; only when every one matched
    are they renamed into ``artifacts/sha256/`` (so a damaged artifact leaves the cache as it
    was, not half filled).
    """
    from keystone.sources.bundle import extract_bundle_artifact  # dulwich

    root = Path(req.runtime) / "artifacts"
    cache = root / "sha256"
    missing = [sha for sha in shas if not (cache / sha).exists()]
    if not missing:
        return
    cache.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".bundle-import-", dir=root))
    try:
        for sha in missing:
            extract_bundle_artifact(bundle, sha, staging / sha)
        for sha in missing:
            os.chmod(staging / sha, 0o444)  # as the cache keeps its blobs: immutable
            os.replace(staging / sha, cache / sha)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def http_download(req: WorkerRequest) -> tuple[Path | None, dict[str, Any]]:
    """Fetch the bundle URL conditionally; resume a partial download; bound the size.

    Returns (path of a complete new bundle, or None when unchanged (304), wire stats).
    """
    import httpx  # heavy, and only the http source needs it

    src = req.source
    if src is None:
        raise ValidationError("no [source] is configured", field="source")
    url = src.url
    runtime = Path(req.runtime)
    limit = _max_bundle_bytes(req)
    state_path = runtime / "state" / "http-source.json"
    state = read_json(state_path, {}) or {}
    if state.get("url") != url:
        state = {"url": url}
    work = runtime / "bundles" / "http"
    work.mkdir(parents=True, exist_ok=True)
    partial = work / "download.partial"
    # Offsets in Range and the size bound count the bundle's own bytes: no content coding.
    headers: dict[str, str] = {"Accept-Encoding": "identity"}
    have = partial.stat().st_size if partial.exists() and state.get("partial_etag") else 0
    if have:
        headers["Range"] = f"bytes={have}-"
        headers["If-Range"] = state["partial_etag"]
    elif state.get("etag") or state.get("last_modified"):
        if state.get("etag"):
            headers["If-None-Match"] = state["etag"]
        if state.get("last_modified"):
            headers["If-Modified-Since"] = state["last_modified"]
    stats: dict[str, Any] = {"requests": 1, "bytes": 0, "status": None, "resumed_from": have}
    deadline = time.monotonic() + (src.timeout or 120) * 10
    timeout = httpx.Timeout(src.timeout or 60, connect=15.0)
    try:
        with (
            httpx.Client(timeout=timeout, follow_redirects=True) as client,
            client.stream("GET", url, headers=headers) as resp,
        ):
            stats["status"] = resp.status_code
            if resp.status_code == 304:
                return None, stats
            if resp.status_code == 416 and have:
                # The partial file is no prefix of the bundle (it is complete, or the bundle
                # shrank without a new ETag): start again from byte 0 on the next poll.
                partial.unlink(missing_ok=True)
                state.pop("partial_etag", None)
                write_json(state_path, state)
                raise SourceUnreachable(
                    f"bundle URL {url} refused to resume at byte {have} (HTTP 416); the "
                    "download restarts from the beginning on the next poll"
                )
            if resp.status_code not in (200, 206):
                raise SourceUnreachable(f"bundle URL {url} answered HTTP {resp.status_code}")
            append = resp.status_code == 206 and have > 0
            total = have if append else 0
            declared = resp.headers.get("Content-Length")
            if declared and int(declared) + total > limit:
                raise BundleError(
                    f"bundle at {url} is {int(declared) + total} bytes, over the limit of {limit}"
                )
            etag = resp.headers.get("ETag")
            state.update({"partial_etag": etag} if etag else {})
            write_json(state_path, state)
            with partial.open("ab" if append else "wb") as out:
                # Chunks as they arrive (no re-chunking buffer): every byte received before a
                # connection breaks is on disk, so the next poll resumes exactly there.
                for chunk in resp.iter_bytes():
                    total += len(chunk)
                    stats["bytes"] += len(chunk)
                    if total > limit:
                        raise BundleError(
                            f"bundle at {url} is over the limit of {limit} bytes; download stopped"
                        )
                    if time.monotonic() > deadline:
                        raise SourceUnreachable(
                            f"bundle download from {url} took too long; will resume"
                        )
                    out.write(chunk)
            last_modified = resp.headers.get("Last-Modified")
    except BundleError:
        partial.unlink(missing_ok=True)
        state.pop("partial_etag", None)
        write_json(state_path, state)
        raise
    except httpx.HTTPError as exc:
        raise SourceUnreachable(
            f"bundle URL {url} unreachable: {exc}; a partial download resumes next poll"
        ) from exc
    done = work / "current.bundle"
    partial.replace(done)
    state.pop("partial_etag", None)
    state.pop("bundle_revision", None)
    state.update({"etag": etag, "last_modified": last_modified, "fetched_at": time.time()})
    write_json(state_path, state)
    return done, stats


def op_http_fetch(req: WorkerRequest) -> WorkerAnswer:
    """Poll an HTTP bundle source; an unchanged bundle costs one conditional request.

    After a 304 the bundle downloaded before (``bundles/http/current.bundle``) is imported
    again only when its revision is neither applied nor known bad (an import cut short, a
    dry run) or when the operator asks (``sync --retry`` / ``--allow-rollback``); a bundle
    refused as a file (damaged, too large, missing prerequisites) is deleted, so the 304s
    that follow cost nothing.
    """
    url = req.source.url if req.source else ""
    try:
        path, stats = http_download(req)
    except KeystoneError as exc:
        return WorkerAnswer.failed(_error(exc), FetchedTip(source=url))
    wire = {"http": stats}
    state_path = Path(req.runtime) / "state" / "http-source.json"
    state = read_json(state_path, {}) or {}
    if path is None:
        current = Path(req.runtime) / "bundles" / "http" / "current.bundle"
        rev = state.get("bundle_revision")
        unchanged = FetchedTip(revision=rev, source=url, bytes=stats["bytes"], wire=wire)
        if not current.is_file():
            return WorkerAnswer(
                ok=True, tip=replace(unchanged, revision=req.applied), gate=Gate.UP_TO_DATE
            )
        skip = gate(req, rev)
        if skip is not None:
            return WorkerAnswer(ok=True, tip=unchanged, gate=skip)
        path = current  # never verified (an import cut short), or verified but not deployed
    try:
        out = op_import_bundle(replace(req, bundle=str(path), source_label=url))
    except KeystoneError as exc:
        out = WorkerAnswer.failed(_error(exc), FetchedTip(source=url))
    if out.tip.revision:
        state["bundle_revision"] = out.tip.revision
        write_json(state_path, state)
    elif not out.ok:
        path.unlink(missing_ok=True)
    tip = replace(out.tip, bytes=stats["bytes"], wire={**out.tip.wire, **wire})
    return replace(out, tip=tip)


def op_mark_applied(req: WorkerRequest) -> WorkerAnswer:
    """Record the anti-rollback anchor in the mirror (survives loss of the state dir)."""
    mirror = _mirror(req)
    mirror.set_ref(APPLIED_REF, req.rev)
    return WorkerAnswer(ok=True)


OPS: dict[WorkerOp, Callable[[WorkerRequest], WorkerAnswer]] = {
    WorkerOp.FETCH: op_fetch,
    WorkerOp.VERIFY_REV: op_verify_rev,
    WorkerOp.IMPORT_BUNDLE: op_import_bundle,
    WorkerOp.HTTP_FETCH: op_http_fetch,
    WorkerOp.MARK_APPLIED: op_mark_applied,
}


def serve(doc: Any) -> WorkerAnswer:
    """Answer one request document (refusals are answers, not exceptions)."""
    try:
        req = WorkerRequest.from_json(doc)
        return OPS[req.op](req)
    except KeystoneError as exc:
        return WorkerAnswer.failed(_error(exc))
    except Exception as exc:
        traceback.print_exc()
        return WorkerAnswer.failed(ErrorInfo(type(exc).__name__, "bug", str(exc)))


def main() -> int:
    """Read one request, answer it, exit 0 (a crash exits 1 with a traceback on stderr)."""
    try:
        doc = read_request(sys.stdin.buffer)
    except KeystoneError as exc:
        write_answer(WorkerAnswer.failed(_error(exc)).to_json())
        return 0
    write_answer(serve(doc).to_json())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
