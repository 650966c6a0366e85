"""The agent's own look at the source before a sync starts the worker.

A scheduled poll that finds nothing new should cost what ``git fetch`` costs: one request and
almost no CPU. The sync worker (a process that loads dulwich and cryptography before it asks
the server anything) is only needed when there is something to fetch, verify or resolve. So,
before starting it, the agent makes the request the worker would have started with:

* a git remote over smart HTTP: one ``GET info/refs?service=git-upload-pack`` on the agent's
  loop, read with a bounded pkt-line reader (:func:`keystone.sources.transport.advertised_tip`);
* an HTTP bundle URL: the same conditional request the source sends
  (:func:`keystone.sources.http.unchanged_bundle`), answered 304.

When the tip it sees is one the worker's own gate would stop at (the applied revision, or one
that failed before) the answer is written here, exactly as the worker would have written it.
Anything else (a new tip, a forced sync, a proxy, ssh, an error, an answer it cannot judge)
starts the worker as before, which asks the server itself. Nothing from the wire but ref names
and object ids is parsed here: packs, bundles and TOML stay in the worker.
"""

from __future__ import annotations

from pathlib import Path

from keystone.limits import Limits
from keystone.sources.base import redact_url
from keystone.sync.model import FetchedTip, Gate, WorkerAnswer, WorkerOp, WorkerRequest, gate


async def peek_git(req: WorkerRequest) -> WorkerAnswer | None:
    """The worker's answer to a git fetch whose advertised tip its gate stops at, else None."""
    # lazy: the HTTP client and the pkt-line reader are loaded with the first poll
    from keystone.sources.transport import advertised_tip, ref_candidates

    src = req.source
    if src is None or not src.url:
        return None
    if not (Path(req.runtime) / "repo" / "objects").is_dir():
        return None  # no mirror (a fresh or wiped runtime): the worker fetches into a new one
    tip = await advertised_tip(
        src.url,
        ref_candidates(src.ref or "refs/heads/main"),
        timeout=src.timeout,
        max_bytes=Limits.from_env().max_ref_advertisement_bytes,
    )
    if tip is None:
        return None
    stop = gate(req, tip.revision)
    if stop is None:
        return None
    return WorkerAnswer(
        ok=True,
        tip=FetchedTip(revision=tip.revision, source=redact_url(src.url), changed=False),
        gate=stop,
    )


async def peek_http(req: WorkerRequest) -> WorkerAnswer | None:
    """The worker's answer to a bundle URL that answers 304 and needs no import, else None."""
    # lazy: only an HTTP bundle source needs it
    from keystone.sources.http import unchanged_bundle

    src = req.source
    if src is None or not src.url:
        return None
    runtime = Path(req.runtime)
    seen = await unchanged_bundle(
        src.url,
        state_file=runtime / "state" / "http-source.json",
        work_dir=runtime / "bundles" / "http",
        timeout=src.timeout,
    )
    if seen is None:
        return None
    wire = {"http": dict(seen.detail)}
    source = redact_url(src.url)
    if not seen.kept:
        # Nothing kept from before (it was refused as a file): nothing new, nothing to verify.
        tip = FetchedTip(revision=req.applied, source=source, wire=wire)
        return WorkerAnswer(ok=True, tip=tip, gate=Gate.UP_TO_DATE)
    stop = gate(req, seen.revision) if seen.revision else None
    if stop is None:
        return None  # the kept bundle is imported (again) by the worker
    tip = FetchedTip(revision=seen.revision, source=source, wire=wire)
    return WorkerAnswer(ok=True, tip=tip, gate=stop)


async def peek(req: WorkerRequest) -> WorkerAnswer | None:
    """The worker's answer to ``req`` when the source is unchanged and its gate stops; or None.

    Only plain fetches qualify: a forced sync (``--retry``, ``--allow-rollback``) always
    verifies in the worker. The request runs on the agent's loop (asyncio streams, no thread).
    """
    if req.force:
        return None
    if req.op is WorkerOp.FETCH:
        return await peek_git(req)
    if req.op is WorkerOp.HTTP_FETCH:
        return await peek_http(req)
    return None
