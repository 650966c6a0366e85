"""The short-lived sync worker: fetch, verify and resolve in a process of its own.

``python -m keystone.sync.worker`` reads one JSON request on stdin and writes one JSON answer on
stdout. dulwich, cryptography and httpx are imported here and die with the process, so the
resident agent stays small (DESIGN section 12); a crash in a pack or TOML parser cannot take the
supervisor down. Refusals are answers, not crashes: ``{"ok": false, "error": {...}}``.

Operations:
    fetch          fetch the git source, gate and verify the tip, resolve the device plan
    http-fetch     the same through the HTTP bundle source (one conditional request)
    import-bundle  the same through a bundle file (API upload, stick, staging directory)
    verify-rev     verify and resolve a revision the mirror already has (rollback, restart)
    mark-applied   record the anti-rollback anchor in the mirror

Every fetch goes through a :class:`keystone.sources.base.Source`: fetch, gate (applied or
known bad: stop), verify, then copy a bundle's artifacts into the cache.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from keystone.errors import (
    KeystoneError,
    RollbackRefused,
    StaleRevision,
    ValidationError,
)
from keystone.sources.base import FetchResult, Source
from keystone.statefile import leave_in_place
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
    rollout = _rollout(tree, rev)
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
            rollout=rollout,
        ),
        plan=plan_to_json(desired),
    )


def _rollout(tree: Any, rev: str) -> str | None:
    """The revision's ``rollout.toml``, validated here so a bad one refuses the revision."""
    from keystone.rollout import ROLLOUT_FILE, parse_rollout

    data = tree.read(ROLLOUT_FILE)
    if data is None:
        return None
    where = f"{ROLLOUT_FILE}@{rev[:12]}"
    try:
        text: str = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ValidationError("not UTF-8 text", file=where) from None
    parse_rollout(text, file=where)
    return text


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


def _source(req: WorkerRequest) -> Source:
    """The source a fetch request names: the git remote, the bundle URL, or a bundle file."""
    # lazy: each source loads its own readers (a git poll needs no bundle or HTTP code)
    runtime = Path(req.runtime)
    if req.op is WorkerOp.IMPORT_BUNDLE:
        from keystone.sources.file import BundleFileSource

        return BundleFileSource(
            Path(req.bundle or ""),
            lambda: _mirror(req),
            max_bytes=_max_bundle_bytes(req),
            label=req.source_label,
        )
    src = req.source
    if src is None:
        raise ValidationError("no [source] is configured", field="source")
    if req.op is WorkerOp.HTTP_FETCH:
        from keystone.sources.http import HttpBundleSource

        return HttpBundleSource(
            src.url,
            state_file=runtime / "state" / "http-source.json",
            work_dir=runtime / "bundles" / "http",
            mirror=lambda: _mirror(req),
            max_bytes=_max_bundle_bytes(req),
            timeout=src.timeout,
            # A kept bundle whose revision is applied or known bad is not imported again.
            settled=lambda rev: gate(req, rev) is not None,
        )
    from keystone.sources.git import GitSource

    return GitSource(
        src.url,
        src.ref or "refs/heads/main",
        _mirror(req),
        timeout=src.timeout,
        total_timeout=src.deadline,
    )


def _tip(result: FetchResult) -> FetchedTip:
    """What the pipeline is told of a fetch: the revision, where from, and what it cost."""
    wire: dict[str, Any] = {}
    if result.detail:
        wire["http"] = dict(result.detail)
    if result.bundle is not None:
        wire["bundle_kind"] = result.bundle.kind
        wire["bundle_artifacts"] = list(result.bundle.artifacts)
    return FetchedTip(
        revision=result.revision or None,
        source=result.source,
        bytes=result.bytes_received,
        changed=result.changed,
        wire=wire,
    )


def op_fetch(req: WorkerRequest) -> WorkerAnswer:
    """Fetch through the request's source, gate the tip, verify it, cache a bundle's artifacts.

    The one path of every source (DESIGN section 1): a git remote, an HTTP bundle polled with
    one conditional request, a bundle file from the API, a stick or the staging directory.
    """
    source = _source(req)
    try:
        result = source.fetch()
    except KeystoneError as exc:
        failed = FetchedTip(
            source=req.source.url if req.op is WorkerOp.HTTP_FETCH and req.source else ""
        )
        # A bundle downloaded and then refused as a file still reports what it cost.
        detail = getattr(source, "last_detail", None)
        if detail:
            failed = replace(failed, bytes=int(detail.get("bytes") or 0), wire={"http": detail})
        return WorkerAnswer.failed(_error(exc), failed)
    tip = _tip(result)
    if not result.revision_known:
        # An unchanged bundle URL with no bundle kept: nothing new, nothing to verify.
        return WorkerAnswer(ok=True, tip=replace(tip, revision=req.applied), gate=Gate.UP_TO_DATE)
    mirror = _mirror(req)
    answer = checked(req, mirror, tip)
    if answer.verified is not None and result.bundle is not None and result.bundle.artifacts:
        from keystone.sources.bundle import cache_bundle_artifacts

        try:
            cache_bundle_artifacts(
                result.bundle.path,
                list(result.bundle.artifacts),
                artifacts_dir=Path(req.runtime) / "artifacts",
            )
        except KeystoneError as exc:
            return WorkerAnswer.failed(_error(exc), tip)
    if answer.verified is not None and result.bundle is not None and result.bundle.datasets:
        answer = replace(answer, tip=_stage_datasets(req, result.bundle.path, answer.tip))
    if answer.verified is not None and result.bundle is not None and result.bundle.images:
        answer = replace(answer, tip=_stage_images(req, result.bundle.path, answer.tip))
    return answer


def _stage_images(req: WorkerRequest, bundle: Path, tip: FetchedTip) -> FetchedTip:
    """Copy a verified revision's container image archives to ``runtime/bundles/images``.

    The agent loads them into its container engine before the revision's containers are
    prepared (so ``pull_policy = "never"`` finds them). A damaged copy is reported in
    ``bundle_images_error``; the deployment then refuses a component whose image is missing.
    """
    # lazy: the bundle reader, only for a bundle that carries images
    from keystone.sources.bundle import extract_bundle_images

    dest = Path(req.runtime) / "bundles" / "images"
    wire = dict(tip.wire)
    try:
        staged = extract_bundle_images(bundle, dest)
    except KeystoneError as exc:
        wire["bundle_images_error"] = str(exc)
    else:
        if staged is not None:
            wire["bundle_images"] = str(staged)
    return replace(tip, wire=wire)


def _stage_datasets(req: WorkerRequest, bundle: Path, tip: FetchedTip) -> FetchedTip:
    """Copy a verified revision's bundle datasets to ``runtime/bundles/datasets``; name it.

    The agent hands them to its dataset manager once the revision is deployed. A damaged copy
    is reported in ``bundle_datasets_error``: datasets never decide a revision's fate.
    """
    # lazy: the bundle reader, only for a bundle that carries datasets
    from keystone.sources.bundle import extract_bundle_datasets

    dest = Path(req.runtime) / "bundles" / "datasets"
    wire = dict(tip.wire)
    try:
        staged = extract_bundle_datasets(bundle, dest)
    except KeystoneError as exc:
        wire["bundle_datasets_error"] = str(exc)
    else:
        if staged is not None:
            wire["bundle_datasets"] = str(staged)
    return replace(tip, wire=wire)


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


def op_mark_applied(req: WorkerRequest) -> WorkerAnswer:
    """Record the anti-rollback anchor in the mirror (survives loss of the state dir)."""
    mirror = _mirror(req)
    mirror.set_ref(APPLIED_REF, req.rev)
    return WorkerAnswer(ok=True)


OPS: dict[WorkerOp, Callable[[WorkerRequest], WorkerAnswer]] = {
    WorkerOp.FETCH: op_fetch,
    WorkerOp.VERIFY_REV: op_verify_rev,
    WorkerOp.IMPORT_BUNDLE: op_fetch,
    WorkerOp.HTTP_FETCH: op_fetch,
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
    leave_in_place()  # state files are the agent's to set aside
    try:
        doc = read_request(sys.stdin.buffer)
    except KeystoneError as exc:
        write_answer(WorkerAnswer.failed(_error(exc)).to_json())
        return 0
    write_answer(serve(doc).to_json())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
