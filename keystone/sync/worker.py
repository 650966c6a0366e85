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

import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from keystone.errors import KeystoneError, RollbackRefused, StaleRevision, ValidationError

APPLIED_REF = "refs/keystone/applied"


def _error(exc: BaseException) -> dict[str, Any]:
    kind = getattr(exc, "kind", "bug")
    return {"type": type(exc).__name__, "kind": kind, "message": str(exc)}


def _mirror(req: dict[str, Any]) -> Any:
    from keystone.sources.git import GitMirror

    return GitMirror(Path(req["runtime"]) / "repo")


def _verifier(req: dict[str, Any]) -> Any:
    from keystone.trust import CommitVerifier, TrustPolicy

    t = req.get("trust") or {}

    def p(key: str) -> Path | None:
        return Path(t[key]) if t.get(key) else None

    return CommitVerifier(
        TrustPolicy(
            allowed_signers=p("allowed_signers"),
            gpg_home=p("gpg_home"),
            revoked_keys=p("revoked_keys"),
        )
    )


def verify_and_resolve(req: dict[str, Any], mirror: Any, tip: str) -> dict[str, Any]:
    """Verify ``tip`` (signature, ancestry, freshness) and resolve this device's plan there."""
    from keystone.plan import plan_to_json
    from keystone.sync.resolve import resolve

    trust = req.get("trust") or {}
    verifier = _verifier(req)
    verdict = verifier.require(mirror.raw_commit(tip), revision=tip)
    applied = req.get("applied")
    anchor = applied or mirror.ref(APPLIED_REF)
    if anchor and not mirror.has(anchor):
        anchor = None if req.get("allow_rollback") else anchor
    if anchor and not req.get("allow_rollback"):
        if not mirror.has(anchor):
            raise RollbackRefused(
                f"cannot prove that {tip[:12]} descends from the applied revision {anchor[:12]}, which this "
                "device no longer has; sync once with --allow-rollback to re-anchor"
            )
        if not mirror.is_ancestor(anchor, tip):
            raise RollbackRefused(
                f"revision {tip[:12]} does not descend from the applied revision {anchor[:12]} "
                "(a force-push or an older commit); refused. Use --allow-rollback for one sync to accept it"
            )
    if trust.get("verify") == "all":
        base = anchor if anchor and mirror.has(anchor) and mirror.is_ancestor(anchor, tip) else None
        for rev in mirror.commits_between(base, tip):
            if rev != tip:
                verifier.require(mirror.raw_commit(rev), revision=rev)
    commit_time = mirror.commit_time(tip)
    max_age = float(trust.get("max_age") or 0)
    if max_age > 0 and time.time() - commit_time > max_age:
        age = time.time() - commit_time
        raise StaleRevision(
            f"revision {tip[:12]} was committed {age / 3600:.1f}h ago, older than max_age {max_age / 3600:.1f}h"
        )
    _observe_time(req, commit_time)
    device = req.get("device") or {}
    tree = mirror.file_source(tip)
    environ = dict(req.get("environ") or {})
    desired = resolve(
        tree,
        device_id=device.get("id", ""),
        labels=device.get("labels") or [],
        environ=environ,
        revision=tip,
    )
    if desired.unknown_fields and req.get("refuse_unknown", True):
        raise ValidationError(
            f"revision {tip[:12]} has unknown fields: " + "; ".join(desired.unknown_fields)
        )
    checkout = _export_artifacts(req, tree, tip, desired)
    return {
        "ok": True,
        "revision": tip,
        "signer": verdict.signer,
        "fingerprint": verdict.fingerprint,
        "signature": verdict.format,
        "commit_time": commit_time,
        "plan": plan_to_json(desired),
        "checkout": str(checkout),
        "warnings": list(desired.warnings),
    }


def _observe_time(req: dict[str, Any], when: float) -> None:
    """A verified commit's time is evidence of the current time: advance the trusted clock."""
    import os

    from keystone.runtime.artifacts import ArtifactPolicy, observe_trusted_time

    runtime = Path(req["runtime"])
    observe_trusted_time(
        ArtifactPolicy.from_env(runtime / "artifacts", os.environ, state_dir=runtime / "state"),
        when,
    )


def _export_artifacts(req: dict[str, Any], tree: Any, tip: str, desired: Any) -> Path:
    """Copy the repo-relative artifact files of the plan out of the verified tree."""
    from keystone.sync.resolve import repo_path

    root = Path(req["runtime"]) / "checkouts" / tip
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


def op_fetch(req: dict[str, Any]) -> dict[str, Any]:
    from keystone.sources.git import GitSource

    src = req["source"]
    mirror = _mirror(req)
    result = GitSource(
        src["url"],
        src.get("ref") or "refs/heads/main",
        mirror,
        timeout=float(src.get("timeout") or 60),
    ).fetch()
    base = {"source": result.source, "bytes": result.bytes_received, "changed": result.changed}
    tip = result.revision
    if tip == req.get("applied") and not req.get("force"):
        return {"ok": True, "up_to_date": True, "revision": tip, **base}
    if tip in (req.get("known_bad") or {}) and not req.get("force"):
        return {"ok": True, "known_bad": True, "revision": tip, **base}
    try:
        out = verify_and_resolve(req, mirror, tip)
    except KeystoneError as exc:
        return {"ok": False, "revision": tip, "error": _error(exc), **base}
    return {**out, **base}


def op_verify_rev(req: dict[str, Any]) -> dict[str, Any]:
    mirror = _mirror(req)
    tip = mirror.resolve(req["rev"])
    try:
        return verify_and_resolve(req, mirror, tip)
    except KeystoneError as exc:
        return {"ok": False, "revision": tip, "error": _error(exc)}


def _max_bundle_bytes(req: dict[str, Any]) -> int:
    """The bundle size bound: the request's, else ``KEYSTONE_MAX_BUNDLE_BYTES`` (4 GiB)."""
    from keystone.sync.imports import max_bundle_bytes

    return int(req.get("max_bytes") or max_bundle_bytes())


def op_import_bundle(req: dict[str, Any]) -> dict[str, Any]:
    from keystone.errors import BundleError
    from keystone.sources.bundle import import_bundle

    bundle = Path(req["bundle"])
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
    base = {
        "source": req.get("source_label") or f"bundle:{bundle.name}",
        "bytes": info.size,
        "changed": True,
        "bundle_kind": info.kind,
        "bundle_artifacts": [a.sha256 for a in info.artifacts],
    }
    tip = info.revision
    if tip == req.get("applied") and not req.get("force"):
        return {"ok": True, "up_to_date": True, "revision": tip, **base}
    if tip in (req.get("known_bad") or {}) and not req.get("force"):
        return {"ok": True, "known_bad": True, "revision": tip, **base}
    try:
        out = verify_and_resolve(req, mirror, tip)
        _cache_bundle_artifacts(req, bundle, [a.sha256 for a in info.artifacts])
    except KeystoneError as exc:
        return {"ok": False, "revision": tip, "error": _error(exc), **base}
    return {**out, **base}


def _cache_bundle_artifacts(req: dict[str, Any], bundle: Path, shas: list[str]) -> None:
    """Copy a verified revision's bundle artifacts into the cache, all or none.

    Each is hash-checked into a staging directory beside the cache; only when every one matched
    are they renamed into ``artifacts/sha256/`` (so a damaged artifact leaves the cache as it
    was, not half filled).
    """
    import os
    import shutil
    import tempfile

    from keystone.sources.bundle import extract_bundle_artifact

    root = Path(req["runtime"]) / "artifacts"
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


def http_download(req: dict[str, Any]) -> tuple[Path | None, dict[str, Any]]:
    """Fetch the bundle URL conditionally; resume a partial download; bound the size.

    Returns (path of a complete new bundle, or None when unchanged (304), wire stats).
    """
    import httpx

    from keystone.errors import BundleError, SourceUnreachable
    from keystone.state import read_json, write_json

    src = req["source"]
    url = src["url"]
    runtime = Path(req["runtime"])
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
    deadline = time.monotonic() + float(src.get("timeout") or 120) * 10
    timeout = httpx.Timeout(float(src.get("timeout") or 60), connect=15.0)
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


def op_http_fetch(req: dict[str, Any]) -> dict[str, Any]:
    """Poll an HTTP bundle source; an unchanged bundle costs one conditional request.

    After a 304 the bundle downloaded before (``bundles/http/current.bundle``) is imported
    again only when its revision is neither applied nor known bad (an import cut short, a
    dry run) or when the operator asks (``sync --retry`` / ``--allow-rollback``); a bundle
    refused as a file (damaged, too large, missing prerequisites) is deleted, so the 304s
    that follow cost nothing.
    """
    from keystone.state import read_json, write_json

    url = req["source"]["url"]
    try:
        path, stats = http_download(req)
    except KeystoneError as exc:
        return {"ok": False, "error": _error(exc), "source": url}
    wire = {"http": stats, "bytes": stats["bytes"]}
    state_path = Path(req["runtime"]) / "state" / "http-source.json"
    state = read_json(state_path, {}) or {}
    if path is None:
        current = Path(req["runtime"]) / "bundles" / "http" / "current.bundle"
        rev = state.get("bundle_revision")
        unchanged = {"ok": True, "source": url, "changed": False, **wire}
        done = rev is not None and rev == req.get("applied")
        if not current.is_file() or (done and not req.get("force")):
            return {**unchanged, "up_to_date": True, "revision": req.get("applied")}
        if rev in (req.get("known_bad") or {}) and not req.get("force"):
            return {**unchanged, "known_bad": True, "revision": rev}
        path = current  # never verified (an import cut short), or verified but not deployed
    try:
        out = op_import_bundle({**req, "bundle": str(path), "source_label": url})
    except KeystoneError as exc:
        out = {"ok": False, "error": _error(exc), "source": url}
    if out.get("revision"):
        state["bundle_revision"] = out["revision"]
        write_json(state_path, state)
    elif not out.get("ok"):
        path.unlink(missing_ok=True)
    return {**out, **wire}


def op_mark_applied(req: dict[str, Any]) -> dict[str, Any]:
    """Record the anti-rollback anchor in the mirror (survives loss of the state dir)."""
    mirror = _mirror(req)
    mirror.set_ref(APPLIED_REF, req["rev"])
    return {"ok": True}


OPS = {
    "fetch": op_fetch,
    "verify-rev": op_verify_rev,
    "import-bundle": op_import_bundle,
    "http-fetch": op_http_fetch,
    "mark-applied": op_mark_applied,
}


def main() -> int:
    """Read one request, answer it, exit 0 (a crash exits 1 with a traceback on stderr)."""
    req = json.loads(sys.stdin.read())
    try:
        answer = OPS[req["op"]](req)
    except KeystoneError as exc:
        answer = {"ok": False, "error": _error(exc)}
    except Exception as exc:
        traceback.print_exc()
        answer = {
            "ok": False,
            "error": {"type": type(exc).__name__, "kind": "bug", "message": str(exc)},
        }
    sys.stdout.write(json.dumps(answer))
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
